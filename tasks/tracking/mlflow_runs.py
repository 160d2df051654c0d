"""MLflow runs through an explicit client: one parent run per pipeline run, one nested run per stage.

The explicit `MlflowClient` (rather than the fluent `mlflow.start_run`) keeps runs correct when Prefect runs
tasks in worker threads, where the fluent API's active-run stack would not follow.

The tracking store is checked when the tracker opens (a database URI is connected to, a server's `/health`
is asked), with retries and backoff, so an unreachable store fails before any work with an error naming its
URL (password masked). Every write is retried the same way; params and tags are masked for secrets.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from featureatlas.schemas.artifacts import ArtifactRef
from featureatlas.tasks.tracking.datasets import dataset_entity
from featureatlas.tasks.tracking.mlflow_store import open_store
from featureatlas.tasks.tracking.orphans import OWNER_TAG, owner, reap_orphans
from featureatlas.tasks.tracking.paths import check_name
from featureatlas.tasks.tracking.retry import retrying
from featureatlas.tasks.tracking.secrets import mask_secrets
from featureatlas.tasks.tracking.timeouts import connect_args, with_timeouts

_MAX_PARAM = 6000
_HINT = (
    "Check that the tracking server or database is running and the URI is right "
    "(FEATUREATLAS_MLFLOW_TRACKING_URI); `featureatlas server status` shows the configured services."
)


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out |= flatten(value, f"{name}.")
        else:
            out[name] = str(value)[:_MAX_PARAM]
    return out


def _write(client: MlflowClient, fn, *args, **kwargs):
    """One tracking write, retried with backoff while the store is unreachable."""
    return retrying("MLflow tracking store", client.tracking_uri, lambda: fn(*args, **kwargs), _HINT)


class StageRun:
    """Handle on one MLflow run: params, metrics with steps, artifacts and dataset inputs."""

    def __init__(self, client: MlflowClient, run_id: str):
        self.client, self.run_id = client, run_id

    def log_params(self, config: dict) -> None:
        params = [Param(k, v) for k, v in mask_secrets(flatten(config)).items()]
        for i in range(0, len(params), 100):
            _write(self.client, self.client.log_batch, self.run_id, params=params[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        _write(self.client, self.client.log_batch, self.run_id, metrics=batch)

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in mask_secrets(tags).items():
            _write(self.client, self.client.set_tag, self.run_id, k, v)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if artifact_path is not None:
            check_name(artifact_path)
        _write(self.client, self.client.log_artifact, self.run_id, str(path), artifact_path)

    def log_input(self, ref: ArtifactRef, context: str) -> None:
        """Record that this run consumed `ref`: the lineage MLflow shows in its UI (`datasets.py`)."""
        tags = [InputTag("mlflow.data.context", context), InputTag("featureatlas.kind", ref.kind)]
        entity = DatasetInput(dataset_entity(ref), tags)
        for attempt in range(3):
            try:
                _write(self.client, self.client.log_inputs, self.run_id, datasets=[entity])
                return
            except MlflowException as e:
                # stages running at once (a fanned-out sweep) may insert the same new dataset together: one
                # insert wins, and the loser's transaction is rolled back, so repeating it finds the row
                if attempt == 2 or "unique" not in str(e).lower():
                    raise


def probe(uri: str) -> None:
    """Raise ConnectionError unless the tracking store at `uri` answers (a server's /health, a database's
    SELECT 1); a local store (SQLite, files) and other schemes are left to MLflow."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=10) as r:
                r.read()
        except urllib.error.HTTPError as e:
            if e.code >= 500:
                raise ConnectionError(f"HTTP {e.code} from /health") from e
        except (urllib.error.URLError, OSError) as e:
            raise ConnectionError(str(getattr(e, "reason", e))) from e
    elif uri.split(":", 1)[0].split("+")[0] in {"postgresql", "mysql", "mssql"}:
        from sqlalchemy import create_engine, text

        engine = create_engine(uri, connect_args=connect_args(uri))
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        finally:
            engine.dispose()


class Tracker:
    def __init__(self, uri: str, experiment: str, artifact_root: Path):
        self.uri = uri
        # before MLflow's own client: its database store retries a dead server for minutes, silently
        retrying("MLflow tracking store", uri, lambda: probe(uri), _HINT)
        # a tracking server keeps artifacts in its own store; a local store puts them in `artifact_root`
        location = None
        if not uri.startswith(("http://", "https://")):
            artifact_root.mkdir(parents=True, exist_ok=True)
            location = artifact_root.as_uri()
        # store creation, migration and the experiment under a cross-process lock (see `mlflow_store`)
        client_uri = with_timeouts(uri)
        self.client, self.experiment_id = retrying(
            "MLflow tracking store", uri, lambda: open_store(client_uri, uri, experiment, location), _HINT
        )

    def start(self, name: str, parent_run_id: str | None = None, tags: dict | None = None) -> StageRun:
        tags = mask_secrets({MLFLOW_RUN_NAME: name, **(tags or {})}) | {OWNER_TAG: owner()}
        if parent_run_id:
            tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        run = _write(self.client, self.client.create_run, self.experiment_id, tags=tags, run_name=name)
        return StageRun(self.client, run.info.run_id)

    def reopen(self, run_id: str) -> StageRun | None:
        """The run `run_id`, set running again, or None if this store has no such (live) run."""
        try:
            info = self.client.get_run(run_id).info
        except MlflowException:
            return None
        if info.lifecycle_stage != "active" or info.experiment_id != self.experiment_id:
            return None
        self.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        self.client.set_tag(run_id, OWNER_TAG, owner())  # this process runs it now
        return StageRun(self.client, run_id)

    def reap_orphans(self) -> list[str]:
        """Mark KILLED the RUNNING runs whose processes died (see `orphans`); their ids."""
        return retrying("MLflow tracking store", self.uri,
                        lambda: reap_orphans(self.client, self.experiment_id), _HINT)  # fmt: skip

    def end(self, run: StageRun, ok: bool) -> None:
        status = RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED)
        _write(self.client, self.client.set_terminated, run.run_id, status)

    @contextmanager
    def run(
        self,
        name: str,
        parent_run_id: str | None = None,
        tags: dict | None = None,
        run: StageRun | None = None,
    ):
        """A run that ends FINISHED, or FAILED if the block raises (the error still propagates).

        With `run` (from `reopen`), that run continues instead of a new one starting.
        """
        run = run or self.start(name, parent_run_id, tags)
        ok = False
        try:
            yield run
            ok = True
        finally:
            self.end(run, ok)


@lru_cache(maxsize=4)
def open_tracker(uri: str, experiment: str, artifact_root: str) -> Tracker:
    return Tracker(uri, experiment, Path(artifact_root))
