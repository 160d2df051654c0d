"""documents.parquet: the documents in the order and split their ids' hashes give, ids made unique by their
source, written in two passes that hold one bucket of text, not the corpus."""

from __future__ import annotations

import hashlib
import json
import tracemalloc

import polars as pl
import pytest

from featureatlas.schemas.spec import CorpusSpec
from featureatlas.tasks.common import documents
from featureatlas.tasks.common.documents import load_documents, write_documents


def _jsonl(path, texts) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


def _definition(rows: list[tuple[str, str, str]], heldout_fraction: float) -> pl.DataFrame:
    """The frame written from the definition: (doc_id, source, text) sorted by sha256('order:' + id),
    held out where the first 4 bytes of sha256(id) fall under the fraction."""

    def split(d: str) -> str:
        return (
            "heldout"
            if int(hashlib.sha256(d.encode()).hexdigest()[:8], 16) / 2**32 < heldout_fraction
            else "train"
        )

    rows = sorted(rows, key=lambda r: hashlib.sha256(f"order:{r[0]}".encode()).hexdigest())
    return pl.DataFrame(
        [(*r, split(r[0])) for r in rows], schema=["doc_id", "source", "text", "split"], orient="row"
    )


def test_documents_are_ordered_and_split_by_their_ids_hashes(tmp_path, monkeypatch):
    monkeypatch.setattr(documents, "_FLUSH_CHARS", 64)  # many row groups per bucket
    texts = [f"document {i} " + "word " * (i % 17) for i in range(700)] + ["   "]  # blank: left out
    source = _jsonl(tmp_path / "c.jsonl", texts)
    spec = CorpusSpec(sources=[source], heldout_fraction=0.25)
    counts = write_documents(spec, tmp_path / "out" / "documents.parquet")
    got = pl.read_parquet(tmp_path / "out" / "documents.parquet")
    want = _definition([(f"c.jsonl:{i}", source, t) for i, t in enumerate(texts[:-1])], 0.25)
    assert got.equals(want)
    assert counts == {
        "n_documents": 700,
        "n_chars": sum(len(t) for t in texts[:-1]),
        "n_heldout_documents": int((want["split"] == "heldout").sum()),
    }
    assert load_documents(spec).equals(want)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["documents.parquet"]


def test_two_files_of_one_name_get_ids_prefixed_by_their_source(tmp_path):
    a = _jsonl(tmp_path / "a" / "x.jsonl", ["alpha", "beta"])
    b = _jsonl(tmp_path / "b" / "x.jsonl", ["gamma"])
    got = load_documents(CorpusSpec(sources=[a, b], heldout_fraction=0.5))
    rows = [(f"{a}::x.jsonl:0", a, "alpha"), (f"{a}::x.jsonl:1", a, "beta"), (f"{b}::x.jsonl:0", b, "gamma")]
    assert got.equals(_definition(rows, 0.5))


def test_a_corpus_without_text_is_refused(tmp_path):
    with pytest.raises(ValueError, match="hold no text"):
        load_documents(CorpusSpec(sources=[_jsonl(tmp_path / "e.jsonl", [" ", ""])]))


def test_writing_documents_holds_a_bucket_not_the_corpus(tmp_path, monkeypatch):
    # 4 KB of text per bucket before it goes to disk: at most ~1 MB pending over 256 buckets. Corpora of 4
    # and 16 MB of text (Python's own allocations, traced: the strings read and the rows pending)
    monkeypatch.setattr(documents, "_FLUSH_CHARS", 4096)
    peaks = []
    for n in (20, 1_000, 4_000):  # the first loads the readers
        source = _jsonl(tmp_path / f"{n}.jsonl", [f"{i} " + "x" * 4000 for i in range(n)])
        spec = CorpusSpec(sources=[source])
        tracemalloc.start()
        try:
            write_documents(spec, tmp_path / f"{n}" / "documents.parquet")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        peaks.append(peak)
    small, large = peaks[1:]  # measured: 0.68 and 0.76 MB
    assert large < 4e6, f"peak {large / 1e6:.1f} MB for 16 MB of text"
    assert large - small < 1e6, f"{small / 1e6:.1f} -> {large / 1e6:.1f} MB while the text grew by 12 MB"
