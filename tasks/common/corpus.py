"""Documents from the built-in corpora, local files or saved `datasets`, cut or packed into token contexts.

Built-in corpora ship with every Python: `pydoc_data.topics` (the topic help, ~113k SmolLM2 tokens) and the
docstrings of the standard library (~300k tokens). Held-out documents are chosen by a hash of the document id,
so the split is the same on every machine and does not move when other documents are added.
"""

from __future__ import annotations

import ast
import hashlib
import json
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import polars as pl
import torch

from featureatlas.schemas.spec import CorpusSpec

_MIN_DOCSTRING_CHARS = 200


def _pydoc_topics() -> Iterator[tuple[str, str]]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield f"pydoc:{name}", topics[name]


def _stdlib_docstrings() -> Iterator[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "lib2to3"}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if skip & set(rel.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few stdlib files are templates or in other encodings; they are not prose anyway
        nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef))]
        for node in nodes:
            doc = ast.get_docstring(node)
            if doc and len(doc) >= _MIN_DOCSTRING_CHARS:
                name = getattr(node, "name", "<module>")
                yield f"stdlib:{rel.as_posix()}:{name}:{getattr(node, 'lineno', 0)}", doc


def _saved_dataset(path: Path, text_field: str) -> Iterator[tuple[str, str]]:
    """Records of a `datasets` Dataset or DatasetDict (every split, in name order) saved with save_to_disk."""
    from datasets import Dataset, load_from_disk

    loaded = load_from_disk(str(path))
    parts = {"": loaded} if isinstance(loaded, Dataset) else {f"{k}:": loaded[k] for k in sorted(loaded)}
    for prefix, ds in parts.items():
        if text_field not in ds.column_names:
            raise ValueError(
                f"{path}: no column {text_field!r} (columns: {ds.column_names}); set `corpus.text_field`"
            )
        for i, text in enumerate(ds[text_field]):
            yield f"{path.name}:{prefix}{i}", str(text)


def _folder(path: Path, text_field: str) -> Iterator[tuple[str, str]]:
    """Every .txt, .jsonl and .parquet file under a plain folder, in path order (a corpus that grows)."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _FOLDER_SUFFIXES)
    if not files:
        raise ValueError(
            f"corpus folder {str(path)!r} holds no {', '.join(_FOLDER_SUFFIXES)} files (and is not a "
            "dataset saved with save_to_disk); add files or fix `corpus.sources`"
        )
    for f in files:
        rel = f.relative_to(path).as_posix()
        for doc_id, text in _local_file(f, text_field):
            yield f"{path.name}/{rel}{doc_id[len(f.name) :]}", text


_FOLDER_SUFFIXES = (".txt", ".jsonl", ".parquet")


def _local_file(path: Path, text_field: str) -> Iterator[tuple[str, str]]:
    if not path.exists():
        raise FileNotFoundError(f"corpus file {str(path)!r} does not exist; fix `corpus.sources` in the spec")
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            yield from _saved_dataset(path, text_field)
        else:
            yield from _folder(path, text_field)
    elif path.suffix == ".txt":
        yield f"{path.name}", path.read_text(encoding="utf-8")
    elif path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                record = json.loads(line)
                if text_field not in record:
                    raise ValueError(f"{path}:{i + 1}: no field {text_field!r}; set `corpus.text_field`")
                yield f"{path.name}:{i}", str(record[text_field])
    else:
        df = pl.read_parquet(path)
        if text_field not in df.columns:
            raise ValueError(
                f"{path}: no column {text_field!r} (columns: {df.columns}); set `corpus.text_field`"
            )
        for i, text in enumerate(df[text_field].to_list()):
            yield f"{path.name}:{i}", str(text)


def _split(doc_id: str, heldout_fraction: float) -> str:
    h = int(hashlib.sha256(doc_id.encode()).hexdigest()[:8], 16) / 2**32
    return "heldout" if h < heldout_fraction else "train"


def load_documents(spec: CorpusSpec) -> pl.DataFrame:
    """All documents as a frame (doc_id, source, text, split), in a fixed, hash-shuffled order."""
    rows = []
    for source in spec.sources:
        if source == "builtin:pydoc_topics":
            docs = _pydoc_topics()
        elif source == "builtin:stdlib_docstrings":
            docs = _stdlib_docstrings()
        else:
            docs = _local_file(Path(source), spec.text_field)
        rows.extend((doc_id, source, text) for doc_id, text in docs if text.strip())
    if not rows:
        raise ValueError(f"corpus sources {spec.sources} hold no text")
    df = pl.DataFrame(rows, schema=["doc_id", "source", "text"], orient="row")
    if df["doc_id"].n_unique() != df.height:
        # two local files with one name: make ids unique by prefixing the source path
        df = df.with_columns(doc_id=pl.col("source") + "::" + pl.col("doc_id"))
    # order by a hash of the id: a token budget then samples every source, and the order is reproducible.
    # A salted hash, not the one that picks the split: otherwise held-out documents would all come first.
    df = df.with_columns(
        split=pl.col("doc_id").map_elements(
            lambda d: _split(d, spec.heldout_fraction), return_dtype=pl.String
        ),
        _order=pl.col("doc_id").map_elements(
            lambda d: hashlib.sha256(f"order:{d}".encode()).hexdigest(), return_dtype=pl.String
        ),
    )
    return df.sort("_order").drop("_order")


class Contexts(NamedTuple):
    input_ids: torch.Tensor  # [n_ctx, L] int64, padded with the pad id
    attention_mask: torch.Tensor  # [n_ctx, L] int64, 1 for real tokens
    doc_index: torch.Tensor  # [n_ctx] int64: row of the (first) document in the documents frame
    heldout: torch.Tensor  # [n_ctx] bool
    token_doc: torch.Tensor | None = None  # [n_ctx, L] int64 document row per position (-1: padding)

    def doc_of_tokens(self) -> torch.Tensor:
        """Document row of every real token, in row order [n_tokens]."""
        if self.token_doc is not None:
            return self.token_doc[self.attention_mask.bool()]
        return torch.repeat_interleave(self.doc_index, self.attention_mask.sum(1))


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def split_budgets(spec: CorpusSpec) -> dict[bool, int]:
    """Tokens each split may take, keyed by `heldout`: the held-out share of `max_tokens` is reserved for
    held-out documents, so a budget smaller than the corpus never leaves evaluation without tokens (filling
    contexts in document order alone would hand the whole budget to whichever split comes first)."""
    heldout = round(spec.max_tokens * spec.heldout_fraction)
    return {True: heldout, False: spec.max_tokens - heldout}


def _token_ids(tokenizer, text: str) -> np.ndarray:
    """The document's token ids as one int64 array: a corpus of 10^8 tokens held as Python ints would take
    ~40 bytes a token (the int and the list's pointer) until the contexts are built."""
    return np.asarray(tokenizer(text, add_special_tokens=True)["input_ids"], dtype=np.int64)


def _padded(windows: list[np.ndarray], length: int, fill: int) -> torch.Tensor:
    """`windows` (each at most `length` long) as the rows of one int64 tensor, right-padded with `fill`."""
    out = np.full((len(windows), length), fill, dtype=np.int64)
    for row, window in zip(out, windows):
        row[: len(window)] = window
    return torch.from_numpy(out)


def _mask(lengths: list[int], length: int) -> torch.Tensor:
    """[n, length] int64 attention mask: 1 for the first lengths[i] positions of row i."""
    return (torch.arange(length) < torch.tensor(lengths, dtype=torch.int64)[:, None]).long()


def pack_contexts(documents: pl.DataFrame, tokenizer, spec: CorpusSpec) -> Contexts:
    """Documents end to end (each followed by EOS) in full contexts, train and held-out kept apart.

    Each split takes its share of `max_tokens` (`split_budgets`), or all of its documents when they are
    fewer: every context is full except the last one of each split. Contexts are filled as int64 arrays and
    padded once at the end, so building them peaks at about 1.4x the memory of the result, whatever the
    corpus.
    """
    L, eos = spec.context_length, tokenizer.eos_token_id
    budget = split_budgets(spec)
    fill = {h: [np.empty(L, np.int64), np.empty(L, np.int64), 0] for h in (False, True)}  # ids, docs, used
    done: list[tuple[np.ndarray, np.ndarray, bool]] = []
    taken = {False: 0, True: 0}
    for i, (text, split) in enumerate(zip(documents["text"], documents["split"])):
        heldout = split == "heldout"
        if taken[heldout] >= budget[heldout]:
            if all(taken[h] >= budget[h] for h in taken):
                break
            continue
        tokens = _token_ids(tokenizer, text)
        if eos is not None and (not len(tokens) or tokens[-1] != eos):
            tokens = np.append(tokens, eos)  # marks the document boundary for the model
        ids, docs, used = fill[heldout]
        pos = 0
        while pos < len(tokens) and taken[heldout] < budget[heldout]:
            take = min(L - used, len(tokens) - pos, budget[heldout] - taken[heldout])
            ids[used : used + take] = tokens[pos : pos + take]
            docs[used : used + take] = i
            used, pos, taken[heldout] = used + take, pos + take, taken[heldout] + take
            if used == L:
                done.append((ids.copy(), docs.copy(), heldout))
                used = 0
        fill[heldout][2] = used
    done.extend((ids[:used].copy(), docs[:used].copy(), h) for h, (ids, docs, used) in fill.items() if used)
    if not done:
        raise ValueError("the corpus yields no context; add text")
    return Contexts(
        _padded([ids for ids, _, _ in done], L, _pad_id(tokenizer)),
        _mask([len(ids) for ids, _, _ in done], L),
        torch.tensor([int(docs[0]) for _, docs, _ in done], dtype=torch.int64),
        torch.tensor([h for _, _, h in done], dtype=torch.bool),
        _padded([docs for _, docs, _ in done], L, -1),
    )


def build_contexts(documents: pl.DataFrame, tokenizer, spec: CorpusSpec) -> Contexts:
    """Cut each document into windows of `context_length` tokens until `max_tokens` real tokens are taken.

    Each split takes its share of the budget (`split_budgets`), so evaluation always has held-out tokens
    when the corpus has held-out documents. Windows never cross documents; a document's tail shorter than
    `min_context_tokens` is dropped. With `spec.pack`, documents are packed end to end instead
    (`pack_contexts`). Windows are views of each document's int64 ids, padded once at the end.
    """
    if spec.pack:
        return pack_contexts(documents, tokenizer, spec)
    L = spec.context_length
    budget = split_budgets(spec)
    windows: list[np.ndarray] = []
    doc_index, heldout = [], []
    taken = {False: 0, True: 0}

    def full(h: bool) -> bool:  # what is left of the split's budget is too short for another window
        return budget[h] - taken[h] < max(spec.min_context_tokens, 1)

    for i, (text, split) in enumerate(zip(documents["text"], documents["split"])):
        held = split == "heldout"
        if full(held):
            if full(not held):
                break
            continue
        tokens = _token_ids(tokenizer, text)
        for start in range(0, len(tokens), L):
            window = tokens[start : start + L][: budget[held] - taken[held]]
            if len(window) < spec.min_context_tokens:
                break
            windows.append(window)
            doc_index.append(i)
            heldout.append(held)
            taken[held] += len(window)
    if not windows:
        raise ValueError("the corpus yields no context; lower `corpus.min_context_tokens` or add text")
    return Contexts(
        _padded(windows, L, _pad_id(tokenizer)),
        _mask([len(w) for w in windows], L),
        torch.tensor(doc_index, dtype=torch.int64),
        torch.tensor(heldout, dtype=torch.bool),
    )
