"""Schedules: a pipeline spec as a Prefect deployment that a process worker runs, and the runs it made.

`register_schedule` deploys `pipeline_flow` (entrypoint `flows.pipeline.pipeline_flow`, imported by module
path, so the worker needs featureatlas installed, not a copy of this folder) with the validated spec as its
parameter, a cron or interval schedule, and a concurrency limit of one run at a time: a run that comes due
while the last one is still going waits for it (two runs of one spec would race for the same artifacts).
Each run fingerprints its inputs again, so a run after the corpus grew rebuilds the corpus and what depends
on it and reuses the rest. Deployments go to a `process` work pool; `featureatlas worker` serves it.

`flows/pipeline_file.py::pipeline_file_flow` is the same pipeline with a spec *path* as its parameter, read
when each run starts: the entrypoint of the deployments in `infra/prefect.yaml` (`prefect deploy --all`).

Schedules need a real Prefect server (`PREFECT_API_URL`): the temporary server a plain `featureatlas run`
starts lives only as long as that command, so nothing would ever fire.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NamedTuple

from featureatlas.schemas.settings import Settings
from featureatlas.schemas.spec import PipelineSpec

WORK_POOL = "featureatlas"
TAG = "featureatlas"


class ScheduleError(RuntimeError):
    """A schedule cannot be registered or served; the message says how to fix it."""


class Registered(NamedTuple):
    deployment_id: str
    name: str  # "<flow name>/<deployment name>", as `prefect deployment run` takes it
    work_pool: str
    schedule: str


class RunRow(NamedTuple):
    name: str
    id: str
    deployment: str | None
    state: str
    expected_start: str | None
    start: str | None
    end: str | None


def api_url() -> str:
    """The Prefect server to talk to, or a ScheduleError saying how to get one."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise ScheduleError(
            "schedules need a running Prefect server, and PREFECT_API_URL is not set; start one "
            "(`prefect server start --host 127.0.0.1 --port 4200`) and set "
            "PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    return url


def _ensure_work_pool(client, pool: str) -> None:
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    try:
        found = client.read_work_pool(pool)
    except ObjectNotFound:
        client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        return
    if found.type != "process":
        raise ScheduleError(
            f"work pool {pool!r} exists with type {found.type!r}; featureatlas deploys to a 'process' pool: "
            "pass another --pool name"
        )


def register_schedule(
    spec: PipelineSpec,
    *,
    name: str | None = None,
    cron: str | None = None,
    interval: float | None = None,
    pool: str = WORK_POOL,
) -> Registered:
    """Create (or update, for the same name) the deployment of `spec` with its schedule."""
    if (cron is None) == (interval is None):
        raise ScheduleError('give exactly one of --cron "0 3 * * *" or --interval SECONDS')
    if interval is not None and interval <= 0:
        raise ScheduleError(f"--interval must be a positive number of seconds, got {interval}")
    url = api_url()
    from prefect.client.orchestration import get_client
    from prefect.deployments.runner import EntrypointType
    from prefect.exceptions import PrefectHTTPStatusError

    from featureatlas.flows.pipeline import pipeline_flow

    name = name or spec.name
    try:
        with get_client(sync_client=True) as client:
            _ensure_work_pool(client, pool)
    except (OSError, PrefectHTTPStatusError) as e:
        raise ScheduleError(f"Prefect server at {url} did not answer ({e}); is it running?") from None
    deployment = pipeline_flow.to_deployment(
        name=name,
        cron=cron,
        interval=interval,
        parameters={"spec": spec.model_dump(mode="json")},
        concurrency_limit=1,
        tags=[TAG],
        description=f"featureatlas pipeline {spec.name!r}",
        work_pool_name=pool,
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
    deployment_id = deployment.apply(work_pool_name=pool)
    when = f"cron {cron!r}" if cron is not None else f"every {interval:g} s"
    return Registered(str(deployment_id), f"{pipeline_flow.name}/{name}", pool, when)


def worker_command(pool: str = WORK_POOL, limit: int | None = None) -> list[str]:
    """`prefect worker start` for the featureatlas pool (process type: each flow run in a new process)."""
    cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process"]
    if limit is not None:
        cmd += ["--limit", str(limit)]
    return cmd


def worker_environment(settings: Settings) -> dict[str, str]:
    """The worker's environment, the featureatlas home made absolute: flow runs start in a temp folder."""
    env = os.environ.copy()
    env["FEATUREATLAS_HOME"] = str(settings.home_dir)
    if settings.artifact_root is not None:
        env["FEATUREATLAS_ARTIFACT_ROOT"] = str(Path(settings.artifacts_dir))
    return env


def _run_client():
    """An async Prefect client: on the configured server, or without one on the local database in-process.

    Without PREFECT_API_URL, Prefect's own client would start a temporary server in a subprocess just to
    answer one query (tens of seconds on a busy machine); the in-process app reads the same database.
    """
    from prefect.client.orchestration import PrefectClient, get_client
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return get_client()
    from prefect.server.api.server import create_app

    return PrefectClient(api=create_app(ephemeral=True))


def _local_database() -> Path | None:
    """The SQLite file of the temporary Prefect server that plain `featureatlas run`s use, when no server
    is configured and the database is SQLite (None otherwise)."""
    from prefect.settings import get_current_settings

    current = get_current_settings()
    if current.api.url:
        return None
    url = current.server.database.connection_url
    url = url.get_secret_value() if url is not None else f"sqlite:///{current.home / 'prefect.db'}"
    return Path(url.split(":///", 1)[1]) if url.startswith("sqlite") and ":///" in url else None


def _local_runs(db: Path, limit: int, upcoming: bool) -> list[RunRow]:
    """Read the runs straight from the temporary server's SQLite file (read-only): starting Prefect's server
    app only to answer this one query takes tens of seconds on a busy machine; this takes milliseconds."""
    import sqlite3
    from datetime import datetime, timezone

    if not db.is_file():
        return []
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")

    def iso(t: str | None) -> str | None:
        if t is None:
            return None
        when = datetime.fromisoformat(t).replace(microsecond=0)
        return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).isoformat()  # stored in UTC

    query = (
        "SELECT r.name, r.id, d.name, r.state_name, r.expected_start_time, r.start_time, r.end_time "
        "FROM flow_run r LEFT JOIN deployment d ON d.id = r.deployment_id "
        f"{'' if upcoming else 'WHERE r.expected_start_time <= ? '}"
        "ORDER BY r.expected_start_time DESC LIMIT ?"
    )
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as conn:
        rows = conn.execute(query, (limit,) if upcoming else (now, limit)).fetchall()
    return [RunRow(n, str(i), d, s or "?", iso(e), iso(st), iso(en)) for n, i, d, s, e, st, en in rows]


def list_runs(limit: int = 20, upcoming: bool = False) -> list[RunRow]:
    """Flow runs with their states, newest expected start first: those due by now (finished, running,
    waiting), or with `upcoming` also the future runs a schedule has already created."""
    import asyncio

    db = _local_database()
    if db is not None:
        return _local_runs(db, limit, upcoming)
    from datetime import datetime, timezone

    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterExpectedStartTime
    from prefect.client.schemas.sorting import FlowRunSort

    def iso(t) -> str | None:
        return None if t is None else t.isoformat(timespec="seconds")

    async def read():
        async with _run_client() as client:
            now = datetime.now(timezone.utc)
            due = FlowRunFilter(expected_start_time=FlowRunFilterExpectedStartTime(before_=now))
            runs = await client.read_flow_runs(
                flow_run_filter=None if upcoming else due,
                sort=FlowRunSort.EXPECTED_START_TIME_DESC,
                limit=limit,
            )
            names = {}
            for d_id in {r.deployment_id for r in runs if r.deployment_id}:
                names[d_id] = (await client.read_deployment(d_id)).name
            return runs, names

    runs, names = asyncio.run(read())
    return [
        RunRow(
            name=r.name,
            id=str(r.id),
            deployment=names.get(r.deployment_id),
            state=r.state.name if r.state else "?",
            expected_start=iso(r.expected_start_time),
            start=iso(r.start_time),
            end=iso(r.end_time),
        )
        for r in runs
    ]


class ScheduleRow(NamedTuple):
    name: str  # "<flow name>/<deployment name>"
    id: str
    schedule: str
    paused: bool
    work_pool: str | None


def _deployment(client, name: str):
    """A featureatlas deployment by its name, with or without the flow's name in front."""
    from prefect.exceptions import ObjectNotFound

    from featureatlas.flows.pipeline import pipeline_flow

    full = name if "/" in name else f"{pipeline_flow.name}/{name}"
    try:
        return client.read_deployment_by_name(full)
    except ObjectNotFound:
        known = ", ".join(r.name for r in list_schedules()) or "none"
        raise ScheduleError(f"no schedule named {name!r}; known: {known}") from None


def _describe(deployment) -> str:
    parts = []
    for s in deployment.schedules or []:
        sched = s.schedule
        if getattr(sched, "cron", None):
            parts.append(f"cron {sched.cron!r}")
        elif getattr(sched, "interval", None) is not None:
            parts.append(f"every {sched.interval.total_seconds():g} s")
        else:
            parts.append(type(sched).__name__)
    return ", ".join(parts) or "no schedule"


def list_schedules() -> list[ScheduleRow]:
    """The featureatlas deployments (tagged `featureatlas`) on the Prefect server, by name."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterTags

    api_url()
    with get_client(sync_client=True) as client:
        found = client.read_deployments(
            deployment_filter=DeploymentFilter(tags=DeploymentFilterTags(all_=[TAG]))
        )
        flows = {f.id: f.name for f in client.read_flows()}
    return sorted(
        (
            ScheduleRow(
                f"{flows.get(d.flow_id, '?')}/{d.name}",
                str(d.id),
                _describe(d),
                bool(d.paused),
                d.work_pool_name,
            )
            for d in found
        ),
        key=lambda r: r.name,
    )


def set_schedule(name: str, action: str) -> ScheduleRow:
    """Pause, resume or delete the deployment `name`; returns it as it was before a delete, else after."""
    from prefect.client.orchestration import get_client

    api_url()
    with get_client(sync_client=True) as client:
        deployment = _deployment(client, name)
        row = ScheduleRow(
            f"{name if '/' in name else deployment.name}",
            str(deployment.id),
            _describe(deployment),
            action == "pause" if action != "delete" else bool(deployment.paused),
            deployment.work_pool_name,
        )
        match action:
            case "pause":
                client.pause_deployment(deployment.id)
            case "resume":
                client.resume_deployment(deployment.id)
            case "delete":
                client.delete_deployment(deployment.id)
            case other:
                raise ValueError(f"unknown schedule action {other!r}")
    return row
