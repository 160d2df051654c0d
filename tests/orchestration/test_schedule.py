"""A schedule on a real Prefect server: the run fires, the worker completes it, and a grown corpus rebuilds.

The test starts `prefect server start` on a free loopback port with its own PREFECT_HOME (a schedule only
fires on a real server: the temporary one lives and dies with one command), registers a spec with
`featureatlas schedule --interval`, serves it with `featureatlas worker`, and reads the results back from
the MLflow store and the catalog the scheduled runs wrote. Every wait has a deadline, and the server, the
worker and the flow runs it started are killed as process groups at the end, so nothing outlives the test.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest
import yaml
from mlflow.tracking import MlflowClient

from featureatlas.schemas.settings import Settings
from featureatlas.tasks.tracking.catalog import open_catalog
from tests.flows.test_pipeline import tiny_spec
from tests.helpers import TINY_TEXT

REPO = Path(__file__).parents[2]
CLI = [sys.executable, "-c", "from flows.cli import main; main()"]
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group (the worker's flow runs included), SIGKILL what is left after 30 s."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


@pytest.fixture
def prefect_server(tmp_path):
    port = _free_port()
    env = os.environ | {
        "PREFECT_HOME": str(tmp_path / "prefect-server"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
    }
    env.pop("PREFECT_API_URL", None)
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, f"prefect server exited: {_tail(log)}"
            assert time.monotonic() < deadline, f"prefect server not healthy in 240 s: {_tail(log)}"
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        yield url
    finally:
        _stop(proc)


def _flow_runs(url: str) -> list[dict]:
    r = httpx.post(
        f"{url}/flow_runs/filter", json={"sort": "EXPECTED_START_TIME_ASC", "limit": 50}, timeout=30
    )
    r.raise_for_status()
    return r.json()


def _wait_for_completed_run(url: str, after: datetime, timeout_s: float, worker_log: Path) -> dict:
    """The first COMPLETED flow run that started after `after`; any FAILED/CRASHED run fails the test."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for run in _flow_runs(url):
            state = run["state_type"]
            assert state not in ("FAILED", "CRASHED"), f"flow run {run['name']} {state}: {_tail(worker_log)}"
            started = run["start_time"] and datetime.fromisoformat(run["start_time"].replace("Z", "+00:00"))
            if state == "COMPLETED" and started > after:
                return run
        time.sleep(2)
    raise AssertionError(f"no scheduled run completed in {timeout_s} s: {_tail(worker_log)}")


def test_scheduled_pipeline_runs_on_a_real_server_and_rebuilds_only_what_changed(tmp_path, prefect_server):
    url = prefect_server
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"part-{i}.jsonl").write_text(
            "\n".join(json.dumps({"text": " ".join(TINY_TEXT[j : j + 6])}) for j in range(i * 6, i * 6 + 6))
        )
    raw = tiny_spec(tmp_path, evaluate={"enabled": False}, label={"enabled": False})
    raw["corpus"]["sources"] = ["corpus"]  # relative to the spec's folder
    spec_path = tmp_path / "nightly.yaml"
    spec_path.write_text(yaml.safe_dump(raw))
    home = tmp_path / "home"
    env = os.environ | {
        "FEATUREATLAS_HOME": str(home),
        "PREFECT_API_URL": url,
        "PREFECT_HOME": str(tmp_path / "prefect-client"),
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PYTHONPATH": str(REPO),
    }

    # without a server a schedule is refused, saying how to get one
    no_server = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    refused = subprocess.run(
        [*CLI, "schedule", str(spec_path), "--interval", "15"],
        env=no_server,
        capture_output=True,
        timeout=300,
    )
    assert refused.returncode == 2 and b"PREFECT_API_URL is not set" in refused.stderr

    done = subprocess.run(
        [*CLI, "schedule", str(spec_path), "--interval", "15", "--name", "tiny-nightly"],
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert b"featureatlas-pipeline/tiny-nightly" in done.stdout and b"every 15 s" in done.stdout

    worker_log = tmp_path / "worker.log"
    t0 = datetime.now(timezone.utc)
    with worker_log.open("wb") as out:
        worker = subprocess.Popen(
            [*CLI, "worker"], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        first = _wait_for_completed_run(url, t0, 480, worker_log)
        assert first["deployment_id"] and first["parameters"]["spec"]["name"] == "tiny"

        settings = Settings(home=home)
        client = MlflowClient(settings.mlflow_uri)
        exp = client.get_experiment_by_name(settings.experiment)
        (parent,) = client.search_runs(
            [exp.experiment_id], filter_string=f"tags.featureatlas.prefect_flow_run_id = '{first['id']}'"
        )
        assert parent.info.status == "FINISHED" and parent.data.tags["featureatlas.pipeline"] == "tiny"
        assert (
            len(
                client.search_runs(
                    [exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
                )
            )
            == 4
        )
        catalog = open_catalog(settings.catalog)
        kinds = sorted(kind for kind, _ in catalog.list())
        assert kinds == sorted(["model", "corpus", "activation_cache", "dictionary"])

        # the corpus folder grows; the next scheduled run rebuilds the corpus and what follows from it
        (corpus / "part-3.jsonl").write_text(
            "\n".join(json.dumps({"text": f"New text {j}: " + TINY_TEXT[j]}) for j in range(6))
        )
        grown = datetime.now(timezone.utc)
        second = _wait_for_completed_run(url, grown, 480, worker_log)
        assert second["id"] != first["id"]

        kinds = sorted(kind for kind, _ in catalog.list())
        assert kinds == sorted(["model"] + ["corpus", "activation_cache", "dictionary"] * 2)
        (last,) = client.search_runs(
            [exp.experiment_id], filter_string=f"tags.featureatlas.prefect_flow_run_id = '{second['id']}'"
        )
        assert last.info.status == "FINISHED"
        stages = client.search_runs(
            [exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{last.info.run_id}'"
        )
        reused = {
            r.data.tags["featureatlas.stage"]: "featureatlas.reused_from_run" in r.data.tags for r in stages
        }
        assert reused == {"model": True, "corpus": False, "activation_cache": False, "dictionary": False}

        listed = subprocess.run([*CLI, "runs", "--json"], env=env, capture_output=True, timeout=300)
        assert listed.returncode == 0, listed.stderr.decode()[-3000:]
        rows = {r["id"]: r for r in json.loads(listed.stdout)}
        assert rows[first["id"]]["state"] == "Completed" and rows[second["id"]]["state"] == "Completed"
        assert rows[first["id"]]["deployment"] == "tiny-nightly"
        # future runs the schedule already created show only with --upcoming
        assert all(r["expected_start"] <= datetime.now(timezone.utc).isoformat() for r in rows.values())
        upcoming = subprocess.run(
            [*CLI, "runs", "--json", "--upcoming"], env=env, capture_output=True, timeout=300
        )
        assert any(r["state"] == "Scheduled" for r in json.loads(upcoming.stdout))
    finally:
        _stop(worker)
