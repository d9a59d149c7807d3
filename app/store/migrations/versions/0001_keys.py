"""Keys, usage and the keys version counter.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A data dir from before the store moved onto Alembic already has these tables, made by the same DDL.
    if sa.inspect(op.get_bind()).has_table("keys"):
        return
    op.create_table(
        "keys",
        sa.Column("id", sa.String, primary_key=True),
        sa.Column("alias", sa.String, nullable=False),
        sa.Column("digest", sa.String, nullable=False, unique=True),
        sa.Column("prefix", sa.String, nullable=False),
        sa.Column("models", sa.Text, nullable=False),
        sa.Column("rpm", sa.Integer),
        sa.Column("max_concurrent", sa.Integer),
        sa.Column("image_quota", sa.Integer),
        sa.Column("quota_period", sa.String, nullable=False),
        sa.Column("expires_at", sa.Float),
        sa.Column("active", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("revoked_at", sa.Float),
    )
    op.create_table(
        "usage",
        sa.Column("principal", sa.String, primary_key=True),
        sa.Column("hour", sa.Integer, primary_key=True),
        sa.Column("requests", sa.Integer, nullable=False, server_default="0"),
        sa.Column("images", sa.Integer, nullable=False, server_default="0"),
        sa.Column("pixel_steps", sa.Integer, nullable=False, server_default="0"),
    )
    meta = op.create_table(
        "meta",
        sa.Column("name", sa.String, primary_key=True),
        sa.Column("value", sa.Integer, nullable=False),
    )
    op.bulk_insert(meta, [{"name": "keys_version", "value": 0}])


def downgrade() -> None:
    for table in ("meta", "usage", "keys"):
        op.drop_table(table)
