"""The catalog as data: every registered artifact as one Polars frame, typed references, lineage trees.

The comparison table itself (method, hookpoint, d_sae, k and the headline metrics FVU, L0, CE-loss score
of the newest evaluation) is built, filtered and sorted in `featureatlas.tasks.tracking.catalog_view`, the
one implementation the command line formats too; `FRAME_COLUMNS` and `catalog_frame` are its. Heavy
imports (Polars, SQLAlchemy, pydantic models) happen inside the functions: `import featureatlas` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from featureatlas.tasks.tracking.catalog_view import COLUMNS as FRAME_COLUMNS
from featureatlas.tasks.tracking.catalog_view import catalog_frame

if TYPE_CHECKING:
    import polars as pl

    from featureatlas.schemas.artifacts import ArtifactRef
    from featureatlas.tasks.tracking.catalog import Catalog as SQLCatalog

__all__ = ["FRAME_COLUMNS", "CatalogView", "Lineage", "catalog", "catalog_frame"]


@dataclass(frozen=True)
class Lineage:
    """Where an artifact came from and what was made from it.

    `ancestors` and `descendants` are nested dicts of ids (`{parent: {grandparent: {...}}}`); `paths` maps
    every id in either tree (and the artifact's own) to its folder.
    """

    id: str
    ancestors: dict[str, dict] = field(default_factory=dict)
    descendants: dict[str, dict] = field(default_factory=dict)
    paths: dict[str, str] = field(default_factory=dict)

    def ids(self) -> set[str]:
        """Every id in both trees, without the artifact's own."""

        def flat(tree: dict) -> set[str]:
            return {i for node, sub in tree.items() for i in {node} | flat(sub)}

        return flat(self.ancestors) | flat(self.descendants)


class CatalogView:
    """Read access to one featureatlas home's catalog, returning frames and typed references.

    Make one with `featureatlas.catalog(home=None)`.
    """

    def __init__(self, sql_catalog: SQLCatalog) -> None:
        """Wrap an open SQL catalog (`featureatlas.tasks.tracking.catalog.Catalog`), kept as `.sql`."""
        self.sql = sql_catalog

    def __repr__(self) -> str:
        """The catalog's database URL."""
        return f"CatalogView({self.sql.url!r})"

    def list(
        self,
        kind: str | None = None,
        where: str | pl.Expr | None = None,
        *,
        method: str | None = None,
        hookpoint: str | None = None,
        sort: str | None = None,
        descending: bool = False,
    ) -> pl.DataFrame:
        """Registered artifacts as a Polars frame (columns: FRAME_COLUMNS), oldest first.

        `kind`: one of model, corpus, activation_cache, dictionary, evaluation, labeling, interactions.
        `where`: a Polars expression or a SQL condition on the columns, e.g. `"fvu < 0.3 AND k >= 8"`.
        `method`, `hookpoint`: keep only rows with this method or hookpoint.
        `sort`, `descending`: order by this column instead (nulls last).
        The same frame `featureatlas catalog list` prints (`featureatlas.tasks.tracking.catalog_view`).
        """
        from featureatlas.tasks.tracking.catalog_view import list_artifacts

        return list_artifacts(
            self.sql, kind, where, method=method, hookpoint=hookpoint, sort=sort, descending=descending
        )

    def row(self, artifact_id: str) -> tuple[str, Any]:
        """(kind, SQL row) of an artifact; ValueError names the fix when the id is unknown."""
        found = self.sql.get(artifact_id)
        if found is None:
            raise ValueError(
                f"no artifact {artifact_id!r} in the catalog at {self.sql.url}; "
                "`featureatlas.catalog().list()` (or `featureatlas catalog list`) shows the ids"
            )
        return found

    def get(self, artifact_id: str) -> ArtifactRef:
        """The typed reference of an artifact (DictionaryRef, EvalReport, LabelingRef, ...), as registered."""
        from featureatlas.schemas import artifacts as a

        classes = {
            "model": a.ModelRef,
            "corpus": a.CorpusRef,
            "activation_cache": a.ActivationCacheRef,
            "dictionary": a.DictionaryRef,
            "evaluation": a.EvalReport,
            "labeling": a.LabelingRef,
            "interactions": a.InteractionScoresRef,
        }
        kind, row = self.row(artifact_id)
        return classes[kind].model_validate(row.ref)

    def resolve(self, artifact_id: str, kind: str) -> ArtifactRef:
        """The artifact of `kind` that `artifact_id` names or leads to, newest first.

        A dictionary id leads to its newest evaluation or labeling and to its cache; an evaluation or
        labeling id leads to its dictionary (and that one's cache).
        """
        found_kind, row = self.row(artifact_id)
        if found_kind == kind:
            return self.get(artifact_id)
        ref = row.ref
        if kind == "dictionary" and "dictionary_id" in ref and ref["dictionary_id"]:
            return self.get(ref["dictionary_id"])
        if kind == "activation_cache":
            if found_kind == "dictionary":
                return self.get(ref["cache_id"])
            if ref.get("dictionary_id"):
                return self.resolve(ref["dictionary_id"], kind)
        if kind in ("evaluation", "labeling") and found_kind in ("dictionary", "evaluation", "labeling"):
            dictionary_id = artifact_id if found_kind == "dictionary" else ref["dictionary_id"]
            made = [r for _, r in self.sql.list(kind) if r.ref.get("dictionary_id") == dictionary_id]
            if made:
                return self.get(max(made, key=lambda r: r.created_at).id)
            raise ValueError(
                f"dictionary {dictionary_id} has no {kind} in the catalog; run its pipeline with "
                f"`{'evaluate' if kind == 'evaluation' else 'label'}` enabled"
            )
        raise ValueError(f"{artifact_id} is a {found_kind}, which leads to no {kind}; give a {kind} id")

    def lineage(self, artifact_id: str) -> Lineage:
        """Ancestors and descendants of an artifact, as nested dicts of ids, with every node's folder."""
        self.row(artifact_id)

        def walk(node: str, step) -> dict:
            return {n: walk(n, step) for n in step(node)}

        ancestors = walk(artifact_id, self.sql.parents)
        descendants = walk(artifact_id, self.sql.children)
        out = Lineage(artifact_id, ancestors, descendants)
        rows = {r.id: r.uri for _, r in self.sql.list()}
        out.paths.update({i: rows[i] for i in out.ids() | {artifact_id} if i in rows})
        return out

    def path(self, artifact_id: str) -> Path:
        """The folder holding an artifact's files."""
        return Path(self.row(artifact_id)[1].uri)


def catalog(home: str | Path | None = None) -> CatalogView:
    """The catalog of a featureatlas home (default: FEATUREATLAS_HOME, else ./.featureatlas).

    A catalog URL in FEATUREATLAS_CATALOG_URL (or the profile) takes precedence over the home's SQLite file.
    """
    from featureatlas.schemas.settings import Settings
    from featureatlas.tasks.tracking.catalog import open_catalog

    settings = Settings(home=Path(home)) if home is not None else Settings()
    return CatalogView(open_catalog(settings.catalog))
