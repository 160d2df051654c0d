"""`featureatlas server`: a Prefect server and an MLflow server as background processes, without containers.

Each server runs in its own session (so stopping it stops its workers too), logs to
`<home>/server/<name>.log` and is recorded in `<home>/server/<name>.json` (pid, URL, health URL). They bind
127.0.0.1 unless told otherwise. Database URLs go to the servers through their environment, never their
command line, so `ps` does not show passwords; what is written to the state files is masked.

MLflow keeps runs in `mlflow_backend` (`FEATUREATLAS_MLFLOW_BACKEND_URI`, or the configured tracking
database, or SQLite in home) and serves
artifacts from `<home>/mlflow-artifacts`; Prefect keeps flow runs in `prefect_database_url` (default SQLite
in `<home>/prefect`).
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
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from featureatlas.schemas.settings import Settings
from featureatlas.tasks.tracking.secrets import mask_url

NAMES = ("prefect", "mlflow")


@dataclass(frozen=True)
class ServerPlan:
    name: str
    url: str  # what clients use
    health_url: str
    command: list[str]
    env: dict[str, str]  # added to the environment; may hold secrets, never written anywhere


@dataclass(frozen=True)
class ServerStatus:
    name: str
    url: str
    pid: int | None
    running: bool
    healthy: bool
    log: Path


def state_dir(settings: Settings) -> Path:
    return settings.home_dir / "server"


def mlflow_backend(settings: Settings) -> str:
    """Where the MLflow server keeps runs: `mlflow_backend_uri`, else the tracking URI when it is a
    database (clients then switch to the server's http URL), else SQLite in home."""
    if settings.mlflow_backend_uri:
        return settings.mlflow_backend_uri
    uri = settings.mlflow_tracking_uri
    if uri and not uri.startswith(("http://", "https://")):
        return uri
    return f"sqlite:///{settings.home_dir / 'mlflow.db'}"


def plans(settings: Settings, host: str, mlflow_port: int, prefect_port: int) -> dict[str, ServerPlan]:
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    prefect_env = {
        "PREFECT_HOME": str(settings.home_dir / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_API_HOST": host,
        "PREFECT_SERVER_API_PORT": str(prefect_port),
    }
    if settings.prefect_database_url:
        prefect_env["PREFECT_API_DATABASE_CONNECTION_URL"] = settings.prefect_database_url
    artifacts = settings.mlflow_artifacts_dir
    return {
        "prefect": ServerPlan(
            name="prefect",
            url=f"http://{shown}:{prefect_port}/api",
            health_url=f"http://{shown}:{prefect_port}/api/health",
            command=[sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port",
                     str(prefect_port)],  # fmt: skip
            env=prefect_env,
        ),
        "mlflow": ServerPlan(
            name="mlflow",
            url=f"http://{shown}:{mlflow_port}",
            health_url=f"http://{shown}:{mlflow_port}/health",
            command=[sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(mlflow_port),
                     "--workers", "1", "--serve-artifacts",
                     "--artifacts-destination", artifacts.as_uri()],  # fmt: skip
            env={"MLFLOW_BACKEND_STORE_URI": mlflow_backend(settings)},
        ),
    }


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _alive(pid: int, name: str) -> bool:
    """Whether `pid` runs and is still our server (not an unrelated process that reused the pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():
        return name.encode() in cmdline.read_bytes()
    return True


def healthy(url: str, timeout: float = 5) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _read_state(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def status(settings: Settings) -> list[ServerStatus]:
    out = []
    for name in NAMES:
        state = _read_state(state_dir(settings) / f"{name}.json")
        log = state_dir(settings) / f"{name}.log"
        if state is None:
            out.append(ServerStatus(name, "", None, False, False, log))
            continue
        running = _alive(state["pid"], name)
        ok = running and healthy(state["health_url"])
        out.append(ServerStatus(name, state["url"], state["pid"], running, ok, log))
    return out


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def start(
    settings: Settings,
    host: str = "127.0.0.1",
    mlflow_port: int = 5000,
    prefect_port: int = 4200,
    only: tuple[str, ...] = NAMES,
    timeout: float = 300,
) -> list[ServerStatus]:
    """Start the servers that are not running yet and wait until each answers its health check.

    Raises RuntimeError (with the end of the server's log) when a port is taken or a server does not come
    up in `timeout` seconds; a server that failed to come up is stopped again.
    """
    folder = state_dir(settings)
    folder.mkdir(parents=True, exist_ok=True)
    settings.mlflow_artifacts_dir.mkdir(parents=True, exist_ok=True)
    current = {s.name: s for s in status(settings)}
    ports = {"mlflow": mlflow_port, "prefect": prefect_port}
    todo = {
        name: plan
        for name, plan in plans(settings, host, mlflow_port, prefect_port).items()
        if name in only and not current[name].running
    }
    for name in todo:  # all ports checked before anything starts
        if not _port_free(host, ports[name]):
            raise RuntimeError(
                f"port {ports[name]} on {host} is in use; choose another (--{name}-port, or "
                f"FEATUREATLAS_{name.upper()}_PORT) or stop what listens there"
            )
    started: list[ServerPlan] = []
    for name, plan in todo.items():
        log = folder / f"{name}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                plan.command,
                env=os.environ | plan.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        state = {"pid": proc.pid, "url": plan.url, "health_url": plan.health_url,
                 "command": [mask_url(c) for c in plan.command], "started_at": time.time()}  # fmt: skip
        (folder / f"{name}.json").write_text(json.dumps(state, indent=1))
        started.append(plan)
    deadline = time.monotonic() + timeout
    for plan in started:
        state = _read_state(folder / f"{plan.name}.json")
        while not healthy(plan.health_url, timeout=5):
            if not _alive(state["pid"], plan.name) or time.monotonic() > deadline:
                stop(settings, only=(plan.name,))
                why = "exited" if time.monotonic() <= deadline else f"did not answer within {timeout:.0f} s"
                raise RuntimeError(
                    f"the {plan.name} server {why}; the end of {folder / plan.name}.log:\n"
                    f"{_log_tail(folder / f'{plan.name}.log')}"
                )
            time.sleep(1)
    return status(settings)


def stop(settings: Settings, only: tuple[str, ...] = NAMES, timeout: float = 30) -> list[str]:
    """Stop the recorded servers (SIGTERM to their process group, SIGKILL after `timeout`); their names."""
    stopped = []
    for name in only:
        path = state_dir(settings) / f"{name}.json"
        state = _read_state(path)
        if state is None:
            continue
        pid = state["pid"]
        if _alive(pid, name):
            _group_signal(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while not _gone(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if not _gone(pid):
                _group_signal(pid, signal.SIGKILL)
                while not _gone(pid):
                    time.sleep(0.1)
            stopped.append(name)
        path.unlink(missing_ok=True)
    return stopped


def _group_signal(pid: int, sig: int) -> bool:
    """Signal the server's process group (its workers too); fall back to the process alone."""
    try:
        os.killpg(pid, sig)  # started with start_new_session, so its group id is its pid
        return True
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        return False


def _gone(pid: int) -> bool:
    """Whether `pid` has exited; reaps it when it is our own child (a test or a CLI that started it)."""
    ours = True
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return True
    except ChildProcessError:
        ours = False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    if ours:
        return False  # still running, or a zombie the next waitpid collects
    stat = Path(f"/proc/{pid}/stat")
    try:  # someone else's zombie: exited, waiting for its parent to collect it
        return stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, IndexError):
        return True
