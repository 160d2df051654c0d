"""Building contexts: the same tensors as the plain list-of-lists definition, in less than twice the memory of
the result (a corpus held as Python ints takes ~40 bytes a token until the tensors are made)."""

from __future__ import annotations

import random
import tracemalloc

import polars as pl
import pytest
import torch

from featureatlas.schemas.spec import CorpusSpec
from featureatlas.tasks.common.corpus import build_contexts, split_budgets


class WordTokenizer:
    """BOS, then one id per word (ids from 300 up, so none is a cached small int); the word `<eos>` is EOS."""

    pad_token_id, eos_token_id, bos = 0, 2, 1

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        eos = self.eos_token_id
        ids = [eos if w == "<eos>" else 300 + sum(map(ord, w)) * 31 % 50_000 for w in text.split()]
        return {"input_ids": [self.bos] * add_special_tokens + ids}


def _reference(documents: pl.DataFrame, tok, spec: CorpusSpec) -> tuple[torch.Tensor, ...]:
    """The contexts as plain lists, written from the definition (windows, or documents packed with EOS)."""
    L, budget, taken = spec.context_length, split_budgets(spec), {False: 0, True: 0}
    out = []  # (ids, docs, heldout)
    open_ = {False: ([], []), True: ([], [])}
    for i, (text, split) in enumerate(zip(documents["text"], documents["split"])):
        held = split == "heldout"
        ids = tok(text)["input_ids"]
        if spec.pack:
            if not ids or ids[-1] != tok.eos_token_id:
                ids = ids + [tok.eos_token_id]
            for t in ids:
                if taken[held] >= budget[held]:
                    break
                open_[held][0].append(t)
                open_[held][1].append(i)
                taken[held] += 1
                if len(open_[held][0]) == L:
                    out.append((*open_[held], held))
                    open_[held] = ([], [])
            continue
        for start in range(0, len(ids), L):
            if budget[held] - taken[held] < max(spec.min_context_tokens, 1):
                break
            window = ids[start : start + L][: budget[held] - taken[held]]
            if len(window) < spec.min_context_tokens:
                break
            out.append((window, [i] * len(window), held))
            taken[held] += len(window)
    if spec.pack:
        out += [(*open_[h], h) for h in (False, True) if open_[h][0]]
    pad = lambda xs, v: xs + [v] * (L - len(xs))  # noqa: E731
    return (
        torch.tensor([pad(ids, tok.pad_token_id) for ids, _, _ in out]),
        torch.tensor([pad([1] * len(ids), 0) for ids, _, _ in out]),
        torch.tensor([docs[0] for _, docs, _ in out]),
        torch.tensor([h for _, _, h in out]),
        torch.tensor([pad(docs, -1) for _, docs, _ in out]),
    )


def _documents(rng: random.Random, n: int, max_words: int) -> pl.DataFrame:
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]
    texts = []
    for _ in range(n):
        text = [rng.choice(words) for _ in range(rng.randint(0, max_words))]
        texts.append(" ".join(text + (["<eos>"] if rng.random() < 0.3 else [])))
    return pl.DataFrame({"text": texts, "split": [rng.choice(["train", "train", "heldout"]) for _ in texts]})


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("pack", [False, True])
def test_contexts_equal_the_plain_definition(seed, pack):
    rng = random.Random(seed)
    documents = _documents(rng, rng.randint(20, 80), max_words=rng.choice([10, 40, 150]))
    total = sum(len(t.split()) + 2 for t in documents["text"])
    spec = CorpusSpec(
        sources=["unused"],
        context_length=rng.choice([8, 16, 32]),
        max_tokens=max(rng.choice([total * 2, total // 2, 256]), 256),  # all of it, or a budget that cuts
        heldout_fraction=rng.choice([0.1, 0.3]),
        min_context_tokens=rng.choice([2, 4]),
        pack=pack,
    )
    tok = WordTokenizer()
    try:
        want = _reference(documents, tok, spec)
    except RuntimeError:  # the definition found no context (torch.tensor of an empty list of lists)
        with pytest.raises(ValueError, match="no context"):
            build_contexts(documents, tok, spec)
        return
    got = build_contexts(documents, tok, spec)
    names = ["input_ids", "attention_mask", "doc_index", "heldout", "token_doc"]
    for name, w, g in zip(names, want, got if pack else (*got[:4], want[4])):
        assert g.dtype == w.dtype and torch.equal(g, w), name


@pytest.mark.parametrize("pack", [False, True])
def test_building_contexts_takes_less_than_twice_the_memory_of_the_result(pack):
    # 200 documents of 2,000 words, 400,000 tokens: Python lists of ids, masks (and documents) took 48-56
    # bytes a token while they were built, 2.3-3x the tensors they became
    documents = pl.DataFrame({"text": [" ".join(["gamma"] * 2000)] * 200, "split": ["train"] * 200})
    spec = CorpusSpec(
        sources=["unused"], context_length=512, max_tokens=10**6, heldout_fraction=0.0, pack=pack
    )
    tracemalloc.start()
    try:
        contexts = build_contexts(documents, WordTokenizer(), spec)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    result = sum(t.nbytes for t in contexts if t is not None)
    assert int(contexts.attention_mask.sum()) == 200 * (2001 + pack)
    assert peak < 2 * result, f"peak {peak / result:.2f}x the contexts' bytes"
