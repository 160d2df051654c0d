"""Progress of a long stage: a bar with elapsed time and ETA on a terminal, a log line now and then elsewhere.

Evaluation and labeling run for minutes in a few long phases (reconstruction metrics, the CE-loss splice,
ablation and steering; the feature table, the atlas). A `StageProgress` is told the phases with rough
weights (their usual share of the time); the bar advances by a phase's weight when it ends, so tqdm's rate
gives the ETA. Inside a long phase a heartbeat thread keeps the bar's clock moving on a terminal and, in
logs (CI, a Prefect worker, a pipe), writes `<stage>: <phase> (2/5), 1 min 40 s elapsed` every `every_s`
seconds, so a silent stage never looks hung.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Iterator

from tqdm import tqdm


def _duration(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    return f"{minutes} min {s} s" if minutes else f"{s} s"


class StageProgress:
    """Phases of one stage run, shown on a terminal (`terminal=True`) or logged every `every_s` seconds."""

    def __init__(
        self,
        name: str,
        phases: dict[str, float],
        terminal: bool,
        log: logging.Logger | logging.LoggerAdapter | None = None,
        every_s: float = 30.0,
    ) -> None:
        self.name, self.weights, self.every_s = name, {k: w for k, w in phases.items() if w > 0}, every_s
        self.log = log or logging.getLogger(__name__)
        self.terminal = terminal
        self.current: str | None = None
        self.done = 0
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._bar = (
            tqdm(total=sum(self.weights.values()), desc=name, file=sys.stderr, bar_format=(
                "{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}] {postfix}"))
            if terminal
            else None
        )  # fmt: skip
        self._beat = threading.Thread(target=self._heartbeat, daemon=True, name=f"progress {name}")
        self._beat.start()

    def _heartbeat(self) -> None:
        interval = 1.0 if self._bar is not None else self.every_s
        while not self._stop.wait(interval):
            if self._bar is not None:
                self._bar.refresh()
            elif self.current is not None:
                self.log.info(
                    "%s: %s (%d/%d), %s elapsed",
                    self.name,
                    self.current,
                    self.done + 1,
                    len(self.weights),
                    _duration(time.monotonic() - self.started),
                )

    def step(self, what: str) -> None:
        """End the current phase (the bar advances by its weight) and start `what`."""
        self._end()
        self.current = what
        if self._bar is not None:
            self._bar.set_postfix_str(what, refresh=True)

    def _end(self) -> None:
        if self.current is None:
            return
        if self._bar is not None:
            self._bar.update(self.weights.get(self.current, 0))
        self.done += 1
        self.current = None

    @contextlib.contextmanager
    def phase(self, what: str) -> Iterator[None]:
        """Run one phase as a block."""
        self.step(what)
        yield
        self._end()

    def close(self) -> None:
        self._end()
        self._stop.set()
        self._beat.join()
        if self._bar is not None:
            self._bar.close()
        else:
            self.log.info("%s: done in %s", self.name, _duration(time.monotonic() - self.started))

    def __enter__(self) -> StageProgress:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()
