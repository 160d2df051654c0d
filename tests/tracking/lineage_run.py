"""One tiny pipeline run in a home of its own, shared by the lineage tests (module-scoped: it takes ~20 s)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from featureatlas.schemas.settings import Settings


def run_tiny_pipeline(home: Path, work: Path):
    """Run the tiny pipeline with `home` as FEATUREATLAS_HOME; returns (settings, PipelineResult)."""
    from featureatlas.flows.pipeline import pipeline_flow
    from featureatlas.schemas.spec import parse_spec
    from tests.flows.test_pipeline import tiny_spec

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEATUREATLAS_HOME", str(home))
        for name in ("FEATUREATLAS_CATALOG_URL", "FEATUREATLAS_MLFLOW_TRACKING_URI"):
            mp.delenv(name, raising=False)
        result = pipeline_flow(parse_spec(tiny_spec(work)))
        settings = Settings()
    assert settings.mlflow_uri.startswith("sqlite"), settings.mlflow_uri
    assert os.environ.get("FEATUREATLAS_HOME") != str(home)  # restored for the other tests
    return settings, result
