"""`featureatlas ui` serves the MLflow UI on loopback over the featureatlas store, showing the run tree, and
prints the URL of the experiment's runs table with the dictionaries' columns."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from featureatlas.tasks.tracking.lineage import runs_table_route
from featureatlas.tasks.tracking.stage import tracker_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ui_serves_the_run_tree(home):
    tracker = tracker_for(home)
    with tracker.run("pipeline") as parent, tracker.run("train_dictionary", parent.run_id) as child:
        child.log_metrics({"fvu": 0.25}, step=1)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", "from featureatlas.flows.cli import main; main()", "ui", "--port", str(port)],
        env=os.environ | {"PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        body = {"experiment_ids": [tracker.experiment_id], "max_results": 10}
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/search",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(request, timeout=5) as r:
                    runs = json.loads(r.read())["runs"]
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read().decode()
                assert time.monotonic() < deadline, "the MLflow UI did not answer within 120 s"
                time.sleep(1)
        tags = {r["info"]["run_name"]: {t["key"]: t["value"] for t in r["data"]["tags"]} for r in runs}
        assert tags["train_dictionary"]["mlflow.parentRunId"] == parent.run_id
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as r:
            assert r.status == 200 and b"<html" in r.read(2000).lower()
        printed = [proc.stdout.readline().decode().strip() for _ in range(2)]  # printed before serving
        assert printed[0].startswith(f"MLflow UI on http://127.0.0.1:{port} (store "), printed
        runs_url = f"http://127.0.0.1:{port}/{runs_table_route(tracker.experiment_id)}"
        assert printed[1] == f"runs table: {runs_url}"
        with urllib.request.urlopen(runs_url, timeout=10) as r:  # the route is the page's fragment
            assert r.status == 200 and b"<html" in r.read(2000).lower()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
