"""Training data for a transcoder: two hookpoints' activations of the same tokens, fed as one source.

`PairedSource` wraps an input source and a target source over the same rows and yields their chunks side by
side, [rows, d_input + d_target], so the trainer's batching (shuffling, epochs, resume) moves both together
and every batch row holds one token's input and target. `split` takes a batch apart again. Two cache
sources stream the same rows in the same seeded order (the order depends on the rows, the seed and the
shard layout, not on the hookpoint); the row ids of each chunk are compared, so misaligned data stops the
run instead of training on mismatched pairs.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from featureatlas.tasks.dictionary.data import INIT_SAMPLE_ROWS, ActivationSource, BadActivations, CacheSource


class PairedSource:
    """Inputs and targets of the same rows; chunks are [rows, d_input + d_target] (inputs first)."""

    def __init__(self, inputs: ActivationSource, targets: ActivationSource) -> None:
        if inputs.n_rows != targets.n_rows:
            raise BadActivations(
                f"transcoder inputs have {inputs.n_rows} rows but targets {targets.n_rows}; take both "
                "hookpoints' activations of the same tokens"
            )
        if inputs.d_in != targets.d_in:
            raise BadActivations(
                f"transcoder input width {inputs.d_in} differs from target width {targets.d_in}; "
                "transcoders between sites of different widths are not supported"
            )
        self.inputs, self.targets = inputs, targets
        self.d_input = inputs.d_in
        self.d_in = inputs.d_in + targets.d_in
        self.n_rows = inputs.n_rows

    def split(self, batch: Tensor) -> tuple[Tensor, Tensor]:
        """(inputs, targets) of a batch or sample [rows, d_input + d_target]."""
        return batch[:, : self.d_input], batch[:, self.d_input :]

    def epoch(self, epoch: int, batch_size: int, seed: int) -> Iterator[Tensor]:
        if isinstance(self.inputs, CacheSource) and isinstance(self.targets, CacheSource):
            pairs = zip(
                _rows_and_acts(self.inputs, epoch, batch_size, seed),
                _rows_and_acts(self.targets, epoch, batch_size, seed),
            )
            for (rows_in, a), (rows_out, b) in pairs:
                if not torch.equal(rows_in, rows_out):
                    raise BadActivations(
                        f"the streams of {self.inputs.hookpoint!r} and {self.targets.hookpoint!r} disagree "
                        "on their rows; the cache's hookpoints are inconsistent: cache again"
                    )
                yield torch.cat([a, b.to(a.dtype)], dim=1)
            return
        for a, b in zip(
            self.inputs.epoch(epoch, batch_size, seed), self.targets.epoch(epoch, batch_size, seed)
        ):
            if a.shape[0] != b.shape[0]:
                raise BadActivations(
                    "transcoder input and target chunks differ in length; sources misaligned"
                )
            yield torch.cat([a, b.to(a.dtype)], dim=1)

    def init_sample(self, max_rows: int = INIT_SAMPLE_ROWS) -> Tensor:
        # Both sources pick their sample rows by the rows alone (strides, or shards in a fixed order).
        a, b = self.inputs.init_sample(max_rows), self.targets.init_sample(max_rows)
        return torch.cat([a, b.to(a.dtype)], dim=1)

    def materialize(self) -> Tensor:
        a, b = self.inputs.materialize(), self.targets.materialize()
        return torch.cat([a, b.to(a.dtype)], dim=1)


def _rows_and_acts(
    source: CacheSource, epoch: int, batch_size: int, seed: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """(row ids, acts) of one epoch of a cache source, every shard checked as it is read."""
    for b in source.stream(epoch, batch_size, seed):
        yield b.rows, b.acts
