"""Headless Chromium for the browser tests: found on PATH, skipped without it only outside CI (CI=true
must run them; `.ci/run` installs the `chromium` package)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

needs_chromium = pytest.mark.skipif(
    CHROMIUM is None and os.environ.get("CI") != "true",
    reason="chromium is not installed (apt-get install chromium; CI installs it in .ci/run)",
)


def chromium(args: list[str], profile: Path, budget_ms: int | None = None) -> str:
    """Run headless Chromium with `args` (e.g. --dump-dom URL); returns its stdout.

    `budget_ms` lets a single-page app render: Chromium waits that much virtual time (network and
    timers) before it dumps the DOM or takes the screenshot."""
    assert CHROMIUM is not None, "CI=true but chromium is missing: .ci/run must install it"
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        f"--user-data-dir={profile}",
        *([f"--virtual-time-budget={budget_ms}"] if budget_ms else []),
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=True).stdout


def keep_screenshot(shot: Path) -> None:
    """Copy `shot` into the folder FEATUREATLAS_KEEP_SCREENSHOTS names, if set (to look at it)."""
    folder = os.environ.get("FEATUREATLAS_KEEP_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(folder) / shot.name)


def free_port() -> int:
    """A port on 127.0.0.1 that is free now (for a server the test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
