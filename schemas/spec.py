"""The pipeline spec: what a user writes in `pipeline.yaml`, validated before anything runs.

`PipelineSpec` ties the sections together and checks them against each other; the sections live in
`schemas/spec_inputs.py` (model, corpus, cache) and `schemas/spec_stages.py` (evaluate, label), and every
name of theirs is importable from here too.

Validators here check shapes and cross-field consistency only; whether files exist, hookpoints resolve and
each stage fits in memory is checked by the plan before any stage runs (`flows/plan.py::preflight`;
validators never touch the disk, the network or the GPU).
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import Field, ValidationError, model_validator

from featureatlas.schemas.base import Contract, format_validation_error
from featureatlas.schemas.interactions import InteractionsSpec
from featureatlas.schemas.methods import DictionaryConfig
from featureatlas.schemas.spec_inputs import BUILTIN_CORPORA, CacheSpec, CorpusSpec, DType, ModelSpec
from featureatlas.schemas.spec_stages import EvaluateSpec, LabelSpec, LLMLabelSpec

__all__ = [
    "BUILTIN_CORPORA",
    "CacheSpec",
    "CorpusSpec",
    "DType",
    "EvaluateSpec",
    "InteractionsSpec",
    "LLMLabelSpec",
    "LabelSpec",
    "ModelSpec",
    "PipelineSpec",
    "SpecError",
    "load_spec",
    "parse_spec",
]


class PipelineSpec(Contract):
    """A whole pipeline: one model, one corpus, hookpoints, and the dictionaries to learn on them.

    A spec may also hold only an `interactions` section (no model, hookpoints or dictionaries).
    """

    name: str = Field("pipeline", description="Name of the pipeline; the MLflow experiment's run name.")
    model: ModelSpec | None = Field(
        None,
        description="The language model; leave out (with hookpoints and dictionaries) to only score "
        "interactions.",
    )
    corpus: CorpusSpec = Field(default_factory=CorpusSpec)
    hookpoints: list[str] = Field(
        default_factory=list,
        description="Module names, e.g. 'model.layers.6', or aliases resid_post.L, mlp_out.L, mlp_hidden.L, "
        "attn_out.L, attn_z.L.",
    )
    cache: CacheSpec = Field(default_factory=CacheSpec)
    dictionaries: list[DictionaryConfig] = Field(
        default_factory=list, description="Dictionaries to learn; a list of several is a sweep."
    )
    evaluate: EvaluateSpec = Field(default_factory=EvaluateSpec)
    label: LabelSpec = Field(default_factory=LabelSpec)
    interactions: InteractionsSpec = Field(
        default_factory=InteractionsSpec, description="Rashomon-set interaction scoring (off by default)."
    )

    @model_validator(mode="before")
    @classmethod
    def _cache_dtype(cls, data: object) -> object:
        """`cache.dtype: auto` becomes the model's dtype, so the cache's fingerprint names the real one."""
        if not isinstance(data, dict) or data.get("model") is None:
            return data
        model, cache = data["model"], data.get("cache") or {}
        dtype = model.get("dtype", "float32") if isinstance(model, dict) else getattr(model, "dtype", None)
        if isinstance(cache, dict) and cache.get("dtype", "auto") == "auto" and dtype:
            data = {**data, "cache": {**cache, "dtype": dtype}}
        elif isinstance(cache, CacheSpec) and cache.dtype == "auto" and dtype:
            data = {**data, "cache": cache.model_copy(update={"dtype": dtype})}
        return data

    @model_validator(mode="after")
    def _parts(self) -> PipelineSpec:
        inter = self.interactions
        if self.model is None:
            if self.hookpoints or self.dictionaries:
                raise ValueError(
                    "`hookpoints`/`dictionaries` are given but no `model` to read activations from; add "
                    "`model: {path: ...}`, or drop them for a spec that only scores interactions"
                )
            if not inter.enabled:
                raise ValueError(
                    "nothing to run: the spec has no `model` (with `hookpoints` and `dictionaries`) and "
                    "interactions are not enabled; add them, or set `interactions: {enabled: true, ...}`"
                )
            if inter.source == "dictionary" and not isinstance(inter.dictionary, str):
                raise ValueError(
                    "interactions.dictionary: a spec without a model trains no dictionary, so name one from "
                    "the catalog by id (e.g. 'dict-0123abcd4567'; see `featureatlas catalog list`)"
                )
            return self
        for key in ("hookpoints", "dictionaries"):
            if not getattr(self, key):
                raise ValueError(f"{key}: a spec with a `model` needs at least one; list them")
        if inter.enabled and inter.source == "dictionary" and not isinstance(inter.dictionary, str):
            n = len(self.dictionary_jobs())
            if inter.dictionary is None and n != 1:
                raise ValueError(
                    f"interactions.dictionary: this spec trains {n} dictionaries; give the index (0 to "
                    f"{n - 1}) of the one to probe, in the order of `dictionaries` times `hookpoints`"
                )
            if inter.dictionary is not None and not 0 <= inter.dictionary < n:
                raise ValueError(
                    f"interactions.dictionary: index {inter.dictionary} is out of range; this spec trains "
                    f"{n} dictionaries (0 to {n - 1})"
                )
        return self

    @model_validator(mode="after")
    def _dictionary_hookpoints(self) -> PipelineSpec:
        if self.model is None:
            return self
        if self.model.kind == "encoder" and self.evaluate.enabled:
            raise ValueError(
                "evaluate: the CE-loss score needs next-token predictions, which an encoder model does not "
                "make; set `evaluate: {enabled: false}` or use a causal LM"
            )
        if len(set(self.hookpoints)) != len(self.hookpoints):
            raise ValueError("hookpoints: a hookpoint is listed twice; list each once")
        for i, d in enumerate(self.dictionaries):
            if d.hookpoint is not None and d.hookpoint not in self.hookpoints:
                raise ValueError(
                    f"dictionaries.{i}.hookpoint {d.hookpoint!r} is not among the cached hookpoints "
                    f"{self.hookpoints}; add it to `hookpoints` or fix the name"
                )
            if d.target_hookpoint is not None and d.target_hookpoint not in self.hookpoints:
                raise ValueError(
                    f"dictionaries.{i}.target_hookpoint {d.target_hookpoint!r} is not among the cached "
                    f"hookpoints {self.hookpoints}; a transcoder needs both sites cached; add it there"
                )
        return self

    def dictionary_jobs(self) -> list[tuple[str, DictionaryConfig]]:
        """(hookpoint, config) pairs: a config without a hookpoint is trained on every hookpoint."""
        return [
            (hp, d) for d in self.dictionaries for hp in ([d.hookpoint] if d.hookpoint else self.hookpoints)
        ]


class SpecError(ValueError):
    """A spec file that cannot be read or validated; the message lists every problem by key path."""


def load_spec(path: str | Path) -> PipelineSpec:
    """Read and validate a YAML spec. Relative corpus paths are made relative to the spec's folder."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"spec file {str(path)!r} not found") from None
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a mapping of keys (model, corpus, hookpoints, ...) at the top")
    corpus = raw.get("corpus")
    if isinstance(corpus, dict) and isinstance(corpus.get("sources"), list):
        corpus["sources"] = [
            s
            if not isinstance(s, str) or s.startswith("builtin:") or Path(s).is_absolute()
            else str((path.parent / s).resolve())
            for s in corpus["sources"]
        ]
    inter = raw.get("interactions")
    if isinstance(inter, dict) and isinstance(inter.get("table"), str):
        table = inter["table"]
        if not table.startswith("sklearn:") and not Path(table).is_absolute():
            inter["table"] = str((path.parent / table).resolve())
    return parse_spec(raw, origin=str(path))


def parse_spec(raw: dict, origin: str = "<spec>") -> PipelineSpec:
    try:
        return PipelineSpec.model_validate(raw)
    except ValidationError as e:
        raise SpecError(f"{origin} is not a valid pipeline spec:\n{format_validation_error(e)}") from None
