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
A topk file with `rescale_acts_by_decoder_norm: true` (SAELens ranks pre * ||W_dec_i|| and decodes
(codes / ||W_dec_i||) W_dec) is folded exactly: W_enc and b_enc times the norms, unit rows, the same codes.
The flag on any other architecture is refused (SAELens defines it for topk alone).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from safetensors.torch import save_file
from torch import Tensor

from featureatlas.tasks.dictionary.base import Dictionary
from featureatlas.tasks.dictionary.saelens_import import SAELENS_CFG, SAELENS_WEIGHTS, import_saelens

__all__ = ["EXPORTERS", "SAELENS_CFG", "SAELENS_WEIGHTS", "export_saelens", "import_saelens"]

logger = logging.getLogger(__name__)

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
    tau = d.fitted_tau.detach().to("cpu", torch.float32)
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
