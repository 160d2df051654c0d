"""The SQL metadata catalog: register finished artifacts with their lineage, find them by fingerprint.

Any SQLAlchemy URL works; SQLite (the default) runs in WAL mode so a reader never blocks the writer. The
schema is brought to the newest Alembic revision when the catalog is opened.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, event, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

import schemas
from schemas.artifacts import ArtifactRef
from schemas.catalog import ROWS, ArtifactRow, LineageEdge

MIGRATIONS = Path(schemas.__file__).resolve().parent / "migrations"


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


class Catalog:
    def __init__(self, url: str):
        self.url = url
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.engine: Engine = create_engine(url)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self.migrate()

    def migrate(self) -> None:
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        with self.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    # ---- writes ---------------------------------------------------------------------------------------
    def register(self, ref: ArtifactRef, parents: list[ArtifactRef], config: dict, **columns) -> None:
        """Record a finished artifact and its edges in one transaction (idempotent for the same id)."""
        row_cls = ROWS[ref.kind]
        with Session(self.engine) as s, s.begin():
            if s.get(row_cls, ref.id) is not None:
                return
            s.add(
                row_cls(
                    id=ref.id,
                    fingerprint=ref.fingerprint,
                    uri=ref.path,
                    mlflow_run_id=ref.mlflow_run_id,
                    config=config,
                    ref=ref.model_dump(mode="json", exclude={"reused"}),
                    **columns,
                )
            )
            for p in parents:
                s.add(LineageEdge(child_id=ref.id, parent_id=p.id, child_kind=ref.kind, parent_kind=p.kind))

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
