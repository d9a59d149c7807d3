"""Jobs, their events, and the webhook outbox, secrets and disabled endpoints.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.String, primary_key=True),
        sa.Column("kind", sa.String, nullable=False),
        sa.Column("surface", sa.String, nullable=False),
        sa.Column("owner", sa.String, nullable=False),
        sa.Column("principal", sa.Text, nullable=False),
        sa.Column("model", sa.String, nullable=False),
        sa.Column("status", sa.String, nullable=False),
        sa.Column("request", sa.Text, nullable=False),
        sa.Column("inputs", sa.Text, nullable=False),
        sa.Column("n", sa.Integer, nullable=False),
        sa.Column("idempotency_key", sa.String),
        sa.Column("request_hash", sa.String),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("lease_owner", sa.String),
        sa.Column("lease_expires_at", sa.Float),
        sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default="0"),
        sa.Column("step", sa.Integer),
        sa.Column("total_steps", sa.Integer),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("started_at", sa.Float),
        sa.Column("completed_at", sa.Float),
        sa.Column("deadline_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.Column("error_code", sa.String),
        sa.Column("error_message", sa.Text),
        sa.Column("result", sa.Text),
        sa.Column("base_url", sa.String, nullable=False),
        sa.Column("webhook_url", sa.Text),
        sa.Column("webhook_events", sa.Text),
        sa.UniqueConstraint("owner", "idempotency_key", name="jobs_owner_idempotency_key"),
    )
    op.create_index("jobs_status_created", "jobs", ["status", "created_at"])
    op.create_index("jobs_owner_created", "jobs", ["owner", "created_at"])
    op.create_index("jobs_expires", "jobs", ["expires_at"])
    op.create_table(
        "job_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String, nullable=False),
        sa.Column("type", sa.String, nullable=False),
        sa.Column("data", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_index("job_events_job", "job_events", ["job_id", "id"])
    op.create_table(
        "webhook_outbox",
        sa.Column("id", sa.String, primary_key=True),
        sa.Column("job_id", sa.String, nullable=False),
        sa.Column("owner", sa.String, nullable=False),
        sa.Column("url", sa.Text, nullable=False),
        sa.Column("type", sa.String, nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("status", sa.String, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("next_attempt_at", sa.Float, nullable=False),
        sa.Column("lease_owner", sa.String),
        sa.Column("lease_expires_at", sa.Float),
        sa.Column("last_status", sa.Integer),
        sa.Column("last_error", sa.Text),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("delivered_at", sa.Float),
    )
    op.create_index("webhook_outbox_due", "webhook_outbox", ["status", "next_attempt_at"])
    op.create_table(
        "webhook_secrets",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("owner", sa.String, nullable=False),
        sa.Column("secret", sa.String, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("retired_at", sa.Float),
    )
    op.create_index("webhook_secrets_owner", "webhook_secrets", ["owner"])
    op.create_table(
        "webhook_endpoints",
        sa.Column("url", sa.Text, primary_key=True),
        sa.Column("disabled_at", sa.Float, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
    )


def downgrade() -> None:
    for table in ("webhook_endpoints", "webhook_secrets", "webhook_outbox", "job_events", "jobs"):
        op.drop_table(table)
