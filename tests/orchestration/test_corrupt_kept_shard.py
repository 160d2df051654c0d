"""A shard an interrupted caching run left in its folder is adopted only if it still hashes to the sha256
recorded when it was written: a corrupted one is recomputed, never taken into a cache that then verifies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from featureatlas.tasks.common.shards import CacheIntegrityError, ShardWriter
from featureatlas.tasks.common.store import ActivationCache
from tests.activations.cache_worker import run
from tests.helpers import TINY_TEXT

HOOKPOINTS = ["resid_post.0", "mlp_hidden.1"]


@pytest.fixture
def args(tmp_path) -> dict:
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": " ".join(TINY_TEXT[i : i + 5])}) for i in range(12)))
    corpus = {"sources": [str(path)], "context_length": 16, "max_tokens": 500, "heldout_fraction": 0.3,
              "min_context_tokens": 4}  # fmt: skip
    return {"corpus": corpus, "cache": {"shard_tokens": 64, "batch_size": 3, "parts": 2},
            "hookpoints": HOOKPOINTS}  # fmt: skip


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # the header (and so the row count and size) stay as they were: only the data changes
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["corrupt", "no record"])
def test_a_damaged_kept_shard_is_recomputed_not_adopted(tmp_path, args, damage):
    fresh, resumed = tmp_path / "fresh", tmp_path / "resumed"
    run(args | {"out": str(fresh)})
    run(args | {"out": str(resumed), "part": 0})  # an interrupted run: the first part's shards only
    shard = resumed / "acts" / "resid_post.0" / "00000.safetensors"
    assert (resumed / "resume.json").exists() and shard.is_file()
    if damage == "corrupt":
        _flip_last_byte(shard)
    else:  # a kill between the shard's rename and its record: complete perhaps, but not known to be
        shard.with_name(shard.name + ".sha256").unlink()

    run(args | {"out": str(resumed)})

    a, b = _files(resumed), _files(fresh)
    assert sorted(a) == sorted(b) and not any(name.endswith(".sha256") for name in a)
    assert [name for name in a if a[name] != b[name]] == []
    ActivationCache(resumed)  # verifies every shard against the manifest


def test_adoption_refuses_a_shard_changed_after_it_was_checked(tmp_path, args):
    out = tmp_path / "c"
    run(args | {"out": str(out), "part": 0})
    shard = out / "acts" / "resid_post.0" / "00000.safetensors"
    _flip_last_byte(shard)
    writer = ShardWriter(out, "resid_post.0", 32, "float32", 64)
    with pytest.raises(CacheIntegrityError, match="00000.safetensors .* does not match the checksum"):
        writer.adopt(1)
    assert not shard.exists()  # deleted, so that the next run recomputes it
