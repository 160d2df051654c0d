"""kill -9 of the `featureatlas run` process alone (not its group) leaves no process behind, its temporary
Prefect server included, and `featureatlas runs --repair` marks the MLflow runs it left RUNNING KILLED."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from featureatlas.schemas.settings import Settings
from tests.flows.test_pipeline import tiny_spec

REPO = Path(__file__).parents[2]


def processes_of(home: Path) -> list[int]:
    """Live processes started for `home` (their environment names it), zombies left out."""
    marker = f"FEATUREATLAS_HOME={home}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if marker not in (proc / "environ").read_bytes().split(b"\0"):
                continue
            if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                found.append(int(proc.name))
        except (FileNotFoundError, PermissionError, ProcessLookupError, IndexError):
            continue
    return found


@pytest.mark.slow
def test_kill_9_of_the_cli_leaves_no_server_and_repair_ends_its_runs(tmp_path, monkeypatch):
    raw = tiny_spec(tmp_path, evaluate={"enabled": False}, label={"enabled": False})
    raw["cache"] = {"shard_tokens": 128, "batch_size": 2}
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(raw))
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # the run starts its own server
    env |= {"FEATUREATLAS_HOME": str(home), "PREFECT_HOME": str(home / "prefect"), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.orchestration.slow_run", str(spec_path)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True,  # only so that the test can clean up if it fails; the kill below is the CLI's
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 400
        while not list(home.glob("artifacts/activation_cache/*.partial/acts/*/*.safetensors")):
            assert proc.poll() is None, f"the run ended before it was killed: {proc.stderr.read().decode()}"
            assert time.monotonic() < deadline, "the run wrote no shards in 400 s"
            time.sleep(0.1)
        assert len(processes_of(home)) >= 2  # the CLI and its temporary Prefect server
        proc.send_signal(signal.SIGKILL)  # the CLI's process alone
        proc.wait(30)
        deadline = time.monotonic() + 60
        while (left := processes_of(home)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert left == [], f"still running after the CLI was killed: {left}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    monkeypatch.setenv("FEATUREATLAS_HOME", str(home))
    settings = Settings()
    client = MlflowClient(settings.mlflow_uri)
    exp = client.get_experiment_by_name(settings.experiment)
    found = client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")
    running = {r.info.run_id for r in found}
    assert running  # the pipeline's run and its caching stage's
    from featureatlas.flows.cli import app

    result = CliRunner().invoke(app, ["runs", "--repair"])
    assert result.exit_code == 0, result.output
    assert f"{len(running)} MLflow runs of dead processes marked KILLED" in result.output
    assert {client.get_run(r).info.status for r in running} == {"KILLED"}
