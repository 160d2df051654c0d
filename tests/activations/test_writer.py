"""The shard writer: pinned bytes, statistics summed on its thread equal those of the shards reread, and a
failed write raised in the caller's thread."""

from __future__ import annotations

import hashlib
import json
import time

import pytest
import torch
from safetensors.torch import load_file

from featureatlas.schemas.spec import CacheSpec, CorpusSpec
from featureatlas.tasks.activations.cache import write_cache
from featureatlas.tasks.common import shard_stats, shards, threads
from featureatlas.tasks.common.corpus import load_documents
from featureatlas.tasks.common.models import LoadedModel
from featureatlas.tasks.common.shards import ShardWriter, shard_statistics, summarize
from tests.helpers import TINY_TEXT, build_tiny_llama, build_tiny_tokenizer

D_IN, T = 24, 64
# sha256 of the four shards (64, 64, 64 and a tail of 8 rows) of `_rows()`, and two of their statistics, as
# the writer made them before it summed statistics on its own thread (the bytes and figures must not move)
PINNED = {
    "float32": [
        "309ca8ab6470e720f9bb24a074fe68b1b7b41f5d99570fe985afef7832b5cc1b",
        "254ea0128403874ca1a454f2c5d87c112f1ead83baa010424b6a05dcefb63704",
        "d8e29b8928f8ddb9325464e4bc589adf964dd75d4e902de9510de6cf4e0b2548",
        "17d7e4b44c05b296a8b4b1b509f00fb55213a65500dd4078d72ac5b0f3a2a5b0",
    ],
    "bfloat16": [
        "ebf9697708e1e506e3abbabd43ac7bb2fa6d85d21448fb38c2b8df629830e483",
        "7c09a0def4a54ce746049d5b7cbfd7958f81bce0a471339cbdc5499a52d4e096",
        "41d25f581d0ac311d5efee6741c24f125b037266c8f6e20a6ce88c2b6a3ca2d1",
        "33c90f9fe281c3d1fe595341038c583b56cd8e9252d1678654ab7a80baf36831",
    ],
}
PINNED_STATS = {
    "float32": (89.01654638398746, 7960.055334881591),
    "bfloat16": (89.01935057773268, 7960.5630430542005),
}


def _rows() -> list[torch.Tensor]:
    """200 rows of exactly representable values, in uneven pieces (as batches of padded contexts come)."""
    gen = torch.Generator().manual_seed(3)
    acts = torch.randint(-2000, 2000, (200, D_IN), generator=gen).float() / 64
    return list(acts.split([5, 70, 1, 64, 60]))


def _write_all(writer: ShardWriter) -> dict:
    """Every row of `_rows()` through `writer`, finished: its manifest entry."""
    for piece in _rows():
        writer.add(piece)
    return writer.finish()


def _write_parts(folder, dtype: str) -> ShardWriter:
    writer = ShardWriter(folder, "resid_post.0", D_IN, dtype, T, stats=False)
    for piece in _rows():
        writer.add(piece)
    writer.finish()
    return writer


def _assemble(folder, dtype: str, verified=()) -> dict:
    writer = ShardWriter(folder, "resid_post.0", D_IN, dtype, T)
    writer.adopt(4, verified)
    return writer.finish()


def _reference(folder, dtype: str) -> dict:
    """The statistics summed as the assembly summed them before shards carried records: each shard reread
    from disk, in order."""
    total, total_sq = torch.zeros(D_IN, dtype=torch.float64), torch.zeros(D_IN, dtype=torch.float64)
    norm_sum, rows = 0.0, 0
    for i in range(4):
        shard = load_file(str(folder / "acts" / "resid_post.0" / f"{i:05d}.safetensors"))["acts"]
        assert shard.dtype == shards.DTYPES[dtype]
        t, tq, n = shard_statistics(shard)
        total, total_sq, norm_sum, rows = total + t, total_sq + tq, norm_sum + n, rows + shard.shape[0]
    return summarize(total, total_sq, norm_sum, rows)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_statistics_from_the_records_equal_the_shards_reread(tmp_path, dtype):
    verified = _write_parts(tmp_path / "a", dtype).verified
    assert verified == {0, 1, 2, 3}
    for folder in ("b", "c"):
        _write_parts(tmp_path / folder, dtype)
    reference = _reference(tmp_path / "a", dtype)
    trusted = _assemble(tmp_path / "a", dtype, verified)  # hashed as written: not read again
    rehashed = _assemble(tmp_path / "b", dtype)  # hashed again, statistics from the records
    for stats in (tmp_path / "c" / "acts" / "resid_post.0").glob("*.stats"):
        stats.unlink()  # records of an older writer: statistics from the shards themselves
    reread = _assemble(tmp_path / "c", dtype)
    assert trusted == rehashed == reread  # to the bit: the manifest's figures do not depend on the path
    assert {k: trusted[k] for k in reference} == reference
    assert [s["rows"] for s in trusted["shards"]] == [64, 64, 64, 8] and trusted["rows"] == 200
    leftovers = [p.name for p in (tmp_path / "a" / "acts" / "resid_post.0").iterdir()]
    assert sorted(leftovers) == [f"{i:05d}.safetensors" for i in range(4)]  # the records are gone


def test_wide_shards_are_summed_in_cache_sized_chunks_to_float64_rounding():
    """At d_in 4096 a chunk is 64 rows (2 MiB of float64); the chunked sums equal one float64 pass."""
    assert [shard_stats.chunk_rows(d) for d in (24, 2048, 4096, 10**6)] == [1024, 128, 64, 16]
    assert shard_stats.chunk_rows(4096, "cuda") == shard_stats.DEVICE_CHUNK_ROWS  # launches, not cache misses
    shard = torch.randn(300, 4096).to(torch.bfloat16)  # five chunks, the last one short
    total, total_sq, norm_sum = shard_statistics(shard, shard_stats.stats_scratch(4096))
    a64 = shard.double()
    assert torch.allclose(total, a64.sum(0), rtol=1e-12, atol=1e-12)
    assert torch.allclose(total_sq, (a64 * a64).sum(0), rtol=1e-12)
    assert norm_sum == pytest.approx(float(a64.norm(dim=1).sum()), rel=1e-12)
    fresh = shard_statistics(shard)  # fresh memory per chunk or the scratch: the same bits
    assert torch.equal(fresh[0], total) and torch.equal(fresh[1], total_sq) and fresh[2] == norm_sum


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rows_hashed_beside_the_write_hash_as_the_file(tmp_path, dtype):
    """The sha256 computed on a second thread while the rows are written is that of the file's bytes."""
    acts = torch.cat(_rows()).to(shards.DTYPES[dtype])
    with threads.side_pool("hash") as pool:
        beside = shards.write_acts_shard(acts, tmp_path / "a.safetensors", hash_pool=pool)
    inline = shards.write_acts_shard(acts, tmp_path / "b.safetensors")
    assert beside == inline == hashlib.sha256((tmp_path / "a.safetensors").read_bytes()).hexdigest()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_shard_bytes_are_pinned(tmp_path, dtype):
    _write_parts(tmp_path, dtype)
    info = _assemble(tmp_path, dtype)
    acts = torch.cat(_rows()).to(shards.DTYPES[dtype])
    for i, shard in enumerate(info["shards"]):
        data = (tmp_path / shard["file"]).read_bytes()
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
        assert header["acts"]["shape"] == [len(acts[i * T : (i + 1) * T]), D_IN]
        assert torch.equal(load_file(str(tmp_path / shard["file"]))["acts"], acts[i * T : (i + 1) * T])
    assert [s["sha256"] for s in info["shards"]] == PINNED[dtype]
    # float64 sums: equal to the bit on one machine (the test above); across CPUs to float64 rounding
    assert (info["mean_norm"], info["total_variance"]) == pytest.approx(PINNED_STATS[dtype], rel=1e-12)


def test_a_failed_write_is_raised_in_the_callers_thread(tmp_path, monkeypatch):
    def full_disk(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shards, "write_acts_shard", full_disk)
    writer = ShardWriter(tmp_path, "resid_post.0", D_IN, "float32", T)
    with pytest.raises(OSError, match="No space left"):
        _write_all(writer)


def test_a_failed_write_fails_the_cache(tmp_path, monkeypatch):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": " ".join(TINY_TEXT[i : i + 5])}) for i in range(12)))
    corpus = CorpusSpec(sources=[str(path)], context_length=16, max_tokens=300, min_context_tokens=4)
    loaded = LoadedModel(build_tiny_llama(), build_tiny_tokenizer(), torch.device("cpu"))
    calls = []

    def fails_on_the_second(acts, path, before_rename=None, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        return write_acts_shard(acts, path, before_rename, **kwargs)

    write_acts_shard = shards.write_acts_shard
    monkeypatch.setattr(shards, "write_acts_shard", fails_on_the_second)
    out = tmp_path / "cache"
    with pytest.raises(OSError, match="Input/output error"):
        write_cache(
            loaded, load_documents(corpus), corpus, CacheSpec(shard_tokens=64, batch_size=4),
            ["resid_post.0"], out, header={},
        )  # fmt: skip
    assert not (out / "manifest.json").exists()


def test_a_failed_fsync_is_raised_before_the_writer_finishes(tmp_path, monkeypatch):
    """The fsync runs after the rename, on its own thread; a disk that fails it still fails the writer, by
    `finish` at the latest, so no manifest is written over a shard that may not be on disk."""
    synced = []

    def failing_fsync(path):
        synced.append(path.name)
        if len(synced) == 2:
            raise OSError(5, "Input/output error")

    monkeypatch.setattr(shards, "fsync_file", failing_fsync)
    writer = ShardWriter(tmp_path, "resid_post.0", D_IN, "float32", T)
    with pytest.raises(OSError, match="Input/output error"):
        _write_all(writer)
    assert synced[:2] == ["00000.safetensors", "00001.safetensors"]  # in shard order, after the rename


def test_every_shard_is_fsynced_by_finish(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(shards, "fsync_file", lambda path: synced.append(path) or time.sleep(0.01))
    writer = ShardWriter(tmp_path, "resid_post.0", D_IN, "float32", T)
    info = _write_all(writer)
    # (paths under this test's folder: a writer another test left failing may still be finishing its shards)
    assert [p for p in synced if p.is_relative_to(tmp_path)] == [tmp_path / s["file"] for s in info["shards"]]


def test_side_threads_run_torch_on_one_thread():
    """The writer's, statistics' and token table's threads must not start a second team of intra-op threads
    beside the model's (on few cores their spin-waits cost more than the work)."""
    # the caller on a team of two, as on any machine of two cores or more: the side thread keeps to one
    with threads.intra_op_threads(2), threads.side_pool("t") as pool:
        assert pool.submit(torch.get_num_threads).result() == 1


def test_a_failed_writer_writes_nothing_after_its_error(tmp_path, monkeypatch):
    """Once a failure is raised, the writer's queued work is cancelled and its running work waited for: no
    shard lands on disk behind the caller's back."""
    write_acts_shard, calls = shards.write_acts_shard, []

    def fails_on_the_first(acts, path, before_rename=None, **kwargs):
        calls.append(path)
        if len(calls) == 1:
            time.sleep(0.05)  # the next shards queue behind it
            raise OSError(5, "Input/output error")
        return write_acts_shard(acts, path, before_rename, **kwargs)

    monkeypatch.setattr(shards, "write_acts_shard", fails_on_the_first)
    writer = ShardWriter(tmp_path, "resid_post.0", D_IN, "float32", T)
    with pytest.raises(OSError, match="Input/output error"):
        _write_all(writer)
    files = sorted(p.name for p in writer.folder.iterdir())
    time.sleep(0.2)
    assert sorted(p.name for p in writer.folder.iterdir()) == files
    assert len(calls) < 4  # the shards queued behind the failure were never written
