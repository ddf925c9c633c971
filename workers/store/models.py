"""The tables of DESIGN.md. Alembic migrations (``migrations/versions``) create them; these
models are what the code reads and writes through."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Computed,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    Text,
    false,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, TSVECTOR
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "pk": "pk_%(table_name)s",
    }
)


class Base(DeclarativeBase):
    metadata = metadata


class EpisodicLog(Base):
    """One AI interaction (or any service's own episode); one row per episode id."""

    __tablename__ = "episodic_logs"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    #: Client-given, or derived from the job: a redelivered record is a no-op on this key.
    episode_id: Mapped[str] = mapped_column(Text, unique=True)
    timestamp: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    user_id: Mapped[str | None] = mapped_column(Text)
    session_id: Mapped[str | None] = mapped_column(Text)
    model_type: Mapped[str] = mapped_column(Text)
    prompt: Mapped[str] = mapped_column(Text, default="", server_default="")
    response: Mapped[str] = mapped_column(Text, default="", server_default="")
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    total_tokens: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    #: True when the tokens were counted by us, not reported by the provider.
    tokens_estimated: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    latency_ms: Mapped[float | None] = mapped_column(Float)
    status: Mapped[str] = mapped_column(Text, default="success", server_default="success")
    job_id: Mapped[str | None] = mapped_column(Text)
    #: Whose episode (the gateway's tenant); None: a service's own, or from before tenants.
    tenant: Mapped[str | None] = mapped_column(Text)
    metadata_: Mapped[dict[str, Any]] = mapped_column(
        "metadata", JSONB, default=dict, server_default=text("'{}'::jsonb")
    )
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    search: Mapped[Any] = mapped_column(
        TSVECTOR,
        Computed(
            "to_tsvector('simple', coalesce(prompt, '') || ' ' || coalesce(response, ''))",
            persisted=True,
        ),
    )

    __table_args__ = (
        Index("ix_episodic_logs_user_time", "user_id", "timestamp"),
        Index("ix_episodic_logs_session_time", "session_id", "timestamp"),
        Index("ix_episodic_logs_timestamp", "timestamp"),
        Index("ix_episodic_logs_search", "search", postgresql_using="gin"),
        Index("ix_episodic_logs_tenant_time", "tenant", "timestamp"),
    )


class WorkflowExecution(Base):
    """One n8n run, keyed by the job that triggered it so a redelivery never triggers twice."""

    __tablename__ = "workflow_executions"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    job_id: Mapped[str] = mapped_column(Text, unique=True)
    workflow: Mapped[str] = mapped_column(Text)
    mode: Mapped[str] = mapped_column(Text)
    n8n_execution_id: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text)
    input: Mapped[dict[str, Any]] = mapped_column(
        JSONB, default=dict, server_default=text("'{}'::jsonb")
    )
    output: Mapped[Any | None] = mapped_column(JSONB)
    error: Mapped[str | None] = mapped_column(Text)
    error_node: Mapped[str | None] = mapped_column(Text)
    triggered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    deadline_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    tenant: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )

    __table_args__ = (Index("ix_workflow_executions_status", "status"),)


class DeadLetter(Base):
    """A job that failed for good: enough to inspect it and submit it again."""

    __tablename__ = "dead_letters"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    job_id: Mapped[str] = mapped_column(Text, unique=True)
    task: Mapped[str] = mapped_column(Text)
    queue: Mapped[str | None] = mapped_column(Text)
    payload: Mapped[Any] = mapped_column(JSONB)
    #: exhausted (retries), permanent (not worth retrying), poison (bad payload), delivery_limit
    reason: Mapped[str] = mapped_column(Text)
    error: Mapped[str] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    failed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    resubmitted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    resubmitted_job_id: Mapped[str | None] = mapped_column(Text)
    #: Whose job it was: a resubmission goes out for the same tenant.
    tenant: Mapped[str | None] = mapped_column(Text)
    #: The request and trace the job came from (the gateway's ``X-Request-ID``, W3C traceparent).
    request_id: Mapped[str | None] = mapped_column(Text)
    traceparent: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        Index("ix_dead_letters_task_failed", "task", "failed_at"),
        Index("ix_dead_letters_tenant_failed", "tenant", "failed_at"),
    )
