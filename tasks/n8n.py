"""``n8n.execute``: run an n8n workflow once and follow it to its end (``workers.n8n.jobs``)."""

from __future__ import annotations

from typing import Any

from conveyor.schemas.n8n import N8nExecutePayload
from workers.n8n import jobs
from workers.runtime.job import JobContext, job


@job("n8n.execute", family="n8n")
def execute(ctx: JobContext, payload: N8nExecutePayload) -> dict[str, Any]:
    """Run an n8n workflow through its webhook (never twice) and report how it ended."""
    return jobs.execute(ctx, payload)
