"""``ai.*``: completion, chat, code and analysis jobs (``workers.ai.jobs``)."""

from __future__ import annotations

from typing import Any

from conveyor.schemas.ai import AnalyzePayload, ChatPayload, CodePayload, GeneratePayload
from workers.ai import jobs
from workers.runtime.job import JobContext, job


@job("ai.generate", family="ai")
def generate(ctx: JobContext, payload: GeneratePayload) -> dict[str, Any]:
    """A completion for one prompt."""
    return jobs.generate(ctx, payload)


@job("ai.chat", family="ai")
def chat(ctx: JobContext, payload: ChatPayload) -> dict[str, Any]:
    """The next assistant message of a conversation."""
    return jobs.chat(ctx, payload)


@job("ai.code", family="ai")
def code(ctx: JobContext, payload: CodePayload) -> dict[str, Any]:
    """Code written or edited from an instruction; the result carries the code blocks."""
    return jobs.code(ctx, payload)


@job("ai.analyze", family="ai")
def analyze(ctx: JobContext, payload: AnalyzePayload) -> dict[str, Any]:
    """Summary, sentiment, classification or extraction, as validated JSON."""
    return jobs.analyze(ctx, payload)
