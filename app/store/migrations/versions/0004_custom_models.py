"""Custom models (seed 001): the models, their training images, their trainings and predictions.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "custom_models",
        sa.Column("id", sa.String, primary_key=True),
        sa.Column("owner", sa.String, nullable=False),
        sa.Column("display_name", sa.String, nullable=False),
        sa.Column("model_type", sa.String),
        sa.Column("base_model", sa.String, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("deleted_at", sa.Float),
    )
    op.create_index("custom_models_owner", "custom_models", ["owner", "created_at"])
    op.create_table(
        "training_images",
        sa.Column("id", sa.String, primary_key=True),
        sa.Column("model_id", sa.String, nullable=False),
        sa.Column("file", sa.String, nullable=False),
        sa.Column("format", sa.String, nullable=False),
        sa.Column("width", sa.Integer, nullable=False),
        sa.Column("height", sa.Integer, nullable=False),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("caption", sa.Text),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_index("training_images_model", "training_images", ["model_id", "created_at"])
    op.create_table(
        "trainings",
        sa.Column("id", sa.String, primary_key=True),
        sa.Column("model_id", sa.String, nullable=False),
        sa.Column("trigger_word", sa.String, nullable=False),
        sa.Column("strength", sa.Integer, nullable=False),
        sa.Column("speed", sa.String, nullable=False),
        sa.Column("plan", sa.Text, nullable=False),
        sa.Column("adapter_id", sa.String),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("deleted_at", sa.Float),
    )
    op.create_index("trainings_model", "trainings", ["model_id", "created_at"])
    op.create_table(
        "predictions",
        sa.Column("id", sa.String, primary_key=True),
        sa.Column("owner", sa.String, nullable=False),
        sa.Column("scale_configs", sa.Text, nullable=False),
        sa.Column("warnings", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("deleted_at", sa.Float),
    )


def downgrade() -> None:
    for table in ("predictions", "trainings", "training_images", "custom_models"):
        op.drop_table(table)
