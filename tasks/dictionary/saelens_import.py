"""SAELens interop, import: read a SAELens SAE folder (v5 or v6 cfg.json + sae_weights.safetensors) as a
featureatlas dictionary computing the same codes. The format, and how scales are folded and undone, is
described in `tasks.dictionary.saelens`, which also holds the export and re-exports `import_saelens`.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file
from torch import Tensor

from featureatlas.tasks.dictionary.base import Dictionary
from featureatlas.tasks.dictionary.registry import METHODS

logger = logging.getLogger(__name__)

# The two files of a SAELens SAE folder.
SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"

class SAELensCfg(NamedTuple):
    """What import needs from a cfg.json of either layout."""

    architecture: str  # standard, topk, jumprelu, gated
    d_in: int
    d_sae: int
    k: int | None
    hook_name: str | None
    apply_b_dec_to_input: bool
    # SAELens TopK: pre-activations times each latent's decoder-row norm before the top-k, codes divided by
    # it before W_dec (`TopKSAE.encode` / `act_times_W_dec`); False in files that predate the flag.
    rescale_acts_by_decoder_norm: bool


def _is_v6(raw: dict[str, Any]) -> bool:
    version = raw.get("sae_lens_version") or (raw.get("metadata") or {}).get("sae_lens_version")
    if not version:
        return False
    major = re.match(r"\d+", str(version))
    return major is not None and int(major.group()) >= 6


def parse_cfg(raw: dict[str, Any], where: Path) -> SAELensCfg:
    """Read the fields import needs from a v5 or v6 cfg.json, refusing what we cannot reproduce."""
    for key in ("d_in", "d_sae"):
        if key not in raw:
            raise ValueError(f"{where} lacks {key!r}; is it a SAELens cfg.json?")
    norm = raw.get("normalize_activations", "none")
    if norm not in ("none", None, False):
        raise ValueError(
            f"{where}: normalize_activations={norm!r} is not supported; fold the scaling into the weights in "
            "SAELens (fold_activation_norm_scaling_factor) and save again"
        )
    if raw.get("reshape_activations", "none") not in ("none", None):
        raise ValueError(
            f"{where}: reshape_activations={raw['reshape_activations']!r} (hook_z) is not supported"
        )
    arch = raw.get("architecture", "standard")
    if _is_v6(raw):
        k, hook_name = raw.get("k"), (raw.get("metadata") or {}).get("hook_name")
    else:
        activation = raw.get("activation_fn_str", raw.get("activation_fn", "relu"))
        k = (raw.get("activation_fn_kwargs") or {}).get("k")
        hook_name = raw.get("hook_name", raw.get("hook_point"))
        if arch == "standard" and activation == "topk":
            arch = "topk"
        elif activation != "relu":
            raise ValueError(
                f"{where}: v5 activation_fn_str {activation!r} is not supported; supported: relu, topk"
            )
    rescale = bool(raw.get("rescale_acts_by_decoder_norm", False))
    if rescale and arch != "topk":
        raise ValueError(
            f"{where}: rescale_acts_by_decoder_norm is set on a {arch!r} SAE; SAELens defines it for "
            "topk only, so the codes it means are unknown here. Fold the decoder norms in SAELens "
            "(fold_W_dec_norm) and save again"
        )
    if arch == "topk" and k is None:
        raise ValueError(
            f"{where}: a topk SAE needs 'k' (v6) or activation_fn_kwargs.k (v5); add it to the file"
        )
    return SAELensCfg(
        architecture=arch,
        d_in=int(raw["d_in"]),
        d_sae=int(raw["d_sae"]),
        k=None if k is None else int(k),
        hook_name=hook_name,
        apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
        rescale_acts_by_decoder_norm=rescale,
    )


def _unit_rows(W_dec: Tensor) -> bool:
    return bool(torch.allclose(W_dec.norm(dim=-1), torch.ones(W_dec.shape[0]), atol=1e-4))


@torch.no_grad()
def _fold_decoder_norms(tensors: dict[str, Tensor], pre_act_keys: tuple[str, ...]) -> None:
    """SAELens' fold_W_dec_norm: unit decoder rows, the norms moved into the encoder side.

    Reconstructions are unchanged; each latent's codes grow by its row norm. Our JumpReLU and gated SAEs keep
    unit-norm rows, so their `decoder_directions` and evaluation stay right.
    """
    norms = tensors["W_dec"].norm(dim=-1).clamp_min(1e-12)
    tensors["W_dec"] = tensors["W_dec"] / norms[:, None]
    tensors["W_enc"] = tensors["W_enc"] * norms
    for key in pre_act_keys:
        tensors[key] = tensors[key] * norms


def _build(method: str, cfg: SAELensCfg, tensors: dict[str, Tensor], **fields: Any) -> Dictionary:
    config = METHODS[method].config_cls(d_sae=cfg.d_sae, hookpoint=cfg.hook_name, device="cpu", **fields)
    model = METHODS[method](config, cfg.d_in)
    model.load_state_dict(tensors, strict=True)
    return model


def _import_standard(cfg: SAELensCfg, t: dict[str, Tensor]) -> Dictionary:
    # SAELens' standard decoders are often unconstrained: the scaled-L1 variant is ours with free rows, so
    # decoder_directions normalises them and the codes stay exactly SAELens'.
    return _build(
        "relu", cfg, _take(t, "W_enc", "b_enc", "W_dec", "b_dec"), scaled_l1=not _unit_rows(t["W_dec"])
    )


def _import_topk(cfg: SAELensCfg, t: dict[str, Tensor]) -> Dictionary:
    return _build("topk", cfg, _take(t, "W_enc", "b_enc", "W_dec", "b_dec"), k=cfg.k, auxk_coef=0.0)


def _import_jumprelu(cfg: SAELensCfg, t: dict[str, Tensor]) -> Dictionary:
    t = _take(t, "W_enc", "b_enc", "W_dec", "b_dec", "threshold")
    # relu(pre) * 1[pre > theta] equals ours, pre * 1[pre > theta], once theta >= 0.
    t["threshold"] = t["threshold"].clamp_min(0)
    if not _unit_rows(t["W_dec"]):
        _fold_decoder_norms(t, ("b_enc", "threshold"))
    return _build("jumprelu", cfg, t)


def _import_gated(cfg: SAELensCfg, t: dict[str, Tensor]) -> Dictionary:
    t = _take(t, "W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec")
    if not _unit_rows(t["W_dec"]):
        # Both paths share W_enc, which takes the norms; r_mag stays (scaling it, as SAELens' own fold does,
        # would change the magnitudes by exp((n - 1) r_mag) instead of n).
        _fold_decoder_norms(t, ("b_gate", "b_mag"))
    ours = {"W_enc": t["W_enc"], "b_enc": t["b_gate"], "r_mag": t["r_mag"], "b_mag": t["b_mag"]}
    return _build("gated", cfg, {**ours, "W_dec": t["W_dec"], "b_dec": t["b_dec"]})


def _take(tensors: dict[str, Tensor], *names: str) -> dict[str, Tensor]:
    return {name: tensors[name] for name in names}


# SAELens architecture -> (tensors it must hold, builder of the featureatlas dictionary computing the same).
IMPORTERS: dict[str, tuple[tuple[str, ...], Callable[[SAELensCfg, dict[str, Tensor]], Dictionary]]] = {
    "standard": (("W_enc", "b_enc", "W_dec", "b_dec"), _import_standard),
    "topk": (("W_enc", "b_enc", "W_dec", "b_dec"), _import_topk),
    "jumprelu": (("W_enc", "b_enc", "W_dec", "b_dec", "threshold"), _import_jumprelu),
    "gated": (("W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec"), _import_gated),
}


def _center_inputs(cfg: SAELensCfg, t: dict[str, Tensor]) -> None:
    """Ours always subtracts b_dec before encoding: x W + b = (x - b_dec) W + (b + b_dec W)."""
    shift = t["b_dec"] @ t["W_enc"]
    if cfg.architecture == "gated":
        t["b_gate"] = t["b_gate"] + shift
        t["b_mag"] = t["b_mag"] + shift * t["r_mag"].exp()
    else:
        t["b_enc"] = t["b_enc"] + shift


def import_saelens(folder: str | Path) -> Dictionary:
    """Load a SAELens SAE folder (v5 or v6 cfg.json) as a featureatlas `Dictionary` (eval mode, CPU)."""
    folder = Path(folder)
    cfg_path, weights_path = folder / SAELENS_CFG, folder / SAELENS_WEIGHTS
    if not cfg_path.is_file() or not weights_path.is_file():
        raise ValueError(
            f"{folder} is not a SAELens SAE folder: it needs {SAELENS_CFG} and {SAELENS_WEIGHTS}"
        )
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{cfg_path} is not valid JSON ({err})") from err
    cfg = parse_cfg(raw, cfg_path)
    if cfg.architecture not in IMPORTERS:
        raise ValueError(
            f"{folder}: SAELens architecture {cfg.architecture!r} is not supported for import; supported: "
            f"{', '.join(sorted(IMPORTERS))}"
        )
    required, build = IMPORTERS[cfg.architecture]
    tensors = {name: t.to(torch.float32) for name, t in load_file(str(weights_path)).items()}
    # v5 files may carry a per-latent finetuning scale applied to the codes before W_dec: fold it into W_dec.
    scale = tensors.pop("finetuning_scaling_factor", tensors.pop("scaling_factor", None))
    missing = set(required) - set(tensors)
    if missing:
        raise ValueError(
            f"{weights_path} lacks tensors {sorted(missing)}; is it a SAELens {cfg.architecture} SAE?"
        )
    if scale is not None:
        tensors["W_dec"] = scale[:, None] * tensors["W_dec"]
    if not cfg.apply_b_dec_to_input:
        _center_inputs(cfg, tensors)
    if cfg.rescale_acts_by_decoder_norm:
        # SAELens ranks pre * ||W_dec_i|| and decodes (codes / ||W_dec_i||) @ W_dec. Scaling W_enc and b_enc
        # by the norms and making the rows unit gives exactly those pre-activations, top-k and outputs.
        # Before the common-scale unfold: it would otherwise move a shared norm out of the ranking.
        _fold_decoder_norms(tensors, ("b_enc",))
    scale = _unfold_common_scale(tensors)
    model = build(cfg, tensors)
    model.input_scale.fill_(scale)
    return model.eval()


@torch.no_grad()
def _unfold_common_scale(t: dict[str, Tensor]) -> float:
    """Undo a folded input scale: decoder rows of one common norm c become unit rows with input_scale 1/c.

    SAELens' fold_activation_norm_scaling_factor (and our export) leave W_enc * s, W_dec / s, b_dec / s; with
    s = 1/c, W_enc / s, W_dec * s, b_dec * s and input_scale s compute exactly the same codes and outputs.
    Rows of differing norms are left to the architecture's importer; returns the input scale (1.0 then).
    """
    norms = t["W_dec"].norm(dim=-1)
    c = float(norms.mean())
    if c <= 0 or not torch.allclose(norms, torch.full_like(norms, c), rtol=1e-4, atol=0):
        return 1.0
    t["W_enc"] = t["W_enc"] * c
    t["W_dec"] = t["W_dec"] / c
    t["b_dec"] = t["b_dec"] / c
    return 1.0 / c
