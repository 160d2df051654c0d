"""Memory a pipeline's stages need, estimated from the spec and the model's config before anything runs.

Each estimate adds what a stage holds at its peak on its device: the language model's parameters (loaded
once per process and kept), a dictionary's parameters with their gradients and the two Adam moments (four
copies in float32), and the intermediates of one batch (pre-activations, codes and their gradients; logits
over the vocabulary for the CE-loss score; shards in flight while caching). They are upper-bound sketches,
meant to catch the spec that cannot fit by orders of magnitude (a `d_sae` of 10**12) before the model is
loaded, not to predict the peak to the byte; the plan prints them so a user sees what dominates.
"""

from __future__ import annotations

from typing import NamedTuple

from featureatlas.schemas.methods import DictionaryConfig
from featureatlas.schemas.spec import PipelineSpec
from featureatlas.tasks.common.preflight import ModelFacts, PreflightError

F32 = 4
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
ADAM_COPIES = 4  # weights, gradients, first and second moments


class StageMemory(NamedTuple):
    key: tuple  # ("register_model",), ("cache_activations",), ("train", hookpoint, cfgs), ("evaluate", ...)
    stage: str
    device: str
    bytes: int
    parts: dict[str, int]  # what the estimate is made of
    lower: str  # what to lower when it does not fit


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def resolve_device_name(device: str) -> str:
    """'auto' as the stages resolve it (CUDA when present); 'cuda' as its first device."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda:0" if device == "cuda" else device


def available_bytes(device: str) -> int:
    """Free memory on `device` now: free GPU memory, or the system's available RAM."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise PreflightError(f"device {device!r} asked for, but CUDA is not available; use auto or cpu")
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    import psutil

    return int(psutil.virtual_memory().available)


def dictionary_params(cfg: DictionaryConfig, d_in: int) -> int:
    """Encoder and decoder matrices with their biases (every method's bulk)."""
    return 2 * d_in * cfg.d_sae + cfg.d_sae + d_in


def _training(
    hookpoint: str, cfgs: list[DictionaryConfig], d_in: int, model: int, device: str
) -> StageMemory:
    weights = sum(dictionary_params(c, d_in) * F32 * ADAM_COPIES for c in cfgs)
    # pre-activations, codes and both gradients per row, plus the input batch and its reconstruction
    batch = sum(c.batch_size * (4 * c.d_sae + 4 * d_in) * F32 for c in cfgs)
    methods = ", ".join(f"{c.method} d_sae={c.d_sae}" for c in cfgs)
    parts = {"dictionaries": weights, "batch": batch, "model": model}
    name = f"train_dictionary[{methods}, {hookpoint}]"
    return StageMemory(
        ("train", hookpoint, tuple(cfgs)),
        name,
        device,
        sum(parts.values()),
        parts,
        "lower d_sae or batch_size",
    )


def estimate(
    spec: PipelineSpec, facts: ModelFacts, groups: list[tuple[str, list[DictionaryConfig]]]
) -> list[StageMemory]:
    """Peak memory of each stage of `spec`; `groups` are the sweep groups trained together."""
    assert spec.model is not None
    model_dev = resolve_device_name(spec.model.device)
    model = facts.n_params * DTYPE_BYTES[spec.model.dtype]
    corpus, cache = spec.corpus, spec.cache
    L, vocab, d = corpus.context_length, facts.vocab_size, facts.d_model
    forward = cache.batch_size * L * d * 16 * F32  # hidden states, MLP and attention intermediates
    shards = sum(3 * cache.shard_tokens * w * DTYPE_BYTES[cache.dtype] for w in facts.widths.values())
    out = [
        StageMemory(
            ("register_model",),
            "register_model",
            model_dev,
            model,
            {"model": model},
            "use a smaller model or dtype bfloat16",
        ),
        StageMemory(
            ("cache_activations",),
            "cache_activations",
            model_dev,
            model + forward + shards,
            {"model": model, "forward": forward, "shards": shards},
            "lower cache.batch_size or cache.shard_tokens",
        ),
    ]
    for hookpoint, cfgs in groups:
        device = resolve_device_name(cfgs[0].device)
        resident = model if device == model_dev else 0
        out.append(_training(hookpoint, cfgs, facts.widths[hookpoint], resident, device))
    for hookpoint, cfgs in groups:
        d_in = facts.widths[hookpoint]
        for c in cfgs:
            weights = dictionary_params(c, d_in) * F32
            if spec.evaluate.enabled:
                ev = spec.evaluate
                # clean, spliced and ablated logits of one batch, and the codes of its tokens
                logits = 3 * ev.batch_size * L * (vocab + c.d_sae) * F32
                parts = {"model": model, "dictionary": weights, "batch": logits}
                out.append(
                    StageMemory(
                        ("evaluate", hookpoint, c),
                        f"evaluate_dictionary[{c.method} d_sae={c.d_sae}, {hookpoint}]",
                        model_dev,
                        sum(parts.values()),
                        parts,
                        "lower d_sae or evaluate.batch_size",
                    )
                )
            if spec.label.enabled:
                # per-latent statistics (histograms, top contexts, examples) and the logit-effect chunk
                stats = c.d_sae * (64 + spec.label.top_k * (2 * spec.label.window + 1)) * F32
                parts = {"model": model, "dictionary": weights, "statistics": stats}
                out.append(
                    StageMemory(
                        ("label", hookpoint, c),
                        f"label_features[{c.method} d_sae={c.d_sae}, {hookpoint}]",
                        model_dev,
                        sum(parts.values()),
                        parts,
                        "lower d_sae or label.top_k",
                    )
                )
    return out


def device_present(device: str) -> bool:
    """Whether `device` exists on this machine (a CUDA device needs CUDA; the CPU always exists)."""
    if not device.startswith("cuda"):
        return True
    import torch

    return torch.cuda.is_available()


def check_fits(estimates: list[StageMemory], available=available_bytes, *, skip_absent: bool = False) -> None:
    """Refuse the first stage whose estimate exceeds the free memory of its device, saying what to lower.

    `skip_absent` (planning): a stage on a device this machine lacks (a GPU spec planned on a laptop) is
    left unchecked instead of refused; running it here is still refused, by `available`.
    """
    free: dict[str, int] = {}
    for e in estimates:
        if skip_absent and not device_present(e.device):
            continue
        if e.device not in free:
            free[e.device] = available(e.device)
        if e.bytes > free[e.device]:
            big = max(e.parts, key=e.parts.get)
            raise PreflightError(
                f"{e.stage} needs about {human(e.bytes)} on {e.device} ({big}: {human(e.parts[big])}), but "
                f"{human(free[e.device])} is free; {e.lower}"
            )
