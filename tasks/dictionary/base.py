"""The interface every dictionary exposes, whatever method made it.

Evaluation, labeling and interaction scoring hold a `Dictionary` and call `encode`, `decode`,
`decoder_directions`, `save` and `load`; they never ask whether a TopK SAE, GBA or semi-NMF sits behind it.

Every dictionary works in the raw activation space at its boundary but keeps a scalar `input_scale`, fitted on
the training data so that E||acts * input_scale||^2 = d_in. Internally the method sees scaled inputs, which
keeps learning rates and loss magnitudes comparable across models whose residual norms differ by orders of
magnitude; `encode` multiplies by the scale and `decode` divides, so reconstructions (and FVU) are unaffected.
"""

from __future__ import annotations

import json
import logging
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
from pydantic import BaseModel, ValidationError
from safetensors.torch import load_file, save
from torch import Tensor, nn

from featureatlas.schemas.base import format_validation_error

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
CFG_NAME = "cfg.json"
WEIGHTS_NAME = "weights.safetensors"
# Keys of cfg.json that describe the saved artifact rather than the method's config.
_ARTIFACT_KEYS = ("d_in", "format_version")


class ForwardOutput(NamedTuple):
    """What `Dictionary.forward` returns: the reconstruction and the codes that produced it."""

    acts_hat: Tensor  # [..., d_in], raw activation space
    codes: Tensor  # [..., d_sae], nonnegative for the SAE variants


class TrainStepOutput(NamedTuple):
    """One minibatch's losses from a gradient-trained dictionary (see `tasks.dictionary.train.Trainable`)."""

    loss: Tensor  # scalar to backpropagate
    mse: Tensor  # mean squared error per element, raw activation units (detached)
    fvu: Tensor  # sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the batch (detached)
    auxk_loss: Tensor  # auxiliary loss before its weight is applied; 0 for methods without one (detached)
    codes: Tensor  # [batch, d_sae] (detached), used to count firing latents


class Dictionary(nn.Module, ABC):
    """A learned dictionary of `d_sae` directions in a `d_in`-dimensional activation space.

    Subclasses set `method` (the registry key written to cfg.json) and `config_cls` (its pydantic config), and
    take `(cfg, d_in)` in their constructor so that `load` can rebuild them from cfg.json alone.
    """

    method: ClassVar[str]
    config_cls: ClassVar[type[BaseModel]]
    # Fitted scalars saved in cfg.json (human-readable) rather than in the weights file.
    fitted_scalars: ClassVar[tuple[str, ...]] = ("input_scale",)

    def __init__(self, cfg: BaseModel, d_in: int) -> None:
        super().__init__()
        if d_in < 1:
            raise ValueError(f"d_in must be >= 1, got {d_in}")
        self.cfg = cfg
        self.d_in = d_in
        self.d_sae: int = cfg.d_sae  # type: ignore[attr-defined]
        # Non-persistent: it lives in cfg.json, yet `.to(device)` still moves it with the parameters.
        self.register_buffer("input_scale", torch.ones(()), persistent=False)

    @abstractmethod
    def encode(self, acts: Tensor) -> Tensor:
        """acts [..., d_in] (raw) -> codes [..., d_sae]."""

    @abstractmethod
    def decode(self, codes: Tensor) -> Tensor:
        """codes [..., d_sae] -> acts_hat [..., d_in] (raw)."""

    @abstractmethod
    def decoder_directions(self) -> Tensor:
        """The dictionary's directions, [d_sae, d_in], one row per latent."""

    def active(self, codes: Tensor) -> Tensor:
        """Bool mask [..., d_sae] of the codes that count as firing (labeling's frequencies and contexts)."""
        return codes > 0

    def forward(self, acts: Tensor) -> ForwardOutput:
        codes = self.encode(acts)
        return ForwardOutput(acts_hat=self.decode(codes), codes=codes)

    # ---- persistence -------------------------------------------------------------------------------------

    def save(self, folder: str | Path) -> Path:
        """Write `cfg.json` and `weights.safetensors` into `folder` (created if needed); return the folder.

        The weights go first and cfg.json last, so a folder with a cfg.json always holds complete weights.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in self.state_dict().items()}
        tmp = folder / f".{WEIGHTS_NAME}.tmp"
        metadata = {"method": self.method, "format_version": str(FORMAT_VERSION)}
        write_safetensors_sorted(tensors, metadata, tmp)
        _fsync_replace(tmp, folder / WEIGHTS_NAME)

        cfg_json: dict[str, Any] = self.cfg.model_dump(mode="json")
        cfg_json.update(method=self.method, d_in=self.d_in, d_sae=self.d_sae, format_version=FORMAT_VERSION)
        for name in self.fitted_scalars:
            cfg_json[name] = float(getattr(self, name))
        tmp = folder / f".{CFG_NAME}.tmp"
        tmp.write_text(json.dumps(cfg_json, indent=2, sort_keys=True))
        _fsync_replace(tmp, folder / CFG_NAME)
        logger.info(
            "saved %s dictionary (d_in=%d, d_sae=%d) to %s", self.method, self.d_in, self.d_sae, folder
        )
        return folder

    @classmethod
    def upgrade_cfg(cls, raw: dict[str, Any]) -> dict[str, Any]:
        """Fill in keys that cfg.json files from older versions lack. Subclasses extend it, calling super."""
        raw = dict(raw)
        raw.setdefault("format_version", 1)
        # Dictionaries saved before input scaling existed were trained on raw activations.
        raw.setdefault("input_scale", 1.0)
        return raw

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> Dictionary:
        """Rebuild a dictionary written by `save`, in eval mode on `device`."""
        folder = Path(folder)
        raw = cls.upgrade_cfg(read_cfg_json(folder))
        if raw.get("method") != cls.method:
            raise ValueError(
                f"{folder / CFG_NAME} holds method {raw.get('method')!r}, not {cls.method!r}; "
                "load it with tasks.dictionary.load_dictionary(folder), which picks the class"
            )
        if raw["format_version"] > FORMAT_VERSION:
            raise ValueError(
                f"{folder} was saved in format {raw['format_version']}, newer than this featureatlas reads "
                f"({FORMAT_VERSION}); upgrade featureatlas"
            )
        if "d_in" not in raw:
            raise ValueError(f"{folder / CFG_NAME} lacks 'd_in'; it was not written by Dictionary.save()")
        scalars = {name: raw.pop(name) for name in cls.fitted_scalars}
        d_in = int(raw.pop("d_in"))
        for key in _ARTIFACT_KEYS:
            raw.pop(key, None)
        try:
            cfg = cls.config_cls.model_validate(raw)
        except ValidationError as err:
            raise ValueError(
                f"{folder / CFG_NAME} is not a valid {cls.method} config:\n{format_validation_error(err)}"
            ) from err
        model = cls(cfg, d_in)
        weights_path = folder / WEIGHTS_NAME
        if not weights_path.is_file():
            raise ValueError(f"{folder} has cfg.json but no {WEIGHTS_NAME} (save cut short); save again")
        model.load_state_dict(load_file(str(weights_path)), strict=True)
        for name, value in scalars.items():
            getattr(model, name).fill_(float(value))
        return model.to(device).eval()


def read_cfg_json(folder: Path) -> dict[str, Any]:
    """The parsed cfg.json of a saved dictionary folder, with errors that name the folder."""
    path = folder / CFG_NAME
    if not path.is_file():
        raise ValueError(f"no {CFG_NAME} in {folder}; expected a folder written by Dictionary.save()")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); re-save the dictionary") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(raw).__name__}")
    return raw


def write_safetensors_sorted(tensors: dict[str, Tensor], metadata: dict[str, str], path: Path) -> None:
    """Write `tensors` as safetensors with the header's metadata keys in sorted order.

    The safetensors library serialises `__metadata__` from a hash map, whose iteration order is seeded per
    process: two processes saving the same weights wrote different bytes, so a resumed training could not
    be checked byte for byte against an uninterrupted one. The header is rewritten here with the keys sorted
    (the tensors' own order and offsets are already deterministic); readers see the same tensors and metadata.
    """
    raw = memoryview(save(tensors, metadata=metadata))
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(bytes(raw[8 : 8 + n]))
    if "__metadata__" in header:
        header = {"__metadata__": dict(sorted(header.pop("__metadata__").items())), **header}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the data must start at an 8-byte boundary, as the library pads it
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        f.write(raw[8 + n :])


def _fsync_replace(tmp: Path, final: Path) -> None:
    """Flush `tmp` to disk, then rename it over `final`, so readers never see a half-written file."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
