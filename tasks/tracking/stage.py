"""Run a stage or reuse its artifact: the one place that decides, tracks and registers.

Every stage goes through `run_stage`: if the catalog holds a finished artifact with the stage's fingerprint,
it is handed on (and the reuse is logged and recorded as a nested MLflow run pointing at the original);
otherwise the stage builds into a temporary folder inside a nested MLflow run, the folder is renamed into
place, and only then is the artifact registered with its lineage. A failed stage leaves no folder and no row,
except a resumable stage (activation caching): it builds in `<id>.partial`, one folder per fingerprint that a
failed or killed run leaves behind, and the next run with the same fingerprint resumes there.

Two processes asked for the same artifact at once (two identical pipelines) build it once: the builder holds
an exclusive lock on `<id>.lock` beside the folder; a second one waits for it, then looks in the catalog
again and reuses what the first registered. Nothing is ever removed that a finished build registered.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from pydantic import Field

from featureatlas.schemas.artifacts import ArtifactRef
from featureatlas.schemas.base import Contract
from featureatlas.schemas.settings import Settings
from featureatlas.tasks.tracking.catalog import open_catalog
from featureatlas.tasks.tracking.identity import Identity
from featureatlas.tasks.tracking.mlflow_runs import StageRun, Tracker, open_tracker
from featureatlas.tasks.tracking.paths import inside

R = TypeVar("R", bound=ArtifactRef)


class StageContext(Contract):
    """What every stage task needs to know about the pipeline run it belongs to."""

    settings: Settings = Field(description="Where the catalog, MLflow store and artifacts live.")
    parent_run_id: str | None = Field(None, description="The pipeline's MLflow run; stages nest under it.")
    progress: bool = Field(False, description="Show progress bars (the CLI on a terminal).")


def stage_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a flow or task (so lines reach the Prefect UI), else a plain logger."""
    try:
        from prefect.logging import get_run_logger

        return get_run_logger()
    except Exception:  # MissingContextError outside a Prefect run: plain logging is the right fallback
        return logging.getLogger("featureatlas")


def tracker_for(settings: Settings) -> Tracker:
    return open_tracker(settings.mlflow_uri, settings.experiment, str(settings.mlflow_artifacts_dir))


@contextlib.contextmanager
def build_lock(lock_path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on `lock_path` (created if needed), waiting while another process holds it.

    The holder removes the file when done, so no lock files pile up; a process that was waiting on the
    removed file then holds a lock nobody else can see, so after every acquisition the path is checked to
    still name the locked file, and the lock is taken again on the new file if not. `on_wait` is called
    once if the lock was busy.
    """
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        f = lock_path.open("a")
        try:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait is not None:
                    on_wait()
                    on_wait = None
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                current = os.stat(lock_path).st_ino == os.fstat(f.fileno()).st_ino
            except FileNotFoundError:
                current = False
        except BaseException:
            f.close()
            raise
        if current:
            break
        f.close()
    try:
        yield
    finally:
        lock_path.unlink(missing_ok=True)  # while still held, so the next holder finds a file of its own
        f.close()


def artifact_exists(settings: Settings, ident: Identity) -> bool:
    """Whether the catalog holds a finished artifact with this fingerprint (what `run_stage` reuses)."""
    found = open_catalog(settings.catalog).find(ident.kind, ident.fingerprint)
    return found is not None and Path(found["path"]).exists()


def _reopen(tracker: Tracker, run_file: Path | None, partial: Path) -> StageRun | None:
    """The MLflow run of an interrupted build that left `partial` behind, if it is to be continued."""
    if run_file is None or not run_file.is_file() or not partial.is_dir():
        return None
    return tracker.reopen(run_file.read_text().strip())


def run_stage(
    ctx: StageContext,
    ident: Identity,
    ref_cls: type[R],
    *,
    name: str,
    config: dict,
    parents: list[ArtifactRef],
    build: Callable[[Path, StageRun], tuple[dict, dict]],
    resumable: bool = False,
    same_run: bool = False,
) -> R:
    """`build(folder, run)` writes the artifact into `folder` and returns (ref fields, catalog columns).

    With `resumable`, `folder` is `<id>.partial` and may hold what an interrupted build left; `build` must
    resume from it. It is kept when the build fails after writing something, and never registered. With
    `same_run` too, a resumed build continues the MLflow run of the interrupted one (its id is kept in
    `<id>.partial.run` beside the folder), so its metrics go on at the next step in the same run.
    """
    log = stage_logger()
    settings = ctx.settings
    catalog = open_catalog(settings.catalog)
    tracker = tracker_for(settings)
    tags = {
        "featureatlas.stage": ident.kind,
        "featureatlas.artifact_id": ident.id,
        "featureatlas.fingerprint": ident.fingerprint,
    }

    def reuse(found: dict) -> R:
        ref = ref_cls.model_validate(found | {"reused": True})
        log.info(
            "%s: reusing %s (fingerprint %s, made by MLflow run %s)",
            name,
            ref.id,
            ident.fingerprint[:12],
            ref.mlflow_run_id,
        )
        reuse_tags = tags | {"featureatlas.reused_from_run": str(ref.mlflow_run_id)}
        with tracker.run(f"{name} (reused)", ctx.parent_run_id, reuse_tags) as run:
            run.log_params(config)
            for p in parents:
                run.log_input(p, context=p.kind)
        return ref

    def finished() -> dict | None:
        found = catalog.find(ident.kind, ident.fingerprint)
        return found if found is not None and Path(found["path"]).exists() else None

    if (found := finished()) is not None:
        return reuse(found)

    final = inside(settings.artifacts_dir, ident.kind, ident.id)
    lock_path = final.with_name(f"{final.name}.lock")

    def waiting() -> None:
        log.info("%s: another process is building %s; waiting for it, to reuse its result", name, ident.id)

    with build_lock(lock_path, on_wait=waiting):
        # whoever held the lock may have built and registered it meanwhile: then it is reused, not rebuilt
        if (found := finished()) is not None:
            return reuse(found)
        return _build(ctx, ident, ref_cls, tracker, catalog, final, name=name, config=config, parents=parents,
                      tags=tags, build=build, resumable=resumable, same_run=same_run)  # fmt: skip


def _build(
    ctx: StageContext,
    ident: Identity,
    ref_cls: type[R],
    tracker: Tracker,
    catalog,
    final: Path,
    *,
    name: str,
    config: dict,
    parents: list[ArtifactRef],
    tags: dict,
    build: Callable[[Path, StageRun], tuple[dict, dict]],
    resumable: bool,
    same_run: bool,
) -> R:
    """Build into a temporary folder, rename it to `final`, register it; the caller holds the build lock."""
    log = stage_logger()
    if resumable:
        tmp = final.with_name(f"{final.name}.partial")
    else:
        for stale in final.parent.glob(f"{final.name}.partial-*"):
            shutil.rmtree(stale)  # a killed builder's; under the build lock nobody else writes there
        tmp = final.with_name(f"{final.name}.partial-{uuid.uuid4().hex[:8]}")
    log.info("%s: building %s", name, ident.id)
    run_file = final.with_name(f"{final.name}.partial.run") if resumable and same_run else None
    with tracker.run(name, ctx.parent_run_id, tags, reopened := _reopen(tracker, run_file, tmp)) as run:
        if reopened is not None:
            log.info("%s: continuing MLflow run %s of the interrupted build", name, run.run_id)
            run.set_tags({"featureatlas.resumed_under": str(ctx.parent_run_id)})
        else:
            run.log_params(config)
            for p in parents:
                run.log_input(p, context=p.kind)
        if run_file is not None:
            run_file.write_text(run.run_id)
        if resumable and tmp.is_dir() and any(tmp.iterdir()):
            log.info("%s: resuming from %s, left by an interrupted run", name, tmp)
        ok = False
        try:
            tmp.mkdir(parents=True, exist_ok=resumable)
            fields, columns = build(tmp, run)
            if final.exists():
                # left by a run that died after the rename, before registering: under the build lock, with
                # the catalog checked after taking it, this folder is registered nowhere and read by no one
                shutil.rmtree(final)
            os.replace(tmp, final)
            ok = True
        finally:
            if not ok and resumable and tmp.is_dir() and any(tmp.iterdir()):
                log.warning("%s: kept %s; running the stage again resumes from it", name, tmp)
            elif tmp.exists():
                shutil.rmtree(tmp)
            if run_file is not None and not tmp.exists():
                run_file.unlink(missing_ok=True)
        ref = ref_cls.model_validate(
            {
                "id": ident.id,
                "fingerprint": ident.fingerprint,
                "path": str(final),
                "mlflow_run_id": run.run_id,
                **fields,
            }
        )
        catalog.register(ref, parents, config, **columns)
        run.set_tags({"featureatlas.artifact_path": str(final)})
    log.info("%s: registered %s at %s", name, ref.id, final)
    return ref
