"""Any number of processes may open a new MLflow store at once (SQLite and PostgreSQL), and a SQLite store
left half-migrated is mended, or refused with the commands that mend it."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from featureatlas.tasks.tracking.errors import Refusal
from featureatlas.tasks.tracking.mlflow_runs import Tracker
from featureatlas.tasks.tracking.mlflow_store import StoreNeedsRepair

REPO = Path(__file__).parents[2]
N = 4


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_several_processes_open_a_new_store_at_once(store, tmp_path, request):
    if store == "sqlite":
        uri = f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}"
    else:
        cluster = request.getfixturevalue("pg_cluster")
        uri = cluster.url(cluster.create_database())
    go = tmp_path / "go"
    env = os.environ | {"PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.tracking.tracker_opener",
                uri,
                str(tmp_path / "art"),
                str(tmp_path / f"ready{i}"),
                str(go),
            ],  # fmt: skip
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(N)
    ]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready{i}").exists() for i in range(N)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.02)
    go.touch()  # all of them open the store now
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * N, "\n".join(e[-2000:] for e in errors)
    client = MlflowClient(uri)
    (exp,) = [e for e in client.search_experiments() if e.name == "featureatlas"]
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == N and {r.info.status for r in runs} == {"FINISHED"}


def _store_with_a_run(tmp_path: Path) -> tuple[str, Path, str]:
    path = tmp_path / "mlflow.db"
    uri = f"sqlite:///{path}"
    with Tracker(uri, "featureatlas", tmp_path / "art").run("kept") as run:
        run.log_metrics({"fvu": 0.5})
    return uri, path, run.run_id


def test_an_interrupted_migration_with_its_original_table_is_mended(tmp_path):
    uri, path, run_id = _store_with_a_run(tmp_path)
    with sqlite3.connect(path) as conn:  # a batch migration's copy, cut short before it replaced `metrics`
        conn.execute("CREATE TABLE _alembic_tmp_metrics AS SELECT * FROM metrics")
    tracker = Tracker(uri, "featureatlas", tmp_path / "art")
    assert tracker.client.get_run(run_id).data.metrics == {"fvu": 0.5}
    with sqlite3.connect(path) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "metrics" in tables and not any(t.startswith("_alembic_tmp_") for t in tables)


def test_a_half_made_store_without_runs_is_built_again(tmp_path):
    path = tmp_path / "mlflow.db"
    with sqlite3.connect(path) as conn:  # what two runs colliding on a new home left behind
        conn.execute("CREATE TABLE experiments (experiment_id INTEGER PRIMARY KEY, name TEXT)")
        conn.execute("CREATE TABLE _alembic_tmp_latest_metrics (key TEXT)")
    tracker = Tracker(f"sqlite:///{path}", "featureatlas", tmp_path / "art")
    with tracker.run("first") as run:
        pass
    assert tracker.client.get_run(run.run_id).info.status == "FINISHED"


def test_a_half_migrated_store_with_runs_and_no_original_is_refused_with_the_fix(tmp_path):
    uri, path, _ = _store_with_a_run(tmp_path)
    with sqlite3.connect(path) as conn:  # killed between dropping `metrics` and renaming its copy
        conn.execute("ALTER TABLE metrics RENAME TO _alembic_tmp_metrics")
    with pytest.raises(StoreNeedsRepair, match="ALTER TABLE _alembic_tmp_metrics RENAME TO metrics") as e:
        Tracker(uri, "featureatlas", tmp_path / "art")
    assert isinstance(e.value, Refusal) and "mlflow db upgrade" in str(e.value)
