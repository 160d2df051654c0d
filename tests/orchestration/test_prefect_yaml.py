"""infra/prefect.yaml names flows that load, with parameters they accept and specs that validate."""

from __future__ import annotations

from pathlib import Path

import yaml
from prefect.flows import load_flow_from_entrypoint

from featureatlas.flows.pipeline_file import pipeline_file_flow
from featureatlas.schemas.spec import load_spec

REPO = Path(__file__).parents[2]


def test_every_deployment_loads_and_its_spec_validates(monkeypatch):
    monkeypatch.chdir(REPO)  # flow runs start in the repository (the pull step), as here
    config = yaml.safe_load((REPO / "infra" / "prefect.yaml").read_text())
    assert config["deployments"]
    for deployment in config["deployments"]:
        loaded = load_flow_from_entrypoint(deployment["entrypoint"])
        assert loaded.name == pipeline_file_flow.name
        assert set(deployment["parameters"]) == {"spec_path"}
        assert load_spec(deployment["parameters"]["spec_path"]).name
        assert deployment["work_pool"]["name"] == "featureatlas" and deployment["concurrency_limit"] == 1
        for schedule in deployment["schedules"]:
            assert len(schedule["cron"].split()) == 5
