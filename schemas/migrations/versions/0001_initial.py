"""Initial catalog: artifact tables per kind and lineage edges.

Revision ID: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _artifact_columns() -> list[sa.Column]:
    return [
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("fingerprint", sa.String(64), nullable=False, unique=True, index=True),
        sa.Column("uri", sa.Text, nullable=False),
        sa.Column("mlflow_run_id", sa.String(64), nullable=True),
        sa.Column("config", sa.JSON, nullable=False),
        sa.Column("ref", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    ]


def upgrade() -> None:
    op.create_table(
        "models",
        *_artifact_columns(),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("architecture", sa.String(128), nullable=False),
        sa.Column("n_layers", sa.Integer, nullable=False),
        sa.Column("d_model", sa.Integer, nullable=False),
    )
    op.create_table(
        "corpora",
        *_artifact_columns(),
        sa.Column("n_documents", sa.Integer, nullable=False),
        sa.Column("n_chars", sa.Integer, nullable=False),
    )
    op.create_table(
        "activation_caches",
        *_artifact_columns(),
        sa.Column("model_id", sa.String(64), sa.ForeignKey("models.id"), nullable=False),
        sa.Column("corpus_id", sa.String(64), sa.ForeignKey("corpora.id"), nullable=False),
        sa.Column("hookpoints", sa.JSON, nullable=False),
        sa.Column("n_tokens", sa.Integer, nullable=False),
    )
    op.create_table(
        "dictionaries",
        *_artifact_columns(),
        sa.Column("cache_id", sa.String(64), sa.ForeignKey("activation_caches.id"), nullable=False),
        sa.Column("method", sa.String(64), nullable=False),
        sa.Column("hookpoint", sa.String(256), nullable=False),
        sa.Column("d_in", sa.Integer, nullable=False),
        sa.Column("d_sae", sa.Integer, nullable=False),
    )
    op.create_table(
        "evaluations",
        *_artifact_columns(),
        sa.Column("dictionary_id", sa.String(64), sa.ForeignKey("dictionaries.id"), nullable=False),
        sa.Column("metrics", sa.JSON, nullable=False),
    )
    op.create_table(
        "labelings",
        *_artifact_columns(),
        sa.Column("dictionary_id", sa.String(64), sa.ForeignKey("dictionaries.id"), nullable=False),
        sa.Column("n_features", sa.Integer, nullable=False),
    )
    op.create_table(
        "lineage_edges",
        sa.Column("child_id", sa.String(64), primary_key=True),
        sa.Column("parent_id", sa.String(64), primary_key=True, index=True),
        sa.Column("child_kind", sa.String(32), nullable=False),
        sa.Column("parent_kind", sa.String(32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    for table in (
        "lineage_edges",
        "labelings",
        "evaluations",
        "dictionaries",
        "activation_caches",
        "corpora",
        "models",
    ):
        op.drop_table(table)
