"""The ``ai.*`` jobs as plain code: build the messages (``prompts``), run one streamed
generation (``generation``: provider, circuit, fallbacks, rate limit, coalesced progress),
shape the answer, and record the interaction as an episode. ``tasks/ai.py`` registers them.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

from conveyor.names import AI
from conveyor.schemas.ai import AnalyzePayload, ChatPayload, CodePayload, GeneratePayload
from workers import settings
from workers.ai.generation import CancelWatch, Generation, Generator
from workers.ai.prompts import AnswerDoesNotFit, extract_code_blocks, messages_for, parse_analysis
from workers.ai.providers import default_provider_name
from workers.ai.providers.base import estimate_tokens
from workers.episodes.outbox import log_episode
from workers.runtime import connections
from workers.runtime.context import JobContext
from workers.store.episodes import recent_episodes


def generate(ctx: JobContext, payload: GeneratePayload) -> dict[str, Any]:
    """A completion for one prompt."""
    return run(ctx, "ai.generate", payload)


def chat(ctx: JobContext, payload: ChatPayload) -> dict[str, Any]:
    """The next assistant message of a conversation."""
    return run(ctx, "ai.chat", payload)


def code(ctx: JobContext, payload: CodePayload) -> dict[str, Any]:
    """Code written or edited from an instruction; the result carries the code blocks."""
    return run(ctx, "ai.code", payload, shape=_code_result)


def analyze(ctx: JobContext, payload: AnalyzePayload) -> dict[str, Any]:
    """Summary, sentiment, classification or extraction, as validated JSON."""
    return run(ctx, "ai.analyze", payload, shape=functools.partial(parse_analysis, payload))


@functools.cache
def generator() -> Generator:
    """The process's one generator over the configured providers."""
    ai = settings.ai()
    return Generator(
        ai.providers,
        default_provider_name(ai.providers),
        connections.redis_client(),
        breaker_fail_max=ai.breaker_fail_max,
        breaker_reset_s=ai.breaker_reset_s,
        rate_wait_s=ai.rate_wait_s,
        progress_interval_s=ai.progress_interval_s,
    )


def run(
    ctx: JobContext, task: str, payload: Any, shape: Callable[[str], dict[str, Any]] | None = None
) -> dict[str, Any]:
    """One generation for ``task``: prompt, stream, shape the answer, record the episode."""
    messages = messages_for(task, payload, history=_recall(payload, ctx.origin.tenant))
    # Our own deadline: the threads pool cannot enforce Celery's time limits.
    deadline = time.monotonic() + settings.pool(AI).soft_time_limit_s
    with cancel_watch().watching(ctx.job_id) as cancelled:
        result = generator().run(
            messages,
            provider=payload.provider,
            model=payload.model,
            temperature=payload.temperature,
            max_tokens=payload.max_tokens,
            stop=payload.stop,
            deadline=deadline,
            should_stop=cancelled,
            on_progress=_progress_sender(ctx),
        )
    data = _result_data(result)
    try:
        if shape is not None:
            data.update(shape(result.completion.content))
    except AnswerDoesNotFit:
        _record(ctx, task, payload, messages, result, status="invalid_answer")
        raise
    _record(ctx, task, payload, messages, result, status="success")
    return data


def _recall(payload: Any, tenant: str | None) -> list[dict[str, str]]:
    """The session's last ``history`` episodes of the job's tenant, as the turns of a
    conversation, oldest first."""
    if not payload.history:
        return []
    episodes = recent_episodes(
        connections.engine(),
        payload.session_id,
        payload.history,
        settings.ai().history_tokens,
        count_tokens=estimate_tokens,
        tenant=tenant,
    )
    turns: list[dict[str, str]] = []
    for episode in episodes:
        turns += [
            {"role": "user", "content": episode["prompt"]},
            {"role": "assistant", "content": episode["response"]},
        ]
    return turns


def _result_data(result: Generation) -> dict[str, Any]:
    c = result.completion
    return {
        "content": c.content,
        "provider": result.provider,
        "model": c.model,
        "finish_reason": c.finish_reason,
        "tokens": {
            "prompt": c.prompt_tokens,
            "completion": c.completion_tokens,
            "total": c.total_tokens,
            "estimated": c.tokens_estimated,
        },
        "latency_ms": round(c.latency_s * 1000, 1),
        "ttft_ms": None if c.ttft_s is None else round(c.ttft_s * 1000, 1),
    }


def _code_result(content: str) -> dict[str, Any]:
    blocks = extract_code_blocks(content)
    return {"code_blocks": blocks, "code": blocks[0]["code"] if blocks else content}


def _record(
    ctx: JobContext,
    task: str,
    payload: Any,
    messages: list[dict[str, str]],
    result: Generation,
    *,
    status: str,
) -> None:
    c = result.completion
    log_episode(
        ctx.job_id,
        together=True,
        tenant=ctx.origin.tenant,
        user_id=payload.user_id or "anonymous",
        session_id=payload.session_id,
        model_type=f"{result.provider}:{c.model}",
        prompt=messages[-1]["content"],
        response=c.content,
        tokens={
            "prompt": c.prompt_tokens,
            "completion": c.completion_tokens,
            "total": c.total_tokens,
            "estimated": c.tokens_estimated,
        },
        latency_ms=round(c.latency_s * 1000, 1),
        status=status,
        metadata={**payload.metadata, "task": task, "finish_reason": c.finish_reason},
    )


def _progress_sender(ctx: JobContext) -> Callable[[dict[str, Any]], None]:
    """``on_progress`` for a stream: the job's ``ai_generation_progress`` events go out in the
    process's next event batch, not one round trip each."""
    return functools.partial(ctx.emit_soon, "progress")


@functools.cache
def cancel_watch() -> CancelWatch:
    return CancelWatch(connections.redis_client, settings.ai().cancel_check_s)
