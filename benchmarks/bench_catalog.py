"""What does a catalog registration cost on PostgreSQL against SQLite, alone and with two writers racing?

    python benchmarks/bench_catalog.py [--artifacts 200]

Measured in one run: `Catalog.register` of N corpora (each with one lineage edge, one transaction each)
into a fresh SQLite file in WAL mode, and into a fresh database of a throwaway PostgreSQL cluster on
loopback (the test suite's, from the distribution's server binaries); then the same with two processes
registering N each, half of them the same artifacts. Printed as registrations/s and as ratios against
SQLite alone. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from featureatlas.tasks.tracking.catalog import Catalog  # noqa: E402
from tests.pg import remove_cluster, start_cluster  # noqa: E402
from tests.tracking.catalog_writer import corpus_ref  # noqa: E402


def alone(url: str, n: int) -> float:
    cat = Catalog(url)
    root = corpus_ref("root")
    cat.register(root, [], {}, n_documents=3, n_chars=30)
    start = time.perf_counter()
    for i in range(n):
        cat.register(corpus_ref(f"a{i}"), [root], {"i": i}, n_documents=3, n_chars=30)
    return n / (time.perf_counter() - start)


def racing(url: str, n: int, folder: Path) -> float:
    """Two writer processes, N registrations each, N/2 shared: unique rows per second of the race."""
    cat = Catalog(url)
    cat.register(corpus_ref("root"), [], {}, n_documents=3, n_chars=30)
    go = folder / "go"
    env = os.environ | {"PYTHONPATH": str(REPO)}
    ranges = ((0, n), (n // 2, n + n // 2))
    procs = [
        subprocess.Popen([sys.executable, "-m", "tests.tracking.catalog_writer", url, str(a), str(b),
                          str(folder / f"ready{a}"), str(go)], env=env, cwd=REPO)  # fmt: skip
        for a, b in ranges
    ]
    while not all((folder / f"ready{a}").exists() for a, _ in ranges):
        time.sleep(0.02)
    start = time.perf_counter()
    go.touch()
    for p in procs:
        assert p.wait() == 0
    elapsed = time.perf_counter() - start
    rows = len(cat.list("corpus")) - 1
    assert rows == n + n // 2, rows
    return rows / elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--artifacts", type=int, default=200)
    n = parser.parse_args().artifacts
    tmp = Path(tempfile.mkdtemp(prefix="bench-catalog-"))
    cluster = start_cluster()
    try:
        out = {
            "sqlite_per_s": alone(f"sqlite:///{tmp / 'a.db'}", n),
            "postgres_per_s": alone(cluster.url(cluster.create_database()), n),
        }
        (tmp / "s").mkdir()
        (tmp / "p").mkdir()
        out["sqlite_two_writers_per_s"] = racing(f"sqlite:///{tmp / 'b.db'}", n, tmp / "s")
        out["postgres_two_writers_per_s"] = racing(cluster.url(cluster.create_database()), n, tmp / "p")
    finally:
        remove_cluster(cluster)
    base = out["sqlite_per_s"]
    for key, value in out.items():
        print(f"{key:28s} {value:8.1f} registrations/s   {value / base:5.2f} x SQLite alone")
    print(json.dumps({"artifacts": n} | {k: round(v, 1) for k, v in out.items()}
                     | {f"{k}_ratio": round(v / base, 3) for k, v in out.items()}))  # fmt: skip


if __name__ == "__main__":
    main()
