"""Removing an artifact with everything derived from it, from the catalog and from the disk.

`removal_plan` walks the lineage edges down from an artifact (its descendants cannot exist without it);
`remove` deletes their rows and edges in one transaction, children first, then their folders. The
command line shows the plan first (`featureatlas catalog remove --dry-run`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import NamedTuple

from sqlalchemy import delete, or_
from sqlalchemy.orm import Session

from featureatlas.schemas.catalog import ROWS, LineageEdge

# children before parents: the order rows must be deleted in (foreign keys point up the lineage)
_DELETE_ORDER = (
    "interactions",
    "labeling",
    "evaluation",
    "dictionary",
    "activation_cache",
    "corpus",
    "model",
)


class Removal(NamedTuple):
    """The artifacts `remove` deletes, with their kinds and folders."""

    ids: list[str]  # the artifact and its descendants, children first
    kinds: dict[str, str]
    paths: dict[str, str]
    edges: int  # lineage edges that touch them


def removal_plan(catalog, artifact_id: str) -> Removal:
    """What `remove` would delete: the artifact, everything derived from it, their edges and folders."""
    found = catalog.get(artifact_id)
    if found is None:
        raise ValueError(
            f"no artifact {artifact_id!r} in the catalog; `featureatlas catalog list` shows the ids"
        )
    seen, todo = {artifact_id}, [artifact_id]
    while todo:
        for child in catalog.children(todo.pop()):
            if child not in seen:
                seen.add(child)
                todo.append(child)
    kinds, paths = {}, {}
    for kind, r in catalog.list():
        if r.id in seen:
            kinds[r.id], paths[r.id] = kind, r.uri
    ids = sorted(seen, key=lambda i: (_DELETE_ORDER.index(kinds[i]), i))
    edges = sum(1 for child, parent in catalog.edges() if child in seen or parent in seen)
    return Removal(ids, kinds, paths, edges)


def remove(catalog, plan: Removal) -> list[str]:
    """Delete the plan's rows and edges in one transaction, then their folders (returned)."""
    with Session(catalog.engine) as s, s.begin():
        s.execute(
            delete(LineageEdge).where(
                or_(LineageEdge.child_id.in_(plan.ids), LineageEdge.parent_id.in_(plan.ids))
            )
        )
        for artifact_id in plan.ids:
            row_cls = ROWS[plan.kinds[artifact_id]]
            s.execute(delete(row_cls).where(row_cls.id == artifact_id))
    removed = []
    for artifact_id in plan.ids:
        folder = Path(plan.paths[artifact_id])
        if folder.is_dir():
            shutil.rmtree(folder)
            removed.append(str(folder))
    return removed
