"""A grown corpus folder changes the corpus fingerprint and everything downstream, nothing upstream."""

from __future__ import annotations

import os

import pytest

from featureatlas.schemas.methods import TopKConfig
from featureatlas.schemas.spec import CacheSpec, CorpusSpec, ModelSpec
from featureatlas.tasks.common.corpus import load_documents
from featureatlas.tasks.tracking.identity import (
    cache_identity,
    corpus_identity,
    dictionary_identity,
    model_identity,
)
from tests.helpers import TINY_TEXT


def _chain(folder):
    corpus = corpus_identity(CorpusSpec(sources=[str(folder)], max_tokens=4096))
    model = model_identity(ModelSpec(path="m"), [], "local")
    cache = cache_identity(model, corpus, ["model.layers.1"], CacheSpec())
    dictionary = dictionary_identity(cache, "model.layers.1", TopKConfig(d_sae=64, k=4))
    return model, corpus, cache, dictionary


def test_grown_folder_changes_corpus_and_downstream_fingerprints_only(tmp_path):
    folder = tmp_path / "news"
    (folder / "2026").mkdir(parents=True)
    (folder / "2026" / "a.txt").write_text(TINY_TEXT[0])
    (folder / "b.txt").write_text(TINY_TEXT[1])
    docs = load_documents(CorpusSpec(sources=[str(folder)]))
    assert sorted(docs["doc_id"]) == ["news/2026/a.txt", "news/b.txt"]
    assert set(docs["text"]) == {TINY_TEXT[0], TINY_TEXT[1]}
    before = _chain(folder)

    # touching a file without changing it keeps every fingerprint: identity follows content, not mtime
    st = (folder / "b.txt").stat()
    os.utime(folder / "b.txt", ns=(st.st_atime_ns + 10**9, st.st_mtime_ns + 10**9))
    assert _chain(folder) == before

    (folder / "c.txt").write_text(TINY_TEXT[2])  # the folder grew
    after = _chain(folder)
    assert after[0] == before[0]  # the model: reused
    for old, new in zip(before[1:], after[1:]):  # corpus, cache, dictionary: rebuilt
        assert old.fingerprint != new.fingerprint and old.id != new.id
    assert len(load_documents(CorpusSpec(sources=[str(folder)]))) == 3

    (folder / "b.txt").write_text(TINY_TEXT[1] + " edited")  # an edited file counts too
    assert _chain(folder)[1] != after[1]


def test_empty_folder_is_refused_with_the_fix(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("not a corpus file")
    with pytest.raises(ValueError, match=r"holds no \.txt, \.jsonl, \.parquet files.*fix `corpus.sources`"):
        load_documents(CorpusSpec(sources=[str(tmp_path / "empty")]))
