"""The resume state of a cache being written: each finished shard's sha256 and float64 statistics, recorded
in small files beside it, and the check (`finished_shards`) that tells a resumed run which shards it may keep.

A record is written just before its shard takes its final name and deleted by the assembly once the manifest
lists every checksum, so a killed run, or a cache written in parts, sums the same statistics in the same
order as one run does, without reading its shards again.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def hookpoint_dir(hookpoint: str) -> str:
    return hookpoint.replace("/", "_")


def _record_path(path: Path, kind: str) -> Path:
    return path.with_name(f"{path.name}.{kind}")


def _write_small(data: bytes, path: Path) -> None:
    """Write a resume record under a temporary name and rename it: never seen half-written. Not fsynced: a
    record lost in a crash only makes the resumed run recompute its shard, never adopt a wrong one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def record_shard(path: Path, sha256: str, stats: tuple[torch.Tensor, torch.Tensor, float]) -> None:
    """Record the sha256 and float64 statistics of the shard just written at `path` in the resume state:
    files beside it (`.stats`: the sha256 it belongs to and the raw float64 sums; `.sha256`, last).

    Written once the shard is complete, just before it is renamed into place, so every shard under its final
    name has a record (a resumed run adopts every shard it finds that hashes to it); a kill in between
    leaves a record without a shard, and the shard is recomputed and the record rewritten. The assembly
    step sums the recorded statistics in shard order, as one run sums them, and deletes the records once the
    manifest lists every checksum.
    """
    total, total_sq, norm_sum = stats
    sums = torch.cat([total, total_sq, torch.tensor([norm_sum], dtype=torch.float64)])
    _write_small(sha256.encode() + sums.numpy().tobytes(), _record_path(path, "stats"))
    _write_small(sha256.encode(), _record_path(path, "sha256"))


def recorded_sha256(path: Path) -> str | None:
    """The sha256 recorded when the shard at `path` was written, or None if there is no record."""
    try:
        return _record_path(path, "sha256").read_text().strip()
    except FileNotFoundError:
        return None


def recorded_stats(path: Path, sha256: str, d_in: int) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """The float64 statistics recorded for the shard at `path` with content `sha256`, or None if there is
    no record of them (an older run's, a cut one, or one of other bytes)."""
    try:
        data = _record_path(path, "stats").read_bytes()
    except FileNotFoundError:
        return None
    if len(data) != 64 + 8 * (2 * d_in + 1) or data[:64] != sha256.encode():
        return None
    sums = torch.frombuffer(bytearray(data[64:]), dtype=torch.float64)
    return sums[:d_in], sums[d_in : 2 * d_in], float(sums[-1])


def finished_shards(
    folder: Path,
    hookpoint: str,
    shard_tokens: int,
    start: int = 0,
    stop: int | None = None,
    *,
    verify: bool = True,
) -> int:
    """How many full shards (`start`, `start` + 1, ... without a gap, before `stop`) an interrupted run left
    for `hookpoint`.

    A shard is renamed into place once written, and fsynced after (before its cache's manifest): a kill
    leaves it complete, a power loss may cut it. Its size is checked against its own header, which costs
    nothing and catches a copy cut short. With `verify`,
    each shard must also hash to the sha256 recorded when it was written: a shard damaged since (a bad
    disk, a stray write) or without a record is not adopted, but recomputed from there on.
    """
    shard_dir = folder / "acts" / hookpoint_dir(hookpoint)
    n = start
    while (stop is None or n < stop) and (path := shard_dir / f"{n:05d}.safetensors").is_file():
        try:
            with safe_open(str(path), "pt") as f:
                rows = f.get_slice("acts").get_shape()[0]
        except (SafetensorError, OSError):  # cut short or unreadable: not a usable shard
            break
        if rows != shard_tokens:
            break
        if verify and (recorded_sha256(path) is None or sha256_file(path) != recorded_sha256(path)):
            break
        n += 1
    return n - start
