"""A corpus's documents (`tasks.common.documents`) cut or packed into token contexts."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import polars as pl

from featureatlas.schemas.spec import CorpusSpec
from featureatlas.tasks.common.contexts import Contexts, ContextWriter
from featureatlas.tasks.common.documents import load_documents, write_documents
from featureatlas.tasks.common.parquet import open_parquet

__all__ = ["build_contexts", "load_documents", "pack_contexts", "split_budgets", "write_documents"]


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def split_budgets(spec: CorpusSpec) -> dict[bool, int]:
    """Tokens each split may take, keyed by `heldout`: the held-out share of `max_tokens` is reserved for
    held-out documents, so a budget smaller than the corpus never leaves evaluation without tokens (filling
    contexts in document order alone would hand the whole budget to whichever split comes first)."""
    heldout = round(spec.max_tokens * spec.heldout_fraction)
    return {True: heldout, False: spec.max_tokens - heldout}


GROUP_DOCUMENTS, GROUP_CHARS = 64, 1 << 20  # tokenized in one call: up to 64 documents or 1 MiB of text


def _groups(documents: pl.DataFrame | Path) -> Iterator[tuple[list[str], list[bool]]]:
    """(texts, held out) of consecutive documents, `GROUP_DOCUMENTS` or `GROUP_CHARS` of text at a time (a
    document longer than that alone), read from the frame or from documents.parquet in batches."""
    if isinstance(documents, pl.DataFrame):
        batches = (b.to_arrow() for b in documents.select("text", "split").iter_slices(GROUP_DOCUMENTS))
    else:
        file = open_parquet(documents)
        batches = file.iter_batches(batch_size=GROUP_DOCUMENTS, columns=["text", "split"])
    texts, held, chars = [], [], 0
    for batch in batches:
        for text, split in zip(batch.column("text").to_pylist(), batch.column("split").to_pylist()):
            texts.append(text)
            held.append(split == "heldout")
            chars += len(text)
            if len(texts) == GROUP_DOCUMENTS or chars >= GROUP_CHARS:
                yield texts, held
                texts, held, chars = [], [], 0
    if texts:
        yield texts, held


def _tokenized(
    documents: pl.DataFrame | Path, tokenizer, wanted: Callable[[bool], bool]
) -> Iterator[tuple[int, bool, np.ndarray | None]]:
    """(row, held out, token ids) of every document in order.

    Documents come a group at a time (`_groups`), so neither the corpus's text nor its ids are ever held
    whole, and a group is tokenized in one call: a fast tokenizer spreads it over the cores. A document whose
    split is not `wanted` when its group starts (its budget is spent: it stays spent) comes without ids. Ids
    are int64 arrays: 10^8 tokens held as Python ints would take ~40 bytes a token.
    """
    first = 0
    for texts, held in _groups(documents):
        todo = [j for j, h in enumerate(held) if wanted(h)]
        ids = tokenizer([texts[j] for j in todo], add_special_tokens=True)["input_ids"] if todo else []
        tokens = dict(zip(todo, ids))
        for j, h in enumerate(held):
            t = tokens.get(j)
            yield first + j, h, None if t is None else np.asarray(t, dtype=np.int64)
        first += len(texts)


def pack_contexts(
    documents: pl.DataFrame | Path, tokenizer, spec: CorpusSpec, path: Path | None = None
) -> Contexts:
    """Documents end to end (each followed by EOS) in full contexts, train and held-out kept apart.

    Each split takes its share of `max_tokens` (`split_budgets`), or all of its documents when they are
    fewer: every context is full except the last one of each split. A context goes to the writer when it is
    full (`build_contexts` says where it ends up), so building holds one context per split.
    """
    L, eos = spec.context_length, tokenizer.eos_token_id
    budget = split_budgets(spec)
    fill = {h: [np.empty(L, np.int64), [], 0] for h in (False, True)}  # ids, runs (position, doc), used
    taken = {False: 0, True: 0}
    with ContextWriter(L, _pad_id(tokenizer), path) as out:
        for i, heldout, tokens in _tokenized(documents, tokenizer, lambda h: taken[h] < budget[h]):
            if taken[heldout] >= budget[heldout]:
                if all(taken[h] >= budget[h] for h in taken):
                    break
                continue
            if eos is not None and (not len(tokens) or tokens[-1] != eos):
                tokens = np.append(tokens, eos)  # marks the document boundary for the model
            ids, runs, used = fill[heldout]
            pos = 0
            while pos < len(tokens) and taken[heldout] < budget[heldout]:
                take = min(L - used, len(tokens) - pos, budget[heldout] - taken[heldout])
                ids[used : used + take] = tokens[pos : pos + take]
                runs.append((used, i))
                used, pos, taken[heldout] = used + take, pos + take, taken[heldout] + take
                if used == L:
                    out.add(ids, heldout, runs)
                    runs.clear()
                    used = 0
            fill[heldout][2] = used
        for h, (ids, runs, used) in fill.items():
            if used:
                out.add(ids[:used], h, runs)
        if not len(out):
            raise ValueError("the corpus yields no context; add text")
        return out.finish()


def build_contexts(
    documents: pl.DataFrame | Path, tokenizer, spec: CorpusSpec, path: Path | None = None
) -> Contexts:
    """Cut each document into windows of `context_length` tokens until `max_tokens` real tokens are taken.

    `documents` is the documents frame or its parquet file (read a batch of rows at a time). With `path` the
    contexts are written there (contexts.safetensors) as they are made and read back a slice at a time, so
    building and holding them take memory set by a block of contexts, not by the corpus; without one they are
    held in memory.

    Each split takes its share of the budget (`split_budgets`), so evaluation always has held-out tokens
    when the corpus has held-out documents. Windows never cross documents; a document's tail shorter than
    `min_context_tokens` is dropped. With `spec.pack`, documents are packed end to end instead
    (`pack_contexts`).
    """
    if spec.pack:
        return pack_contexts(documents, tokenizer, spec, path)
    L = spec.context_length
    budget = split_budgets(spec)
    taken = {False: 0, True: 0}

    def full(h: bool) -> bool:  # what is left of the split's budget is too short for another window
        return budget[h] - taken[h] < max(spec.min_context_tokens, 1)

    with ContextWriter(L, _pad_id(tokenizer), path) as out:
        for i, held, tokens in _tokenized(documents, tokenizer, lambda h: not full(h)):
            if full(held):
                if full(not held):
                    break
                continue
            for start in range(0, len(tokens), L):
                window = tokens[start : start + L][: budget[held] - taken[held]]
                if len(window) < spec.min_context_tokens:
                    break
                out.add(window, held, [(0, i)])
                taken[held] += len(window)
        if not len(out):
            raise ValueError("the corpus yields no context; lower `corpus.min_context_tokens` or add text")
        return out.finish()
