"""Checks a spec against the machine before any stage runs: local paths, the model's config, hookpoints.

A spec validates without touching the disk (validators never do); these checks do, so that a missing corpus
file, a model folder that is not there, a config `transformers` cannot read or a hookpoint the model does not
have fail the plan in a second, not after the model was loaded and the corpus read. The model is built on
PyTorch's `meta` device from its config alone: module names, parameter counts and layer widths come for free,
no weight is read.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

from featureatlas.schemas.spec import BUILTIN_CORPORA, CorpusSpec, ModelSpec, PipelineSpec


class PreflightError(ValueError):
    """The spec cannot run on this machine; the message says what to change."""


class ModelFacts(NamedTuple):
    """What the plan needs to know about a model, read from its config (no weights loaded)."""

    architecture: str
    n_params: int
    d_model: int
    vocab_size: int
    widths: dict[str, int]  # hookpoint -> width of its activation rows (d_in of a dictionary trained there)


def check_corpus_paths(spec: CorpusSpec) -> None:
    """Every local corpus source exists (files and folders; built-in corpora need nothing)."""
    for source in spec.sources:
        if source in BUILTIN_CORPORA:
            continue
        path = Path(source).expanduser()
        if not path.exists():
            raise PreflightError(f"corpus file {source!r} does not exist; fix `corpus.sources` in the spec")
        if path.is_dir() and not any(path.iterdir()):
            raise PreflightError(f"corpus folder {source!r} is empty; add files or fix `corpus.sources`")


def _looks_local(path: str) -> bool:
    """A path the user meant as a folder on this machine (a hub id is `owner/name`, never absolute)."""
    return Path(path).is_absolute() or path.startswith(("./", "../", "~", "."))


def check_model_path(spec: ModelSpec) -> None:
    """A local model folder exists (checked before the hub fallback, which would only confuse the message)."""
    if spec.path.startswith("package:"):
        return
    if _looks_local(spec.path) and not Path(spec.path).expanduser().exists():
        raise PreflightError(
            f"model path {spec.path!r} does not exist; give an existing local folder (with config.json and "
            "weights) or 'package:<name>'"
        )


def _width(site, cfg) -> int:
    """Width of the rows cached at `site`: a linear layer's in/out features, else the model's hidden size."""
    module = site.module
    weight = getattr(module, "weight", None)
    if hasattr(module, "in_features"):  # torch.nn.Linear: weight [out, in]
        return int(module.in_features if site.read == "input" else module.out_features)
    if type(module).__name__ == "Conv1D" and weight is not None:  # GPT-2's projection: weight [in, out]
        return int(weight.shape[0] if site.read == "input" else weight.shape[1])
    return int(getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 0))


def model_facts(spec: ModelSpec, source: str, hookpoints: list[str]) -> ModelFacts:
    """Read the config from `source`, build the model on the meta device and resolve every hookpoint.

    Remembered per process: `featureatlas run` checks before starting Prefect and the flow checks again, and
    reading a GGUF file's header alone takes seconds.
    """
    return _model_facts(spec, source, tuple(hookpoints))


@lru_cache(maxsize=8)
def _model_facts(spec: ModelSpec, source: str, hookpoints: tuple[str, ...]) -> ModelFacts:
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from featureatlas.tasks.common.hookpoints import resolve_site

    kwargs = {"gguf_file": spec.gguf_file} if spec.gguf_file else {}
    try:
        cfg = AutoConfig.from_pretrained(source, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PreflightError(
            f"model {spec.path!r}: transformers cannot read its config ({first}); the folder needs a "
            "config.json (or give `gguf_file`)"
        ) from None
    auto = AutoModel if spec.kind == "encoder" else AutoModelForCausalLM
    try:
        with torch.device("meta"):
            model = auto.from_config(cfg)
    except (ValueError, KeyError) as e:
        raise PreflightError(
            f"model {spec.path!r}: cannot build {cfg.model_type!r} from its config: {e}"
        ) from None
    widths = {}
    for name in hookpoints:
        try:
            widths[name] = _width(resolve_site(model, name), cfg)
        except ValueError as e:
            raise PreflightError(f"hookpoints: {e}") from None
    return ModelFacts(
        architecture=type(model).__name__,
        n_params=sum(p.numel() for p in model.parameters()),
        d_model=int(getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 0)),
        vocab_size=int(getattr(cfg, "vocab_size", 0) or 0),
        widths=widths,
    )


def check_heldout(spec: PipelineSpec) -> None:
    """Evaluation reads held-out tokens only: the held-out share of the budget must hold a context."""
    if spec.model is None or not spec.evaluate.enabled:
        return
    corpus = spec.corpus
    if corpus.heldout_fraction == 0:
        raise PreflightError(
            "corpus.heldout_fraction is 0, so evaluation would have no held-out tokens; raise it (e.g. 0.1) "
            "or set `evaluate: {enabled: false}`"
        )
    share = round(corpus.max_tokens * corpus.heldout_fraction)
    needed = 1 if corpus.pack else corpus.min_context_tokens
    if share < needed:
        raise PreflightError(
            f"the held-out share of the token budget is {share} tokens (corpus.max_tokens "
            f"{corpus.max_tokens} x heldout_fraction {corpus.heldout_fraction}), less than one context of "
            f"{needed}; raise corpus.max_tokens or corpus.heldout_fraction"
        )


def check_paths(spec: PipelineSpec) -> None:
    """The checks that need no model: corpus files, the held-out budget and the model folder."""
    check_corpus_paths(spec.corpus)
    check_heldout(spec)
    if spec.model is not None:
        check_model_path(spec.model)
