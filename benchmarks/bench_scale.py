"""The whole pipeline at two token counts an order of magnitude apart, stored and streaming.

A randomly initialised Llama-shaped model (`benchmarks/configs/llama_small.json` on CPU, `llama_1b.json`, a
1B-parameter shape, with `--device cuda`) runs over synthetic token ids. Each (mode, size) runs in its own
child process, so its peak RSS is its own. Per stage: tokens/s and the ratio of its time per token to a
baseline measured in the same process:

  forward        the bare forward pass to the hookpoint (the baseline of caching and streaming)
  cache          forward passes + shards written, hashed, float64 statistics (stored)      / forward
                 and the rest of `write_cache`: token table (written beside the forward passes),
                 assembly, contexts and manifest; `bench_cache_stage.py` splits it up
  train_memory   the training step alone, on rows in memory                                 (baseline)
  train_cache    training from the stored cache, streamed shard by shard                    / train_memory
  train_stream   training straight from forward passes, nothing stored            / (forward + train_memory)
  encode         one encode pass of the trained dictionary over the labeled rows            (baseline)
  label          the label stage's passes (`feature_table` over the cache's rows)           / encode

The last stdout line is JSON: per mode and size `stage_ratio` (per stage), `tokens_per_s`, `peak_rss_gb`
(and `peak_gpu_gb` on CUDA); `rss_growth` per mode (peak RSS at the larger size / the smaller).

`rss_growth` would also count buffers that are bounded by design but not yet full at the smaller size, so on
CPU the default sizes, 2^18 and 2^18 * 10 tokens (16 and 160 shards of 16,384 rows), are the least that
fill all of them at both sizes:
  - labeling: `CodeStream`'s resident firing codes, 12 B per firing, capped at 64 MiB on the CPU (the cap
    is reached from about 175,000 rows with k = 32);
  - training from a cache or from forward passes: `buffer_shards` (4) shards a group, two groups held while
    the next is read (8 shards);
  - streaming: `Recompute` holds up to `hold_rows` (2^16) rows of shards read once, for their second read;
  - the in-memory baseline: up to `--memory-rows` (2^16) rows.
At 2^15 and 2^15 * 10 tokens (`--tokens 32768`) the smaller corpus is 2 shards and the ratio measures these
buffers filling, not growth with tokens.

The stage functions are called directly: no Prefect, MLflow or catalog, and polars (with it labeling and
the token table) only when installed, so it runs on a bare CUDA machine with torch, transformers,
safetensors and pydantic.

    nice python benchmarks/bench_scale.py                         # CPU: 2^18 and 2^18 * 10 tokens
    python benchmarks/bench_scale.py --quick                      # CPU: 2^12 and 2^12 * 10, a smoke run
    python benchmarks/bench_scale.py --device cuda --quick        # 1B shape, bf16, 2^14 and 2^14 * 10
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _source_tree_package() -> None:
    """Import `featureatlas.schemas`/`.tasks` from this source tree when the package is not installed (a
    bare GPU machine given a copy of the repository): the same mapping pyproject.toml installs."""
    try:
        import featureatlas.tasks  # noqa: F401

        return
    except ImportError:
        pass
    import types

    package = types.ModuleType("featureatlas")
    package.__path__ = [str(ROOT / "flows" / "api")]
    sys.modules["featureatlas"] = package
    for name in ("schemas", "tasks"):
        spec = importlib.util.spec_from_file_location(
            f"featureatlas.{name}", ROOT / name / "__init__.py", submodule_search_locations=[str(ROOT / name)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        setattr(package, name, module)


log = logging.getLogger("bench_scale")
HOOKPOINT = "resid_post.{layer}"


class SyntheticTokenizer:
    """What the cache needs of a tokenizer for synthetic ids: a pad id, special ids and a display string."""

    def __init__(self, pad: int, eos: int) -> None:
        self.pad_token_id, self.eos_token_id, self.all_special_ids = pad, eos, [pad, eos]

    def decode(self, ids: list[int]) -> str:
        return "".join(f"<{i}>" for i in ids)


def synthetic_contexts(n_tokens: int, length: int, vocab: int, path: Path, seed: int = 0):
    """Full contexts of random token ids, each its own document and every tenth one held out, built into
    `path` as a corpus' contexts are (`ContextWriter`): the benchmark holds no more of them than a stage."""
    from featureatlas.tasks.common.contexts import ContextWriter

    n_ctx = max(2, n_tokens // length)
    gen = torch.Generator().manual_seed(seed)
    with ContextWriter(length, 0, path) as out:
        for a in range(0, n_ctx, 1024):
            ids = torch.randint(3, vocab, (min(1024, n_ctx - a), length), generator=gen).numpy()
            for c, row in enumerate(ids, start=a):
                out.add(row, c % 10 == 9, [(0, c)])
        return out.finish()


def build_model(config: Path, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    from featureatlas.tasks.common.models import LoadedModel

    cfg = LlamaConfig(**json.loads(config.read_text()))
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.eval().requires_grad_(False)
    return LoadedModel(model, SyntheticTokenizer(cfg.pad_token_id, cfg.eos_token_id), device), cfg


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


STAGE_RSS: dict[str, dict[str, float]] = {}  # per timed stage: peak and resident set after it, GB


def timed(fn, device: torch.device, name: str):
    """(fn(), seconds); records the stage's own peak resident set (the kernel's high-water mark is reset
    first, where Linux allows it) and the resident set after it, so growth is seen where it happens."""
    _reset_peak()
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    seconds = time.perf_counter() - t0
    STAGE_RSS[name] = {"peak": round(_rss_gb("VmHWM"), 3), "after": round(_rss_gb(), 3)}
    return out, seconds


def bare_forward(loaded, contexts, hookpoint: str, batch_size: int, stop: int | None = None) -> None:
    """The forward passes alone over contexts [0, stop), read from their file as the caching reads them."""
    from featureatlas.tasks.common.hooks import capture_activations

    model, _, device = loaded
    for start in range(0, stop or contexts.n_contexts, batch_size):
        ids = contexts.ids(start, start + batch_size).to(device)
        with torch.inference_mode():
            capture_activations(model, [hookpoint], ids, torch.ones_like(ids))


def make_plan(loaded, contexts, spec, hookpoint: str):
    from featureatlas.tasks.activations.cache import CachePlan, _split, stored_dtype
    from featureatlas.tasks.common.hooks import resolve_site

    n_rows = contexts.n_tokens
    key = {"hookpoints": [hookpoint], "cache": spec.model_dump(mode="json"), "header": {}, "n": n_rows}
    sites = {hookpoint: resolve_site(loaded.model, hookpoint)}
    parts = _split(n_rows, spec.shard_tokens, 1)
    return CachePlan(contexts, sites, key, n_rows, parts, stored_dtype(spec, loaded.model))


def n_train_rows(contexts) -> int:
    """How many rows a cache selects for training by default: train contexts, position 0 left out."""
    return int((contexts.lengths[~contexts.heldout] - 1).clamp(min=0).sum())


def train_rows(contexts, limit: int | None = None) -> torch.Tensor:
    """The first `limit` (default: all) of those rows' numbers, context by context."""
    starts = contexts.lengths.cumsum(0) - contexts.lengths
    out, n = [], 0
    for c in (~contexts.heldout).nonzero().flatten().tolist():
        if limit is not None and n >= limit:
            break
        out.append(torch.arange(int(starts[c]) + 1, int(starts[c] + contexts.lengths[c])))
        n += len(out[-1])
    return torch.cat(out)[:limit] if out else torch.zeros(0, dtype=torch.int64)


def child(args) -> dict:
    """One (mode, size) in this process: every stage's seconds and tokens, peak memory."""
    from featureatlas.schemas.methods import TopKConfig
    from featureatlas.schemas.spec import CacheSpec
    from featureatlas.tasks.activations.cache import assemble, prepare_cache, start_token_table, write_part
    from featureatlas.tasks.activations.unstored import write_unstored
    from featureatlas.tasks.common.store import ActivationCache
    from featureatlas.tasks.dictionary.data import CacheSource
    from featureatlas.tasks.dictionary.train import train_dictionary

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = (
        ROOT / "benchmarks" / "configs" / ("llama_1b.json" if device.type == "cuda" else "llama_small.json")
    )
    loaded, cfg = build_model(config, device, dtype)
    base_rss = _rss_gb()  # torch, the model and the libraries: what every size pays alike
    hookpoint = HOOKPOINT.format(layer=cfg.num_hidden_layers // 2)
    inputs = tempfile.TemporaryDirectory(dir=args.tmp)
    contexts = synthetic_contexts(
        args.tokens, args.context_length, cfg.vocab_size, Path(inputs.name) / "contexts.safetensors"
    )
    n = contexts.n_tokens
    try:  # the token table and labeling need polars; the rest does not
        import polars  # noqa: F401

        has_polars = True
    except ImportError:
        has_polars = False
    spec = CacheSpec(shard_tokens=args.shard_tokens, batch_size=args.batch_size, store=args.mode == "stored")
    stages: dict[str, tuple[float, int]] = {}
    bare_forward(loaded, contexts, hookpoint, args.batch_size, stop=1)  # untimed: the first pass' set-up
    STAGE_RSS.clear()
    forward = lambda: bare_forward(loaded, contexts, hookpoint, args.batch_size)  # noqa: E731
    _, t_forward = timed(forward, device, "forward")
    # every training row's number only where there is no token table to select them from
    rows = train_rows(contexts, None if not has_polars else args.memory_rows)
    d_in = cfg.hidden_size
    steps = n_train_rows(contexts) // args.train_batch
    topk = TopKConfig(
        d_sae=args.expansion * d_in,
        k=args.k,
        batch_size=args.train_batch,
        steps=steps,
        device=str(device),
        log_every=max(steps, 1),
    )
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        folder = Path(tmp) / "cache"
        plan = make_plan(loaded, contexts, spec, hookpoint)
        if args.mode == "stored":

            def cache(folder: Path, contexts=contexts) -> None:  # what `write_cache` does in one process
                plan = make_plan(loaded, contexts, spec, hookpoint)
                prepare_cache(plan, folder)
                docs = _documents(contexts, has_polars)
                table = has_polars and start_token_table(loaded.tokenizer, docs, plan, spec, folder)
                verified: dict[str, set[int]] = {}
                write_part(loaded, plan, spec, folder, 0, verified=verified)
                done = {"token_table": table, "verified": verified}
                assemble(loaded.tokenizer, docs, plan, spec, folder, header={}, **done)

            # untimed, as the forward's warm-up: the one-time set-up of a process (pyarrow's import, the
            # writer's first buffers), which the small size would otherwise carry as a per-token cost
            small = synthetic_contexts(2 * args.shard_tokens, args.context_length, 64, Path(tmp) / "warm.st")
            cache(Path(tmp) / "warm", small)
            # forward and cache alternate, the least time of each kept: the load of a shared machine only
            # ever adds time, and it moves between passes by more than the cost measured here
            for i in range(args.repeats):
                if i:
                    shutil.rmtree(folder)
                    t_forward = min(t_forward, timed(forward, device, "forward")[1])
                t_cache = timed(lambda: cache(folder), device, "cache")[1]
                stages["cache"] = (min(t_cache, stages.get("cache", (t_cache,))[0]), n)
            shutil.rmtree(Path(tmp) / "warm")
        else:
            docs = _documents(contexts, has_polars)
            write_unstored(loaded, docs, plan, spec, folder, header={}, token_table=has_polars)
        stages["forward"] = (t_forward, n)
        store = ActivationCache(folder)
        if not store.stored:
            store.attach_model(loaded)
        # the train split as a training stage reads it: from the token table, shard by shard (polars)
        source = CacheSource(store, hookpoint, None if has_polars else rows)
        # the training step alone: the same number of steps on at most `memory_rows` rows held in memory
        memory = store.load(hookpoint, rows[: args.memory_rows]).to(device)
        # warm-up, untimed: the first training in a process pays one-time kernel and allocator set-up
        train_dictionary(topk.model_copy(update={"steps": 2, "log_every": 2}), memory)
        result, t_mem = timed(lambda: train_dictionary(topk, memory), device, "train_memory")
        stages["train_memory"] = (t_mem, steps * args.train_batch)
        memory = None  # the in-memory rows go before the streamed stages are measured
        if not store.stored:  # a fresh reader, as a training process has: no shard left from the load above
            store.attach_model(loaded)
        name = "train_cache" if store.stored else "train_stream"
        result, t_train = timed(lambda: train_dictionary(topk, source), device, name)
        stages[name] = (t_train, steps * args.train_batch)
        sae = result.dictionary.to(device)
        if args.no_label:
            pass
        elif has_polars:  # the labeled rows come from the token table
            labeled = _label_rows(store, args.label_tokens or None)
            _, t_enc = timed(lambda: _encode_pass(sae, store, hookpoint, labeled, device), device, "encode")
            stages["encode"] = (t_enc, labeled.n_rows)
            t_label = _label(sae, store, hookpoint, labeled, device)
            stages["label"] = (t_label, labeled.n_rows)
        else:
            log.info("polars is not installed: labeling skipped")
    out = {
        "stages": {k: {"seconds": round(s, 3), "tokens": t} for k, (s, t) in stages.items()},
        "peak_rss_gb": max(
            _PEAK[0], _rss_gb("VmHWM"), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        ),
        "base_rss_gb": base_rss,
        "stage_rss_gb": STAGE_RSS,
        "acts_gb": n * d_in * torch.finfo(store_dtype(plan)).bits / 8 / 2**30,
        "tokens": n,
    }
    if device.type == "cuda":
        out["peak_gpu_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    inputs.cleanup()
    return out


def _rss_gb(field: str = "VmRSS") -> float:
    """Resident set size now (VmRSS) or its high-water mark (VmHWM), Linux, GB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 2**20
    return 0.0


_PEAK = [0.0]  # the process' peak resident set before the last reset, GB


def _reset_peak() -> None:
    """Reset the kernel's peak resident set (VmHWM) to the current one (Linux >= 4.0; else left as is),
    keeping the peak so far in `_PEAK`."""
    _PEAK[0] = max(_PEAK[0], _rss_gb("VmHWM"))
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def store_dtype(plan) -> torch.dtype:
    from featureatlas.tasks.common.models import DTYPES

    return DTYPES[plan.dtype]


def _documents(contexts, has_polars: bool):
    if not has_polars:
        return None
    import polars as pl

    return pl.DataFrame({"doc_id": [f"d{i}" for i in range(contexts.n_contexts)]})


class LabelRows(NamedTuple):
    """The rows the label stage labels (`corpus`), and their cache row numbers in batches (`batches()`)."""

    corpus: object
    batches: object
    n_rows: int


def _label_rows(store, max_rows: int | None, batch_rows: int = 4096) -> LabelRows:
    """The rows the label stage labels, read as it reads them: the token table and contexts a chunk at a time
    (`CacheRows`, which needs pyarrow); where pyarrow is missing (a bare GPU machine), the same rows with
    their contexts in memory (`TensorRows`)."""
    from featureatlas.tasks.labeling.corpus import CacheRows, TensorRows

    if importlib.util.find_spec("pyarrow") is not None:
        corpus = CacheRows(store, max_rows)
        return LabelRows(corpus, lambda: corpus.cache_rows(batch_rows), corpus.n_rows)
    ids = store.contexts()["input_ids"]
    rows = store.select_rows(None)[:max_rows]
    length = ids.shape[1]
    corpus = TensorRows(rows // length, rows % length, ids)
    return LabelRows(corpus, lambda: iter(rows.split(batch_rows)), len(rows))


def _encode_pass(sae, store, hookpoint: str, labeled: LabelRows, device: torch.device) -> None:
    from featureatlas.tasks.labeling.sharded import ShardRows

    reader = ShardRows(store, hookpoint)
    with torch.inference_mode():
        for rows in labeled.batches():
            sae.encode(reader(rows).to(device, torch.float32))


def _label(sae, store, hookpoint: str, labeled: LabelRows, device: torch.device) -> float:
    """The label stage's own passes (`feature_table` over `ShardRows`), n-gram counts included."""
    from featureatlas.tasks.labeling.features import feature_table
    from featureatlas.tasks.labeling.sharded import ShardRows

    reader = ShardRows(store, hookpoint)
    _, seconds = timed(
        lambda: feature_table(
            sae,
            lambda: (reader(rows) for rows in labeled.batches()),
            labeled.corpus,
            lambda ids: [f"<{i}>" for i in ids],
            top_k=10,
            window=4,
        ),
        device,
        "label",
    )
    return seconds


def ratios(stages: dict) -> dict:
    """Time per token of each stage over its baseline's (1.0: as fast as the baseline)."""
    per = {k: v["seconds"] / max(v["tokens"], 1) for k, v in stages.items()}
    base = {"cache": per["forward"], "train_cache": per["train_memory"], "label": per.get("encode")}
    if "train_stream" in per:
        base["train_stream"] = per["forward"] + per["train_memory"]
    return {k: round(per[k] / b, 3) for k, b in base.items() if k in per and b}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (1B shape in bfloat16)")
    ap.add_argument("--quick", action="store_true", help="a small first size (2^12 on CPU, 2^14 on CUDA)")
    ap.add_argument("--tokens", type=int, default=None, help="the smaller size; the larger is 10x")
    ap.add_argument("--modes", nargs="+", default=["stored", "streaming"])
    ap.add_argument("--context-length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16, help="contexts per forward pass")
    ap.add_argument("--shard-tokens", type=int, default=16384)
    ap.add_argument("--repeats", type=int, default=3, help="forward and cache passes alternated (least kept)")
    ap.add_argument("--train-batch", type=int, default=1024)
    ap.add_argument("--expansion", type=int, default=4)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--label-tokens", type=int, default=0, help="rows labeled (0: all the cache selects)")
    ap.add_argument("--memory-rows", type=int, default=1 << 16, help="rows of the in-memory baseline")
    ap.add_argument("--no-label", action="store_true", help="leave the labeling stage out")
    ap.add_argument("--tmp", default=None, help="folder for the caches (default: the system's)")
    ap.add_argument("--child", nargs=2, metavar=("MODE", "TOKENS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    _source_tree_package()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.child:
        args.mode, args.tokens = args.child[0], int(args.child[1])
        print(json.dumps(child(args)))  # noqa: T201
        return
    cuda = args.device.startswith("cuda")
    small = args.tokens or ((1 << 14 if cuda else 1 << 12) if args.quick else (1 << 15 if cuda else 1 << 18))
    forwarded = [a for a in sys.argv[1:] if a not in ("--quick",)]
    result: dict = {"device": args.device, "sizes": [small, small * 10]}
    for mode in args.modes:
        runs = {}
        for size in (small, small * 10):
            cmd = [sys.executable, __file__, *forwarded, "--child", mode, str(size)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode:
                sys.stderr.write(proc.stderr[-4000:])
                raise SystemExit(f"{mode} at {size} tokens failed (exit {proc.returncode})")
            run = json.loads(proc.stdout.strip().splitlines()[-1])
            run["stage_ratio"] = ratios(run["stages"])
            run["tokens_per_s"] = {
                k: round(v["tokens"] / max(v["seconds"], 1e-9)) for k, v in run["stages"].items()
            }
            del run["stages"]
            log.info("%s %d tokens: %s", mode, size, run)
            runs[str(size)] = run
        growth = runs[str(small * 10)]["peak_rss_gb"] / runs[str(small)]["peak_rss_gb"]
        result[mode] = runs | {"rss_growth": round(growth, 3)}
    result["rss_growth"] = max(result[m]["rss_growth"] for m in args.modes)
    print(json.dumps(result))  # noqa: T201


if __name__ == "__main__":
    main()
