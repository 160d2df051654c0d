"""The SQL metadata catalog: register finished artifacts with their lineage, find them by fingerprint.

Any SQLAlchemy URL works: SQLite (the default) in WAL mode so a reader never blocks the writer, or
PostgreSQL (`postgresql+psycopg://user:password@host:5432/db`). The schema is brought to the newest Alembic
revision when the catalog is opened; concurrent openers take turns (an advisory lock on PostgreSQL, a write
lock on SQLite), so two pipelines starting at once on an empty database do not both create the tables.
Registration is one transaction, retried with backoff when the database is briefly unreachable or busy,
and idempotent, so a retry or two processes registering the same artifact leave exactly one row. Secrets
in configs are masked before they are stored.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, event, select, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

import featureatlas.schemas as schemas_pkg
from featureatlas.schemas.artifacts import ArtifactRef
from featureatlas.schemas.catalog import ROWS, ArtifactRow, LineageEdge
from featureatlas.tasks.tracking.retry import retrying
from featureatlas.tasks.tracking.secrets import mask_secrets
from featureatlas.tasks.tracking.timeouts import connect_args

MIGRATIONS = Path(schemas_pkg.__file__).resolve().parent / "migrations"
_MIGRATION_LOCK = 0x66656174  # PostgreSQL advisory lock key held while migrating ("feat")
_HINT = (
    "Check that the database server is running and the URL is right (FEATUREATLAS_CATALOG_URL); "
    "`featureatlas server status` shows the configured services."
)


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def make_engine(url: str) -> Engine:
    """An engine for `url`: SQLite with WAL, foreign keys and a busy timeout; others with pre-ping and the
    connect and statement timeouts of `timeouts`."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    if url.startswith("sqlite"):
        engine = create_engine(url)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, connect_args=connect_args(url))


def _write_lock(conn: Connection) -> None:
    """Serialise writers from the start of the transaction.

    SQLite: a deferred transaction that reads and then writes fails with 'database is locked' if another
    process committed in between; BEGIN IMMEDIATE waits (busy_timeout) for the write lock up front instead.
    """
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def migrate(engine: Engine, revision: str = "head") -> None:
    """Upgrade the schema to `revision`, one process at a time."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
        else:
            _write_lock(conn)
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


class Catalog:
    def __init__(self, url: str):
        self.url = url
        self.engine: Engine = make_engine(url)
        self.migrate()

    def migrate(self) -> None:
        retrying("catalog database", self.url, lambda: migrate(self.engine), _HINT)

    # ---- writes ---------------------------------------------------------------------------------------
    def register(self, ref: ArtifactRef, parents: list[ArtifactRef], config: dict, **columns) -> None:
        """Record a finished artifact and its edges in one transaction (idempotent for the same id).

        Retried with backoff while the database is unreachable or busy; either the row and all its edges
        are written, or nothing is.
        """
        retrying(
            "catalog database", self.url, lambda: self._register_once(ref, parents, config, columns), _HINT
        )

    def _register_once(
        self, ref: ArtifactRef, parents: list[ArtifactRef], config: dict, columns: dict
    ) -> None:
        row_cls = ROWS[ref.kind]
        try:
            with Session(self.engine) as s, s.begin():
                _write_lock(s.connection())
                if s.get(row_cls, ref.id) is not None:
                    return
                s.add(
                    row_cls(
                        id=ref.id,
                        fingerprint=ref.fingerprint,
                        uri=ref.path,
                        mlflow_run_id=ref.mlflow_run_id,
                        config=mask_secrets(config),
                        ref=mask_secrets(ref.model_dump(mode="json", exclude={"reused"})),
                        **columns,
                    )
                )
                for p in parents:
                    s.add(
                        LineageEdge(child_id=ref.id, parent_id=p.id, child_kind=ref.kind, parent_kind=p.kind)
                    )
        except IntegrityError:
            # another process registered the same artifact between our check and our insert (PostgreSQL
            # lets both transactions read first): its row is ours, unless the fingerprint differs
            with Session(self.engine) as s:
                row = s.get(row_cls, ref.id)
                if row is None or row.fingerprint != ref.fingerprint:
                    raise

    # ---- reads ----------------------------------------------------------------------------------------
    def find(self, kind: str, fingerprint: str) -> dict | None:
        row_cls = ROWS[kind]
        with Session(self.engine) as s:
            row = s.scalars(select(row_cls).where(row_cls.fingerprint == fingerprint)).first()
            return dict(row.ref) if row is not None else None

    def get(self, artifact_id: str) -> tuple[str, ArtifactRow] | None:
        with Session(self.engine) as s:
            for kind, row_cls in ROWS.items():
                row = s.get(row_cls, artifact_id)
                if row is not None:
                    s.expunge(row)
                    return kind, row
        return None

    def list(self, kind: str | None = None) -> list[tuple[str, ArtifactRow]]:
        out = []
        with Session(self.engine) as s:
            for k, row_cls in ROWS.items():
                if kind in (None, k):
                    rows = s.scalars(select(row_cls).order_by(row_cls.created_at)).all()
                    for r in rows:
                        s.expunge(r)
                    out.extend((k, r) for r in rows)
        return out

    def parents(self, artifact_id: str) -> list[str]:
        with Session(self.engine) as s:
            q = select(LineageEdge.parent_id).where(LineageEdge.child_id == artifact_id)
            return sorted(s.scalars(q).all())

    def children(self, artifact_id: str) -> list[str]:
        with Session(self.engine) as s:
            q = select(LineageEdge.child_id).where(LineageEdge.parent_id == artifact_id)
            return sorted(s.scalars(q).all())

    def edges(self) -> list[tuple[str, str]]:
        with Session(self.engine) as s:
            return [(e.child_id, e.parent_id) for e in s.scalars(select(LineageEdge)).all()]


@lru_cache(maxsize=4)
def open_catalog(url: str) -> Catalog:
    return Catalog(url)
