"""`featureatlas run SPEC` with a short sleep per forward pass, so a test can kill it while it caches.

`python -m tests.orchestration.slow_run SPEC`: the real CLI and pipeline; only the model is slowed down.
"""

from __future__ import annotations

import sys
import time

import featureatlas.tasks.activations.task as stage
from featureatlas.flows.cli import main

_load = stage.load_model_ref


def _slowed(*args, **kwargs):
    loaded = _load(*args, **kwargs)
    loaded.model.register_forward_pre_hook(lambda *_: time.sleep(0.25))
    return loaded


if __name__ == "__main__":
    stage.load_model_ref = _slowed
    sys.argv = ["featureatlas", "run", *sys.argv[1:]]
    main()
