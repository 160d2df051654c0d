"""One process of the training-memory test: `python -m tests.dictionary.memory_worker build|train FOLDER [N]`.

`build` writes a stored cache of N rows by hand (random activations of width 4 through the real shard
writer, a token table with the columns a selection filters on) without a model, so 10^7 rows take seconds.
`train` trains a few steps from that cache through `CacheSource` (the train split, the stage's default) and
prints the process' peak resident set as JSON: the selection, the epoch's plan, the sample and the first
group are all made, so whatever of them grows with the rows shows in the peak.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import numpy as np
import torch

HOOKPOINT = "model.layers.0"
D_IN, SHARD_TOKENS, CONTEXT = 4, 1 << 17, 128
CHUNK = 1 << 20  # rows generated and written at a time


def build(folder: Path, n_rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from featureatlas.tasks.common.shards import ShardWriter

    folder.mkdir(parents=True)
    writer = ShardWriter(folder, HOOKPOINT, D_IN, "float32", SHARD_TOKENS)
    table = None
    gen = torch.Generator().manual_seed(0)
    for start in range(0, n_rows, CHUNK):
        row = torch.arange(start, min(start + CHUNK, n_rows))
        writer.add(torch.randn(row.numel(), D_IN, generator=gen))
        context = row // CONTEXT
        chunk = pa.table(
            {
                "row": row.numpy(),
                "position": (row % CONTEXT).numpy(),
                "is_special": (row % CONTEXT == 0).numpy(),
                "split": pa.array(np.where((context % 10 == 9).numpy(), "heldout", "train")),
            }
        )
        table = table or pq.ParquetWriter(str(folder / "tokens.parquet"), chunk.schema)
        table.write_table(chunk)
    table.close()
    manifest = {
        "stored": True,
        "dtype": "float32",
        "shard_tokens": SHARD_TOKENS,
        "n_tokens": n_rows,
        "exclude_first_token": True,
        "exclude_special_tokens": True,
        "hookpoints": {HOOKPOINT: writer.finish()},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))


def train(folder: Path) -> dict:
    from featureatlas.schemas.methods import TopKConfig
    from featureatlas.tasks.common.store import ActivationCache
    from featureatlas.tasks.dictionary.data import CacheSource
    from featureatlas.tasks.dictionary.train import train_dictionary

    source = CacheSource(ActivationCache(folder), HOOKPOINT)
    cfg = TopKConfig(d_sae=16, k=2, batch_size=4096, steps=8, device="cpu", log_every=8)
    train_dictionary(cfg, source)
    return {"rows": source.n_rows, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


if __name__ == "__main__":
    command, folder = sys.argv[1], Path(sys.argv[2])
    if command == "build":
        build(folder, int(sys.argv[3]))
    else:
        print(json.dumps(train(folder)))  # noqa: T201
