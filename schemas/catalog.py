"""The SQL metadata catalog: one table per artifact kind, and the lineage edges between artifacts.

Every artifact row holds its content fingerprint, the MLflow run that made it, where its files live, the
config it was made with, and the full artifact reference as JSON (so a reused artifact is handed downstream
exactly as it was first registered). The schema is managed by Alembic (`schemas/migrations`): change a
table here and add a revision there.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import JSON, DateTime, ForeignKey, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def _now() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class ArtifactRow:
    """Columns every artifact table shares."""

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    uri: Mapped[str] = mapped_column(Text)
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    config: Mapped[dict] = mapped_column(JSON)
    ref: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class ModelRow(ArtifactRow, Base):
    __tablename__ = "models"
    source: Mapped[str] = mapped_column(Text)
    architecture: Mapped[str] = mapped_column(String(128))
    n_layers: Mapped[int] = mapped_column(Integer)
    d_model: Mapped[int] = mapped_column(Integer)


class CorpusRow(ArtifactRow, Base):
    __tablename__ = "corpora"
    n_documents: Mapped[int] = mapped_column(Integer)
    n_chars: Mapped[int] = mapped_column(Integer)


class ActivationCacheRow(ArtifactRow, Base):
    __tablename__ = "activation_caches"
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"))
    corpus_id: Mapped[str] = mapped_column(ForeignKey("corpora.id"))
    hookpoints: Mapped[list] = mapped_column(JSON)
    n_tokens: Mapped[int] = mapped_column(Integer)


class DictionaryRow(ArtifactRow, Base):
    __tablename__ = "dictionaries"
    cache_id: Mapped[str] = mapped_column(ForeignKey("activation_caches.id"))
    method: Mapped[str] = mapped_column(String(64))
    hookpoint: Mapped[str] = mapped_column(String(256))
    d_in: Mapped[int] = mapped_column(Integer)
    d_sae: Mapped[int] = mapped_column(Integer)


class EvaluationRow(ArtifactRow, Base):
    __tablename__ = "evaluations"
    dictionary_id: Mapped[str] = mapped_column(ForeignKey("dictionaries.id"))
    metrics: Mapped[dict] = mapped_column(JSON)


class LabelingRow(ArtifactRow, Base):
    __tablename__ = "labelings"
    dictionary_id: Mapped[str] = mapped_column(ForeignKey("dictionaries.id"))
    n_features: Mapped[int] = mapped_column(Integer)


class InteractionsRow(ArtifactRow, Base):
    __tablename__ = "interactions"
    source: Mapped[str] = mapped_column(Text)
    reference: Mapped[str] = mapped_column(String(64))
    n_features: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict] = mapped_column(JSON)


class LineageEdge(Base):
    """`child` was derived from `parent`."""

    __tablename__ = "lineage_edges"
    child_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    parent_id: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)
    child_kind: Mapped[str] = mapped_column(String(32))
    parent_kind: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


ROWS: dict[str, type[ArtifactRow]] = {
    "model": ModelRow,
    "corpus": CorpusRow,
    "activation_cache": ActivationCacheRow,
    "dictionary": DictionaryRow,
    "evaluation": EvaluationRow,
    "labeling": LabelingRow,
    "interactions": InteractionsRow,
}
ID_PREFIX = {
    "model": "model",
    "corpus": "corpus",
    "activation_cache": "cache",
    "dictionary": "dict",
    "evaluation": "eval",
    "labeling": "labels",
    "interactions": "fis",
}
