"""SAELens interop: export dictionaries to SAELens' folder format; import SAELens SAEs from a local folder.

SAELens saves an SAE as `cfg.json` + `sae_weights.safetensors`. Every architecture has `W_enc [d_in, d_sae]`,
`W_dec [d_sae, d_in]`, `b_dec [d_in]`; with x' = x - b_dec when `apply_b_dec_to_input`, else x' = x:
    standard  b_enc [d_sae]:              codes = relu(x' W_enc + b_enc)
    topk      b_enc, cfg `k`:             codes = relu(top-k of x' W_enc + b_enc)
    jumprelu  b_enc, threshold [d_sae]:   codes = relu(pre) * 1[pre > threshold],  pre = x' W_enc + b_enc
    gated     b_gate, r_mag, b_mag:       codes = 1[x' W_enc + b_gate > 0] * relu(x' (W_enc e^r_mag) + b_mag)
and x_hat = codes W_dec + b_dec. SAELens saves BatchTopK (and Matryoshka BatchTopK) SAEs for inference as
jumprelu, the global threshold repeated per latent; we do the same, and a threshold SAE's `>= tau` becomes
`> nextafter(tau, -inf)`, the same test in float32.

Two cfg.json layouts exist. v6 (SAELens >= 6.0) keeps the forward-pass fields at the top (`architecture`,
`d_in`, `d_sae`, `dtype`, `device`, `apply_b_dec_to_input`, `normalize_activations`, `reshape_activations`,
`k` for topk) and the provenance under `metadata` (`model_name`, `hook_name`, `sae_lens_version`, ...);
SAELens reads `metadata.sae_lens_version` to decide which layout it holds. v5 is flat: `architecture` is
"standard", "gated" or "jumprelu", a TopK SAE is "standard" with `activation_fn_str` "topk" and
`activation_fn_kwargs.k`, and `hook_name`, `hook_layer`, `model_name`, `context_size`, `dataset_path`,
`prepend_bos` ... sit beside the weights' fields (v5's loader requires them). Both are written and read.

featureatlas dictionaries work on scaled inputs (see `tasks.dictionary.base`); export folds `input_scale`
into the weights (W_enc * s, W_dec / s, b_dec / s; biases and thresholds live in pre-activation units and
are unchanged), so the SAELens file needs no normalisation (`normalize_activations: "none"`). Converters
are keyed by featureatlas method (export) and by SAELens architecture (import); a method without a linear
encoder (`mp`, `snmf`) has no SAELens architecture and is refused with that reason.

Import undoes a folded scale: decoder rows of one common norm c give unit rows and `input_scale` 1/c, with
identical codes. Rows of differing norms (a SAELens-trained decoder) stay as they are for `standard` (read as
our scaled-L1 ReLU, whose decoder is free), are folded into the codes for `jumprelu` and `gated` (SAELens'
`fold_W_dec_norm`: same reconstructions, codes times the row norm), and stay as they are for `topk`, whose
`decoder_directions` then are not unit-length (top-k selection is not invariant to a per-latent rescale).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from tasks.dictionary.base import Dictionary
from tasks.dictionary.registry import METHODS

logger = logging.getLogger(__name__)

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
# The cfg layout we write as v6; SAELens reads metadata.sae_lens_version to choose its loader.
V6_FORMAT_VERSION = "6.0.0"
SAELensVersion = Literal["v6", "v5"]
# Tensors in the input space that `input_scale` folds into (everything else is in pre-activation units).
_SCALED_UP = ("W_enc",)
_SCALED_DOWN = ("W_dec", "b_dec")


class Exported(NamedTuple):
    """One featureatlas dictionary as a SAELens SAE, tensors still in the scaled space."""

    architecture: str  # SAELens architecture: standard, topk, jumprelu, gated
    tensors: dict[str, Tensor]
    k: int | None = None  # topk only


def _linear(d: Dictionary, **extra: Tensor) -> dict[str, Tensor]:
    return {"W_enc": d.W_enc, "b_enc": d.b_enc, "W_dec": d.W_dec, "b_dec": d.b_dec, **extra}


def _export_relu(d: Dictionary) -> Exported:
    # Plain and scaled-L1 alike: the decoder rows are saved as they are (unconstrained in the scaled variant).
    return Exported("standard", _linear(d))


def _export_topk(d: Dictionary) -> Exported:
    return Exported("topk", _linear(d), k=int(d.cfg.k))


def _export_jumprelu(d: Dictionary) -> Exported:
    return Exported("jumprelu", _linear(d, threshold=d.threshold))


def _export_batchtopk(d: Dictionary) -> Exported:
    # Inference compares with one global threshold (clamped at 0: an unfitted -1 means plain ReLU), as
    # SAELens' own BatchTopK export does, repeated per latent.
    threshold = d.threshold.clamp_min(0).expand(d.d_sae)
    return Exported("jumprelu", _linear(d, threshold=threshold))


def _export_threshold(d: Dictionary) -> Exported:
    # Ours fires on pre >= tau, SAELens' jumprelu on pre > threshold: in float32 these agree exactly when the
    # threshold is the next float below tau. tau > 0, so SAELens' extra relu changes nothing.
    tau = torch.tensor(d.cfg.tau, dtype=torch.float32)
    threshold = torch.nextafter(tau, torch.tensor(-torch.inf)).expand(d.d_sae)
    return Exported("jumprelu", _linear(d, threshold=threshold))


def _export_gated(d: Dictionary) -> Exported:
    # Our b_enc is the gate bias; SAELens' gated SAE has no b_enc.
    tensors = {"W_enc": d.W_enc, "b_gate": d.b_enc, "r_mag": d.r_mag, "b_mag": d.b_mag}
    return Exported("gated", {**tensors, "W_dec": d.W_dec, "b_dec": d.b_dec})


def _export_gba(d: Dictionary) -> Exported:
    # y = W (x - b_pre) + b, ReLU, x_hat = sum_m a_m z_m w_m + b_pre: a standard SAE with tied directions,
    # the output scales a folded into the decoder rows, and b_pre as b_dec.
    tensors = {"W_enc": d.W.T, "b_enc": d.b, "W_dec": d.a.unsqueeze(-1) * d.W, "b_dec": d.b_pre}
    return Exported("standard", tensors)


EXPORTERS: dict[str, Callable[[Dictionary], Exported]] = {
    "relu": _export_relu,
    "topk": _export_topk,
    "batchtopk": _export_batchtopk,
    "matryoshka": _export_batchtopk,
    "jumprelu": _export_jumprelu,
    "gated": _export_gated,
    "threshold": _export_threshold,
    "gba": _export_gba,
    "ba": _export_gba,
}


def _layer_of(hook_name: str) -> int | None:
    """The layer index in a hook name ("model.layers.3.mlp" -> 3), or None if it names none."""
    numbers = re.findall(r"\d+", hook_name)
    return int(numbers[0]) if numbers else None


def _v6_cfg(exported: Exported, d: Dictionary, model_name: str | None, hook_name: str | None) -> dict:
    cfg: dict[str, Any] = {
        "architecture": exported.architecture,
        "d_in": d.d_in,
        "d_sae": d.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "model_name": model_name,
            "hook_name": hook_name,
            "sae_lens_version": V6_FORMAT_VERSION,
            "sae_lens_training_version": None,
        },
        # Unknown top-level keys are dropped by SAELens' config loader, so our own provenance is safe here.
        "featureatlas_method": d.method,
    }
    if exported.k is not None:
        cfg["k"] = exported.k
    return cfg


def _v5_cfg(exported: Exported, d: Dictionary, model_name: str | None, hook_name: str | None) -> dict:
    if hook_name is None:
        raise ValueError(
            f"the v5 SAELens format needs a hook name and this {d.method} dictionary has no hookpoint; "
            "pass hook_name=... (e.g. 'blocks.3.hook_resid_post') or export in the v6 format"
        )
    architecture, activation, kwargs = exported.architecture, "relu", {}
    if architecture == "topk":  # v5 had no topk architecture: a standard SAE with a topk activation
        architecture, activation, kwargs = "standard", "topk", {"k": exported.k}
    return {
        "architecture": architecture,
        "d_in": d.d_in,
        "d_sae": d.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "model_name": model_name,
        "hook_name": hook_name,
        "hook_layer": _layer_of(hook_name),
        "hook_head_index": None,
        "activation_fn_str": activation,
        "activation_fn_kwargs": kwargs,
        "apply_b_dec_to_input": True,
        "finetuning_scaling_factor": False,
        "sae_lens_training_version": None,
        "prepend_bos": True,
        "dataset_path": None,
        "dataset_trust_remote_code": True,
        "context_size": None,
        "normalize_activations": "none",
        "neuronpedia_id": None,
        "model_from_pretrained_kwargs": {},
        "featureatlas_method": d.method,
    }


def export_saelens(
    dictionary: Dictionary,
    folder: str | Path,
    *,
    model_name: str | None = None,
    hook_name: str | None = None,
    version: SAELensVersion = "v6",
) -> Path:
    """Write `dictionary` to `folder` as a SAELens SAE (cfg.json + sae_weights.safetensors).

    `hook_name` defaults to the dictionary's hookpoint; `version` picks the v6 (default) or v5 layout.
    """
    exporter = EXPORTERS.get(dictionary.method)
    if exporter is None:
        raise ValueError(
            f"method {dictionary.method!r} has no SAELens architecture (SAELens SAEs encode with one linear "
            f"map and an activation); exportable methods: {', '.join(sorted(EXPORTERS))}"
        )
    if version not in ("v6", "v5"):
        raise ValueError(f"version {version!r} unknown; use 'v6' (SAELens >= 6) or 'v5'")
    target = getattr(dictionary.cfg, "target_hookpoint", None)
    if target is not None:
        # SAELens' SAE folders reconstruct their own input: a transcoder's decoder lives in the target's
        # (differently scaled) space, and a folder written as an SAE would load with the wrong weights
        raise ValueError(
            f"this {dictionary.method} is a transcoder ({getattr(dictionary.cfg, 'hookpoint', None)!r} -> "
            f"{target!r}); the SAELens SAE format holds only dictionaries that reconstruct their input, so "
            "save it with dictionary.save(folder) instead"
        )
    exported = exporter(dictionary)
    hook_name = hook_name if hook_name is not None else getattr(dictionary.cfg, "hookpoint", None)
    build_cfg = _v6_cfg if version == "v6" else _v5_cfg
    cfg = build_cfg(exported, dictionary, model_name, hook_name)

    s = float(dictionary.input_scale)
    # Ours: encode(x) = act((x s - b_dec) W_enc + b_enc), decode(z) = (z W_dec + b_dec) / s. Fold s in.
    folded = {}
    for name, t in exported.tensors.items():
        t = t.detach().to("cpu", torch.float32)
        if name in _SCALED_UP:
            t = t * s
        elif name in _SCALED_DOWN:
            t = t / s
        folded[name] = t.contiguous()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(folded, str(folder / SAELENS_WEIGHTS))
    # cfg.json last: a folder with a cfg.json holds complete weights.
    (folder / SAELENS_CFG).write_text(json.dumps(cfg, indent=2, sort_keys=True))
    logger.info(
        "exported %s dictionary to %s as SAELens %s %s",
        dictionary.method,
        folder,
        version,
        exported.architecture,
    )
    return folder


# ---- import ---------------------------------------------------------------------------------------------


class SAELensCfg(NamedTuple):
    """What import needs from a cfg.json of either layout."""

    architecture: str  # standard, topk, jumprelu, gated
    d_in: int
    d_sae: int
    k: int | None
    hook_name: str | None
    apply_b_dec_to_input: bool


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
