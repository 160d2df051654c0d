"""Interaction scores: one row per Rashomon-set scoring of a tabular model.

Revision ID: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "interactions",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("fingerprint", sa.String(64), nullable=False, unique=True, index=True),
        sa.Column("uri", sa.Text, nullable=False),
        sa.Column("mlflow_run_id", sa.String(64), nullable=True),
        sa.Column("config", sa.JSON, nullable=False),
        sa.Column("ref", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("reference", sa.String(64), nullable=False),
        sa.Column("n_features", sa.Integer, nullable=False),
        sa.Column("metrics", sa.JSON, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("interactions")
