"""Child servers of the CLI (`featureatlas worker`, `ui`): started, signalled and reaped together.

`subprocess.call` left the child running when the CLI got SIGTERM (an orphaned `prefect worker` went on to
run scheduled pipelines; an orphaned `mlflow server` kept answering). Here the child starts in a process
group of its own and is told to die with its parent (Linux `PR_SET_PDEATHSIG`, for a parent killed with
SIGKILL); SIGTERM, SIGINT and SIGHUP to the CLI are forwarded to the whole group (the worker's flow runs,
the server's web workers), the CLI waits for it to exit, and after a grace period kills what is left.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import socket
import subprocess
import sys
import time

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def port_in_use(host: str, port: int) -> bool:
    """Whether binding `host:port` fails because something already listens there."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise
    return False


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def run_child(cmd: list[str], env: dict[str, str], grace_s: float = 20.0) -> int:
    """Run `cmd` in its own process group until it exits, forwarding termination signals to the group.

    Returns the child's exit code (128 + the signal's number when a forwarded signal ended it, as a shell
    reports it). A group that outlives `grace_s` after the signal is killed, so nothing is left behind.
    """
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_die_with_parent)  # noqa: PLW1509
    received: list[int] = []

    def forward(signum, _frame) -> None:
        received.append(signum)
        _signal_group(proc, signal.SIGTERM if signum == signal.SIGHUP else signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        while True:
            try:
                code = proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if received and not _wait_after_signal(proc, grace_s):
                    break
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if proc.poll() is None:  # killed by a grace period, or an error in this loop: leave nothing behind
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
        _signal_group(proc, signal.SIGKILL)  # grandchildren the child left in its group
    if received:
        return 128 + int(received[0])
    return code


def _wait_after_signal(proc: subprocess.Popen, grace_s: float) -> bool:
    """Wait up to `grace_s` for the signalled child; False when it had to be killed."""
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return True
        time.sleep(0.1)
    _signal_group(proc, signal.SIGKILL)
    proc.wait()
    return False
