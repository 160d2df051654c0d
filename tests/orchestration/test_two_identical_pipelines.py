"""Two identical `featureatlas run`s started together on one home both succeed, and every artifact is built
once and registered once: the second waits for each stage the first is building and reuses its result."""

from __future__ import annotations

import collections
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from featureatlas.schemas.settings import Settings
from featureatlas.tasks.tracking.catalog import open_catalog
from tests.flows.test_pipeline import tiny_spec

REPO = Path(__file__).parents[2]


@pytest.mark.slow
def test_two_identical_pipelines_at_once_build_each_artifact_once(tmp_path, prefect_harness):  # noqa: ARG001
    from prefect.settings import PREFECT_API_URL

    raw = tiny_spec(tmp_path, evaluate={"enabled": False}, label={"enabled": False})
    raw["cache"] = {"shard_tokens": 256, "batch_size": 4}
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(raw))
    home = tmp_path / "home"
    env = os.environ | {"FEATUREATLAS_HOME": str(home), "PREFECT_API_URL": PREFECT_API_URL.value(),
                        "PYTHONPATH": str(REPO)}  # fmt: skip
    # the slowed model keeps the first run caching while the second arrives at the same stage
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.orchestration.slow_run", str(spec_path)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(2)
    ]
    errors = [p.communicate(timeout=900)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(e[-3000:] for e in errors)

    settings = Settings(home=home)
    kinds = collections.Counter(k for k, _ in open_catalog(settings.catalog).list())
    assert kinds == {"model": 1, "corpus": 1, "activation_cache": 1, "dictionary": 1}
    client = MlflowClient(settings.mlflow_uri)
    exp = client.get_experiment_by_name(settings.experiment)
    built = collections.Counter()
    for run in client.search_runs([exp.experiment_id]):
        assert run.info.status == "FINISHED"
        tags = run.data.tags
        if "featureatlas.artifact_id" in tags and "featureatlas.reused_from_run" not in tags:
            built[tags["featureatlas.artifact_id"]] += 1
    assert sorted(built.values()) == [1, 1, 1, 1]  # each of the four artifacts built by one run
    assert len(list((home / "artifacts").glob("*/*"))) == 4  # no lock files, no partial folders
