"""A failure at run time prints one line and the log's path (the traceback only under --debug), and the
orchestration stack's start-up chatter stays off the terminal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.flows.test_pipeline import tiny_spec


def featureatlas(*args: str, home) -> subprocess.CompletedProcess:
    env = os.environ.copy() | {"FEATUREATLAS_HOME": str(home.home_dir)}
    return subprocess.run(
        [sys.executable, "-m", "featureatlas.flows.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_a_stage_error_is_one_line_with_the_log_path(tmp_path, home):
    corpus = tmp_path / "notes.jsonl"  # exists (the plan accepts it) but its records have no `text`
    corpus.write_text("\n".join(json.dumps({"body": f"note {i}"}) for i in range(4)))
    spec = tiny_spec(tmp_path)
    spec["corpus"]["sources"] = [str(corpus)]
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec))

    done = featureatlas("run", str(path), home=home)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert "Traceback" not in done.stderr and "temporary server" not in done.stderr
    error, log = lines[-2:]
    assert error == f"error: {corpus}:1: no field 'text'; set `corpus.text_field`"
    assert log.startswith("full log: ")
    logged = Path(log.removeprefix("full log: ")).read_text()
    assert "Traceback" in logged and "no field 'text'" in logged
    # the stages' progress lines (Prefect's, the model loader's bar), then the error
    assert len(lines) <= 14, done.stderr

    debug = featureatlas("--debug", "run", str(path), home=home)
    assert debug.returncode == 1 and "Traceback" in debug.stderr

    # `runs` reads the temporary server's database without starting one; runs are named by spec and time
    runs = featureatlas("runs", "--json", home=home)
    assert runs.returncode == 0, runs.stderr
    listed = json.loads(runs.stdout)
    assert [r["state"] for r in listed] == ["Failed", "Failed"]
    assert all(r["name"].startswith("tiny 20") and r["end"].endswith("+00:00") for r in listed)
