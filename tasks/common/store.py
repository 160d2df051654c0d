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
from pathlib import Path

import polars as pl
import torch
from safetensors.torch import load_file, save_file

from tasks.common.models import DTYPES

FORMAT_VERSION = 1


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
    """Buffers rows of one hookpoint and writes fixed-size shards, keeping running statistics."""

    def __init__(self, folder: Path, hookpoint: str, d_in: int, dtype: str, shard_tokens: int):
        self.folder = folder / "acts" / hookpoint_dir(hookpoint)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.hookpoint, self.d_in, self.dtype, self.shard_tokens = (
            hookpoint,
            d_in,
            DTYPES[dtype],
            shard_tokens,
        )
        self.buffer: list[torch.Tensor] = []
        self.buffered = 0
        self.shards: list[dict] = []
        # float64 sums: float32 loses the small per-dimension variances over 10^6 rows
        self.sum = torch.zeros(d_in, dtype=torch.float64)
        self.sumsq = torch.zeros(d_in, dtype=torch.float64)
        self.norm_sum = 0.0
        self.rows = 0

    def add(self, acts: torch.Tensor) -> None:
        if acts.shape[-1] != self.d_in:
            raise ValueError(f"{self.hookpoint}: got width {acts.shape[-1]}, expected {self.d_in}")
        acts = acts.detach().to("cpu", self.dtype)
        a64 = acts.double()
        self.sum += a64.sum(0)
        self.sumsq += (a64 * a64).sum(0)
        self.norm_sum += float(a64.norm(dim=-1).sum())
        self.rows += acts.shape[0]
        self.buffer.append(acts)
        self.buffered += acts.shape[0]
        while self.buffered >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def _flush(self, n: int) -> None:
        data = torch.cat(self.buffer)
        shard, rest = data[:n], data[n:]
        self.buffer, self.buffered = ([rest] if rest.shape[0] else []), rest.shape[0]
        path = self.folder / f"{len(self.shards):05d}.safetensors"
        atomic_save_safetensors({"acts": shard}, path)
        self.shards.append(
            {
                "file": str(path.relative_to(self.folder.parent.parent)),
                "rows": int(shard.shape[0]),
                "bytes": path.stat().st_size,
                "sha256": sha256_file(path),
            }
        )

    def finish(self) -> dict:
        if self.buffered:
            self._flush(self.buffered)
        mean = self.sum / max(self.rows, 1)
        var = self.sumsq / max(self.rows, 1) - mean**2
        return {
            "d_in": self.d_in,
            "rows": self.rows,
            "shards": self.shards,
            "mean": mean.tolist(),
            "total_variance": float(var.clamp_min(0).sum()),
            "mean_norm": self.norm_sum / max(self.rows, 1),
        }


class CacheIntegrityError(RuntimeError):
    """A shard is missing, truncated or does not match its checksum."""


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
                path = self.folder / shard["file"]
                if not path.is_file():
                    raise CacheIntegrityError(
                        f"shard {path} of hookpoint {hp!r} is missing; rebuild the cache"
                    )
                if path.stat().st_size != shard["bytes"] or sha256_file(path) != shard["sha256"]:
                    raise CacheIntegrityError(
                        f"shard {path} of hookpoint {hp!r} is truncated or corrupt (checksum mismatch); "
                        "delete the cache folder and run the pipeline again"
                    )

    @property
    def tokens(self) -> pl.DataFrame:
        if self._tokens is None:
            self._tokens = pl.read_parquet(self.folder / "tokens.parquet")
        return self._tokens

    def contexts(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.folder / "contexts.safetensors"))

    def select_rows(self, split: str | None = None, exclude_first_token: bool | None = None) -> torch.Tensor:
        """Row indices of the token table for a split ('train', 'heldout' or None for all)."""
        if exclude_first_token is None:
            exclude_first_token = self.manifest["exclude_first_token"]
        df = self.tokens
        if split is not None:
            df = df.filter(pl.col("split") == split)
        if exclude_first_token:
            df = df.filter(pl.col("position") > 0)
        return torch.from_numpy(df["row"].to_numpy().astype("int64"))

    def load(self, hookpoint: str, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Activations of `hookpoint` for the given rows (all rows when None), as one CPU tensor."""
        info = self.manifest["hookpoints"].get(hookpoint)
        if info is None:
            raise ValueError(f"hookpoint {hookpoint!r} is not in this cache; cached: {self.hookpoints}")
        data = torch.cat([load_file(str(self.folder / s["file"]))["acts"] for s in info["shards"]])
        return data if rows is None else data[rows]
