"""`python -m featureatlas.tasks.tracking.tether PARENT_PID COMMAND...`: COMMAND, dying with PARENT.

A process killed with SIGKILL runs no clean-up, so a server it started would live on, reparented to init
(a temporary Prefect server holds about 260 MB). On Linux the kernel is asked to SIGKILL this process when
its parent dies (`PR_SET_PDEATHSIG`, kept across `exec`), then COMMAND replaces it. Elsewhere this process
stays as a watchdog: it runs COMMAND in a process group of its own and ends that group once the parent is
gone. Either way, a parent already gone when this starts means COMMAND never runs.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> bool:
    """Ask the kernel for SIGKILL when the parent dies; False where there is no prctl."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return sys.platform.startswith("linux") and libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) == 0
    except (OSError, AttributeError):
        return False


def main(argv: list[str]) -> int:
    parent, command = int(argv[0]), argv[1:]
    if _die_with_parent():
        if os.getppid() != parent:  # the parent died before the request took effect
            return 1
        os.execv(command[0], command)
    proc = subprocess.Popen(command, start_new_session=True)
    while proc.poll() is None:
        if os.getppid() != parent:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return 1
        time.sleep(0.5)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
