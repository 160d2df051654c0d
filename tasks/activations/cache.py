"""Write an activation cache: tokenise the corpus into contexts, run the model with forward hooks, store rows.

Only real tokens are stored (padding never becomes a row). The forward pass stops after the deepest requested
hookpoint, so caching an early layer does not pay for the rest of the model.

Three steps, so that the forward passes can be split into jobs (`cache.parts`) that run on other processes
or machines:
  plan_cache     tokenise into the folder's contexts.safetensors (a part on another process opens that file),
                 check the hookpoints, and cut the rows into parts: part p owns the full shards
                 [first_p, end_p) (shard s holds rows [s*T, (s+1)*T)), the last part also the trailing
                 partial shard; `prepare_cache` then records the run in `resume.json` (or discards the
                 shards of another run);
  write_part     runs the batches that hold the part's missing rows and writes its shards under their final
                 names. Batches are cut at multiples of batch_size from context 0 exactly as in a single run,
                 so every shard holds the same bytes whichever part, or run, wrote it;
  assemble       takes every shard in order (its size, its sha256 and float64 statistics from the record
                 written beside it, summed as one run sums them; a shard not hashed in this process is
                 hashed again), writes the token table and contexts, removes `resume.json` and writes the
                 manifest last.
`write_cache` calls the three in one process: parts=1 is the same code path as any other split.

Resuming: if `out_dir` already holds a `resume.json` with the same content, every part keeps the full shards
it finds in its own range (from its first shard on, without a gap, on every hookpoint) that still hash to
the sha256 recorded beside each when it was written (`<shard>.sha256`, its statistics in `<shard>.stats`),
and restarts at the batch holding its first missing row, so a killed run recomputes only what is missing
and ends with the bytes of an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import shutil
from concurrent.futures import Future, wait
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from safetensors import safe_open
from tqdm import tqdm

from featureatlas.schemas.spec import CacheSpec, CorpusSpec
from featureatlas.tasks.activations.token_table import write_token_table
from featureatlas.tasks.common.hookpoints import Site
from featureatlas.tasks.common.hooks import capture_activations, resolve_site
from featureatlas.tasks.common.models import DTYPES, LoadedModel
from featureatlas.tasks.common.shard_records import finished_shards, hookpoint_dir
from featureatlas.tasks.common.shards import ShardWriter, atomic_write_text
from featureatlas.tasks.common.store import FORMAT_VERSION
from featureatlas.tasks.common.threads import side_pool

if TYPE_CHECKING:  # polars and the corpus code load only where a stage needs them (not for the shards)
    import polars as pl

    from featureatlas.tasks.common.contexts import Contexts

log = logging.getLogger(__name__)


class CacheSummary(NamedTuple):
    n_tokens: int
    n_contexts: int
    d_in: dict[str, int]
    manifest: dict


class CachePlan(NamedTuple):
    """What `plan_cache` worked out: the same in every process for the same arguments."""

    contexts: Contexts
    sites: dict[str, Site]
    key: dict  # what resume.json records: a folder holding another key holds another run's shards
    n_rows: int
    parts: list[tuple[int, int]]  # shard range [first, end) of each part; the last ends past the tail
    dtype: str  # dtype of the stored rows: `cache.dtype`, or the model's for 'auto'


def _split(n_rows: int, shard_tokens: int, parts: int) -> list[tuple[int, int]]:
    """Shard ranges of `parts` parts: full shards shared out evenly, the trailing partial one to the last.

    More parts than full shards are cut down to one per full shard (a part with nothing to do would only
    load the model); a cache of less than one shard is one part.
    """
    n_full, tail = divmod(n_rows, shard_tokens)
    n = max(1, min(parts, n_full))
    bounds = [p * n_full // n for p in range(n + 1)]
    bounds[-1] += bool(tail)
    return list(zip(bounds[:-1], bounds[1:]))


def stored_dtype(cache: CacheSpec, model: torch.nn.Module) -> str:
    """The dtype rows are stored in: `cache.dtype`, or with 'auto' the dtype the model runs in."""
    if cache.dtype != "auto":
        return cache.dtype
    dtype = next(model.parameters()).dtype
    names = {v: k for k, v in DTYPES.items()}
    return names.get(dtype, "float32")


def plan_cache(
    loaded: LoadedModel,
    documents: pl.DataFrame | Path | None,
    corpus: CorpusSpec | None,
    cache: CacheSpec,
    hookpoints: list[str],
    *,
    header: dict,
    folder: Path | None = None,
    contexts: Contexts | None = None,
) -> CachePlan:
    """Contexts, sites and the parts' shard ranges; no forward pass.

    The contexts are built from `documents` (the frame or documents.parquet) into `folder`'s
    contexts.safetensors, where they stay and are read a slice at a time; without a folder, in memory. A
    part on another process passes the `contexts` opened from that file instead (`open_contexts`).
    """
    # fail before any work, with close matches (or why an alias does not resolve) in the message
    from featureatlas.tasks.common.corpus import build_contexts

    sites = {hp: resolve_site(loaded.model, hp) for hp in hookpoints}
    if contexts is None:
        path = folder / "contexts.safetensors" if folder is not None else None
        contexts = build_contexts(documents, loaded.tokenizer, corpus, path)
    key = {
        "hookpoints": hookpoints,
        # `parts` left out: it does not change the bytes, so a run killed with one split resumes with another
        "cache": cache.model_dump(mode="json", exclude={"parts"}),
        "header": header,
        "contexts_sha256": contexts.sha256(),  # a block of ids at a time
        "n_contexts": contexts.n_contexts,
    }
    n_rows = contexts.n_tokens
    parts = _split(n_rows, cache.shard_tokens, cache.parts)
    if len(parts) < cache.parts:
        log.info(
            "%d rows make %d full shards: caching in %d parts, not %d",
            n_rows,
            n_rows // cache.shard_tokens,
            len(parts),
            cache.parts,
        )
    return CachePlan(contexts, sites, key, n_rows, parts, stored_dtype(cache, loaded.model))


def prepare_cache(plan: CachePlan, out_dir: Path) -> None:
    """Record the run in `out_dir/resume.json`, keeping what an earlier run with the same key left there.

    Called once, before any part starts: it deletes the shards of a different or unknown run.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    resume_file = out_dir / "resume.json"
    if resume_file.is_file() and json.loads(resume_file.read_text()) == plan.key:
        return
    if (out_dir / "acts").exists():
        log.warning("%s holds shards of a different or unknown run; starting afresh", out_dir)
        shutil.rmtree(out_dir / "acts")
    atomic_write_text(json.dumps(plan.key, indent=1), resume_file)


def write_part(
    loaded: LoadedModel,
    plan: CachePlan,
    cache: CacheSpec,
    out_dir: Path,
    part: int,
    *,
    progress: bool = False,
    verified: dict[str, set[int]] | None = None,
) -> int:
    """Write the missing shards of part `part` into `out_dir`; return how many batches it ran.

    `verified[hookpoint]`, where given, gains the shards this call hashed (those it wrote, those it kept), so
    an assembly in the same process need not read them again.
    """
    resume_file = out_dir / "resume.json"
    if not resume_file.is_file() or json.loads(resume_file.read_text()) != plan.key:
        raise RuntimeError(
            f"{out_dir} is not prepared for this cache (its resume.json is missing or records another run); "
            "call prepare_cache(plan, out_dir) once before the parts (write_cache does)"
        )
    model, _, device = loaded
    hookpoints, (first, end) = plan.key["hookpoints"], plan.parts[part]
    T, bs = cache.shard_tokens, cache.batch_size
    # full shards this part finished in an earlier run (on every hookpoint); the tail is always redone
    kept = min(finished_shards(out_dir, hp, T, first, end) for hp in hookpoints)
    if verified is not None:
        for hp in hookpoints:
            verified.setdefault(hp, set()).update(range(first, first + kept))
    row_start = (first + kept) * T
    row_stop = plan.n_rows if part == len(plan.parts) - 1 else end * T
    if row_start >= row_stop:
        log.info("part %d (shards %d-%d): all finished", part, first, end - 1)
        return 0
    contexts = plan.contexts
    row_end = contexts.lengths.cumsum(0)  # row_end[c]: rows before context c + 1
    n_ctx = contexts.n_contexts
    # the batch holding the part's first missing row, aligned as a single run aligns it
    first_batch = int(torch.searchsorted(row_end, row_start, right=True)) // bs * bs
    last_batch = int(torch.searchsorted(row_end, row_stop - 1, right=True)) // bs * bs
    log.info(
        "part %d: shards %d-%d, %d kept; contexts %d-%d",
        part,
        first,
        end - 1,
        kept,
        first_batch,
        min(last_batch + bs, n_ctx) - 1,
    )
    writers: dict[str, ShardWriter] = {}
    batches = range(first_batch, last_batch + 1, bs)
    for start in tqdm(batches, desc=f"caching activations, part {part}", unit="batch", disable=not progress):
        mask = contexts.mask(start, start + bs).to(device)
        ids = contexts.ids(start, start + bs).to(device)  # read from the contexts file, a batch at a time
        with torch.inference_mode():  # ~15% faster than no_grad on CPU: no version counters
            acts = capture_activations(model, hookpoints, ids, mask)
        # rows [batch_row, ...) of the cache are in this batch; keep those inside [row_start, row_stop)
        batch_row = int(row_end[start - 1]) if start else 0
        lo, hi = max(row_start - batch_row, 0), row_stop - batch_row
        keep = mask.bool()
        padded = not bool(keep.all())  # full contexts (the common case): rows are a view, not a copy
        for hp in hookpoints:
            if hp not in writers:
                d_in, layout = acts[hp].shape[-1], plan.sites[hp].layout()
                writers[hp] = ShardWriter(
                    out_dir, hp, d_in, plan.dtype, T, layout, first_shard=first + kept, stats=False
                )
            rows = acts[hp][keep] if padded else acts[hp].flatten(0, 1)
            writers[hp].add(rows[lo:hi])
    for hp, w in writers.items():
        w.finish()  # the last part flushes the tail; the others end on a shard boundary, with nothing left
        if verified is not None:
            verified.setdefault(hp, set()).update(w.verified)
    return len(batches)


def _shard_width(out_dir: Path, hookpoint: str, n_rows: int, shard_tokens: int) -> int:
    """d_in of `hookpoint`'s shards, once every shard is known to be there with its row count."""
    shard_dir = out_dir / "acts" / hookpoint_dir(hookpoint)
    n_shards = -(-n_rows // shard_tokens)
    # sizes only: `ShardWriter.adopt` checks every shard against its recorded sha256 right after
    full = finished_shards(out_dir, hookpoint, shard_tokens, 0, n_rows // shard_tokens, verify=False)
    tail = shard_dir / f"{n_shards - 1:05d}.safetensors"
    if full < n_rows // shard_tokens or not tail.is_file():
        missing = f"{full:05d}" if full < n_rows // shard_tokens else f"{n_shards - 1:05d}"
        raise RuntimeError(
            f"{out_dir}: shard {missing} of hookpoint {hookpoint!r} is missing or short, so a part did not "
            "finish; run the caching again (it resumes, recomputing only the missing shards)"
        )
    with safe_open(str(tail), "pt") as f:
        return f.get_slice("acts").get_shape()[1]


def assemble(
    tokenizer,
    documents: pl.DataFrame | None,
    plan: CachePlan,
    cache: CacheSpec,
    out_dir: Path,
    *,
    header: dict,
    token_table: bool | Future = True,
    verified: dict[str, set[int]] | None = None,
) -> CacheSummary:
    """Adopt every part's shards, write the token table, contexts and (last) the manifest.

    Each shard's statistics come from its record, summed in shard order as one run sums them; a shard is
    hashed again unless `verified` (filled by `write_part` in this process) says it was hashed here already.
    """
    T = cache.shard_tokens
    n_shards = -(-plan.n_rows // T)
    hp_info = {}
    for hp in plan.key["hookpoints"]:
        d_in = _shard_width(out_dir, hp, plan.n_rows, T)
        writer = ShardWriter(out_dir, hp, d_in, plan.dtype, T, plan.sites[hp].layout())
        writer.adopt(n_shards, (verified or {}).get(hp, ()))
        hp_info[hp] = writer.finish()
    return finish_cache(
        tokenizer, documents, plan, cache, out_dir, header=header, hookpoints=hp_info, token_table=token_table
    )


def start_token_table(tokenizer, documents: pl.DataFrame, plan: CachePlan, cache: CacheSpec, out_dir: Path):
    """Write `out_dir/tokens.parquet` on a thread of its own; returns the future of its counts, for
    `assemble(token_table=...)`. The table needs the contexts alone, so it is written while the forward
    passes run, off the caching's critical path (polars and Arrow release the GIL for the bulk of it)."""
    pool = side_pool("token-table")
    path = out_dir / "tokens.parquet"
    try:
        return pool.submit(write_token_table, tokenizer, documents, plan.contexts, cache.shard_tokens, path)
    finally:
        pool.shutdown(wait=False)


def finish_cache(
    tokenizer,
    documents: pl.DataFrame,
    plan: CachePlan,
    cache: CacheSpec,
    out_dir: Path,
    *,
    header: dict,
    hookpoints: dict[str, dict],
    extra: dict | None = None,
    token_table: bool | Future = True,
) -> CacheSummary:
    """Write the token table, the contexts and (last) the manifest listing `hookpoints`.

    `token_table=False` leaves tokens.parquet out (and polars unloaded): a cache then serves only readers
    that pass their rows explicitly, as throughput measurements on synthetic token ids do. A future from
    `start_token_table` means the table is being written already: its counts are awaited here.
    """
    contexts, T, hp_info = plan.contexts, cache.shard_tokens, hookpoints
    n_ctx, L = contexts.n_contexts, contexts.length
    if isinstance(token_table, Future):
        counts = token_table.result()  # re-raises a failed table here
    elif token_table:
        counts = write_token_table(tokenizer, documents, contexts, T, out_dir / "tokens.parquet")
    else:
        n_held = int(contexts.lengths[contexts.heldout].sum())
        special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.int64)
        n_special = sum(
            int(torch.isin(contexts.ids(a, b)[contexts.mask(a, b).bool()], special).sum())
            for a, b in contexts.blocks()
        )
        counts = {"n_train_tokens": contexts.n_tokens - n_held, "n_heldout_tokens": n_held}
        counts["n_special_tokens"] = n_special
    contexts.save(out_dir / "contexts.safetensors")  # nothing to do where they were built into it
    manifest = {
        "format_version": FORMAT_VERSION,
        **header,
        "dtype": plan.dtype,
        "exclude_first_token": cache.exclude_first_token,
        "exclude_special_tokens": cache.exclude_special_tokens,
        "context_length": L,
        "n_contexts": n_ctx,
        "n_tokens": plan.n_rows,
        **counts,
        "shard_tokens": T,
        "hookpoints": hp_info,
        **(extra or {}),
    }
    (out_dir / "resume.json").unlink(missing_ok=True)
    # the manifest is written last: a folder without one is never taken for a finished cache
    atomic_write_text(json.dumps(manifest, indent=1), out_dir / "manifest.json")
    return CacheSummary(plan.n_rows, n_ctx, {hp: i["d_in"] for hp, i in hp_info.items()}, manifest)


def write_cache(
    loaded: LoadedModel,
    documents: pl.DataFrame,
    corpus: CorpusSpec,
    cache: CacheSpec,
    hookpoints: list[str],
    out_dir: Path,
    *,
    header: dict,
    progress: bool = False,
) -> CacheSummary:
    """Cache `hookpoints` of `loaded.model` over `documents` into `out_dir`, its parts one after another.

    `out_dir` is empty, or holds what an interrupted call with the same arguments left there: it resumes.
    """
    plan = plan_cache(loaded, documents, corpus, cache, hookpoints, header=header, folder=out_dir)
    n, length = plan.contexts.n_contexts, plan.contexts.length
    log.info("caching %d contexts of up to %d tokens at %s", n, length, hookpoints)
    prepare_cache(plan, out_dir)
    table = start_token_table(loaded.tokenizer, documents, plan, cache, out_dir)
    verified: dict[str, set[int]] = {}
    try:
        for part in range(len(plan.parts)):
            write_part(loaded, plan, cache, out_dir, part, progress=progress, verified=verified)
    except BaseException:
        wait([table])  # the table's thread writes into out_dir: it ends before the error goes up
        raise
    return assemble(
        loaded.tokenizer, documents, plan, cache, out_dir, header=header, token_table=table, verified=verified
    )
