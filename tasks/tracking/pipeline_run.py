"""The parent MLflow run of one pipeline run: the spec as params and artifact, stages nested beneath."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from featureatlas.schemas.artifacts import PipelineResult
from featureatlas.schemas.settings import Settings
from featureatlas.schemas.spec import PipelineSpec
from featureatlas.tasks.tracking.catalog import open_catalog
from featureatlas.tasks.tracking.lineage import dictionary_title, record_lineage
from featureatlas.tasks.tracking.mlflow_runs import StageRun
from featureatlas.tasks.tracking.secrets import register_config_secrets
from featureatlas.tasks.tracking.stage import StageContext, stage_logger, tracker_for


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() or "unknown"


@contextmanager
def pipeline_run(settings: Settings, spec: PipelineSpec, progress: bool = False) -> Iterator[StageContext]:
    """Open the parent run; it ends FINISHED, or FAILED when a stage raises (the error propagates).

    The catalog and the tracking store are both opened first, so that an unreachable one fails the run
    before anything is tracked or built.
    """
    # the variables the spec names as holding keys (label.llm.api_key_env) are masked whatever their names
    register_config_secrets(spec.model_dump(mode="json"))
    open_catalog(settings.catalog)
    tracker = tracker_for(settings)
    tracker.reap_orphans()  # runs a killed run left RUNNING can never end: they are marked KILLED
    tags = {"featureatlas.pipeline": spec.name, "featureatlas.code_version": _git_commit()}
    from prefect.runtime import flow_run

    if flow_run.id:  # inside a Prefect flow run (always, from the flow): link the two run trees
        tags["featureatlas.prefect_flow_run_id"] = flow_run.id
    with tracker.run(spec.name, tags=tags) as run:
        run.log_params(spec.model_dump(mode="json"))
        spec_file = settings.home_dir / "specs" / f"{run.run_id}.yaml"
        spec_file.parent.mkdir(parents=True, exist_ok=True)
        spec_file.write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
        run.log_artifact(spec_file)
        stage_logger().info("pipeline %r: MLflow run %s", spec.name, run.run_id)
        yield StageContext(settings=settings, parent_run_id=run.run_id, progress=progress)


def log_summary(ctx: StageContext, result: PipelineResult) -> None:
    """Put every dictionary's headline figures (`dict<i>.fvu`, `.l0`, `.ce_loss_score`: columns of the runs
    table), a `dict<i>` tag naming it, and the whole result on the parent run; give every dictionary its
    MLflow logged model (`lineage.py`)."""
    tracker = tracker_for(ctx.settings)
    run = StageRun(tracker.client, result.mlflow_run_id)
    metrics = {}
    record_lineage(tracker, result)
    for i, d in enumerate(result.dictionaries):
        run.set_tags({f"dict{i}": dictionary_title(d.dictionary)})
        if d.evaluation is not None:
            for key in ("fvu", "l0", "dead_fraction", "ce_loss_score"):
                metrics[f"dict{i}.{key}"] = getattr(d.evaluation, key)
    if metrics:
        run.log_metrics(metrics)
    path = ctx.settings.home_dir / "specs" / f"{result.mlflow_run_id}.result.json"
    path.write_text(json.dumps(result.model_dump(mode="json"), indent=1))
    run.log_artifact(path)
