"""Packed contexts: full windows across documents, splits kept apart, the token budget met exactly."""

from __future__ import annotations

import json

import polars as pl
import pytest
import torch

from featureatlas.schemas.spec import CorpusSpec
from featureatlas.tasks.common.corpus import build_contexts, load_documents
from tests.helpers import TINY_TEXT, build_tiny_tokenizer


@pytest.fixture
def docs(tmp_path) -> tuple[CorpusSpec, pl.DataFrame]:
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": " ".join(TINY_TEXT[i : i + 3])}) for i in range(20)))
    spec = CorpusSpec(sources=[str(path)], context_length=16, max_tokens=333, heldout_fraction=0.3, pack=True)
    return spec, load_documents(spec)


def test_packing_fills_contexts_and_meets_the_budget_exactly(docs):
    spec, documents = docs
    tok = build_tiny_tokenizer()
    c = build_contexts(documents, tok, spec)
    lengths = c.attention_mask.sum(1)
    assert int(lengths.sum()) == 333  # exactly the budget
    assert (lengths < 16).sum() <= 2  # only the last context of each split is short
    assert set(c.heldout.tolist()) == {True, False}
    # every token sits in a context of its own document's split, and documents follow each other with EOS
    held = documents["split"].to_numpy() == "heldout"
    doc_of = c.token_doc[c.attention_mask.bool()]
    ctx_held = c.heldout.repeat_interleave(lengths)
    assert (torch.from_numpy(held)[doc_of] == ctx_held).all()
    first = c.token_doc[0]
    n_first = int((first == first[0]).sum())
    expected = tok(documents["text"][int(first[0])])["input_ids"] + [tok.eos_token_id]
    assert c.input_ids[0, :n_first].tolist() == expected[:n_first]
    assert (c.token_doc[~c.attention_mask.bool()] == -1).all()


def test_packing_a_small_corpus_takes_all_of_it(docs):
    spec, documents = docs
    tok = build_tiny_tokenizer()
    everything = sum(len(tok(t)["input_ids"]) + 1 for t in documents["text"])
    c = build_contexts(documents, tok, spec.model_copy(update={"max_tokens": 10**6}))
    assert int(c.attention_mask.sum()) == everything


def test_saved_dataset_folder_is_a_corpus(tmp_path):
    from datasets import Dataset, DatasetDict

    folder = tmp_path / "saved"
    DatasetDict(
        {
            "train": Dataset.from_dict({"body": TINY_TEXT[:3]}),
            "test": Dataset.from_dict({"body": TINY_TEXT[3:5]}),
        }
    ).save_to_disk(str(folder))
    docs = load_documents(CorpusSpec(sources=[str(folder)], text_field="body"))
    assert sorted(docs["doc_id"].to_list()) == [f"saved:test:{i}" for i in range(2)] + [
        f"saved:train:{i}" for i in range(3)
    ]
    assert set(docs["text"].to_list()) == set(TINY_TEXT[:5])
    with pytest.raises(ValueError, match=r"no column 'text'.*body"):
        load_documents(CorpusSpec(sources=[str(folder)]))


@pytest.mark.parametrize("pack", [True, False])
def test_heldout_share_of_the_budget_is_kept_when_train_documents_come_first(docs, pack):
    spec, documents = docs
    # the worst order for a budget filled in document order: every training document before any held-out one
    documents = documents.sort(pl.col("split") == "heldout")
    spec = spec.model_copy(
        update={"max_tokens": 200, "heldout_fraction": 0.1, "pack": pack, "min_context_tokens": 4}
    )
    c = build_contexts(documents, build_tiny_tokenizer(), spec)
    lengths = c.attention_mask.sum(1)
    held, train = int(lengths[c.heldout].sum()), int(lengths[~c.heldout].sum())
    if pack:
        assert (held, train) == (20, 180)  # exactly round(0.1 * 200) held-out tokens, the rest for training
    else:
        assert 0 < held <= 20 and 0 < train <= 180  # windows end at documents: at most each share
