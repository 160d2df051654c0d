"""A training process for the kill-and-resume test: `python -m tests.dictionary.train_worker ARGS_JSON`.

It trains a sweep through the dictionary stage (real catalog, real MLflow store), sleeping a little in each
step so that the test can kill it between checkpoints.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from pydantic import TypeAdapter

from featureatlas.schemas.methods import DictionaryConfig


def run(args: dict, sleep_s: float = 0.0) -> list:
    from featureatlas.schemas.artifacts import ActivationCacheRef
    from featureatlas.schemas.settings import Settings
    from featureatlas.tasks.dictionary.task import train_dictionaries_task
    from featureatlas.tasks.dictionary.topk import TopKSAE
    from featureatlas.tasks.tracking.env import configure_environment
    from featureatlas.tasks.tracking.stage import StageContext

    torch.set_num_threads(1)  # the same reduction order as the test process, for bitwise equality
    settings = configure_environment(Settings(home=Path(args["home"])))
    if sleep_s:
        real = TopKSAE.training_loss

        def slow(self, acts, dead_mask):
            time.sleep(sleep_s)
            return real(self, acts, dead_mask)

        TopKSAE.training_loss = slow
    cfgs = [TypeAdapter(DictionaryConfig).validate_python(c) for c in args["cfgs"]]
    cache = ActivationCacheRef.model_validate(args["cache"])
    return train_dictionaries_task.fn(StageContext(settings=settings), cache, args["hookpoint"], cfgs)


if __name__ == "__main__":
    run(json.loads(sys.argv[1]), sleep_s=0.1)
