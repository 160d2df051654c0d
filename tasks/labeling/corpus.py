"""Where the labeled activation rows came from: row -> (context, position), token windows, n-gram counts.

The streamed labeling passes only know row numbers (0..n_rows-1, in activation order). What a feature
table shows about a row (its context, position and a window of text) is asked for a few rows at a time:
the top contexts, the quantile examples, the silent rows. Two implementations:
- `TensorRows`: everything in memory (`row_context`, `row_position`, `context_tokens` tensors), for
  callers that hold them anyway (tests, small corpora);
- `CacheRows`: a cache's token table and contexts read in chunks on demand, so the memory of labeling
  does not grow with the corpus: no per-row array of the whole corpus, no whole contexts tensor. Rows are
  the cache's token-table rows left after the cache's own exclusions (as `ActivationCache.select_rows`),
  in order; every question is answered by one streamed scan of the token table or of the contexts.
`windows` returns `[m, 2 * half + 1]` token ids centred on each asked position, -1 outside its context.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from featureatlas.tasks.common.parquet import open_parquet
from featureatlas.tasks.labeling.stat_labeler import NgramCounts, count_ngrams

__all__ = ["CacheRows", "TensorRows", "window_ids"]


def window_ids(tokens: Tensor, ctx: Tensor, pos: Tensor, half: int) -> Tensor:
    """[m, 2 * half + 1] ids of `tokens [n_ctx, L]` around (ctx[i], pos[i]) (rows of `ctx` index `tokens`),
    -1 outside the context or on padding."""
    length = tokens.shape[1]
    at = pos.long()[:, None] + torch.arange(-half, half + 1)
    inside = (at >= 0) & (at < length)
    ids = tokens[ctx.long()[:, None], at.clamp(0, max(length - 1, 0))]
    return torch.where(inside & (ids >= 0), ids, torch.full_like(ids, -1))


def wanted_ngrams(windows: Tensor, half: int) -> Tensor:
    """Distinct bigram keys `a * 2^32 + b` ending at the centre of each window (both real tokens)."""
    if half < 1 or len(windows) == 0:
        return torch.empty(0, dtype=torch.int64)
    a, b = windows[:, half - 1].long(), windows[:, half].long()
    ok = (a >= 0) & (b >= 0)
    return torch.unique(a[ok] * (1 << 32) + b[ok])


class TensorRows:
    """Rows in memory: row i came from position `row_position[i]` of context `row_context[i]`, whose token
    ids are `context_tokens[row_context[i]]` (negative ids: padding)."""

    def __init__(self, row_context: Tensor, row_position: Tensor, context_tokens: Tensor):
        self.row_context, self.row_position = row_context.cpu().long(), row_position.cpu().long()
        self.context_tokens = context_tokens.cpu()
        self.n_rows = len(self.row_context)
        self.length = context_tokens.shape[1] if context_tokens.ndim == 2 else 0
        self._keys: tuple[Tensor, Tensor] | None = None

    def locate(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        rows = rows.cpu().long()
        return self.row_context[rows], self.row_position[rows]

    def rows_at(self, ctx: Tensor, pos: Tensor) -> Tensor:
        """The row of each (ctx, pos) pair, -1 where no row holds it."""
        if self._keys is None:
            self._keys = torch.sort(self.row_context * self.length + self.row_position)
        sorted_keys, order = self._keys
        want = ctx.long() * self.length + pos.long()
        if not len(sorted_keys):
            return torch.full_like(want, -1)
        at = torch.searchsorted(sorted_keys, want).clamp_max(len(sorted_keys) - 1)
        return torch.where(sorted_keys[at] == want, order[at], torch.full_like(want, -1))

    def windows(self, ctx: Tensor, pos: Tensor, half: int) -> Tensor:
        return window_ids(self.context_tokens, ctx, pos, half)

    def ngram_counts(self, bigrams: Tensor) -> NgramCounts:  # noqa: ARG002
        """Every n-gram of the contexts (a superset of the `bigrams` asked for)."""
        return count_ngrams(self.context_tokens)


class CacheRows:
    """The labeled rows of a cache, read from its token table and contexts a chunk at a time.

    `max_rows` keeps the first rows only (a label budget); `chunk_rows` token-table rows and `chunk_contexts`
    contexts are in memory at a time."""

    def __init__(
        self, store, max_rows: int | None = None, chunk_rows: int = 1 << 18, chunk_contexts: int = 4096
    ):
        from safetensors import safe_open

        self.folder = store.folder
        self.max_rows, self.chunk_rows, self.chunk_contexts = max_rows, chunk_rows, chunk_contexts
        self._parquet = open_parquet(self.folder / "tokens.parquet")  # a row group at a time
        names = self._parquet.schema_arrow.names
        self.exclude_first = bool(store.manifest["exclude_first_token"])
        self.exclude_special = bool(store.manifest.get("exclude_special_tokens", False)) and (
            "is_special" in names
        )
        with safe_open(str(self.folder / "contexts.safetensors"), "pt") as f:
            self.n_contexts, self.length = f.get_slice("input_ids").get_shape()
        self.n_rows = sum(len(rows) for _, rows, _, _ in self.chunks())

    def chunks(self) -> Iterator[tuple[int, Tensor, Tensor, Tensor]]:
        """(first row, cache rows, contexts, positions) of consecutive labeled rows, a chunk at a time."""
        columns = ["row", "context", "position"] + (["is_special"] if self.exclude_special else [])
        first = 0
        for batch in self._parquet.iter_batches(batch_size=self.chunk_rows, columns=columns):
            cols = {name: batch.column(name).to_numpy(zero_copy_only=False) for name in columns}
            keep = np.ones(batch.num_rows, dtype=bool)
            if self.exclude_first:
                keep &= cols["position"] > 0
            if self.exclude_special:
                keep &= ~cols["is_special"]
            if self.max_rows is not None:
                keep &= np.cumsum(keep) <= self.max_rows - first
            if not keep.any():
                if self.max_rows is not None and first >= self.max_rows:
                    return
                continue
            rows, ctx, pos = (torch.from_numpy(cols[k][keep].astype(np.int64)) for k in columns[:3])
            yield first, rows, ctx, pos
            first += len(rows)

    def cache_rows(self, batch_size: int) -> Iterator[Tensor]:
        """The cache rows of the labeled rows, `batch_size` at a time (the last batch shorter)."""
        pending: list[Tensor] = []
        have = 0
        for _, rows, _, _ in self.chunks():
            pending.append(rows)
            have += len(rows)
            while have >= batch_size:
                joined = torch.cat(pending)
                yield joined[:batch_size]
                pending, have = [joined[batch_size:]], have - batch_size
        if have:
            yield torch.cat(pending)

    def locate(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        rows = rows.cpu().long()
        ctx, pos = torch.full_like(rows, -1), torch.full_like(rows, -1)
        order = torch.argsort(rows)
        srt = rows[order]
        for first, chunk_rows, c, p in self.chunks():
            lo, hi = torch.searchsorted(srt, torch.tensor([first, first + len(chunk_rows)])).tolist()
            if lo < hi:
                ctx[order[lo:hi]], pos[order[lo:hi]] = c[srt[lo:hi] - first], p[srt[lo:hi] - first]
        if len(rows) and int(ctx.min()) < 0:
            raise ValueError(f"rows must be within the {self.n_rows} labeled rows")
        return ctx, pos

    def rows_at(self, ctx: Tensor, pos: Tensor) -> Tensor:
        want = ctx.long() * self.length + pos.long()
        out = torch.full_like(want, -1)
        order = torch.argsort(want)
        srt = want[order]
        for first, chunk_rows, c, p in self.chunks():
            keys = c * self.length + p  # ascending: the token table is in context, then position order
            lo = int(torch.searchsorted(srt, keys[0]))
            hi = int(torch.searchsorted(srt, keys[-1], right=True))
            if lo < hi:
                at = torch.searchsorted(keys, srt[lo:hi]).clamp_max(len(keys) - 1)
                found = keys[at] == srt[lo:hi]
                out[order[lo:hi][found]] = at[found] + first
        return out

    def _contexts(self, wanted: Tensor) -> Iterator[tuple[int, Tensor]]:
        """(first context, token ids with padding -1) of the context chunks holding any `wanted` context."""
        from safetensors import safe_open

        blocks = torch.unique(wanted.long() // self.chunk_contexts).tolist() if wanted is not None else None
        with safe_open(str(self.folder / "contexts.safetensors"), "pt") as f:
            ids, mask = f.get_slice("input_ids"), f.get_slice("attention_mask")
            for block in blocks if blocks is not None else range(-(-self.n_contexts // self.chunk_contexts)):
                a = block * self.chunk_contexts
                b = min(a + self.chunk_contexts, self.n_contexts)
                yield a, ids[a:b].long().masked_fill(mask[a:b] == 0, -1)

    def windows(self, ctx: Tensor, pos: Tensor, half: int) -> Tensor:
        out = torch.full((len(ctx), 2 * half + 1), -1, dtype=torch.int64)
        ctx, pos = ctx.long(), pos.long()
        for a, tokens in self._contexts(ctx):
            here = ((ctx >= a) & (ctx < a + len(tokens))).nonzero().flatten()
            out[here] = window_ids(tokens, ctx[here] - a, pos[here], half)
        return out

    def token_names(self) -> dict[int, str]:
        """{token id: display string} of every distinct token of the token table: bounded by the vocabulary,
        read a chunk at a time."""
        names: dict[int, str] = {}
        for batch in self._parquet.iter_batches(batch_size=self.chunk_rows, columns=["token_id", "token"]):
            ids = batch.column("token_id").to_numpy()
            _, first = np.unique(ids, return_index=True)
            tokens = batch.column("token").take(first).to_pylist()
            names.update(zip(ids[first].tolist(), tokens))
        return names

    def ngram_counts(self, bigrams: Tensor) -> NgramCounts:
        """Unigram counts of the whole corpus and the counts of the given bigrams (keys `a * 2^32 + b`) only:
        tables bounded by the vocabulary and by the bigrams asked for, whatever the corpus."""
        unigrams = np.zeros(0, dtype=np.int64)
        wanted = torch.sort(bigrams.long()).values
        found = torch.zeros(len(wanted), dtype=torch.int64)
        n = 0
        for _, tokens in self._contexts(None):
            part = count_ngrams(tokens)  # this chunk's counts, every bigram of it: one chunk in memory
            n += part.n
            if len(part.unigrams) > len(unigrams):
                unigrams = np.pad(unigrams, (0, len(part.unigrams) - len(unigrams)))
            unigrams[: len(part.unigrams)] += part.unigrams
            keys = torch.from_numpy(part.bigram_keys)
            keys = keys // part.vocab * (1 << 32) + keys % part.vocab
            if len(keys) and len(wanted):
                at = torch.searchsorted(keys, wanted).clamp_max(len(keys) - 1)
                hit = keys[at] == wanted
                found[hit] += torch.from_numpy(part.bigram_counts)[at[hit]]
        vocab = max(len(unigrams), 1)
        a, b = wanted // (1 << 32), wanted % (1 << 32)
        inside = (a < vocab) & (b < vocab) & (found > 0)
        keys, order = torch.sort(a[inside] * vocab + b[inside])
        return NgramCounts(unigrams, keys.numpy(), found[inside][order].numpy(), vocab, n)
