"""Feature-table columns built from tensors in one go: per-latent lists and marked text windows.

A feature table holds, per latent, lists of a few structs (top contexts, quantile examples, neighbours).
Built as Python dicts, a table of a few thousand latents is tens of thousands of dicts and lists: their
conversion to Arrow costs more than the passes that found them at small corpus sizes, and so many surviving
containers set off a full collection of Python's garbage collector, which walks every object of the process
(the model and its libraries included). So the columns are assembled here from flat tensors: one flat
column per field, sorted by latent, cut into per-latent lists by polars (`per_latent`), and the text
windows joined by polars from token strings fetched once per distinct token (`marked_windows`). The values
are those the Python loops produced: float32 codes widened to float64, the same strings.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import polars as pl
import torch
from torch import Tensor

__all__ = ["MarkedWindows", "mark", "marked_windows", "per_latent", "series"]


def series(values: Tensor, dtype: pl.DataType) -> pl.Series:
    """A flat polars column of a CPU tensor, cast to `dtype` (float32 codes widen exactly to Float64)."""
    return pl.Series(values.detach().cpu().numpy()).cast(dtype)


def per_latent(values: pl.Series | pl.DataFrame, latent: Tensor, n_latents: int) -> pl.Series:
    """[n_latents] lists: list i holds the `values` whose `latent` is i, in their order. `latent` ascending
    (a `DataFrame` of fields becomes a list of structs of them)."""
    if isinstance(values, pl.DataFrame):
        values = values.to_struct("values")
    latent = latent.cpu().long()
    if len(latent) != len(values):
        raise ValueError(f"{len(values)} values for {len(latent)} latent ids")
    counts = torch.bincount(latent, minlength=n_latents)
    width = max(int(counts.max()) if n_latents else 0, 1)
    # every latent's values padded to `width` with one appended null, then cut to the latent's count
    slot = torch.arange(len(latent)) - (counts.cumsum(0) - counts)[latent]
    index = torch.full((n_latents, width), len(values), dtype=torch.int64)
    index[latent, slot] = torch.arange(len(latent))
    padded = pl.concat([values, pl.Series([None], dtype=values.dtype)])
    lists = padded.gather(index.flatten().numpy()).reshape((n_latents, width))
    frame = pl.DataFrame({"lists": lists, "n": counts.numpy()})
    return frame.select(pl.col("lists").arr.to_list().list.head(pl.col("n")))["lists"]


def mark(token: str) -> str:
    """A centre token wrapped in «», its leading whitespace left outside."""
    body = token.lstrip()
    return f"{token[: len(token) - len(body)]}«{body}»"


class MarkedWindows(NamedTuple):
    """Text windows around centre tokens: the kept tokens, the marked text, the centre's index among the
    kept tokens and their number, the centre's token string."""

    tokens: pl.Series  # List(String)
    text: pl.Series  # String: the tokens joined, the centre one marked
    centre: Tensor  # [m] int64
    length: Tensor  # [m] int64
    centre_token: pl.Series  # String


def marked_windows(
    win: Tensor, half: int, window: int, token_strings: Callable[[list[int]], list[str]]
) -> MarkedWindows:
    """The windows of half-width `window` (<= `half`) at the centre of `win [m, 2 * half + 1]` token ids:
    ids < 0 (outside the context, padding) dropped, the centre kept; `token_strings` asked once for the
    distinct ids."""
    ids = win[:, half - window : half + window + 1].long()
    keep = ids >= 0
    keep[:, window] = True
    centre, length = keep[:, :window].sum(1), keep.sum(1)
    # the kept ids moved to the front of each row, in order
    packed = ids.gather(1, torch.argsort((~keep).to(torch.int8), dim=1, stable=True))
    distinct = torch.unique(ids[keep])
    strings = token_strings(distinct.tolist()) if len(distinct) else []
    if len(strings) != len(distinct):
        raise ValueError(f"token_strings returned {len(strings)} strings for {len(distinct)} token ids")
    at = torch.searchsorted(distinct, packed)
    at = torch.where(torch.arange(ids.shape[1]) < length[:, None], at, len(distinct))  # past the end: null
    names = pl.Series(strings, dtype=pl.String)
    padded = pl.concat([names, pl.Series([None], dtype=pl.String)])
    centre_at = torch.searchsorted(distinct, ids[:, window].contiguous()).numpy()
    frame = pl.DataFrame(
        {
            "tokens": padded.gather(at.flatten().numpy()).reshape(tuple(ids.shape)),
            "centre": centre.numpy(),
            "length": length.numpy(),
            "marked": pl.Series([mark(s) for s in strings], dtype=pl.String).gather(centre_at),
        }
    )
    tokens = pl.col("tokens").arr.to_list().list.head(pl.col("length"))
    frame = frame.select(tokens, "centre", "marked").select(
        "tokens",
        pl.concat_str(
            pl.col("tokens").list.slice(0, pl.col("centre")).list.join(""),
            "marked",
            pl.col("tokens").list.slice(pl.col("centre") + 1).list.join(""),
        ).alias("text"),
        pl.col("tokens").list.get(pl.col("centre")).alias("centre_token"),
    )
    return MarkedWindows(frame["tokens"], frame["text"], centre, length, frame["centre_token"])
