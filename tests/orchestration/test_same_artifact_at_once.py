"""The same artifact asked for by several processes at once is built once and registered once: the late
ones wait for the builder and reuse its result; nothing registered is removed or replaced."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from featureatlas.schemas.settings import Settings
from featureatlas.tasks.tracking.catalog import open_catalog
from featureatlas.tasks.tracking.mlflow_runs import Tracker
from featureatlas.tasks.tracking.stage import build_lock

REPO = Path(__file__).parents[2]
N = 3


@pytest.mark.slow
@pytest.mark.parametrize("resumable", [True, False], ids=["resumable", "plain"])
def test_identical_requests_at_once_build_once_and_all_succeed(tmp_path, resumable):
    home, go, builds = tmp_path / "home", tmp_path / "go", tmp_path / "builds"
    settings = Settings(home=home)
    Tracker(settings.mlflow_uri, settings.experiment, settings.mlflow_artifacts_dir)  # the store exists
    env = os.environ | {"PYTHONPATH": str(REPO)}
    procs = []
    for i in range(N):
        args = {"home": str(home), "resumable": resumable, "ready": str(tmp_path / f"ready{i}"),
                "go": str(go), "builds": str(builds), "out": str(tmp_path / f"out{i}.json")}  # fmt: skip
        cmd = [sys.executable, "-m", "tests.orchestration.stage_builder", json.dumps(args)]
        procs.append(subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True))
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready{i}").exists() for i in range(N)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.02)
    go.touch()
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * N, "\n".join(e[-3000:] for e in errors)

    assert len(builds.read_text().split()) == 1  # one build, by one process
    refs = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(N)]
    assert len({r["path"] for r in refs}) == 1 and len({r["mlflow_run_id"] for r in refs}) == 1
    assert sorted(r["reused"] for r in refs) == [False] + [True] * (N - 1)
    assert (Path(refs[0]["path"]) / "data.txt").read_text() == "built once"
    assert len(open_catalog(settings.catalog).list("corpus")) == 1
    folder = Path(refs[0]["path"]).parent
    assert sorted(p.name for p in folder.iterdir()) == [Path(refs[0]["path"]).name]  # no lock, no partial
    client = MlflowClient(settings.mlflow_uri)
    exp = client.get_experiment_by_name(settings.experiment)
    names = sorted(r.data.tags["mlflow.runName"] for r in client.search_runs([exp.experiment_id]))
    assert names == ["prepare_corpus"] + ["prepare_corpus (reused)"] * (N - 1)


def test_the_build_lock_admits_one_holder_at_a_time_though_its_file_comes_and_goes(tmp_path):
    """Each holder removes the lock file as it lets go, while others wait on that file or open a new one:
    never are two inside at once (flock locks of separate opens conflict within one process too)."""
    import threading

    lock, inside, most, waits = tmp_path / "a.lock", [0], [0], []
    guard = threading.Lock()

    def worker() -> None:
        for _ in range(30):
            with build_lock(lock, on_wait=lambda: waits.append(1)):
                with guard:
                    inside[0] += 1
                    most[0] = max(most[0], inside[0])
                time.sleep(0.001)
                with guard:
                    inside[0] -= 1

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert most[0] == 1 and waits and not lock.exists()
