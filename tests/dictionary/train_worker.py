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

from schemas.methods import DictionaryConfig


def run(args: dict, sleep_s: float = 0.0) -> list:
    from schemas.artifacts import ActivationCacheRef
    from schemas.settings import Settings
    from tasks.dictionary.task import train_dictionaries_task
    from tasks.dictionary.topk import TopKSAE
    from tasks.tracking.env import configure_environment
    from tasks.tracking.stage import StageContext

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
