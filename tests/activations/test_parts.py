"""A cache written in parts (`cache.parts`) is the cache written in one go, file for file, in any order."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from featureatlas.schemas.spec import CacheSpec, CorpusSpec
from featureatlas.tasks.activations.cache import (
    _split,
    assemble,
    plan_cache,
    prepare_cache,
    write_cache,
    write_part,
)
from featureatlas.tasks.common.contexts import open_contexts
from featureatlas.tasks.common.corpus import load_documents
from featureatlas.tasks.common.models import LoadedModel
from featureatlas.tasks.tracking.identity import Identity, cache_identity
from tests.activations.cache_worker import run
from tests.helpers import TINY_TEXT, build_tiny_llama, build_tiny_tokenizer

HOOKPOINTS = ["resid_post.0", "mlp_hidden.1", "attn_z.1"]
HEADER = {"model_id": "m"}


@pytest.fixture
def corpus_args(tmp_path) -> dict:
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": " ".join(TINY_TEXT[i : i + 5])}) for i in range(12)))
    return {
        "sources": [str(path)],
        "context_length": 16,
        "max_tokens": 700,
        "heldout_fraction": 0.3,
        "min_context_tokens": 4,
    }


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _loaded() -> LoadedModel:
    return LoadedModel(build_tiny_llama(), build_tiny_tokenizer(bos=True), torch.device("cpu"))


def test_split_shares_full_shards_and_gives_the_tail_to_the_last_part():
    # 700 rows of 64: 10 full shards and a tail of 60 rows (shard 10)
    assert _split(700, 64, 3) == [(0, 3), (3, 6), (6, 11)]
    assert _split(700, 64, 1) == [(0, 11)]
    assert _split(640, 64, 4) == [(0, 2), (2, 5), (5, 7), (7, 10)]  # no tail
    # more parts than full shards: one part per full shard; under one shard: one part
    assert _split(130, 64, 5) == [(0, 1), (1, 3)]
    assert _split(50, 64, 4) == [(0, 1)]


def test_parts_do_not_change_the_fingerprint():
    model, corpus = Identity("model", "m", "a" * 64), Identity("corpus", "c", "b" * 64)
    one = cache_identity(model, corpus, HOOKPOINTS, CacheSpec())
    assert cache_identity(model, corpus, HOOKPOINTS, CacheSpec(parts=4)) == one
    assert cache_identity(model, corpus, HOOKPOINTS, CacheSpec(shard_tokens=64)) != one


def test_parts_must_be_positive():
    with pytest.raises(ValueError, match="parts"):
        CacheSpec(parts=0)


@pytest.mark.parametrize(("shard_tokens", "batch_size"), [(64, 3), (100, 5), (96, 8)])
def test_parts_in_any_order_give_the_bytes_of_one_run(tmp_path, corpus_args, shard_tokens, batch_size):
    corpus, loaded = CorpusSpec(**corpus_args), _loaded()
    docs = load_documents(corpus)
    one = CacheSpec(shard_tokens=shard_tokens, batch_size=batch_size)
    write_cache(loaded, docs, corpus, one, HOOKPOINTS, tmp_path / "one", header=HEADER)
    reference = _files(tmp_path / "one")

    three = one.model_copy(update={"parts": 3})
    plan = plan_cache(loaded, docs, corpus, three, HOOKPOINTS, header=HEADER)
    assert len(plan.parts) == 3
    # the part boundaries fall inside contexts and inside batches: parts must start mid-batch to match
    row_end = plan.contexts.attention_mask.sum(1).cumsum(0).tolist()
    starts = [first * shard_tokens for first, _ in plan.parts[1:]]
    assert any(s not in row_end for s in starts)
    batch_ends = row_end[batch_size - 1 :: batch_size]
    assert any(s not in batch_ends for s in starts)
    for order, name in [([0, 1, 2], "forward"), ([2, 1, 0], "reverse")]:
        out = tmp_path / name
        prepare_cache(plan, out)
        for part in order:
            write_part(loaded, plan, three, out, part)
        assemble(loaded.tokenizer, docs, plan, three, out, header=HEADER)
        got = _files(out)
        assert sorted(got) == sorted(reference)
        assert [f for f in got if got[f] != reference[f]] == [], name  # manifest included
    # write_cache with parts=3 is the same too
    write_cache(loaded, docs, corpus, three, HOOKPOINTS, tmp_path / "call", header=HEADER)
    assert _files(tmp_path / "call") == reference


def test_parts_on_other_processes_read_the_contexts_built_into_the_folder(tmp_path, corpus_args):
    # as `cache_part` on a Dask worker: the contexts come from the folder's file, not from the documents
    corpus, loaded = CorpusSpec(**corpus_args | {"pack": True}), _loaded()
    docs = load_documents(corpus)
    spec = CacheSpec(shard_tokens=64, batch_size=3, parts=3)
    write_cache(
        loaded,
        docs,
        corpus,
        spec.model_copy(update={"parts": 1}),
        HOOKPOINTS,
        tmp_path / "one",
        header=HEADER,
    )
    out = tmp_path / "parts"
    plan = plan_cache(loaded, docs, corpus, spec, HOOKPOINTS, header=HEADER, folder=out)
    assert (out / "contexts.safetensors").is_file() and not list(out.glob(".contexts-*"))
    prepare_cache(plan, out)
    for part in (2, 0, 1):
        opened = open_contexts(out / "contexts.safetensors")
        worker = plan_cache(loaded, None, None, spec, HOOKPOINTS, header=HEADER, contexts=opened)
        assert worker.key == plan.key and worker.parts == plan.parts
        write_part(loaded, worker, spec, out, part)
    assemble(loaded.tokenizer, docs, plan, spec, out, header=HEADER)
    assert _files(out) == _files(tmp_path / "one")


def test_more_parts_than_shards_are_cut_down(tmp_path, corpus_args):
    corpus, loaded = CorpusSpec(**corpus_args | {"max_tokens": 300}), _loaded()
    docs = load_documents(corpus)
    spec = CacheSpec(shard_tokens=128, batch_size=3)
    plan = plan_cache(loaded, docs, corpus, spec.model_copy(update={"parts": 10}), HOOKPOINTS, header=HEADER)
    assert plan.parts == [(0, 1), (1, 3)]  # 300 rows: 2 full shards of 128, a tail of 44
    write_cache(loaded, docs, corpus, spec, HOOKPOINTS, tmp_path / "one", header=HEADER)
    many = spec.model_copy(update={"parts": 10})
    write_cache(loaded, docs, corpus, many, HOOKPOINTS, tmp_path / "many", header=HEADER)
    assert _files(tmp_path / "many") == _files(tmp_path / "one")


def test_a_part_refuses_an_unprepared_folder_and_assembly_a_missing_part(tmp_path, corpus_args):
    corpus, loaded = CorpusSpec(**corpus_args), _loaded()
    docs = load_documents(corpus)
    spec = CacheSpec(shard_tokens=64, batch_size=3, parts=3)
    plan = plan_cache(loaded, docs, corpus, spec, HOOKPOINTS, header=HEADER)
    with pytest.raises(RuntimeError, match="prepare_cache"):
        write_part(loaded, plan, spec, tmp_path / "c", 0)
    prepare_cache(plan, tmp_path / "c")
    write_part(loaded, plan, spec, tmp_path / "c", 0)
    write_part(loaded, plan, spec, tmp_path / "c", 2)
    with pytest.raises(RuntimeError, match=r"shard 00003 of hookpoint 'resid_post.0' is missing"):
        assemble(loaded.tokenizer, docs, plan, spec, tmp_path / "c", header=HEADER)
    assert not (tmp_path / "c" / "manifest.json").exists()


def test_killed_part_resumes_recomputing_only_its_missing_shards(tmp_path, corpus_args):
    cache = {"shard_tokens": 64, "batch_size": 3, "parts": 3}
    args = {"corpus": corpus_args, "cache": cache, "hookpoints": HOOKPOINTS}
    corpus, spec, loaded = CorpusSpec(**corpus_args), CacheSpec(**cache), _loaded()
    docs = load_documents(corpus)
    plan = plan_cache(loaded, docs, corpus, spec, HOOKPOINTS, header=HEADER)
    assert plan.parts == [(0, 3), (3, 6), (6, 11)]
    out = tmp_path / "killed"
    prepare_cache(plan, out)
    for part in (0, 2):
        write_part(loaded, plan, spec, out, part)

    # part 1 in its own process, killed once it wrote its first shard on every hookpoint
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    worker = [sys.executable, "-m", "tests.activations.cache_worker"]
    proc = subprocess.Popen([*worker, json.dumps(args | {"out": str(out), "part": 1})], env=env)
    deadline = time.monotonic() + 120
    while not all((out / "acts" / hp / "00003.safetensors").is_file() for hp in HOOKPOINTS):
        assert proc.poll() is None, "the worker ended before it was killed"
        assert time.monotonic() < deadline, "the worker wrote no shard in time"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    on_disk = {
        p.name: p.stat().st_mtime_ns for hp in HOOKPOINTS for p in (out / "acts" / hp).glob("*.safetensors")
    }
    done = min(len(list((out / "acts" / hp).glob("0000[3-5].safetensors"))) for hp in HOOKPOINTS)
    assert 1 <= done < 3, "the kill came after part 1 had finished"

    # the batches the missing rows lie in: part 1's shards from 3 + done on, and the tail (shard 10)
    row_end = plan.contexts.attention_mask.sum(1).cumsum(0)
    missing = [*range((3 + done) * 64, 6 * 64), *range(10 * 64, plan.n_rows)]
    context = torch.searchsorted(row_end, torch.tensor(missing), right=True)
    expected = len(set((context // 3).tolist()))

    calls = []
    loaded.model.register_forward_pre_hook(lambda *_: calls.append(1))
    write_cache(loaded, docs, corpus, spec, HOOKPOINTS, out, header=HEADER)
    assert len(calls) == expected
    n_batches = -(-plan.contexts.input_ids.shape[0] // 3)
    assert expected < n_batches / 2
    # parts 0 and 2 (but its tail) were adopted, not rewritten
    for name in [f"{i:05d}.safetensors" for i in (0, 1, 2, 6, 7, 8, 9)]:
        assert (out / "acts" / "attn_z.1" / name).stat().st_mtime_ns == on_disk[name]

    fresh = tmp_path / "fresh"
    run(args | {"out": str(fresh)} | {"cache": cache | {"parts": 1}})
    a, b = _files(out), _files(fresh)
    assert sorted(a) == sorted(b) and "resume.json" not in a
    assert [name for name in a if a[name] != b[name]] == []
