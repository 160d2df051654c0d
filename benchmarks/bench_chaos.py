"""Chaos: pipelines started together on one home, killed with SIGKILL at random moments and restarted, must
end exactly as clean runs do, leaving no process and no MLflow run RUNNING.

N `featureatlas run` processes (default 4) start at once on one new home, with overlapping specs: one tiny
Llama, corpus and activation cache for all, a TopK dictionary they all train and one of two others that
half of them share. A killer sends SIGKILL to the CLI process of a random run (the process alone, not its
group: whatever it started must die with it) at random moments and starts that run again, until every run
has succeeded. Then the same specs run one after another on a fresh home, and the two homes are compared:
catalog rows (kind, id, fingerprint), lineage edges, the bytes of every registered artifact's files, and
each run's artifact ids. `orphans` counts processes still running for the chaos home and MLflow runs still
RUNNING there; `failures` counts attempts that failed without being killed (each is tried again).

Run: `nice python benchmarks/bench_chaos.py [--runs 4] [--kills 4] [--seed 0] [--backend sqlite|postgresql]`
(both by default when the PostgreSQL server binaries are installed: `ls /usr/lib/postgresql/*/bin/initdb`).
The last stdout line is one JSON object: runs, kills, mismatches, orphans, wall_s (the chaos phase, summed
over backends), then per backend the same figures and the clean phase's time, and the machine's load.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.helpers (tiny models) and tests.pg (a throwaway PostgreSQL)

log = logging.getLogger("bench_chaos")


def make_specs(root: Path, n: int) -> list[Path]:
    """N specs sharing model, corpus and cache; each trains k=4 and one of k=2 / k=3 (overlapping)."""
    from tests.helpers import TINY_TEXT, save_tiny_llama

    model = save_tiny_llama(root / "tiny-llama")
    corpus = root / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": " ".join(TINY_TEXT[i : i + 6])}) for i in range(24)))
    paths = []
    for i in range(n):
        spec = {
            "name": f"chaos{i}",
            "model": {"path": str(model)},
            "corpus": {"sources": [str(corpus)], "context_length": 32, "max_tokens": 2048,
                       "heldout_fraction": 0.25},  # fmt: skip
            "hookpoints": ["model.layers.1"],
            "cache": {"shard_tokens": 256, "batch_size": 4},
            "dictionaries": [
                {"method": "topk", "d_sae": 64, "k": 4, "batch_size": 128, "epochs": 2},
                {"method": "topk", "d_sae": 64, "k": 2 + i % 2, "batch_size": 128, "epochs": 2},
            ],
            "evaluate": {"enabled": False},
            "label": {"enabled": False},
        }
        path = root / f"chaos{i}.yaml"
        path.write_text(yaml.safe_dump(spec))
        paths.append(path)
    return paths


def run_env(home: Path, databases: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # each run its temporary server
    return env | databases | {"FEATUREATLAS_HOME": str(home), "HF_HUB_OFFLINE": "1"}


def start(spec: Path, env: dict[str, str], logs: Path, tag: str) -> subprocess.Popen:
    out = (logs / f"{tag}.json").open("wb")
    err = (logs / f"{tag}.log").open("wb")
    return subprocess.Popen([sys.executable, "-m", "featureatlas.flows.cli", "run", str(spec), "--json"],
                            env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL)  # fmt: skip


def result_ids(path: Path) -> list[str]:
    result = json.loads(path.read_text())
    return [result[k]["id"] for k in ("model", "corpus", "cache")] + [
        d["dictionary"]["id"] for d in result["dictionaries"]
    ]


def chaos(specs: list[Path], env: dict, logs: Path, rng: random.Random, kills: int, gap: tuple) -> dict:
    """Run every spec at once, SIGKILL `kills` random attempts, restart each killed run; until all succeed."""
    attempt = dict.fromkeys(range(len(specs)), 0)
    procs = {i: start(s, env, logs, f"run{i}-0") for i, s in enumerate(specs)}
    done, failed, killed = {}, {}, 0
    next_kill = time.monotonic() + rng.uniform(*gap)
    while procs:
        for i, p in list(procs.items()):
            if p.poll() is None:
                continue
            del procs[i]
            if p.returncode == 0:
                done[i] = result_ids(logs / f"run{i}-{attempt[i]}.json")
            elif attempt[i] < 6:  # a failure nobody caused: counted, and the run is tried again
                failed[i] = failed.get(i, 0) + 1
                log.warning("run %d attempt %d failed (%d); see %s", i, attempt[i], p.returncode,
                            logs / f"run{i}-{attempt[i]}.log")  # fmt: skip
                attempt[i] += 1
                procs[i] = start(specs[i], env, logs, f"run{i}-{attempt[i]}")
        if procs and killed < kills and time.monotonic() >= next_kill:
            i = rng.choice(sorted(procs))
            procs[i].send_signal(signal.SIGKILL)  # the CLI's process only
            procs[i].wait()
            killed += 1
            log.info("killed run %d attempt %d", i, attempt[i])
            attempt[i] += 1
            procs[i] = start(specs[i], env, logs, f"run{i}-{attempt[i]}")
            next_kill = time.monotonic() + rng.uniform(*gap)
        time.sleep(0.2)
    return {"results": done, "kills": killed, "failures": sum(failed.values())}


def processes_of(home: Path) -> list[int]:
    """Live processes started for `home` (their environment names it), zombies left out."""
    marker = f"FEATUREATLAS_HOME={home}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if marker not in (proc / "environ").read_bytes().split(b"\0"):
                continue
            if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                found.append(int(proc.name))
        except (FileNotFoundError, PermissionError, ProcessLookupError, IndexError):
            continue
    return found


def snapshot(home: Path, databases: dict[str, str]) -> dict:
    """Catalog rows, lineage edges, artifact file digests and RUNNING MLflow runs of one home."""
    from mlflow.tracking import MlflowClient

    from featureatlas.schemas.settings import Settings
    from featureatlas.tasks.tracking.catalog import Catalog

    settings = Settings(home=home, catalog_url=databases.get("FEATUREATLAS_CATALOG_URL"),
                        mlflow_tracking_uri=databases.get("FEATUREATLAS_MLFLOW_TRACKING_URI"))  # fmt: skip
    catalog = Catalog(settings.catalog)
    rows = sorted((kind, r.id, r.fingerprint) for kind, r in catalog.list())
    files = {}
    for kind, r in catalog.list():
        folder = Path(r.uri)
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                files[f"{kind}/{r.id}/{p.relative_to(folder)}"] = hashlib.sha256(p.read_bytes()).hexdigest()
    catalog.engine.dispose()
    client = MlflowClient(settings.mlflow_uri)
    exp = client.get_experiment_by_name(settings.experiment)
    running = len(client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")) if exp else 0
    return {"rows": rows, "edges": sorted(catalog.edges()), "files": files, "running": running}


def differences(a: dict, b: dict) -> list[str]:
    out = [f"row {r}" for r in set(map(tuple, a["rows"])) ^ set(map(tuple, b["rows"]))]
    out += [f"edge {e}" for e in set(map(tuple, a["edges"])) ^ set(map(tuple, b["edges"]))]
    names = sorted(set(a["files"]) | set(b["files"]))
    out += [f"file {f}" for f in names if a["files"].get(f) != b["files"].get(f)]
    return out


def one_backend(backend: str, root: Path, args, rng: random.Random) -> dict:
    cluster = None
    if backend == "postgresql":
        from tests.pg import fresh_database_env, start_cluster

        cluster = start_cluster()
    try:
        specs = make_specs(root / "inputs", args.runs)
        chaos_db = fresh_database_env(cluster) if cluster else {}
        clean_db = fresh_database_env(cluster) if cluster else {}
        chaos_home, clean_home = root / "chaos-home", root / "clean-home"
        logs = root / "logs"
        logs.mkdir(parents=True)
        t0 = time.monotonic()
        gap = (args.min_gap, args.max_gap)
        outcome = chaos(specs, run_env(chaos_home, chaos_db), logs, rng, args.kills, gap)
        wall = time.monotonic() - t0
        deadline = time.monotonic() + 60
        while (left := processes_of(chaos_home)) and time.monotonic() < deadline:
            time.sleep(0.5)
        t1 = time.monotonic()
        clean_results = {}
        for i, spec in enumerate(specs):  # the reference: one after another on a fresh home
            p = start(spec, run_env(clean_home, clean_db), logs, f"clean{i}")
            if p.wait() != 0:
                raise RuntimeError(f"the clean run of {spec} failed; see {logs / f'clean{i}.log'}")
            clean_results[i] = result_ids(logs / f"clean{i}.json")
        clean_s = time.monotonic() - t1
        got, want = snapshot(chaos_home, chaos_db), snapshot(clean_home, clean_db)
        diffs = differences(got, want)
        diffs += [f"run {i} ids" for i in range(len(specs)) if outcome["results"].get(i) != clean_results[i]]
        for d in diffs[:20]:
            log.warning("mismatch: %s", d)
        return {"runs": len(specs), "kills": outcome["kills"], "failures": outcome["failures"],
                "mismatches": len(diffs), "orphans": len(left) + got["running"],
                "orphan_processes": len(left), "running_mlflow_runs": got["running"],
                "artifacts": len(got["rows"]), "files": len(got["files"]),
                "wall_s": round(wall, 1), "clean_s": round(clean_s, 1)}  # fmt: skip
    finally:
        if cluster is not None:
            from tests.pg import remove_cluster

            remove_cluster(cluster)


def main() -> None:
    from tests.pg import server_bin

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=4, help="Pipelines started together.")
    parser.add_argument("--kills", type=int, default=4, help="SIGKILLs sent in all.")
    parser.add_argument("--min-gap", type=float, default=5.0, help="Fewest seconds between two kills.")
    parser.add_argument("--max-gap", type=float, default=40.0, help="Most seconds between two kills.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", choices=["sqlite", "postgresql"], action="append",
                        help="Default: sqlite, and postgresql when its server binaries exist.")  # fmt: skip
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    backends = args.backend or (["sqlite", "postgresql"] if server_bin() else ["sqlite"])
    rng = random.Random(args.seed)
    per = {}
    with tempfile.TemporaryDirectory(prefix="featureatlas-chaos-") as tmp:
        for backend in backends:
            per[backend] = one_backend(backend, Path(tmp) / backend, args, rng)
            log.info("%s: %s", backend, per[backend])
    total = {k: sum(p[k] for p in per.values()) for k in ("kills", "mismatches", "orphans", "wall_s")}
    total["failures"] = sum(p["failures"] for p in per.values())  # runs that failed without being killed
    print(json.dumps({"runs": args.runs, **total, "backends": per,
                      "load_avg": [round(x, 1) for x in os.getloadavg()]}))  # fmt: skip


if __name__ == "__main__":
    main()
