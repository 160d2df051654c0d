"""Building contexts: the same tensors as the plain list-of-lists definition, held in memory or written to
contexts.safetensors (the bytes `save_file` writes for them) in memory set by a block of contexts, not by the
corpus."""

from __future__ import annotations

import random
import tracemalloc

import polars as pl
import pytest
import torch
from safetensors.torch import save_file

from featureatlas.schemas.spec import CorpusSpec
from featureatlas.tasks.common import contexts as contexts_module
from featureatlas.tasks.common import corpus
from featureatlas.tasks.common.contexts import open_contexts
from featureatlas.tasks.common.corpus import build_contexts, split_budgets


class WordTokenizer:
    """BOS, then one id per word (ids from 300 up, so none is a cached small int); the word `<eos>` is EOS."""

    pad_token_id, eos_token_id, bos = 0, 2, 1

    def __call__(self, text: str | list[str], add_special_tokens: bool = True) -> dict:
        if isinstance(text, list):  # a batch, as Hugging Face tokenizers take one
            return {"input_ids": [self(t, add_special_tokens)["input_ids"] for t in text]}
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
def test_contexts_equal_the_plain_definition(tmp_path, seed, pack):
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
    names = ["input_ids", "attention_mask", "doc_index", "heldout", "token_doc"]
    held = build_contexts(documents, tok, spec)
    on_disk = build_contexts(documents, tok, spec, tmp_path / "contexts.safetensors")
    for got in (held, on_disk):
        for name, w in zip(names, want):
            g = getattr(got, name)
            assert g.dtype == w.dtype and torch.equal(g, w), name
    # the file is what save_file writes for the tensors, and reads back the same (without the documents)
    save_file(
        dict(zip(["input_ids", "attention_mask"], want[:2])) | {"heldout": want[3].to(torch.uint8)},
        tmp_path / "ref",
    )
    assert (tmp_path / "contexts.safetensors").read_bytes() == (tmp_path / "ref").read_bytes()
    held.save(tmp_path / "saved.safetensors")
    assert (tmp_path / "saved.safetensors").read_bytes() == (tmp_path / "ref").read_bytes()
    opened = open_contexts(tmp_path / "contexts.safetensors")
    for name in names[:2]:
        assert torch.equal(getattr(opened, name), getattr(held, name)), name
    assert torch.equal(opened.heldout, held.heldout) and opened.sha256() == held.sha256()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["contexts.safetensors", "ref", "saved.safetensors"]


def _words(n_docs: int, words: int) -> pl.DataFrame:
    return pl.DataFrame({"text": [" ".join(["gamma"] * words)] * n_docs, "split": ["train"] * n_docs})


@pytest.mark.parametrize("pack", [False, True])
def test_building_contexts_into_their_file_takes_memory_set_by_a_block(tmp_path, monkeypatch, pack):
    # 1 MiB blocks; 100 and 400 documents of 2,000 words: 1.6 and 6.4 MB of ids. Held whole, the ids, mask
    # (and each token's document) took 16-24 bytes a token, and building them more
    monkeypatch.setattr(contexts_module, "BLOCK_BYTES", 1 << 20)
    monkeypatch.setattr(corpus, "GROUP_CHARS", 1 << 16)  # documents tokenized 5 at a time
    spec = CorpusSpec(
        sources=["unused"], context_length=512, max_tokens=10**7, heldout_fraction=0.0, pack=pack
    )
    peaks = []
    for n_docs in (1, 100, 400):  # the first loads pyarrow, read in the second and third
        documents = tmp_path / f"{n_docs}.parquet"
        _words(n_docs, 2000).write_parquet(documents)
        tracemalloc.start()
        try:
            contexts = build_contexts(documents, WordTokenizer(), spec, tmp_path / f"{n_docs}.safetensors")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert contexts.n_tokens == n_docs * (2001 + pack)
        peaks.append(peak)
    peaks = peaks[1:]
    ids_bytes = 400 * (2001 + pack) * 8
    # the writer's block and a block read back from the raw file (~3 MiB), less than the ids alone: held
    # whole, the ids and mask (and documents) took two to three times them
    assert peaks[1] < 0.75 * ids_bytes, f"peak {peaks[1] / 2**20:.2f} MiB"
    assert peaks[1] - peaks[0] < 0.1 * ids_bytes, f"{peaks[0] / 2**20:.2f} -> {peaks[1] / 2**20:.2f} MiB"


@pytest.mark.parametrize("pack", [False, True])
def test_contexts_held_in_memory_take_their_ids_once(monkeypatch, pack):
    monkeypatch.setattr(corpus, "GROUP_CHARS", 1 << 16)  # documents tokenized 5 at a time
    documents = _words(200, 2000)
    spec = CorpusSpec(
        sources=["unused"], context_length=512, max_tokens=10**6, heldout_fraction=0.0, pack=pack
    )
    tracemalloc.start()
    try:
        contexts = build_contexts(documents, WordTokenizer(), spec)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    ids = contexts.input_ids.nbytes
    assert contexts.n_tokens == 200 * (2001 + pack)
    # the ids, the writer's block and a group of documents' ids as the tokenizer's Python ints
    assert peak < 1.2 * ids + contexts_module.BLOCK_BYTES + 2**20, f"peak {peak / ids:.2f}x the ids' bytes"


_KILLED_BUILD = """
import sys, time
import polars as pl
from pathlib import Path
from featureatlas.schemas.spec import CorpusSpec
from featureatlas.tasks.common import contexts
from featureatlas.tasks.common.corpus import build_contexts
from tests.common.test_contexts_build import WordTokenizer

contexts.BLOCK_BYTES = 4096  # blocks of 64 contexts: rows reach the raw file early

class Slow(WordTokenizer):
    def __call__(self, text, add_special_tokens=True):
        time.sleep(0.05)
        return super().__call__(text, add_special_tokens)

docs = pl.DataFrame({"text": ["alpha beta gamma"] * 10_000, "split": ["train"] * 10_000})
spec = CorpusSpec(
    sources=["unused"], context_length=8, max_tokens=10**6, heldout_fraction=0.0, min_context_tokens=2
)
build_contexts(docs, Slow(), spec, Path(sys.argv[1]))
"""


def test_a_killed_build_leaves_nothing_the_next_one_keeps(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    path = tmp_path / "contexts.safetensors"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_BUILD, str(path)], env=env)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".contexts.safetensors.*.ids")):
        assert proc.poll() is None and time.monotonic() < deadline, "the build did not start in time"
        time.sleep(0.02)
    time.sleep(0.5)  # some blocks written
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not path.exists()
    live = tmp_path / f".contexts.safetensors.{os.getpid()}.abcd.ids"  # a build still running: kept
    live.write_bytes(b"")
    documents = _words(30, 20)
    spec = CorpusSpec(
        sources=["unused"], context_length=8, max_tokens=10**4, heldout_fraction=0.0, min_context_tokens=2
    )
    built = build_contexts(documents, WordTokenizer(), spec, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, live.name])
    assert torch.equal(built.input_ids, build_contexts(documents, WordTokenizer(), spec).input_ids)


def test_a_contexts_file_whose_mask_is_not_right_padded_is_refused(tmp_path):
    ids = torch.arange(12).view(3, 4)
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1], [1, 1, 0, 0]])  # row 1 left-padded
    save_file(
        {"input_ids": ids, "attention_mask": mask, "heldout": torch.zeros(3, dtype=torch.uint8)},
        tmp_path / "c",
    )
    with pytest.raises(ValueError, match="not right-padded"):
        open_contexts(tmp_path / "c")
    (tmp_path / "c").write_bytes((tmp_path / "c").read_bytes()[:-2])  # cut short
    with pytest.raises(ValueError, match="not the size its header says"):
        open_contexts(tmp_path / "c")
