"""The pipeline flow with a spec file as its parameter, for deployments that name a spec by path.

The spec is read when each run starts, so an edited file applies to the next scheduled run; the
deployments in `infra/prefect.yaml` use this entrypoint.
"""

from __future__ import annotations

from prefect import flow

from featureatlas.flows.pipeline import pipeline_flow
from featureatlas.schemas.artifacts import PipelineResult
from featureatlas.schemas.spec import load_spec


@flow(name="featureatlas-pipeline-file")
def pipeline_file_flow(spec_path: str) -> PipelineResult:
    """Read the spec at `spec_path` (relative to the run's working folder) and run the pipeline on it."""
    return pipeline_flow(load_spec(spec_path))
