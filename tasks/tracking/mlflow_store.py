"""Open an MLflow tracking store and its experiment, one process at a time, and mend a half-migrated store.

MLflow creates and migrates a database store (Alembic) the first time a process opens it, and creates an
experiment when none has its name; two processes doing either at once on a new home collide (SQLite:
`table _alembic_tmp_metrics already exists`, `Online migration expected to match one row`), and a
migration cut short leaves the file broken for every later run. So opening takes a cross-process lock
first, as `catalog.migrate` does: an exclusive `flock` on `<store>.lock` beside a SQLite file, a session
advisory lock on PostgreSQL; a tracking server (http) serialises its own store.

SQLite runs DDL outside transactions, so a migration killed halfway can leave `_alembic_tmp_<table>`
copies behind. Before MLflow sees the file, under the lock: a store that holds no runs is emptied (MLflow
builds it again); otherwise a copy whose original table still exists is dropped (the original is intact
and its revision unchanged, so the migration simply runs again); a copy whose original is gone is refused
with the commands that finish the job by hand.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from mlflow.tracking import MlflowClient

from featureatlas.tasks.tracking.errors import Refusal

log = logging.getLogger(__name__)
_STORE_LOCK = 0x6D6C666C  # PostgreSQL advisory lock key held while opening the store ("mlfl")
_TMP = "_alembic_tmp_"


class StoreNeedsRepair(Refusal):
    """The MLflow store was left half-migrated in a way that cannot be mended without losing runs."""


def sqlite_path(uri: str) -> Path | None:
    """The file of a `sqlite:///` URI, or None for any other store (and for an in-memory SQLite one)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def _is_postgresql(uri: str) -> bool:
    return uri.split(":", 1)[0].split("+")[0] in {"postgresql", "postgres"}


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Hold the store's cross-process lock for the block (waits for another process holding it)."""
    path = sqlite_path(uri)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # the lock file stays: unlinking it while another process waits on it would let a third one in
        with path.with_name(path.name + ".lock").open("a") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        return
    if _is_postgresql(uri):
        from sqlalchemy import create_engine, text
        from sqlalchemy.pool import NullPool

        from featureatlas.tasks.tracking.timeouts import connect_args

        engine = create_engine(uri, connect_args=connect_args(uri), poolclass=NullPool)
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _STORE_LOCK})
                conn.commit()
                try:
                    yield
                finally:
                    conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _STORE_LOCK})
                    conn.commit()
        finally:
            engine.dispose()
        return
    yield


def repair_sqlite_store(path: Path) -> None:
    """Mend what a migration killed halfway left in the SQLite store at `path` (see the module docstring);
    raise StoreNeedsRepair, saying what to run, when mending it would lose runs. Call under `store_lock`."""
    if not path.is_file():
        return
    conn = sqlite3.connect(path, timeout=60, isolation_level=None)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        tables = {t for t in tables if not t.startswith("sqlite_")}
        leftovers = sorted(t for t in tables if t.startswith(_TMP))
        unversioned = bool(tables) and "alembic_version" not in tables
        if not leftovers and not unversioned:
            return
        n_runs = conn.execute("SELECT count(*) FROM runs").fetchone()[0] if "runs" in tables else 0
        if n_runs == 0:
            log.warning("MLflow store %s was left half-made by an interrupted run and holds no runs: "
                        "building it again", path)  # fmt: skip
            conn.execute("PRAGMA foreign_keys = OFF")
            for table in sorted(tables):
                conn.execute(f'DROP TABLE "{table}"')
            return
        orphans = [t for t in leftovers if t.removeprefix(_TMP) not in tables]
        if orphans or unversioned:
            fixes = "; ".join(f"ALTER TABLE {t} RENAME TO {t.removeprefix(_TMP)}" for t in orphans)
            what = ", ".join(orphans) or "no alembic_version"
            raise StoreNeedsRepair(
                f"the MLflow store {path} was left half-migrated ({what}), with {n_runs} runs in it; back it "
                f"up, then run `sqlite3 {path} '{fixes}'` and "
                f"`mlflow db upgrade sqlite:///{path}`, or move the file away to start a new store"
            )
        log.warning("MLflow store %s: dropping %s, left by a migration that was cut short; the migration "
                    "runs again", path, ", ".join(leftovers))  # fmt: skip
        for table in leftovers:
            conn.execute(f'DROP TABLE "{table}"')
    finally:
        conn.close()


def open_store(client_uri: str, uri: str, experiment: str, artifact_location: str | None) -> tuple:
    """(client, experiment id): the store at `uri` created or migrated and the experiment created if
    missing, all under the store's lock, so any number of processes may open a new store at once.

    `client_uri` is what the client connects with (`uri` with the database timeouts added).
    """
    with store_lock(uri):
        path = sqlite_path(uri)
        if path is not None:
            repair_sqlite_store(path)
        client = MlflowClient(client_uri)
        exp = client.get_experiment_by_name(experiment)  # the first call creates and migrates the store
        if exp is not None:
            return client, exp.experiment_id
        return client, client.create_experiment(experiment, artifact_location=artifact_location)
