"""`featureatlas server start|status|stop` for real: both servers come up on loopback, answer their health
checks and take a tracked run; stop stops them. Once with the embedded SQLite stores, once with both
servers on PostgreSQL (as a lab would run them)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from featureatlas.flows.cli import app
from featureatlas.tasks.tracking.mlflow_runs import Tracker
from featureatlas.tasks.tracking.servers import healthy, start, status
from tests.pg import PASSWORD, free_port


def listening_addresses(port: int) -> set[str]:
    """Local addresses (as dotted quads) with a socket listening on `port`, from /proc/net/tcp."""
    out = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        addr, p = local.split(":")
        if int(p, 16) == port and state == "0A":  # 0A: LISTEN
            out.add(".".join(str(int(addr[i : i + 2], 16)) for i in (6, 4, 2, 0)))
    return out


@pytest.mark.slow  # each start runs the servers' own migrations: tens of seconds
@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_servers_start_answer_and_stop(backend, home, request, monkeypatch, tmp_path):
    if backend == "postgres":
        cluster = request.getfixturevalue("pg_cluster")
        # the client's tracking URI is the server's own URL; the server keeps runs in PostgreSQL
        monkeypatch.setenv("FEATUREATLAS_MLFLOW_BACKEND_URI", cluster.url(cluster.create_database()))
        monkeypatch.setenv(
            "FEATUREATLAS_PREFECT_DATABASE_URL", cluster.url(cluster.create_database(), driver="asyncpg")
        )
    runner = CliRunner()
    mlflow_port, prefect_port = free_port(), free_port()
    try:
        started = runner.invoke(
            app,
            [
                "server",
                "start",
                "--mlflow-port",
                str(mlflow_port),
                "--prefect-port",
                str(prefect_port),
                "--json",
            ],  # fmt: skip
        )
        assert started.exit_code == 0, started.output
        rows = {r["name"]: r for r in json.loads(started.stdout)}
        assert rows["mlflow"]["url"] == f"http://127.0.0.1:{mlflow_port}"
        assert rows["prefect"]["url"] == f"http://127.0.0.1:{prefect_port}/api"
        assert all(r["healthy"] for r in rows.values())
        assert listening_addresses(mlflow_port) == {"127.0.0.1"}
        assert listening_addresses(prefect_port) == {"127.0.0.1"}
        assert healthy(f"http://127.0.0.1:{prefect_port}/api/health")

        again = runner.invoke(app, ["server", "start", "--mlflow-port", str(mlflow_port), "--json",
                                    "--prefect-port", str(prefect_port)])  # fmt: skip
        assert again.exit_code == 0 and {r["pid"] for r in json.loads(again.stdout)} == {
            r["pid"] for r in rows.values()
        }  # already running: nothing new started

        tracker = Tracker(rows["mlflow"]["url"], "featureatlas", tmp_path / "unused")
        with tracker.run("pipeline") as run:
            run.log_params({"hf_token": "hf_AbCdEfGhIjKlMnOp", "k": 4})
            (tmp_path / "spec.yaml").write_text("name: x\n")
            run.log_artifact(tmp_path / "spec.yaml")
        assert tracker.client.get_run(run.run_id).data.params == {"hf_token": "***", "k": "4"}
        if backend == "postgres":  # the run is in the server's PostgreSQL store
            stored_run = MlflowClient(os.environ["FEATUREATLAS_MLFLOW_BACKEND_URI"]).get_run(run.run_id)
            assert stored_run.data.params["k"] == "4"
        assert [a.path for a in tracker.client.list_artifacts(run.run_id)] == ["spec.yaml"]
        stored = list(home.mlflow_artifacts_dir.rglob("spec.yaml"))
        assert len(stored) == 1  # the server stores artifacts in its own artifact root

        status = runner.invoke(app, ["server", "status"])
        assert status.exit_code == 0 and "healthy" in status.stdout
        assert f"FEATUREATLAS_MLFLOW_TRACKING_URI=http://127.0.0.1:{mlflow_port}" in status.stdout
        logs = "".join(p.read_text(errors="replace") for p in (home.home_dir / "server").glob("*.log"))
        assert PASSWORD not in logs + "".join(
            p.read_text() for p in (home.home_dir / "server").glob("*.json")
        )
    finally:
        stopped = runner.invoke(app, ["server", "stop"])
    assert stopped.exit_code == 0 and "stopped: prefect, mlflow" in stopped.stdout
    for r in rows.values():
        with pytest.raises(ProcessLookupError):
            os.kill(r["pid"], 0)
    status = runner.invoke(app, ["server", "status", "--json"])
    assert status.exit_code == 0 and not any(r["running"] for r in json.loads(status.stdout))
    assert not healthy(f"http://127.0.0.1:{mlflow_port}/health", timeout=2)


def test_a_taken_port_is_refused_before_anything_starts(home):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"port {port} on 127.0.0.1 is in use; choose another"):
            start(home, mlflow_port=free_port(), prefect_port=port)
    assert not list((home.home_dir / "server").glob("*.json"))  # neither server was started
    assert [s.running for s in status(home)] == [False, False]
