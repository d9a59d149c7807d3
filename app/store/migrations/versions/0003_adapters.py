"""LoRA adapters uploaded by an admin (and, later, trained).

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "adapters",
        sa.Column("id", sa.String, primary_key=True),
        sa.Column("model", sa.String, nullable=False),
        sa.Column("name", sa.String, nullable=False),
        sa.Column("trigger_word", sa.String),
        sa.Column("digest", sa.String, nullable=False),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("owner", sa.String),
        sa.Column("source", sa.String, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_index("adapters_model", "adapters", ["model"])


def downgrade() -> None:
    op.drop_table("adapters")
