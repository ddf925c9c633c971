"""``ai.*``: completion, chat, code and analysis jobs.

Each builds its chat messages (``workers.ai.prompts``), runs one streamed generation
(``workers.ai.generation``: provider, circuit, fallbacks, rate limit, coalesced progress), shapes
the answer, and records the interaction as an episode.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from typing import Any

from conveyor.schemas.ai import AnalyzePayload, ChatPayload, CodePayload, GeneratePayload
from workers.ai.generation import CancelWatch, Generation, Generator
from workers.ai.prompts import AnswerDoesNotFit, extract_code_blocks, messages_for, parse_analysis
from workers.ai.providers import default_provider_name, providers_from_env
from workers.app import app
from workers.episodes.outbox import log_episode
from workers.runtime import connections
from workers.runtime.job import JobContext, job
from workers.store.episodes import recent_episodes

#: Read when the worker loads its tasks, so a malformed provider setting stops it at start.
PROVIDERS = providers_from_env(os.environ)
DEFAULT_PROVIDER = default_provider_name(PROVIDERS)


@job("ai.generate", family="ai")
def generate(ctx: JobContext, payload: GeneratePayload) -> dict[str, Any]:
    """A completion for one prompt."""
    return run(ctx, "ai.generate", payload)


@job("ai.chat", family="ai")
def chat(ctx: JobContext, payload: ChatPayload) -> dict[str, Any]:
    """The next assistant message of a conversation."""
    return run(ctx, "ai.chat", payload)


@job("ai.code", family="ai")
def code(ctx: JobContext, payload: CodePayload) -> dict[str, Any]:
    """Code written or edited from an instruction; the result carries the code blocks."""
    return run(ctx, "ai.code", payload, shape=_code_result)


@job("ai.analyze", family="ai")
def analyze(ctx: JobContext, payload: AnalyzePayload) -> dict[str, Any]:
    """Summary, sentiment, classification or extraction, as validated JSON."""
    return run(ctx, "ai.analyze", payload, shape=functools.partial(parse_analysis, payload))


@functools.cache
def generator() -> Generator:
    conf = app.conf
    return Generator(
        PROVIDERS,
        DEFAULT_PROVIDER,
        connections.redis_client(),
        breaker_fail_max=conf.conveyor_breaker_fail_max,
        breaker_reset_s=conf.conveyor_breaker_reset_s,
        rate_wait_s=conf.conveyor_rate_wait_s,
        progress_interval_s=conf.conveyor_ai_progress_interval_s,
    )


def run(
    ctx: JobContext, task: str, payload: Any, shape: Callable[[str], dict[str, Any]] | None = None
) -> dict[str, Any]:
    conf = app.conf
    messages = messages_for(task, payload, history=_recall(payload))
    # Our own deadline: the threads pool cannot enforce Celery's time limits.
    deadline = time.monotonic() + conf.conveyor_pools["ai"]["soft_time_limit"]
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


def _recall(payload: Any) -> list[dict[str, str]]:
    """The session's last ``history`` episodes, as the turns of a conversation, oldest first."""
    if not payload.history:
        return []
    episodes = recent_episodes(
        connections.engine(),
        payload.session_id,
        payload.history,
        app.conf.conveyor_ai_history_tokens,
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
    return CancelWatch(connections.redis_client, app.conf.conveyor_cancel_check_s)
