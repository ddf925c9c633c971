"""Shared rate limits against the session's real Redis, raced by real OS processes.

Budgets refill evenly over a minute, so tests read them with a tolerance of the few tokens
that trickle back while a test runs.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from typing import Any

import pytest
import redis

from conveyor import keys
from workers.failures import Deferred, Permanent
from workers.resilience.ratelimit import RateLimited, SharedRateLimit

SPAWN = mp.get_context("spawn")
PROCESSES = 5


def _drain(redis_url: str, name: str, rpm: Any, tpm: Any, tokens: int, start: Any, results: Any):
    """Takes slots without waiting until refused; reports how many it got."""
    limiter = SharedRateLimit(redis.Redis.from_url(redis_url), name, rpm=rpm, tpm=tpm)
    start.wait(timeout=30)
    admitted = 0
    while True:
        try:
            limiter.acquire(tokens, timeout_s=0)
        except RateLimited as exc:
            results.put((admitted, exc.delay_s))
            return
        admitted += 1


def _race(redis_url: str, name: str, *, rpm: Any, tpm: Any, tokens: int) -> list[Any]:
    start = SPAWN.Barrier(PROCESSES)
    results = SPAWN.Queue()
    processes = [
        SPAWN.Process(target=_drain, args=(redis_url, name, rpm, tpm, tokens, start, results))
        for _ in range(PROCESSES)
    ]
    for process in processes:
        process.start()
    try:
        return [results.get(timeout=30) for _ in range(PROCESSES)]
    finally:
        for process in processes:
            process.join(timeout=30)
            assert process.exitcode == 0


def test_admits_exactly_rpm_across_processes(redis_url, redis_client, unique):
    # 40 rpm: one request back every 1.5 s, far longer than the race lasts.
    outcomes = _race(redis_url, f"llm-{unique}", rpm=40, tpm=None, tokens=0)
    assert sum(admitted for admitted, _ in outcomes) == 40, outcomes
    assert all(0 < delay <= 1.5 for _, delay in outcomes), outcomes
    assert redis_client.pttl(keys.ratelimit(f"llm-{unique}")) > 55_000


def test_admits_exactly_tpm_across_processes(redis_url, unique):
    # 1,000 tpm in reservations of 100: ten calls; 100 tokens come back every 6 s.
    outcomes = _race(redis_url, f"llm-{unique}", rpm=None, tpm=1000, tokens=100)
    assert sum(admitted for admitted, _ in outcomes) == 10, outcomes
    assert all(0 < delay <= 6 for _, delay in outcomes), outcomes


def test_reserve_and_settle_arithmetic(redis_client, unique):
    limiter = SharedRateLimit(redis_client, f"llm-{unique}", rpm=60, tpm=600)  # 10 tokens/s
    first = limiter.acquire(tokens=100)
    second = limiter.acquire(tokens=400)
    assert limiter.budget().tokens == pytest.approx(100, abs=2)
    assert limiter.budget().requests == pytest.approx(58, abs=0.2)

    first.settle(40)  # refund 60
    assert limiter.budget().tokens == pytest.approx(160, abs=2)
    second.settle(450)  # charge 50 more
    assert limiter.budget().tokens == pytest.approx(110, abs=2)
    second.settle(400)  # settling again sets the total: refund those 50
    assert second.tokens == 400
    assert limiter.budget().tokens == pytest.approx(160, abs=2)
    assert limiter.budget().requests == pytest.approx(58, abs=0.2), (
        "settling never refunds a request"
    )

    first.settle(640)  # the call used far more than its estimate: the budget goes into debt
    assert limiter.budget().tokens == pytest.approx(-440, abs=2)
    with pytest.raises(RateLimited) as refused:
        limiter.acquire(tokens=10)
    assert refused.value.delay_s == pytest.approx(45, abs=0.3)  # (440 + 10) tokens at 10/s


def test_a_refund_never_fills_the_budget_beyond_full(redis_client, unique):
    limiter = SharedRateLimit(redis_client, f"llm-{unique}", tpm=600)
    reservation = limiter.acquire(tokens=100)
    time.sleep(0.1)  # 1 token trickles back meanwhile
    reservation.settle(0)
    assert limiter.budget().tokens == pytest.approx(600, abs=0.01)
    for _ in range(6):
        limiter.acquire(tokens=100)
    with pytest.raises(RateLimited):
        limiter.acquire(tokens=100)


def test_a_call_takes_its_request_and_its_tokens_or_neither(redis_client, unique):
    limiter = SharedRateLimit(redis_client, f"llm-{unique}", rpm=10, tpm=100)
    limiter.acquire(tokens=95)
    with pytest.raises(RateLimited) as refused:
        limiter.acquire(tokens=50)
    assert refused.value.delay_s == pytest.approx(27, abs=0.2)  # 45 more tokens at 100/60 per s
    assert limiter.budget().requests == pytest.approx(9, abs=0.01), "refused calls take nothing"
    limiter.acquire(tokens=5)
    assert limiter.budget().requests == pytest.approx(8, abs=0.01)


def test_waits_within_the_callers_budget_and_defers_beyond_it(redis_client, unique):
    limiter = SharedRateLimit(redis_client, f"llm-{unique}", rpm=60)  # one request back per s
    for _ in range(60):
        limiter.acquire()

    with pytest.raises(RateLimited) as refused:
        limiter.acquire(timeout_s=0.2)
    assert isinstance(refused.value, Deferred)
    assert 0.2 < refused.value.delay_s <= 1.0

    started = time.monotonic()
    reservation = limiter.acquire(timeout_s=2)
    waited = time.monotonic() - started
    assert 0.2 < reservation.delay_s <= 1.0, "the refused call must not have taken the slot"
    assert waited >= reservation.delay_s - 0.01

    # A reservation is a place in line: the next caller queues behind it.
    queued = limiter.reserve(max_wait_s=5)
    assert queued.delay_s == pytest.approx(1.0, abs=0.1)


def test_unlimited_when_none(redis_client, unique):
    unlimited = SharedRateLimit(redis_client, f"llm-{unique}")
    for _ in range(1000):
        unlimited.acquire(tokens=10**9).settle(10**9)
    assert not redis_client.exists(keys.ratelimit(f"llm-{unique}"))

    requests_only = SharedRateLimit(redis_client, f"rpm-{unique}", rpm=5)
    for _ in range(5):
        requests_only.acquire(tokens=10**9)
    with pytest.raises(RateLimited):
        requests_only.acquire()
    assert requests_only.budget().tokens is None

    tokens_only = SharedRateLimit(redis_client, f"tpm-{unique}", tpm=50)
    for _ in range(50):
        tokens_only.acquire(tokens=1)
    with pytest.raises(RateLimited):
        tokens_only.acquire(tokens=1)
    assert tokens_only.budget().requests is None


def test_an_estimate_beyond_the_whole_budget_is_permanent(redis_client, unique):
    limiter = SharedRateLimit(redis_client, f"llm-{unique}", tpm=1000)
    with pytest.raises(Permanent):
        limiter.acquire(tokens=1001)
    assert limiter.budget().tokens == pytest.approx(1000)
