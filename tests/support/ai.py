"""What the ai-job tests share: a worker environment aimed at a fake provider, event reading."""

from __future__ import annotations

import json

import pytest

from conveyor import keys
from tests.fakes.llm_server import FakeLLMServer

#: The API key the fake provider is called with; it must never appear in a worker's log.
SECRET = "sk-test-do-not-log"


def ai_env(server: FakeLLMServer, **extra: str) -> dict[str, str]:
    return {
        "LLM_BASE_URL": server.openai_url,
        "LLM_API_KEY": SECRET,
        "LLM_MODEL": "fake-model",
        "CONVEYOR_RETRY_BASE": "0.05",
        "CONVEYOR_MAX_RETRIES": "2",
        "CONVEYOR_AI_CONCURRENCY": "4",
        **extra,
    }


def events_of(redis_client, job_id: str) -> list[dict]:
    return [json.loads(f[b"event"]) for _, f in redis_client.xrange(keys.events_stream(job_id))]


def reset_upstream_state(redis_client) -> None:
    """Breakers and rate limits live in Redis: a test starts with closed, full ones."""
    for pattern in ("conveyor:breaker:*", "conveyor:ratelimit:*"):
        for key in redis_client.scan_iter(pattern):
            redis_client.delete(key)


@pytest.fixture
def fresh_upstream_state(redis_client):
    """Closed circuits, full budgets, and empty ai/episodes queues before and after a test."""
    from tests.support.queues import purge

    reset_upstream_state(redis_client)
    purge(redis_client, "ai", "episodes")
    yield
    purge(redis_client, "ai", "episodes")
