"""Schedule arguments and the worker's environment, checked before any server is involved."""

from __future__ import annotations

import pytest
import yaml
from prefect.settings import PREFECT_API_URL, temporary_settings
from typer.testing import CliRunner

from featureatlas.flows.cli import app
from featureatlas.flows.schedules import ScheduleError, register_schedule, worker_command, worker_environment
from featureatlas.schemas.settings import Settings
from featureatlas.schemas.spec import parse_spec
from tests.flows.test_pipeline import tiny_spec


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of --cron"),
        ({"cron": "0 3 * * *", "interval": 60}, "exactly one of --cron"),
        ({"interval": -5}, "positive number of seconds, got -5"),
    ],
)
def test_bad_schedules_are_refused(tmp_path, kwargs, message):
    spec = parse_spec(tiny_spec(tmp_path))
    with pytest.raises(ScheduleError, match=message):
        register_schedule(spec, **kwargs)


def test_schedule_without_a_server_says_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.setenv("FEATUREATLAS_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec(tmp_path)))
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        result = CliRunner().invoke(app, ["schedule", str(spec), "--cron", "0 3 * * *"])
        worker = CliRunner().invoke(app, ["worker"])
    assert result.exit_code == 2 and "PREFECT_API_URL is not set" in result.output
    assert "prefect server start --host 127.0.0.1" in result.output
    assert worker.exit_code == 2 and "PREFECT_API_URL is not set" in worker.output


def test_worker_runs_flow_runs_with_an_absolute_home(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = worker_environment(Settings(home="relative-home", artifact_root="file:///srv/atlas"))
    assert env["FEATUREATLAS_HOME"] == str(tmp_path / "relative-home")
    assert env["FEATUREATLAS_ARTIFACT_ROOT"] == "/srv/atlas"
    cmd = worker_command("lab", limit=2)
    assert cmd[1:] == [
        "-m",
        "prefect",
        "worker",
        "start",
        "--pool",
        "lab",
        "--type",
        "process",
        "--limit",
        "2",
    ]


def test_schedules_are_listed_paused_resumed_and_deleted(tmp_path, home, prefect_harness):  # noqa: ARG001
    import json

    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec(tmp_path, name="nightly")))
    cli = CliRunner()
    added = cli.invoke(app, ["schedule", "add", str(spec), "--cron", "0 3 * * *", "--pool", "test-pool"])
    assert added.exit_code == 0, added.output

    def listed() -> list[dict]:
        result = cli.invoke(app, ["schedule", "list", "--json"])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    [row] = listed()
    assert (row["name"], row["schedule"], row["paused"]) == (
        "featureatlas-pipeline/nightly",
        "cron '0 3 * * *'",
        False,
    )
    assert cli.invoke(app, ["schedule", "pause", "nightly"]).exit_code == 0
    assert listed()[0]["paused"] is True
    assert "paused" in cli.invoke(app, ["schedule", "list"]).output
    assert cli.invoke(app, ["schedule", "resume", "nightly"]).exit_code == 0
    assert listed()[0]["paused"] is False
    unknown = cli.invoke(app, ["schedule", "pause", "weekly"])
    assert (
        unknown.exit_code == 2
        and "no schedule named 'weekly'; known: featureatlas-pipeline/nightly" in unknown.output
    )
    deleted = cli.invoke(app, ["schedule", "delete", "nightly"])
    assert deleted.exit_code == 0 and "deleted" in deleted.output
    assert listed() == []
