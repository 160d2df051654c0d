"""Documents of a corpus from the built-in corpora, local files or saved `datasets`, in documents.parquet.

Built-in corpora ship with every Python: `pydoc_data.topics` (the topic help, ~113k SmolLM2 tokens) and the
docstrings of the standard library (~300k tokens). Held-out documents are chosen by a hash of the document id,
so the split is the same on every machine and does not move when other documents are added. Documents are
ordered by another hash of the id, so a token budget samples every source and the order is reproducible.

`write_documents` never holds the corpus's text: one pass sends each document to one of 256 bucket files by
the first byte of its order hash, a second sorts one bucket at a time into the Parquet file's row groups.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sysconfig
import tempfile
from array import array
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl

from featureatlas.schemas.spec import CorpusSpec
from featureatlas.tasks.common.parquet import open_parquet

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
        i = 0
        for batch in ds.iter(batch_size=1024):  # a batch of records at a time, not the whole column
            for text in batch[text_field]:
                yield f"{path.name}:{prefix}{i}", str(text)
                i += 1


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
        file = open_parquet(path)
        if text_field not in file.schema_arrow.names:
            raise ValueError(
                f"{path}: no column {text_field!r} (columns: {file.schema_arrow.names}); "
                "set `corpus.text_field`"
            )
        i = 0
        for batch in file.iter_batches(batch_size=1024, columns=[text_field]):
            for text in batch.column(text_field).to_pylist():
                yield f"{path.name}:{i}", str(text)
                i += 1


def _split(doc_id: str, heldout_fraction: float) -> str:
    h = int(hashlib.sha256(doc_id.encode()).hexdigest()[:8], 16) / 2**32
    return "heldout" if h < heldout_fraction else "train"


def _sources(spec: CorpusSpec) -> Iterator[tuple[str, str, str]]:
    """(doc_id, source, text) of every document with text, source by source."""
    for source in spec.sources:
        if source == "builtin:pydoc_topics":
            docs = _pydoc_topics()
        elif source == "builtin:stdlib_docstrings":
            docs = _stdlib_docstrings()
        else:
            docs = _local_file(Path(source), spec.text_field)
        yield from ((doc_id, source, text) for doc_id, text in docs if text.strip())


_BUCKETS = 256  # by the order hash's first byte: a bucket holds 1/256 of the corpus
_FLUSH_CHARS = 1 << 16  # a bucket's documents go to its file once they hold this much text (16 MiB in all)
_COLUMNS = ("doc_id", "source", "text", "split", "_order")


def _bucket(spec: CorpusSpec, folder: Path, prefixed: bool) -> tuple[int, bool]:
    """Every document into `folder/<bucket>.arrow`, an Arrow stream a bucket's batch appended at a time (a
    Parquet writer per bucket would keep its encoders' buffers: 0.05 GB over 256 of them); returns how many
    documents there were and whether their ids are unique."""
    import pyarrow as pa

    pending: dict[int, list[tuple]] = {}
    chars = [0] * _BUCKETS
    writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}
    keys = array("Q")  # 8 bytes of each order hash: the ids' uniqueness without holding them
    schema = pa.schema([(name, pa.string()) for name in _COLUMNS])

    def flush(b: int) -> None:
        columns = list(zip(*pending.pop(b)))
        batch = pa.record_batch([pa.array(c, pa.string()) for c in columns], schema=schema)
        if b not in writers:
            writers[b] = pa.ipc.new_stream(str(folder / f"{b:03d}.arrow"), schema)
        writers[b].write_batch(batch)
        chars[b] = 0

    try:
        for doc_id, source, text in _sources(spec):
            doc_id = f"{source}::{doc_id}" if prefixed else doc_id
            # a salted hash orders, not the one that picks the split: else held-out documents came first
            order = hashlib.sha256(f"order:{doc_id}".encode()).digest()
            keys.append(int.from_bytes(order[:8], "little"))
            pending.setdefault(order[0], []).append(
                (doc_id, source, text, _split(doc_id, spec.heldout_fraction), order.hex())
            )
            chars[order[0]] += len(text)
            if chars[order[0]] >= _FLUSH_CHARS:
                flush(order[0])
        for b in list(pending):
            flush(b)
    finally:
        for w in writers.values():
            w.close()
    if not keys:
        return 0, True
    return len(keys), len(np.unique(np.frombuffer(keys, dtype=np.uint64))) == len(keys)


def write_documents(spec: CorpusSpec, path: Path) -> dict:
    """Write documents.parquet (doc_id, source, text, split) in a fixed, hash-shuffled order, atomically;
    return its counts (n_documents, n_chars, n_heldout_documents). Memory: one bucket, 1/256 of the text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".documents-") as tmp:
        folder = Path(tmp)
        n, unique = _bucket(spec, folder, prefixed=False)
        if not n:
            raise ValueError(f"corpus sources {spec.sources} hold no text")
        if not unique:  # two local files with one name: ids made unique by their source's path
            for f in folder.glob("*.arrow"):
                f.unlink()
            _bucket(spec, folder, prefixed=True)
        counts = {"n_documents": 0, "n_chars": 0, "n_heldout_documents": 0}
        out = folder / "documents.parquet"
        schema = pl.DataFrame(schema=dict.fromkeys(_COLUMNS[:-1], pl.String)).to_arrow().schema
        with pq.ParquetWriter(str(out), schema) as w:
            for b in range(_BUCKETS):
                bucket = folder / f"{b:03d}.arrow"
                if not bucket.is_file():
                    continue
                with pa.ipc.open_stream(str(bucket)) as reader:
                    part = pl.from_arrow(reader.read_all()).sort("_order").drop("_order")
                bucket.unlink()
                w.write_table(part.to_arrow())
                counts["n_documents"] += part.height
                counts["n_chars"] += int(part["text"].str.len_chars().sum())
                counts["n_heldout_documents"] += int((part["split"] == "heldout").sum())
        with out.open("rb") as f:
            os.fsync(f.fileno())  # on disk before it takes its name
        os.replace(out, path)
    return counts


def load_documents(spec: CorpusSpec) -> pl.DataFrame:
    """All documents as a frame (doc_id, source, text, split), in their fixed, hash-shuffled order: what
    `write_documents` writes, read back whole (tests and small corpora; the stages read the file)."""
    with tempfile.TemporaryDirectory(prefix="featureatlas-documents-") as tmp:
        write_documents(spec, Path(tmp) / "documents.parquet")
        return pl.read_parquet(Path(tmp) / "documents.parquet")
