"""SAELens interop: export dictionaries to SAELens' folder format; import SAELens SAEs from a local folder.

SAELens saves an SAE as `cfg.json` + `sae_weights.safetensors` with tensors `W_enc [d_in, d_sae]`,
`b_enc [d_sae]`, `W_dec [d_sae, d_in]`, `b_dec [d_in]` (JumpReLU adds `threshold [d_sae]`) and computes
    codes = act(((x - b_dec) if apply_b_dec_to_input else x) @ W_enc + b_enc)
    x_hat = codes @ W_dec + b_dec.
Its v6 cfg.json carries `architecture` ("standard", "topk", "jumprelu", "gated", ...), `d_in`, `d_sae`,
`dtype`, `device`, `apply_b_dec_to_input`, `normalize_activations`, `reshape_activations`, `metadata` (model
and hook) and per-architecture keys (`k` for topk). v5 files are flat and say `activation_fn_str` ("relu", or
"topk" with `activation_fn_kwargs.k`) instead; both are read.

featureatlas dictionaries work on scaled inputs (see `tasks.dictionary.base`); export folds `input_scale`
into the weights, so the SAELens file needs no normalisation (`normalize_activations: "none"`). Converters
are keyed by featureatlas method (export) and by SAELens architecture (import); a method without a linear
encoder (`mp`, `snmf`) has no SAELens equivalent and is refused with that reason.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from tasks.dictionary.base import Dictionary
from tasks.dictionary.registry import METHODS

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"

# (architecture, tensors in the scaled space, extra cfg keys) for one featureatlas dictionary.
Exported = tuple[str, dict[str, Tensor], dict[str, Any]]


def _export_topk(d: Dictionary) -> Exported:
    tensors = {"W_enc": d.W_enc, "b_enc": d.b_enc, "W_dec": d.W_dec, "b_dec": d.b_dec}
    return "topk", tensors, {"k": d.cfg.k}


def _export_gba(d: Dictionary) -> Exported:
    # y = W (x - b_pre) + b, ReLU, x_hat = sum_m a_m z_m w_m + b_pre: a standard SAE with tied directions,
    # the output scales a folded into the decoder rows, and b_pre as b_dec.
    tensors = {"W_enc": d.W.T, "b_enc": d.b, "W_dec": d.a.unsqueeze(-1) * d.W, "b_dec": d.b_pre}
    return "standard", tensors, {}


EXPORTERS: dict[str, Callable[[Dictionary], Exported]] = {
    "topk": _export_topk,
    "gba": _export_gba,
    "ba": _export_gba,
}


def export_saelens(dictionary: Dictionary, folder: str | Path, *, model_name: str | None = None) -> Path:
    """Write `dictionary` to `folder` as a SAELens SAE (cfg.json + sae_weights.safetensors)."""
    exporter = EXPORTERS.get(dictionary.method)
    if exporter is None:
        raise ValueError(
            f"method {dictionary.method!r} has no SAELens equivalent (SAELens SAEs encode with one linear "
            f"map and an activation); exportable methods: {', '.join(sorted(EXPORTERS))}"
        )
    architecture, tensors, extra = exporter(dictionary)
    s = float(dictionary.input_scale)
    # Ours: encode(x) = act((x s - b_dec) W_enc + b_enc), decode(z) = (z W_dec + b_dec) / s. Fold s in.
    folded = {
        "W_enc": tensors["W_enc"] * s,
        "b_enc": tensors["b_enc"],
        "W_dec": tensors["W_dec"] / s,
        "b_dec": tensors["b_dec"] / s,
    }
    folded.update({k: v for k, v in tensors.items() if k not in folded})
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in folded.items()},
        str(folder / SAELENS_WEIGHTS),
    )
    cfg = {
        "architecture": architecture,
        "d_in": dictionary.d_in,
        "d_sae": dictionary.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "model_name": model_name,
            "hook_name": getattr(dictionary.cfg, "hookpoint", None),
            "featureatlas_method": dictionary.method,
        },
        **extra,
    }
    (folder / SAELENS_CFG).write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return folder


def _import_topk(raw: dict[str, Any], tensors: dict[str, Tensor]) -> Dictionary:
    k = raw.get("k", (raw.get("activation_fn_kwargs") or {}).get("k"))
    if k is None:
        raise ValueError("SAELens topk cfg.json lacks 'k' (nor activation_fn_kwargs.k); add it to the file")
    cfg = METHODS["topk"].config_cls(d_sae=int(raw["d_sae"]), k=int(k), auxk_coef=0.0, device="cpu")
    model = METHODS["topk"](cfg, int(raw["d_in"]))
    model.load_state_dict({name: tensors[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec")}, strict=True)
    return model


# SAELens architecture -> builder of the featureatlas dictionary that computes the same function.
IMPORTERS: dict[str, Callable[[dict[str, Any], dict[str, Tensor]], Dictionary]] = {"topk": _import_topk}


def _architecture(raw: dict[str, Any]) -> str:
    arch = raw.get("architecture", "standard")
    # SAELens v5 wrote TopK SAEs as architecture "standard" with activation_fn_str "topk".
    if arch == "standard" and raw.get("activation_fn_str") == "topk":
        return "topk"
    return arch


def import_saelens(folder: str | Path) -> Dictionary:
    """Load a SAELens SAE folder as a featureatlas `Dictionary` (eval mode, CPU, input_scale 1)."""
    folder = Path(folder)
    cfg_path, weights_path = folder / SAELENS_CFG, folder / SAELENS_WEIGHTS
    if not cfg_path.is_file() or not weights_path.is_file():
        raise ValueError(
            f"{folder} is not a SAELens SAE folder: it needs {SAELENS_CFG} and {SAELENS_WEIGHTS}"
        )
    raw = json.loads(cfg_path.read_text())
    arch = _architecture(raw)
    if arch not in IMPORTERS:
        raise ValueError(
            f"{folder}: SAELens architecture {arch!r} is not supported for import; supported: "
            f"{', '.join(sorted(IMPORTERS))}"
        )
    if raw.get("normalize_activations", "none") not in ("none", None):
        raise ValueError(
            f"{folder}: normalize_activations={raw['normalize_activations']!r} is not supported; fold the "
            "scaling into the weights in SAELens (fold_activation_norm_scaling_factor) and save again"
        )
    tensors = {name: t.to(torch.float32) for name, t in load_file(str(weights_path)).items()}
    missing = {"W_enc", "b_enc", "W_dec", "b_dec"} - set(tensors)
    if missing:
        raise ValueError(f"{weights_path} lacks tensors {sorted(missing)}; is it a SAELens {arch} SAE?")
    if not raw.get("apply_b_dec_to_input", True):
        # Ours always subtracts b_dec before encoding: x W + b = (x - b_dec) W + (b + b_dec W).
        tensors["b_enc"] = tensors["b_enc"] + tensors["b_dec"] @ tensors["W_enc"]
    return IMPORTERS[arch](raw, tensors).eval()
