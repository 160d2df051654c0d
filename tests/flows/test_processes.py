"""`featureatlas ui` and `featureatlas worker` leave nothing behind: SIGTERM to the CLI reaches its children,
the CLI waits for them; a busy port fails at once; the store URL never appears on a command line."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request

import psutil
import pytest
from typer.testing import CliRunner

from featureatlas.flows.cli import app
from tests.flows.test_ui import free_port


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_gone(pids: list[int], timeout: float = 60) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.2)
    return [p for p in pids if alive(p)]


def test_ui_on_a_busy_port_fails_at_once(home):  # noqa: ARG001
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(app, ["ui", "--port", str(port)])
    assert result.exit_code == 1
    assert result.output.strip() == (
        f"port {port} on 127.0.0.1 is already in use; pass --port with a free one (or stop what uses it)"
    )


def test_sigterm_reaches_the_child_and_its_children(tmp_path):
    pids = tmp_path / "pids.json"
    # the child starts a grandchild in its own group, then both sleep: a server with its web workers
    child = textwrap.dedent(f"""
        import json, os, subprocess, sys, time
        grand = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        open({str(pids)!r}, "w").write(json.dumps([os.getpid(), grand.pid]))
        time.sleep(600)
    """)
    parent = subprocess.Popen(
        [sys.executable, "-c", "import sys; from featureatlas.flows.cli_process import run_child; "
         f"sys.exit(run_child([sys.executable, '-c', {child!r}], dict(__import__('os').environ)))"],
        start_new_session=True,  # so that only our SIGTERM, to the parent's pid alone, reaches it
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not pids.exists() or not pids.read_text():
            assert time.monotonic() < deadline and parent.poll() is None
            time.sleep(0.1)
        children = json.loads(pids.read_text())
        assert all(alive(p) for p in children)
        os.kill(parent.pid, signal.SIGTERM)
        assert parent.wait(timeout=60) == 128 + signal.SIGTERM
        assert wait_gone(children) == []
    finally:
        os.killpg(parent.pid, signal.SIGKILL) if parent.poll() is None else None


def start_cli(*args: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "featureatlas.flows.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def stop_and_check(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Signal the CLI's process alone (not its group) and check that it and every descendant exit."""
    kids = [p.pid for p in descendants(proc.pid)]
    assert kids, "the CLI started no child"
    os.kill(proc.pid, sig)
    proc.wait(timeout=90)
    assert wait_gone(kids) == [], "children outlived the CLI"


@pytest.mark.slow
def test_ui_passes_the_store_by_environment_and_stops_with_its_server(home):
    port = free_port()
    proc = start_cli("ui", "--port", str(port), env=os.environ.copy())
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    assert r.status == 200
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read().decode()
                assert time.monotonic() < deadline, "the MLflow UI did not answer within 180 s"
                time.sleep(1)
        for p in descendants(proc.pid):
            try:
                cmdline = " ".join(p.cmdline())
            except psutil.NoSuchProcess:  # a child that exited (or a zombie not yet reaped) since the listing
                continue
            assert "--backend-store-uri" not in cmdline and home.mlflow_uri not in cmdline
        stop_and_check(proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
def test_worker_stops_with_its_prefect_worker(home, prefect_harness):  # noqa: ARG001
    from prefect.settings import PREFECT_API_URL

    env = os.environ.copy() | {"PREFECT_API_URL": PREFECT_API_URL.value()}
    proc = start_cli("worker", "--pool", "test-signals", env=env)
    try:
        deadline = time.monotonic() + 120
        while not any("worker" in " ".join(p.cmdline()) for p in descendants(proc.pid)):
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.5)
        time.sleep(3)  # let it register with the server, as a running worker would be
        stop_and_check(proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
