"""The on-disk activation cache: checksummed safetensors shards per hookpoint, a token table, a manifest.

Layout of one cache folder:
    manifest.json                     model, corpus, hookpoints, dtype, d_in, token count, shards + sha256
    tokens.parquet                    one row per cached activation row: row, context, position, token_id,
                                      token, doc_id, split, shard, shard_row
    contexts.safetensors              input_ids and attention_mask of every context [n_ctx, L]
    acts/<hookpoint>/00000.safetensors  tensor "acts" [rows, d_in]

Stages other than caching read caches only through `ActivationCache`, which verifies every shard's checksum.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import polars as pl
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from featureatlas.tasks.common.models import DTYPES
from featureatlas.tasks.tracking.errors import Refusal
from featureatlas.tasks.tracking.paths import inside

FORMAT_VERSION = 2  # 2: token column is_special, per-hookpoint layout, rms and mean_squared_norm


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    tmp.chmod(0o644)  # safetensors creates files readable by the owner alone; caches are shared in a lab
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def write_acts_shard(acts: torch.Tensor, path: Path) -> str:
    """Write `acts [rows, d_in]` as a one-tensor safetensors file, atomically; return its sha256.

    The same bytes `safetensors.torch.save({"acts": acts})` makes (a test holds them equal), streamed from the
    tensor's memory without the serialised copy, and hashed on the way out instead of read back.
    """
    acts = acts.contiguous()
    raw = memoryview((acts.view(torch.int16) if acts.dtype == torch.bfloat16 else acts).numpy()).cast("B")
    meta = {"dtype": _ST_DTYPES[acts.dtype], "shape": list(acts.shape), "data_offsets": [0, raw.nbytes]}
    header = json.dumps({"acts": meta}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # safetensors pads the header to 8-byte alignment
    h = hashlib.sha256()
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        for part in (struct.pack("<Q", len(header)), header, raw):
            h.update(part)
            f.write(part)
        f.flush()
        os.fsync(f.fileno())
    tmp.chmod(0o644)
    os.replace(tmp, path)
    return h.hexdigest()


def atomic_write_text(text: str, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def hookpoint_dir(hookpoint: str) -> str:
    return hookpoint.replace("/", "_")


class ShardWriter:
    """Buffers rows of one hookpoint and writes fixed-size shards, keeping statistics per shard.

    Statistics are summed shard by shard (in float64, from the rows as stored), so a cache resumed after a
    kill, which re-reads its finished shards, ends with exactly the figures of one made in a single run.

    A part of a cache split into jobs (`first_shard`, `stats=False`) only writes its shards, numbered from
    `first_shard`; the assembly step adopts every shard afterwards and sums the statistics then, in order.
    """

    def __init__(
        self,
        folder: Path,
        hookpoint: str,
        d_in: int,
        dtype: str,
        shard_tokens: int,
        layout: dict | None = None,
        *,
        first_shard: int = 0,
        stats: bool = True,
    ):
        self.root = folder
        self.folder = folder / "acts" / hookpoint_dir(hookpoint)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.hookpoint, self.d_in, self.dtype, self.shard_tokens = (
            hookpoint,
            d_in,
            DTYPES[dtype],
            shard_tokens,
        )
        self.layout = layout or {}
        self.buffer: list[torch.Tensor] = []
        self.buffered = 0
        self.shards: list[dict] = []
        self.n_shards = first_shard  # next shard number (self.shards lists those recorded)
        self.stats = stats
        # one thread per hookpoint writes, fsyncs, hashes and sums shards in order while the model runs on
        self._pool = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"shards-{hookpoint_dir(hookpoint)}"
        )
        self._pending: list[Future] = []
        # float64 sums: float32 loses the small per-dimension variances over 10^6 rows
        self.sum = torch.zeros(d_in, dtype=torch.float64)
        self.sumsq = torch.zeros(d_in, dtype=torch.float64)
        self.norm_sum = 0.0
        self.rows = 0

    def adopt(self, n_shards: int) -> None:
        """Take over the first `n_shards` finished shards of an interrupted run; delete any later ones.

        Each shard must still hash to the sha256 recorded when it was written (`record_shard_sha256`); one
        that does not is deleted, so that running the caching again recomputes it, and refused.
        """
        for i in range(n_shards):
            path = self.folder / f"{i:05d}.safetensors"
            sha256 = sha256_file(path)
            if recorded_sha256(path) != sha256:
                path.unlink()
                raise CacheIntegrityError(
                    f"shard {path} of hookpoint {self.hookpoint!r} does not match the checksum recorded when "
                    "it was written (changed on disk, or never finished); it was deleted: run the caching "
                    "again to recompute it"
                )
            self._record(load_file(str(path))["acts"], path, sha256)
        self.n_shards = n_shards
        for path in self.folder.iterdir():
            if not path.name.endswith(".safetensors") or int(path.name.split(".")[0]) >= n_shards:
                path.unlink()  # a later shard, or a temporary file a kill left behind

    def add(self, acts: torch.Tensor) -> None:
        if acts.shape[-1] != self.d_in:
            raise ValueError(f"{self.hookpoint}: got width {acts.shape[-1]}, expected {self.d_in}")
        acts = acts.detach().to("cpu", self.dtype)
        self.buffer.append(acts)
        self.buffered += acts.shape[0]
        while self.buffered >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def _flush(self, n: int) -> None:
        data = torch.cat(self.buffer)
        shard, rest = data[:n], data[n:]
        self.buffer, self.buffered = ([rest] if rest.shape[0] else []), rest.shape[0]
        path = self.folder / f"{self.n_shards:05d}.safetensors"
        self.n_shards += 1
        # at most two shards in flight: writing may lag behind the model, memory stays bounded
        while len(self._pending) >= 2:
            self._pending.pop(0).result()  # re-raises a failed write here, in the caller's thread
        self._pending.append(self._pool.submit(self._write, shard, path))

    def _write(self, shard: torch.Tensor, path: Path) -> None:
        sha256 = write_acts_shard(shard, path)
        if self.stats:
            self._record(shard, path, sha256)
        else:  # a part of a resumable cache: the resume state keeps the checksum until assembly
            record_shard_sha256(path, sha256)

    def _record(self, shard: torch.Tensor, path: Path, sha256: str) -> None:
        a64 = shard.double()
        sq = a64 * a64
        self.sum += a64.sum(0)
        self.sumsq += sq.sum(0)
        self.norm_sum += float(sq.sum(1).sqrt().sum())
        self.rows += shard.shape[0]
        self.shards.append(
            {
                "file": str(path.relative_to(self.root)),
                "rows": int(shard.shape[0]),
                "bytes": path.stat().st_size,
                "sha256": sha256,
            }
        )

    def finish(self) -> dict:
        if self.buffered:
            self._flush(self.buffered)
        for future in self._pending:
            future.result()
        self._pending = []
        self._pool.shutdown()
        n = max(self.rows, 1)
        mean = self.sum / n
        var = self.sumsq / n - mean**2
        return {
            "d_in": self.d_in,
            "rows": self.rows,
            **self.layout,
            "shards": self.shards,
            "mean": mean.tolist(),
            "rms": (self.sumsq / n).sqrt().tolist(),
            "total_variance": float(var.clamp_min(0).sum()),
            "mean_norm": self.norm_sum / n,
            "mean_squared_norm": float(self.sumsq.sum()) / n,
        }


def _sha256_record(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def record_shard_sha256(path: Path, sha256: str) -> None:
    """Record the sha256 of the shard just written at `path` in the resume state: a file beside it.

    Written after the shard is renamed into place, so a shard with a record is complete as written; a kill
    in between leaves a shard without one, which a resumed run recomputes. The assembly step deletes the
    records once the manifest lists every checksum.
    """
    atomic_write_text(sha256, _sha256_record(path))


def recorded_sha256(path: Path) -> str | None:
    """The sha256 recorded when the shard at `path` was written, or None if there is no record."""
    try:
        return _sha256_record(path).read_text().strip()
    except FileNotFoundError:
        return None


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

    Shards are renamed into place only once fsynced, so a shard under its final name is complete; its size is
    still checked against its own header, which costs nothing and catches a copy cut short. With `verify`,
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


class StreamBatch(NamedTuple):
    acts: torch.Tensor  # [batch, d_in]
    rows: torch.Tensor  # [batch] int64: the rows of the token table they belong to


class CacheIntegrityError(Refusal):
    """A shard is missing, truncated or does not match its checksum."""


def check_shard_size(folder: Path, hookpoint: str, shard: dict) -> Path:
    """The shard's path, once it is known to exist with the size the manifest records."""
    try:
        path = inside(folder, shard["file"])
    except ValueError as e:
        raise CacheIntegrityError(f"manifest of {folder} names shard {shard['file']!r}: {e}") from None
    if not path.is_file():
        raise CacheIntegrityError(f"shard {path} of hookpoint {hookpoint!r} is missing; rebuild the cache")
    size = path.stat().st_size
    if size != shard["bytes"]:
        raise CacheIntegrityError(
            f"shard {path} of hookpoint {hookpoint!r} is truncated or corrupt ({size} bytes, the manifest "
            f"says {shard['bytes']}; checksum mismatch); delete the cache folder and run the pipeline again"
        )
    return path


class ActivationCache:
    """Read access to a finished cache folder; every shard is checked against the manifest on open."""

    def __init__(self, folder: str | Path, verify: bool = True):
        self.folder = Path(folder)
        manifest_path = self.folder / "manifest.json"
        if not manifest_path.is_file():
            raise CacheIntegrityError(
                f"{self.folder} has no manifest.json: it is not a finished activation cache"
            )
        self.manifest = json.loads(manifest_path.read_text())
        if verify:
            self.verify()
        self._tokens: pl.DataFrame | None = None

    @property
    def hookpoints(self) -> list[str]:
        return list(self.manifest["hookpoints"])

    def verify(self) -> None:
        for hp, info in self.manifest["hookpoints"].items():
            for shard in info["shards"]:
                path = check_shard_size(self.folder, hp, shard)
                if sha256_file(path) != shard["sha256"]:
                    raise CacheIntegrityError(
                        f"shard {path} of hookpoint {hp!r} is corrupt (checksum mismatch); "
                        "delete the cache folder and run the pipeline again"
                    )

    @property
    def tokens(self) -> pl.DataFrame:
        if self._tokens is None:
            self._tokens = pl.read_parquet(self.folder / "tokens.parquet")
        return self._tokens

    def contexts(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.folder / "contexts.safetensors"))

    def select_rows(
        self,
        split: str | None = None,
        exclude_first_token: bool | None = None,
        exclude_special_tokens: bool | None = None,
    ) -> torch.Tensor:
        """Row indices of the token table for a split ('train', 'heldout' or None for all).

        By default the cache's own settings decide whether position 0 and special tokens (BOS, CLS, SEP, ...)
        are left out; pass False to keep them.
        """
        if exclude_first_token is None:
            exclude_first_token = self.manifest["exclude_first_token"]
        if exclude_special_tokens is None:
            exclude_special_tokens = self.manifest.get("exclude_special_tokens", False)  # format 1 had none
        df = self.tokens
        if split is not None:
            df = df.filter(pl.col("split") == split)
        if exclude_first_token:
            df = df.filter(pl.col("position") > 0)
        if exclude_special_tokens and "is_special" in df.columns:
            df = df.filter(~pl.col("is_special"))
        return torch.from_numpy(df["row"].to_numpy().astype("int64"))

    def load(self, hookpoint: str, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Activations of `hookpoint` for the given rows (all rows when None), as one CPU tensor."""
        info = self._info(hookpoint)
        data = torch.cat([load_file(str(self.folder / s["file"]))["acts"] for s in info["shards"]])
        return data if rows is None else data[rows]

    def stream(
        self,
        hookpoint: str,
        rows: torch.Tensor | None = None,
        *,
        batch_size: int = 4096,
        seed: int = 0,
        epoch: int = 0,
        buffer_shards: int = 4,
    ) -> Iterator[StreamBatch]:
        """Shuffled batches of `rows` (default: the train split), at most `buffer_shards` shards in memory.

        See `tasks.common.stream.stream_batches`.
        """
        from featureatlas.tasks.common.stream import stream_batches

        if rows is None:
            rows = self.select_rows("train")
        return stream_batches(
            self, hookpoint, rows, batch_size=batch_size, seed=seed, epoch=epoch, buffer_shards=buffer_shards
        )

    def read_shard(self, hookpoint: str, index: int) -> torch.Tensor:
        """One shard of `hookpoint` [rows, d_in]; a missing or truncated file is refused by name."""
        info = self._info(hookpoint)
        shard = info["shards"][index]
        return load_file(str(check_shard_size(self.folder, hookpoint, shard)))["acts"]

    def _info(self, hookpoint: str) -> dict:
        info = self.manifest["hookpoints"].get(hookpoint)
        if info is None:
            raise ValueError(f"hookpoint {hookpoint!r} is not in this cache; cached: {self.hookpoints}")
        return info
