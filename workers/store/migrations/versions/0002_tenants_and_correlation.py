"""tenant on episodic_logs, dead_letters, workflow_executions; request_id, traceparent on
dead_letters

The gateway serves several tenants from one database: each row says whose it is (NULL: written
before tenants, or by a service submitting without one), and a dead letter keeps the request
and trace it came from. The two indexes serve a tenant's newest-first listings.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 09:00:00.000000
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_COLUMNS = [
    ("episodic_logs", "tenant"),
    ("dead_letters", "tenant"),
    ("dead_letters", "request_id"),
    ("dead_letters", "traceparent"),
    ("workflow_executions", "tenant"),
]
#: name -> (table, columns). Built CONCURRENTLY: a plain CREATE INDEX would hold every episode
#: write for as long as the build of a large ``episodic_logs`` takes.
_INDEXES = {
    "ix_episodic_logs_tenant_time": ("episodic_logs", ["tenant", "timestamp"]),
    "ix_dead_letters_tenant_failed": ("dead_letters", ["tenant", "failed_at"]),
}


def upgrade() -> None:
    # Nullable, no default: a change of the catalogue only, however large the table. IF NOT
    # EXISTS: a run whose index build failed (below, outside the transaction) committed these
    # already, and must be able to run again. (Alembic's own if_not_exists needs 1.16.)
    for table, column in _COLUMNS:
        op.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} TEXT")
    with op.get_context().autocommit_block():
        for name, (table, columns) in _INDEXES.items():
            # A failed concurrent build leaves an INVALID index of this name behind: drop it.
            op.drop_index(name, table_name=table, if_exists=True, postgresql_concurrently=True)
            op.create_index(name, table, columns, unique=False, postgresql_concurrently=True)


def downgrade() -> None:
    for name, (table, _) in _INDEXES.items():
        op.drop_index(name, table_name=table)
    for table, column in reversed(_COLUMNS):
        op.drop_column(table, column)
