"""Kill a real caching process between shards, resume it, and get the bytes of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from featureatlas.tasks.common.store import ActivationCache
from tests.activations.cache_worker import run
from tests.helpers import TINY_TEXT, build_tiny_llama

HOOKPOINTS = ["resid_post.0", "mlp_hidden.1", "attn_z.1"]


@pytest.fixture
def args(tmp_path) -> dict:
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": " ".join(TINY_TEXT[i : i + 5])}) for i in range(12)))
    corpus = {
        "sources": [str(path)],
        "context_length": 16,
        "max_tokens": 700,
        "heldout_fraction": 0.3,
        "min_context_tokens": 4,
    }
    return {"corpus": corpus, "cache": {"shard_tokens": 64, "batch_size": 3}, "hookpoints": HOOKPOINTS}


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_killed_run_resumes_to_identical_bytes(tmp_path, args):
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.activations.cache_worker", json.dumps(args | {"out": str(killed)})],
        env=env,
        stderr=subprocess.PIPE,
    )
    shard_dir = killed / "acts" / "attn_z.1"
    deadline = time.monotonic() + 120
    # each hookpoint has its own writer thread, so they finish shards in any order: wait for all of them
    while min(len(list((killed / "acts" / hp).glob("*.safetensors"))) for hp in HOOKPOINTS) < 3:
        assert proc.poll() is None, f"the worker ended before it was killed: {proc.stderr.read().decode()}"
        assert time.monotonic() < deadline, "the worker wrote no shards in time"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "manifest.json").exists() and (killed / "resume.json").exists()
    kept = {p.name: p.stat().st_mtime_ns for p in shard_dir.glob("*.safetensors")}

    fresh = tmp_path / "fresh"
    run(args | {"out": str(fresh)})

    # resume in this process, counting forward passes: the finished shards are not recomputed
    calls = []
    original = build_tiny_llama
    import tests.activations.cache_worker as worker

    def counting_llama():
        model = original()
        model.register_forward_pre_hook(lambda *_: calls.append(1))
        return model

    worker.build_tiny_llama = counting_llama
    try:
        run(args | {"out": str(killed)})
    finally:
        worker.build_tiny_llama = original
    n_batches = -(-ActivationCache(fresh).manifest["n_contexts"] // 3)
    assert 0 < len(calls) < n_batches - 3
    assert kept == {p: (shard_dir / p).stat().st_mtime_ns for p in kept}  # adopted, not rewritten

    a, b = _files(killed), _files(fresh)
    assert sorted(a) == sorted(b) and "resume.json" not in a
    assert [name for name in a if a[name] != b[name]] == []
    store = ActivationCache(killed)
    assert store.manifest["hookpoints"]["attn_z.1"]["n_heads"] == 4
    assert store.load("attn_z.1").shape == (store.manifest["n_tokens"], 32)


def test_leftovers_of_another_run_are_discarded(tmp_path, args):
    out = tmp_path / "c"
    run(args | {"out": str(out)})
    reference = _files(out)
    # a different run's shards with no record of what they hold: not adopted
    (out / "manifest.json").unlink()
    (out / "acts" / "resid_post.0" / "00000.safetensors").write_bytes(b"garbage")
    (out / "resume.json").write_text(json.dumps({"something": "else"}))
    run(args | {"out": str(out)})
    assert _files(out) == reference
