"""MLflow runs left RUNNING by a process that died (kill -9, a lost machine) are found and marked KILLED.

Every run featureatlas starts carries the tag `featureatlas.owner` = `host:pid:start`, the process that
runs it (`start` is the process's start time, so a pid the system has since given to another process does
not pass for the owner). A RUNNING run whose owner is on this host and no longer alive can never end, so
the next pipeline run marks it KILLED (as does `featureatlas runs --repair`); a run owned by a process on
another host is left as it is, since its liveness cannot be seen from here.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

OWNER_TAG = "featureatlas.owner"
log = logging.getLogger(__name__)


def _start_time(pid: int) -> str | None:
    """The start time of process `pid` (clock ticks since boot), or None if it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    return None if fields[0] == "Z" else fields[19]


def owner(pid: int | None = None) -> str:
    """`host:pid:start` of this process (or of `pid`)."""
    pid = pid or os.getpid()
    return f"{socket.gethostname()}:{pid}:{_start_time(pid) or ''}"


def owner_alive(tag: str) -> bool | None:
    """Whether the process named by an owner tag still runs; None when it is on another host."""
    host, pid, start = tag.rsplit(":", 2)
    if host != socket.gethostname():
        return None
    if not Path("/proc").is_dir():  # no start times here: whether the pid exists must do
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return _start_time(int(pid)) == start if start else _start_time(int(pid)) is not None


def reap_orphans(client: MlflowClient, experiment_id: str) -> list[str]:
    """Mark KILLED every RUNNING run of the experiment whose owner on this host has died; their ids."""
    killed, token = [], None
    while True:
        page = client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=500,
                                  page_token=token)  # fmt: skip
        for run in page:
            tag = run.data.tags.get(OWNER_TAG)
            if tag and owner_alive(tag) is False:
                client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.KILLED))
                killed.append(run.info.run_id)
        token = page.token
        if not token:
            break
    if killed:
        log.warning("marked %d MLflow runs KILLED: their processes died while they ran (%s)", len(killed),
                    ", ".join(killed))  # fmt: skip
    return killed
