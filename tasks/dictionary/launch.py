"""Launch data-parallel training (`tasks.dictionary.distributed`) under torchrun from inside the train stage.

The stage stays one process that owns the MLflow run and the catalog; the ranks only train. torchrun runs as
`sys.executable -m torch.distributed.run`, so the ranks use the stage's interpreter and packages, on one node
with a static rendezvous on a free loopback port (nothing is exposed beyond 127.0.0.1). Rank 0 writes the
dictionary folder and a JSON-lines file of the logged metrics; after the launch the stage loads both and
registers them as it registers a single-process training. A failed launch raises `DataParallelError` carrying
the end of torchrun's output, where the failing rank's traceback is (`distributed.main` is `@record`ed).
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import torch

from featureatlas.schemas.methods import DictionaryConfig
from featureatlas.tasks.dictionary.registry import load_dictionary
from featureatlas.tasks.dictionary.train import MetricsCallback, TrainResult

# How much of torchrun's output a failure carries: the rank's traceback and torchrun's summary fit in it.
ERROR_TAIL_CHARS = 6000


class DataParallelError(RuntimeError):
    """A torchrun launch that failed; the message holds the end of its output (the failing rank's error)."""


def free_loopback_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it), for the launch's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(
    nproc: int, port: int, cache: Path, hookpoint: str, config: Path, out: Path
) -> list[str]:
    """The command line of one single-node launch of `nproc` ranks."""
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "1", "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(port),
        "-m", "featureatlas.tasks.dictionary.distributed",
        "--cache", str(cache), "--hookpoint", hookpoint, "--config", str(config),
        "--out", str(out / "dictionary"), "--metrics", str(out / "metrics.jsonl"),
    ]  # fmt: skip


# A rank's uncaught exception, as torchrun prefixes its output: "[rank1]: FloatingPointError: loss ..."
_RANK_ERROR = re.compile(r"^\[rank(\d+)\]: ([A-Za-z_][\w.]*(?:Error|Exception)\b.*)$", re.MULTILINE)


def rank_error(output: str) -> str:
    """The first failing rank's exception line from torchrun's output, or a pointer to the output below."""
    found = _RANK_ERROR.search(output)
    if found is None:
        return "no rank reported an exception (killed, or failed to start); see the output below"
    return f"rank {found.group(1)} raised {found.group(2)}"


def _check_gpus(cfg: DictionaryConfig) -> None:
    # NCCL needs one GPU per rank; say so before torchrun starts ranks that would all fail alike
    gpus = torch.cuda.device_count() if cfg.device != "cpu" and torch.cuda.is_available() else 0
    if gpus and cfg.nproc_per_node > gpus:
        raise ValueError(
            f"nproc_per_node={cfg.nproc_per_node} asks for one GPU per process, but {gpus} GPU(s) are "
            f"visible; use nproc_per_node <= {gpus}, or device: cpu for gloo processes"
        )


def train_with_torchrun(
    cfg: DictionaryConfig,
    cache: Path,
    hookpoint: str,
    workdir: Path,
    *,
    on_metrics: MetricsCallback | None = None,
) -> TrainResult:
    """Train `cfg` on the training split of `hookpoint` of the cache folder `cache`, in nproc_per_node ranks.

    `workdir` (created) holds the config, the ranks' output and metrics; the caller removes it. The logged
    metrics are handed to `on_metrics(metrics, step)` in step order once the ranks are done.
    """
    _check_gpus(cfg)
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "cfg.json"
    config.write_text(json.dumps(cfg.model_dump(mode="json")))
    (workdir / "metrics.jsonl").unlink(missing_ok=True)
    cmd = torchrun_command(cfg.nproc_per_node, free_loopback_port(), cache, hookpoint, config, workdir)
    # The ranks import the installed `featureatlas` package, as the stage itself does.
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = done.stdout.decode(errors="replace")
    if done.returncode != 0:
        raise DataParallelError(
            f"data-parallel training of {cfg.method} (d_sae={cfg.d_sae}) on {hookpoint!r} failed: torchrun "
            f"with {cfg.nproc_per_node} processes exited with code {done.returncode}: {rank_error(output)}\n"
            f"The end of its output:\n{output[-ERROR_TAIL_CHARS:]}"
        )
    history = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    if on_metrics is not None:
        for entry in history:
            on_metrics(entry["metrics"], entry["step"])
    steps = history[-1]["step"] if history else 0
    final = history[-1]["metrics"] if history else {}
    return TrainResult(dictionary=load_dictionary(workdir / "dictionary"), final_metrics=final, steps=steps)
