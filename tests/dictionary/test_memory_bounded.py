"""Training from a stored cache takes memory set by batch and shard sizes, not by the rows: the peak resident
set of a training process at 10^6 and 10^7 cached rows (each in a fresh process, the cache built by another).
Before the selection and the epoch plan were kept per shard, 10^7 rows added ~1 GB of row indices."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _worker(*args: str) -> str:
    cmd = [sys.executable, "-m", "tests.dictionary.memory_worker", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=1200, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_training_peak_memory_does_not_grow_with_the_rows(tmp_path):
    peaks = {}
    for n in (1_000_000, 10_000_000):
        _worker("build", str(tmp_path / str(n)), str(n))
        peaks[n] = json.loads(_worker("train", str(tmp_path / str(n))).strip().splitlines()[-1])
    small, large = peaks[1_000_000], peaks[10_000_000]
    assert large["rows"] > 9 * small["rows"] > 8_000_000  # the train split, without position 0
    # loose: the allocator moves the peak a little; 8 bytes per row anywhere would add 80 MB, and the
    # row-holding plan added ~1 GB (ratio ~3)
    assert large["peak_rss_gb"] / small["peak_rss_gb"] <= 1.3, peaks
