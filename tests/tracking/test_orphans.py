"""RUNNING MLflow runs whose process died are marked KILLED; runs of live processes, or of processes on
another host, are left alone."""

from __future__ import annotations

import socket
import subprocess
import sys

from featureatlas.tasks.tracking.mlflow_runs import Tracker
from featureatlas.tasks.tracking.orphans import OWNER_TAG, owner, owner_alive


def test_runs_of_dead_processes_are_marked_killed(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "featureatlas", tmp_path / "art")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_owner = owner(dead.pid)  # taken while it runs: host, pid and start time
    dead.wait()
    live, orphan, elsewhere = (tracker.start(n) for n in ("live", "orphan", "elsewhere"))
    tracker.client.set_tag(orphan.run_id, OWNER_TAG, dead_owner)
    tracker.client.set_tag(elsewhere.run_id, OWNER_TAG, f"not-{socket.gethostname()}:1:1")
    assert owner_alive(owner()) is True and owner_alive(dead_owner) is False

    assert tracker.reap_orphans() == [orphan.run_id]
    status = {r.run_id: tracker.client.get_run(r.run_id).info.status for r in (live, orphan, elsewhere)}
    assert status == {live.run_id: "RUNNING", orphan.run_id: "KILLED", elsewhere.run_id: "RUNNING"}
    # a pid reused by another process does not pass for the owner: its start time differs
    host, pid, start = owner().rsplit(":", 2)
    assert owner_alive(f"{host}:{pid}:{int(start) - 1}") is False
