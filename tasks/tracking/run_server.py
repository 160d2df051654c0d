"""A temporary Prefect server for one pipeline run from the command line, which cannot outlive that run.

Without `PREFECT_API_URL`, Prefect starts a temporary server of its own and stops it at exit; a run killed
with SIGKILL never reaches its exit, and the server lived on. `run_server` starts the same server (Prefect's
ephemeral app under uvicorn, on a free loopback port, its state in PREFECT_HOME) through `tether`, so the
kernel ends it when the run's process dies, however it dies; a normal exit stops it as before.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from featureatlas.schemas.settings import Settings
from featureatlas.tasks.tracking.errors import Refusal

log = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def server_command(port: int) -> list[str]:
    """Prefect's own temporary server: its API app, without the UI, on 127.0.0.1:`port`."""
    import prefect

    return [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect.__file__).parent.parent),
            "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "error", "--lifespan", "on"]  # fmt: skip


@contextmanager
def run_server(settings: Settings) -> Iterator[str]:
    """The Prefect API URL for the block: the configured one, else a tethered temporary server's."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield PREFECT_API_URL.value()
        return
    folder = settings.home_dir / "server"
    folder.mkdir(parents=True, exist_ok=True)
    log_path = folder / f"run-{os.getpid()}.log"
    env = os.environ | {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                        "PREFECT__SERVER_FINAL": "1"}  # fmt: skip
    tether = [sys.executable, "-m", "featureatlas.tasks.tracking.tether", str(os.getpid())]
    # servers of runs started together migrate the home's one Prefect database at startup, and collide
    # (`duplicate column name`): they start one at a time, each once the one before answers
    with (folder / "prefect-start.lock").open("a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        port = _free_port()
        url = f"http://127.0.0.1:{port}/api"
        log.debug("starting a temporary Prefect server on %s for this run (log: %s)", url, log_path)
        with log_path.open("ab") as out:
            proc = subprocess.Popen([*tether, *server_command(port)], env=env, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)  # fmt: skip
        try:
            _wait_until_healthy(url, proc, log_path)
        except BaseException:
            _stop(proc)
            raise
    try:
        with temporary_settings({PREFECT_API_URL: url}):
            try:
                yield url
            finally:
                _flush_prefect_logs()
    finally:
        _stop(proc)
        log_path.unlink(missing_ok=True)


def _flush_prefect_logs() -> None:
    """Send the run's buffered Prefect log records while the server still answers; sent after it stopped,
    Prefect prints `--- Error logging to API ---` with a traceback at exit."""
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)


def _wait_until_healthy(url: str, proc: subprocess.Popen, log_path: Path) -> None:
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    deadline = time.monotonic() + float(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
    while not _healthy(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
            raise Refusal(f"the temporary Prefect server did not start; the end of {log_path}:\n{tail}")
        time.sleep(0.2)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
