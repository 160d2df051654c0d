"""Long stages report progress: a bar with ETA on a terminal, periodic log lines otherwise."""

from __future__ import annotations

import logging
import time

from featureatlas.tasks.common.progress import StageProgress


def test_log_lines_name_the_phase_while_it_runs(caplog):
    log = logging.getLogger("test.progress")
    with (
        caplog.at_level(logging.INFO, logger="test.progress"),
        StageProgress("evaluate dict-x", {"fvu": 1, "ce": 3}, terminal=False, log=log, every_s=0.05) as p,
    ):
        p.step("fvu")
        time.sleep(0.3)
        p.step("ce")
        time.sleep(0.3)
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("evaluate dict-x: fvu (1/2), ") for line in lines)
    assert any(line.startswith("evaluate dict-x: ce (2/2), ") for line in lines)
    assert lines[-1].startswith("evaluate dict-x: done in ")


def test_terminal_bar_advances_by_phase_weights(capsys):
    with StageProgress("label dict-x", {"load": 1, "table": 3}, terminal=True) as p:
        p.step("load")
        p.step("table")
        assert p._bar.n == 1  # the first phase's weight, out of 4
    assert p._bar.n == 4
    err = capsys.readouterr().err
    assert "label dict-x" in err and "100%" in err and "table" in err
