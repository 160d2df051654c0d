"""Throughput and peak memory of the streamed labeling passes on a synthetic activation cache.

Writes a cache of `--tokens` rows (d_in `--d-in`) as checksummed shards, then runs `build_feature_table`
over a `ShardedActs` view with a sparse ReLU dictionary of `--d-sae` latents (about `--l0` active per row).
Peak MB is the process's peak resident set (ru_maxrss), so it includes torch itself; compare it with the
size of the activations (printed) to see that they are never all in memory. `label_over_encode` is the
table's time over one bare encode pass of the same rows measured in the same run (the goal: <= 3).
`--cache-rows` labels the way the label stage does (`CacheRows`: token table and contexts read in chunks,
n-grams counted for the asked bigrams only) instead of from in-memory row/context tensors. The last line is
JSON.

    python benchmarks/bench_label.py                                # 32k tokens, 2048 latents
    nice python benchmarks/bench_label.py --tokens 1048576 --d-sae 16384  # the full size

The default is shrunk from 1M tokens / 16k latents so that a run on a shared 2-core CPU stays at a few
minutes; the README quotes both sizes.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from featureatlas.tasks.common.shards import ShardWriter  # noqa: E402
from featureatlas.tasks.common.store import ActivationCache  # noqa: E402
from featureatlas.tasks.labeling.features import build_feature_table  # noqa: E402
from featureatlas.tasks.labeling.sharded import ShardedActs  # noqa: E402
from featureatlas.tasks.labeling.stat_labeler import count_ngrams  # noqa: E402

log = logging.getLogger("bench_label")


class SparseRelu(nn.Module):
    """codes = relu(acts @ W_enc + b_enc) with the bias set so that about `l0` latents fire per row."""

    def __init__(self, d_in: int, d_sae: int, l0: int):
        super().__init__()
        self.d_in, self.d_sae = d_in, d_sae
        self.W_enc = torch.nn.functional.normalize(torch.randn(d_in, d_sae), dim=0)
        # a unit-variance projection exceeds t with probability l0 / d_sae
        t = torch.distributions.Normal(0, 1).icdf(torch.tensor(1 - l0 / d_sae))
        self.b_enc = torch.full((d_sae,), -float(t) * (d_in**0.5) / d_in**0.5)

    def encode(self, acts):
        return torch.relu(acts @ self.W_enc + self.b_enc)

    def decoder_directions(self):
        return self.W_enc.T


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1 << 15)
    ap.add_argument("--d-sae", type=int, default=2048)
    ap.add_argument("--d-in", type=int, default=64)
    ap.add_argument("--l0", type=int, default=32)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--shard-tokens", type=int, default=1 << 16)
    ap.add_argument(
        "--baseline",
        action="store_true",
        help="also time the table with every pass re-encoding (no spill of firing codes); print the ratio",
    )
    ap.add_argument("--cache-rows", action="store_true", help="label through CacheRows, as the label stage")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    vocab = 1000
    n_ctx = args.tokens // args.context
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        writer = ShardWriter(folder, "h", args.d_in, "float32", args.shard_tokens)
        for lo in range(0, n_ctx * args.context, args.shard_tokens):
            n = min(args.shard_tokens, n_ctx * args.context - lo)
            writer.add(torch.randn(n, args.d_in) * args.d_in**0.5 / args.d_in**0.5)
        manifest = {"hookpoints": {"h": writer.finish()}, "exclude_first_token": False}
        (folder / "manifest.json").write_text(json.dumps(manifest))
        tokens = torch.randint(0, vocab, (n_ctx, args.context))
        rows = torch.arange(n_ctx * args.context)
        if args.cache_rows:
            _write_token_table(folder, tokens)
        store = ActivationCache(folder)
        view = ShardedActs(store, "h", rows)
        names = [f"t{i}" for i in range(vocab)]
        log.info(
            "cache: %d tokens x d_in %d = %.0f MB of activations",
            len(rows),
            args.d_in,
            len(rows) * args.d_in * 4 / 2**20,
        )
        dictionary = SparseRelu(args.d_in, args.d_sae, args.l0)

        start = time.perf_counter()
        with torch.inference_mode():
            for batch in view.batches(4096):
                dictionary.encode(batch)
        encode_s = time.perf_counter() - start
        log.info("one encode pass: %.2f s", encode_s)

        def run(spill_budget: int):
            start, cpu = time.perf_counter(), time.process_time()
            if args.cache_rows:
                from featureatlas.tasks.labeling.corpus import CacheRows
                from featureatlas.tasks.labeling.features import feature_table
                from featureatlas.tasks.labeling.sharded import ShardRows

                corpus, reader = CacheRows(store), ShardRows(store, "h")
                table = feature_table(
                    dictionary,
                    lambda: (reader(r) for r in corpus.cache_rows(4096)),
                    corpus,
                    lambda ids: [names[i] for i in ids],
                    top_k=10,
                    window=4,
                    spill_budget=spill_budget,
                )
                return table, time.perf_counter() - start, time.process_time() - cpu
            table = build_feature_table(
                dictionary,
                view,
                rows // args.context,
                rows % args.context,
                tokens,
                lambda ids: [names[i] for i in ids],
                count_ngrams(tokens),
                top_k=10,
                window=4,
                spill_budget=spill_budget,
            )
            return table, time.perf_counter() - start, time.process_time() - cpu

        table, seconds, cpu_s = run(8 << 30)
        extra = {}
        if args.baseline:
            _, base_s, base_cpu = run(0)
            log.info("re-encoding every pass: %.1f s (%.1f s CPU)", base_s, base_cpu)
            extra = {
                "speedup_vs_reencode": round(base_s / seconds, 2),
                "cpu_speedup": round(base_cpu / cpu_s, 2),
            }
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    log.info(
        "%d latents, %d labeled, %.1f s (%.1f s CPU: wall time on a shared machine is mostly waiting)",
        table.height,
        int(table["stat_label"].is_not_null().sum()),
        seconds,
        cpu_s,
    )
    print(
        json.dumps(
            {
                "tokens_per_s": round(len(rows) / seconds, 1),
                "label_over_encode": round(seconds / encode_s, 2),
                "peak_mb": round(peak_mb, 1),
                "tokens": len(rows),
                "d_sae": args.d_sae,
                "cpu_s": round(cpu_s, 1),
                **extra,
            }
        )
    )


def _write_token_table(folder: Path, tokens: torch.Tensor) -> None:
    """tokens.parquet and contexts.safetensors of full-length contexts, as a cache writes them."""
    import polars as pl
    from safetensors.torch import save_file

    n_ctx, length = tokens.shape
    rows = torch.arange(n_ctx * length)
    flat = tokens.flatten()
    pl.DataFrame(
        {
            "row": rows.numpy(),
            "context": (rows // length).numpy(),
            "position": (rows % length).numpy(),
            "token_id": flat.numpy(),
            "token": [f"t{i}" for i in flat.tolist()],
            "is_special": torch.zeros(len(rows), dtype=torch.bool).numpy(),
        }
    ).write_parquet(folder / "tokens.parquet", row_group_size=1 << 18)
    save_file(
        {"input_ids": tokens, "attention_mask": torch.ones_like(tokens)}, str(folder / "contexts.safetensors")
    )


if __name__ == "__main__":
    main()
