"""Where does the cache stage of `bench_scale.py` spend its time over the bare forward pass?

    nice python benchmarks/bench_scale.py ...                 # the whole pipeline
    nice python benchmarks/bench_cache_stage.py [--tokens 40960] [--repeats 3]

The model, tokens and cache settings of `bench_scale.py`'s CPU run (a random Llama-shaped model,
`configs/llama_small.json`, over synthetic token ids; `--device cuda`: `llama_1b.json` in bfloat16). Bare
forward passes and caches alternate `--repeats` times, and the least times are compared (load on a
shared machine only adds time):

  forward     the bare forward pass to the hookpoint (the baseline)
  cache       `prepare_cache` + `write_part` + `assemble`, as `write_cache` runs them in one process
  write_part  of which: the hooked forward passes with the shards written, hashed and summed
  assemble    of which: the records summed, the token table awaited (written on a thread of its own
              since the forward passes began), contexts and manifest

Each is timed in wall seconds and in CPU seconds of the whole process (every thread): on a shared machine
wall time follows the load, while CPU time counts the work, so `cpu_ratio` (cache CPU / forward CPU) is
the figure to compare between versions when the machine is busy. The last line is one JSON object with
tokens, forward_s, cache_s, ratio, cpu_ratio and parts (least wall and CPU seconds of each part).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_scale as scale  # noqa: E402

log = logging.getLogger("bench_cache_stage")


class Clock:
    """Wall and process CPU seconds of named laps."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.laps = device, {}

    def lap(self, name: str, fn) -> None:
        scale._sync(self.device)
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        scale._sync(self.device)
        self.laps.setdefault(name, []).append((time.perf_counter() - wall, time.process_time() - cpu))

    def best(self, name: str) -> tuple[float, float]:
        """The least wall and CPU seconds of the lap: load on a shared machine only ever adds time."""
        walls, cpus = zip(*self.laps[name])
        return min(walls), min(cpus)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=40960)
    ap.add_argument("--repeats", type=int, default=5, help="forward and cache passes, alternated")
    ap.add_argument("--context-length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--shard-tokens", type=int, default=16384)
    ap.add_argument("--tmp", default=None, help="folder for the caches (default: the system's)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:  # one thread: CPU seconds count work alone, not the spinning of threads kept waiting
        torch.set_num_threads(args.threads)
    scale._source_tree_package()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from featureatlas.schemas.spec import CacheSpec
    from featureatlas.tasks.activations.cache import assemble, prepare_cache, start_token_table, write_part

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    config = scale.ROOT / "benchmarks" / "configs" / ("llama_1b.json" if cuda else "llama_small.json")
    loaded, cfg = scale.build_model(config, device, torch.bfloat16 if cuda else torch.float32)
    hookpoint = scale.HOOKPOINT.format(layer=cfg.num_hidden_layers // 2)
    inputs = tempfile.TemporaryDirectory(dir=args.tmp)
    path = Path(inputs.name) / "contexts.safetensors"
    contexts = scale.synthetic_contexts(args.tokens, args.context_length, cfg.vocab_size, path)
    n = contexts.n_tokens
    spec = CacheSpec(shard_tokens=args.shard_tokens, batch_size=args.batch_size)
    has_polars = scale.importlib.util.find_spec("polars") is not None
    docs = scale._documents(contexts, has_polars)
    scale.bare_forward(loaded, contexts, hookpoint, args.batch_size, stop=1)  # the first pass' set-up
    clock = Clock(device)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for i in range(args.repeats):
            clock.lap("forward", lambda: scale.bare_forward(loaded, contexts, hookpoint, args.batch_size))
            folder = Path(tmp) / f"cache{i}"
            plan = scale.make_plan(loaded, contexts, spec, hookpoint)
            verified: dict[str, set[int]] = {}
            scale._sync(device)
            wall, cpu = time.perf_counter(), time.process_time()
            clock.lap("prepare", lambda: prepare_cache(plan, folder))
            # the token table starts with the forward passes, as `write_cache` starts it
            table = has_polars and start_token_table(loaded.tokenizer, docs, plan, spec, folder)
            clock.lap("write_part", lambda: write_part(loaded, plan, spec, folder, 0, verified=verified))
            done = {"token_table": table, "verified": verified}
            clock.lap(
                "assemble", lambda: assemble(loaded.tokenizer, docs, plan, spec, folder, header={}, **done)
            )
            clock.laps.setdefault("cache", []).append((time.perf_counter() - wall, time.process_time() - cpu))
            log.info("repeat %d: %s", i, {k: [round(x, 3) for x in v[-1]] for k, v in clock.laps.items()})
    inputs.cleanup()
    (fw, fc), (cw, cc) = clock.best("forward"), clock.best("cache")
    parts = {k: [round(x, 3) for x in clock.best(k)] for k in ("prepare", "write_part", "assemble")}
    result = {
        "tokens": n,
        "device": args.device,
        "forward_s": round(fw, 3),
        "cache_s": round(cw, 3),
        "ratio": round(cw / fw, 3),
        "cpu_ratio": round(cc / fc, 3),
        "parts": parts,
    }
    print(json.dumps(result))  # noqa: T201


if __name__ == "__main__":
    main()
