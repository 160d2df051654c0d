"""Does preparing a corpus take memory that grows with it? `write_documents`, then `build_contexts` (packed,
into contexts.safetensors), at two corpus sizes, each size in a fresh process.

    python benchmarks/bench_corpus.py [--tokens 1000000 100000000]

The corpus is synthetic: a JSON-lines file of documents of 4,000 letters, and a tokenizer that makes one
token of every fourth byte (1,000 tokens a document), so a 10^8-token corpus is prepared in about a minute;
a real tokenizer costs more time, not more memory. Per size and phase, the peak resident set, with torch,
numpy, polars and pyarrow loaded before (the kernel's high-water mark, reset between phases where Linux
allows it). The last line is one JSON object: per size `documents_peak_gb` and `contexts_peak_gb` (the
process' peak during each phase), `*_above_start_gb` (that peak above the resident set when the phase
began), `contexts_gb` (the file's size) and `seconds`; and `rss_growth` per phase (the peak at the larger
size / at the smaller; the goal is at most 1.2).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_scale as scale  # noqa: E402

DOC_CHARS = 4000


class ByteTokenizer:
    """One token of every fourth byte of the text (ids 3-258), EOS 2, pad 0."""

    pad_token_id, eos_token_id = 0, 2

    def __call__(self, texts: list[str], add_special_tokens: bool = True) -> dict:  # noqa: ARG002
        import numpy as np

        ids = [np.frombuffer(t.encode(), dtype=np.uint8)[::4].astype(np.int64) + 3 for t in texts]
        return {"input_ids": ids}


def _phase(out: dict, name: str, fn):
    """fn(), recording the process' peak resident set while it ran and that peak above the set before it."""
    scale._reset_peak()
    base = scale._rss_gb()
    result = fn()
    peak = scale._rss_gb("VmHWM")
    out[f"{name}_peak_gb"], out[f"{name}_above_start_gb"] = round(peak, 3), round(peak - base, 3)
    return result


def child(tokens: int, folder: Path) -> dict:
    import numpy as np
    import polars  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    import torch  # noqa: F401

    from featureatlas.schemas.spec import CorpusSpec
    from featureatlas.tasks.common.corpus import build_contexts
    from featureatlas.tasks.common.documents import write_documents

    n_docs = tokens // (DOC_CHARS // 4)
    rng = np.random.default_rng(0)
    texts = ["".join(chr(97 + c) for c in rng.integers(0, 26, DOC_CHARS)) for _ in range(64)]
    source = folder / "corpus.jsonl"
    with source.open("w") as f:
        for i in range(n_docs):
            f.write(json.dumps({"text": f"{i:08d}" + texts[i % 64][8:]}) + "\n")
    spec = CorpusSpec(
        sources=[str(source)], context_length=1024, max_tokens=tokens, heldout_fraction=0.1, pack=True
    )
    out: dict = {}
    t0 = time.perf_counter()
    _phase(out, "documents", lambda: write_documents(spec, folder / "documents.parquet"))
    documents, path = folder / "documents.parquet", folder / "contexts.st"
    contexts = _phase(out, "contexts", lambda: build_contexts(documents, ByteTokenizer(), spec, path))
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out["tokens"] = contexts.n_tokens
    out["contexts_gb"] = round((folder / "contexts.st").stat().st_size / 2**30, 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs=2, default=[10**6, 10**8])
    ap.add_argument("--tmp", default=None, help="folder for the corpus and its files (default: the system's)")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    scale._source_tree_package()
    if args.child is not None:
        print(json.dumps(child(args.child, Path(args.folder))))  # noqa: T201
        return
    sizes = {}
    for tokens in args.tokens:
        with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
            cmd = [sys.executable, __file__, "--child", str(tokens), "--folder", tmp]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            sizes[str(tokens)] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(tokens, sizes[str(tokens)], flush=True)  # noqa: T201
    small, large = (sizes[str(t)] for t in args.tokens)
    growth = {}
    for phase in ("documents", "contexts"):
        with contextlib.suppress(ZeroDivisionError):
            growth[phase] = round(large[f"{phase}_peak_gb"] / small[f"{phase}_peak_gb"], 2)
    load = os.getloadavg()[0]
    print(json.dumps({"sizes": sizes, "rss_growth": growth, "cores": os.cpu_count(), "load_avg": load}))  # noqa: T201


if __name__ == "__main__":
    main()
