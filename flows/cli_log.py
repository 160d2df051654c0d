"""Where the CLI's logs go: everything to a log file per command, only what a user needs on the terminal.

A failed stage used to print hundreds of lines (Prefect's task and flow tracebacks, then a rich one) with
the one useful message near the end. Now every record goes to `<home>/logs/<time>-<command>.log`; on the
terminal, the start-up chatter of the temporary Prefect server and MLflow's store migrations, and the
tracebacks Prefect logs for a failed task or flow, are left out (the CLI prints the error's one line and the
log's path instead). `--debug` shows everything, tracebacks included.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from featureatlas.schemas.settings import Settings

# Prefect configures the root logger only while it has no handler of someone else's, so the commands that
# use it set Prefect's logging up before the handlers here are installed
PREFECT_COMMANDS = {"run", "demo", "schedule", "worker"}
_NOISE = (
    "Starting temporary server",
    "Stopping temporary server",
    "See https://docs.prefect.io",
    "Context impl ",
    "Will assume ",
    "Running upgrade ",
    "Creating initial MLflow database tables",
    "Updating database tables",
)
_QUIET = ("prefect", "alembic", "mlflow", "httpx", "uvicorn", "distributed")


class QuietConsole(logging.Filter):
    """Keeps start-up chatter and failure tracebacks of the orchestration stack off the terminal."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(_QUIET):
            return True
        message = record.getMessage()
        if message.startswith(_NOISE):
            return False
        # a failed task or flow: Prefect logs the traceback and a "Finished in state Failed" line; the CLI
        # prints the error's one line, the log file keeps the rest
        if record.levelno >= logging.ERROR:
            return False
        return not message.startswith(("Finished in state Failed", "Finished in state Crashed"))


class CommandLog:
    """The log file of one CLI command, and the filters put on the terminal's handlers."""

    def __init__(self, settings: Settings, command: str, debug: bool) -> None:
        folder = settings.home_dir / "logs"
        folder.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.path: Path = folder / f"{stamp}-{command or 'featureatlas'}-{os.getpid()}.log"
        self.debug = debug
        self._file = logging.FileHandler(self.path, encoding="utf-8", delay=True)
        self._file.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
        self._file.setLevel(logging.DEBUG if debug else logging.INFO)
        self._stderr: logging.Handler | None = None

    def start(self) -> CommandLog:
        root = logging.getLogger()
        if not self.debug:
            quiet = QuietConsole()
            for handler in root.handlers:
                handler.addFilter(quiet)
            for name in ("mlflow", "alembic"):  # they log to stderr through handlers of their own
                for handler in logging.getLogger(name).handlers:
                    handler.addFilter(quiet)
        if not root.handlers:  # Prefect not loaded: warnings still reach the terminal
            self._stderr = logging.StreamHandler()
            self._stderr.setLevel(logging.WARNING)
            if not self.debug:
                self._stderr.addFilter(QuietConsole())
            root.addHandler(self._stderr)
        root.addHandler(self._file)
        # featureatlas' own progress lines (stage code outside a Prefect run logs through `logging`)
        logging.getLogger("featureatlas").setLevel(logging.INFO)
        return self

    def failure(self, message: str, error: BaseException) -> None:
        """Write `message` and the traceback of `error` to the log file only (the terminal gets one line)."""
        record = logging.LogRecord(
            "featureatlas.cli",
            logging.ERROR,
            __file__,
            0,
            message,
            None,
            (type(error), error, error.__traceback__),
        )
        self._file.handle(record)

    def stop(self) -> None:
        """Close the log file. The terminal's filters stay: the temporary Prefect server announces its
        shutdown after the command returned, at the process's exit."""
        root = logging.getLogger()
        root.removeHandler(self._file)
        self._file.close()
        if self._stderr is not None:
            root.removeHandler(self._stderr)
