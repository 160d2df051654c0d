"""A process that asks for one artifact at a signal: `python -m tests.orchestration.stage_builder ARGS_JSON`.

ARGS_JSON: home, resumable, ready, go, builds, out. It imports and opens everything first, creates `ready`,
waits for `go`, then calls `run_stage` with a build that takes a second and notes each call in `builds`;
the reference it gets back goes to `out`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from featureatlas.schemas.artifacts import CorpusRef
from featureatlas.schemas.settings import Settings
from featureatlas.schemas.spec import CorpusSpec
from featureatlas.tasks.tracking.catalog import open_catalog
from featureatlas.tasks.tracking.identity import identity
from featureatlas.tasks.tracking.stage import StageContext, run_stage, tracker_for


def build(folder: Path, _run) -> tuple[dict, dict]:
    with open(ARGS["builds"], "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(1.0)  # long enough for the other process to arrive while this one builds
    (folder / "data.txt").write_text("built once")
    return {"spec": CorpusSpec(), "n_documents": 1, "n_chars": 1}, {"n_documents": 1, "n_chars": 1}


if __name__ == "__main__":
    ARGS = json.loads(sys.argv[1])
    settings = Settings(home=ARGS["home"])
    open_catalog(settings.catalog)
    tracker_for(settings)
    Path(ARGS["ready"]).touch()
    while not Path(ARGS["go"]).exists():
        time.sleep(0.005)
    ref = run_stage(StageContext(settings=settings), identity("corpus", {"test": "same"}, []), CorpusRef,
                    name="prepare_corpus", config={}, parents=[], build=build,
                    resumable=ARGS["resumable"])  # fmt: skip
    Path(ARGS["out"]).write_text(ref.model_dump_json())
