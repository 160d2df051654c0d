"""Artifact identity: fingerprint = sha256 of (stage, stage code version, config, input fingerprints).

The same formulas serve the pipeline (to decide reuse) and `featureatlas run --plan` (to show it), so the
plan never disagrees with the run. Bump a stage's version when its output changes for the same inputs.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import NamedTuple

from pydantic import BaseModel

from featureatlas.schemas.catalog import ID_PREFIX
from featureatlas.schemas.methods import DictionaryConfig
from featureatlas.schemas.spec import (
    CacheSpec,
    CorpusSpec,
    EvaluateSpec,
    InteractionsSpec,
    LabelSpec,
    ModelSpec,
)
from featureatlas.tasks.common.shards import sha256_file

STAGE_VERSIONS = {
    "model": 1,
    "corpus": 2,  # 2: document order no longer puts every held-out document first
    "activation_cache": 3,  # 2: is_special column, special tokens excluded, layout and rms in the manifest;
    # 3: each split takes its share of the token budget
    "dictionary": 1,
    "evaluation": 3,  # 2: details (mean ablation, KL, ablation, steering, geometry); 3: atomic geometry
    "labeling": 2,  # 2: feature statistics, statistical labels, scores, atlas
    "interactions": 3,  # 2: pair cap, retraining class, probes on dictionary latents; 3: interior sample,
    # fis_se and the null band in scores.parquet, latents chosen on training rows
}


class Identity(NamedTuple):
    kind: str
    id: str
    fingerprint: str


def _canonical(config: BaseModel | dict | list | str) -> object:
    if isinstance(config, BaseModel):
        return config.model_dump(mode="json")
    return config


def ref_identity(ref: BaseModel) -> Identity:
    """The identity of an artifact already made (its reference carries kind, id and fingerprint)."""
    return Identity(ref.kind, ref.id, ref.fingerprint)


def identity(kind: str, config: object, inputs: list[str]) -> Identity:
    payload = json.dumps(
        {"stage": kind, "version": STAGE_VERSIONS[kind], "config": _canonical(config), "inputs": inputs},
        sort_keys=True,
    )
    fp = hashlib.sha256(payload.encode()).hexdigest()
    return Identity(kind, f"{ID_PREFIX[kind]}-{fp[:12]}", fp)


_file_hashes: dict[tuple[str, int, float], str] = {}


def file_digest(path: Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime) within a process."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime)
    if key not in _file_hashes:
        _file_hashes[key] = sha256_file(path)
    return _file_hashes[key]


def _source_digest(path: Path) -> str:
    """A local corpus file's sha256, or for a saved `datasets` folder the sha256 of its files' digests."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        listing = json.dumps([[str(p.relative_to(path)), file_digest(p)] for p in files])
        return hashlib.sha256(listing.encode()).hexdigest()
    return file_digest(path) if path.exists() else "missing"


def model_identity(spec: ModelSpec, files: list[Path], source: str) -> Identity:
    # content, not location: the same weights found at another path are the same model
    content = [[p.name, file_digest(p)] for p in files] if files else [source, spec.revision]
    config = {"gguf_file": spec.gguf_file, "dtype": spec.dtype, "content": content}
    if spec.kind != "causal_lm":
        config["kind"] = spec.kind  # only when set: causal LMs keep the ids they had before `kind` existed
    return identity("model", config, [])


def corpus_identity(spec: CorpusSpec) -> Identity:
    content = []
    for s in spec.sources:
        if s.startswith("builtin:"):
            # the built-in text is whatever this Python ships
            content.append([s, sys.version.split()[0]])
        else:
            content.append([Path(s).name, _source_digest(Path(s))])
    return identity("corpus", {"spec": _canonical(spec), "content": content}, [])


# Cache fields that do not change the cache's bytes: `parts` only splits the same forward passes into jobs
# (a test holds the files of parts=3 equal to those of parts=1), so caches made either way are one artifact.
_CACHE_NEUTRAL = {"parts"}


def _cache_config(spec: CacheSpec) -> dict:
    config = spec.model_dump(mode="json", exclude=_CACHE_NEUTRAL)
    if config.get("store", True):
        del config["store"]  # added later: stored caches keep the fingerprints they had
    return config


def cache_identity(model: Identity, corpus: Identity, hookpoints: list[str], spec: CacheSpec) -> Identity:
    return identity(
        "activation_cache",
        {"hookpoints": hookpoints, "cache": _cache_config(spec)},
        [model.fingerprint, corpus.fingerprint],
    )


# Trainer fields that do not change the trained dictionary (a resumed run equals an uninterrupted one).
_RESULT_NEUTRAL = ("checkpoint_every",)
# Trainer fields added after dictionaries were first fingerprinted: left out at their defaults, so the
# dictionaries already in a catalog keep their fingerprints (and are reused, not retrained).
_LATER_DEFAULTS = {"autocast": "none", "compile": False}


def dictionary_identity(cache: Identity, hookpoint: str, cfg: DictionaryConfig) -> Identity:
    # the hookpoint field of a sweep entry may be unset; the resolved hookpoint is what counts
    config = _canonical(cfg) | {"hookpoint": hookpoint}
    for key in _RESULT_NEUTRAL:
        config.pop(key, None)
    for key, default in _LATER_DEFAULTS.items():
        if config.get(key) == default:
            config.pop(key)
    return identity("dictionary", config, [cache.fingerprint])


def evaluation_identity(dictionary: Identity, cache: Identity, spec: EvaluateSpec) -> Identity:
    return identity("evaluation", spec, [dictionary.fingerprint, cache.fingerprint])


def labeling_identity(dictionary: Identity, cache: Identity, spec: LabelSpec) -> Identity:
    return identity("labeling", spec, [dictionary.fingerprint, cache.fingerprint])


def interactions_identity(spec: InteractionsSpec, inputs: list[Identity] | None = None) -> Identity:
    # a file table is identified by its content; an sklearn dataset by the scikit-learn version shipping it;
    # a probe on dictionary latents by its inputs (the dictionary and its cache)
    table = spec.table or ""
    if spec.source == "dictionary":
        content = []
    elif table.startswith("sklearn:"):
        from importlib.metadata import version

        content = [table, version("scikit-learn")]
    else:
        content = [Path(table).name, file_digest(Path(table)) if Path(table).exists() else "missing"]
    fingerprints = [i.fingerprint for i in inputs or []]
    return identity("interactions", {"spec": _canonical(spec), "content": content}, fingerprints)
