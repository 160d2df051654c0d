"""A process that opens the tracker at a signal: `python -m tests.tracking.tracker_opener URI ROOT READY GO`.

It imports everything first, says so by creating READY, waits for GO to exist, then opens the tracker and
starts and ends one run, so that several of them open one new store at the same moment.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from featureatlas.tasks.tracking.mlflow_runs import Tracker

if __name__ == "__main__":
    uri, root, ready, go = sys.argv[1:5]
    Path(ready).touch()
    while not Path(go).exists():
        time.sleep(0.005)
    tracker = Tracker(uri, "featureatlas", Path(root))
    with tracker.run("opener"):
        pass
