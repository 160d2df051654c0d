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

import numpy as np
import polars as pl

from featureatlas.schemas.spec import CorpusSpec
from featureatlas.tasks.common.contexts import Contexts, ContextWriter

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


def _texts(documents: pl.DataFrame | Path, rows: int = 64) -> Iterator[tuple[str, str]]:
    """(text, split) of every document in order, from the frame or from documents.parquet, `rows` documents
    at a time: building contexts never holds the corpus's text as Python strings."""
    if isinstance(documents, pl.DataFrame):
        batches = (b.to_arrow() for b in documents.select("text", "split").iter_slices(rows))
    else:
        import pyarrow.parquet as pq

        batches = pq.ParquetFile(documents).iter_batches(batch_size=rows, columns=["text", "split"])
    for batch in batches:
        yield from zip(batch.column("text").to_pylist(), batch.column("split").to_pylist())


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
        for i, (text, split) in enumerate(_texts(documents)):
            heldout = split == "heldout"
            if taken[heldout] >= budget[heldout]:
                if all(taken[h] >= budget[h] for h in taken):
                    break
                continue
            tokens = _token_ids(tokenizer, text)
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
        for i, (text, split) in enumerate(_texts(documents)):
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
                out.add(window, held, [(0, i)])
                taken[held] += len(window)
        if not len(out):
            raise ValueError("the corpus yields no context; lower `corpus.min_context_tokens` or add text")
        return out.finish()
