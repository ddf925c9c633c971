"""episodic_logs, workflow_executions, dead_letters

Revision ID: 0001
Revises:
Create Date: 2026-11-23 07:08:45.325737
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dead_letters",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("job_id", sa.Text(), nullable=False),
        sa.Column("task", sa.Text(), nullable=False),
        sa.Column("queue", sa.Text(), nullable=True),
        sa.Column("payload", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="1", nullable=False),
        sa.Column(
            "failed_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.Column("resubmitted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("resubmitted_job_id", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dead_letters")),
        sa.UniqueConstraint("job_id", name=op.f("uq_dead_letters_job_id")),
    )
    op.create_index(
        "ix_dead_letters_task_failed", "dead_letters", ["task", "failed_at"], unique=False
    )
    op.create_table(
        "episodic_logs",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("episode_id", sa.Text(), nullable=False),
        sa.Column(
            "timestamp", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.Column("user_id", sa.Text(), nullable=True),
        sa.Column("session_id", sa.Text(), nullable=True),
        sa.Column("model_type", sa.Text(), nullable=False),
        sa.Column("prompt", sa.Text(), server_default="", nullable=False),
        sa.Column("response", sa.Text(), server_default="", nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), server_default="0", nullable=False),
        sa.Column("completion_tokens", sa.Integer(), server_default="0", nullable=False),
        sa.Column("total_tokens", sa.Integer(), server_default="0", nullable=False),
        sa.Column(
            "tokens_estimated", sa.Boolean(), server_default=sa.text("false"), nullable=False
        ),
        sa.Column("latency_ms", sa.Float(), nullable=True),
        sa.Column("status", sa.Text(), server_default="success", nullable=False),
        sa.Column("job_id", sa.Text(), nullable=True),
        sa.Column(
            "metadata",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "search",
            postgresql.TSVECTOR(),
            sa.Computed(
                "to_tsvector('simple', coalesce(prompt, '') || ' ' || coalesce(response, ''))",
                persisted=True,
            ),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_episodic_logs")),
        sa.UniqueConstraint("episode_id", name=op.f("uq_episodic_logs_episode_id")),
    )
    op.create_index(
        "ix_episodic_logs_search", "episodic_logs", ["search"], unique=False, postgresql_using="gin"
    )
    op.create_index(
        "ix_episodic_logs_session_time", "episodic_logs", ["session_id", "timestamp"], unique=False
    )
    op.create_index("ix_episodic_logs_timestamp", "episodic_logs", ["timestamp"], unique=False)
    op.create_index(
        "ix_episodic_logs_user_time", "episodic_logs", ["user_id", "timestamp"], unique=False
    )
    op.create_table(
        "workflow_executions",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("job_id", sa.Text(), nullable=False),
        sa.Column("workflow", sa.Text(), nullable=False),
        sa.Column("mode", sa.Text(), nullable=False),
        sa.Column("n8n_execution_id", sa.Text(), nullable=True),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column(
            "input",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("output", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("error_node", sa.Text(), nullable=True),
        sa.Column("triggered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("deadline_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_workflow_executions")),
        sa.UniqueConstraint("job_id", name=op.f("uq_workflow_executions_job_id")),
    )
    op.create_index(
        "ix_workflow_executions_status", "workflow_executions", ["status"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_workflow_executions_status", table_name="workflow_executions")
    op.drop_table("workflow_executions")
    op.drop_index("ix_episodic_logs_user_time", table_name="episodic_logs")
    op.drop_index("ix_episodic_logs_timestamp", table_name="episodic_logs")
    op.drop_index("ix_episodic_logs_session_time", table_name="episodic_logs")
    op.drop_index("ix_episodic_logs_search", table_name="episodic_logs", postgresql_using="gin")
    op.drop_table("episodic_logs")
    op.drop_index("ix_dead_letters_task_failed", table_name="dead_letters")
    op.drop_table("dead_letters")
