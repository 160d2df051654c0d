"""What lets an SAE train as a transcoder: encode one hookpoint's activations, reconstruct another's.

A dictionary whose config sets `target_hookpoint` reads its input at `hookpoint` and is trained to
reconstruct the target site's activations of the same tokens (e.g. the MLP's input to the MLP's output),
so its latents explain a computation rather than a representation. Two things change against a plain SAE:

- the two sites are scaled apart: `input_scale` brings E||acts * input_scale||^2 to d_in, and
  `target_scale` does the same for the targets; the parameters live in these scaled spaces, `decode`
  divides by `target_scale`, and both scalars are saved in cfg.json (a plain SAE's target_scale equals its
  input_scale, and cfg.json files from before transcoders load with exactly that);
- the input is not centred by b_dec, which lives in the target's space; b_enc absorbs any input offset.

`TranscoderSites` is the mixin that holds this for the linear-encoder SAEs (TopK family, ReLU, JumpReLU,
gated, threshold); each method's `training_loss(acts, dead_mask, target=None)` calls `sites` and compares
its reconstruction with the second tensor it returns.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor


class TranscoderSites:
    """Mixin for a `Dictionary` with parameters W_enc [d_in, d_sae] and b_dec [d_in]; call `_init_sites()`
    in `__init__` once the parameters exist."""

    fitted_scalars: ClassVar[tuple[str, ...]] = ("input_scale", "target_scale")

    def _init_sites(self) -> None:
        self.is_transcoder = self.cfg.target_hookpoint is not None
        self.register_buffer("target_scale", torch.ones(()), persistent=False)
        # A transcoder's inputs are centred by nothing: a constant zero, never trained.
        self.register_buffer("_no_center", torch.zeros(self.d_in), persistent=False)

    @classmethod
    def upgrade_cfg(cls, raw: dict[str, Any]) -> dict[str, Any]:
        raw = super().upgrade_cfg(raw)
        # Saved before transcoders: the target was the input, so its scale was the input's.
        raw.setdefault("target_scale", raw["input_scale"])
        return raw

    def check_targets(self, targets: Tensor | None) -> None:
        """Refuse targets for a plain SAE, and their absence for a transcoder."""
        if self.is_transcoder and targets is None:
            raise ValueError(
                f"this {self.method} is a transcoder (target {self.cfg.target_hookpoint!r}): pass the target "
                "hookpoint's activations as `targets`"
            )
        if not self.is_transcoder and targets is not None:
            raise ValueError(
                f"targets given, but this {self.method} is no transcoder; set target_hookpoint in its config"
            )

    @property
    def input_center(self) -> Tensor:
        """What is subtracted from scaled inputs before encoding: b_dec, or zeros for a transcoder."""
        return self._no_center if self.is_transcoder else self.b_dec

    @property
    def output_scale(self) -> Tensor:
        """The scale of the reconstructed site: `decode` divides by it."""
        return self.target_scale if self.is_transcoder else self.input_scale

    def sites(self, acts: Tensor, target: Tensor | None) -> tuple[Tensor, Tensor]:
        """(scaled input, scaled reconstruction target) of a batch; the target is the input for an SAE."""
        self.check_targets(target)
        # Cast before scaling: bfloat16 acts times a float32 0-dim scale would stay bfloat16.
        x = acts.to(self.W_enc.dtype) * self.input_scale
        if target is None:
            return x, x
        return x, target.to(self.W_enc.dtype) * self.target_scale
