"""Shared circuit breakers against the session's real Redis, raced by real OS processes.

A breaker that is only *stored* in Redis is not thereby atomic (pybreaker#24, #26, #88): the
races below use several spawned processes, each with its own Redis connection.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Callable
from typing import Any

import pybreaker
import pytest
import redis

from conveyor import keys
from workers.failures import Deferred, Permanent
from workers.resilience.breakers import CircuitOpen, SharedBreaker

SPAWN = mp.get_context("spawn")


def _fail() -> None:
    raise ConnectionError("upstream down")


def _fail_n(breaker: SharedBreaker, n: int) -> None:
    for _ in range(n):
        with pytest.raises(ConnectionError):
            breaker.call(_fail)


def _raise(exc: BaseException) -> Callable[[], None]:
    def fn() -> None:
        raise exc

    return fn


def _wait_for_state(breaker: SharedBreaker, state: str, within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while breaker.state() != state:
        assert time.monotonic() < deadline, f"breaker never became {state}"
        time.sleep(0.02)


class _Transitions(pybreaker.CircuitBreakerListener):
    """Records the transitions this process made."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        self.seen.append((old_state.name, new_state.name))


# --- single process: the state machine ---------------------------------------------------------


def test_opens_after_exactly_fail_max_consecutive_failures(redis_client, unique):
    breaker = SharedBreaker(redis_client, f"llm-{unique}", fail_max=3, reset_timeout_s=30)
    _fail_n(breaker, 2)
    assert breaker.state() == "closed"
    assert breaker.snapshot().failures == 2

    _fail_n(breaker, 1)
    assert breaker.state() == "open"

    calls: list[int] = []
    with pytest.raises(CircuitOpen) as refused:
        breaker.call(calls.append, 1)
    assert calls == [], "an open circuit must not call the upstream"
    assert isinstance(refused.value, Deferred)
    assert 29 < refused.value.delay_s <= 30
    assert redis_client.pttl(keys.breaker(f"llm-{unique}")) > 30_000


def test_permanent_errors_never_count(redis_client, unique):
    breaker = SharedBreaker(redis_client, f"llm-{unique}", fail_max=2, reset_timeout_s=30)
    for _ in range(5):
        with pytest.raises(Permanent):
            breaker.call(_raise(Permanent("400 bad request")))
    assert breaker.state() == "closed"
    assert breaker.snapshot().failures == 0

    # A caller's 4xx means the upstream answered: like pybreaker, it resets the streak.
    _fail_n(breaker, 1)
    with pytest.raises(Permanent):
        breaker.call(_raise(Permanent("404")))
    _fail_n(breaker, 1)
    assert breaker.state() == "closed"


def test_excluded_predicate_is_honoured(redis_client, unique):
    breaker = SharedBreaker(
        redis_client,
        f"llm-{unique}",
        fail_max=1,
        reset_timeout_s=30,
        exclude=[lambda exc: "quota" in str(exc)],
    )
    with pytest.raises(RuntimeError):
        breaker.call(_raise(RuntimeError("insufficient_quota")))
    assert breaker.state() == "closed"
    with pytest.raises(RuntimeError):
        breaker.call(_raise(RuntimeError("502")))
    assert breaker.state() == "open"


def test_success_resets_the_count(redis_client, unique):
    breaker = SharedBreaker(redis_client, f"llm-{unique}", fail_max=3, reset_timeout_s=30)
    _fail_n(breaker, 2)
    assert breaker.call(lambda: "ok") == "ok"
    assert breaker.snapshot().failures == 0
    _fail_n(breaker, 2)
    assert breaker.state() == "closed"
    _fail_n(breaker, 1)
    assert breaker.state() == "open"


def test_deferred_inside_the_block_counts_for_nothing(redis_client, unique):
    """A rate limit deferring the call says nothing about the upstream: no reset, no count."""
    breaker = SharedBreaker(redis_client, f"llm-{unique}", fail_max=2, reset_timeout_s=30)
    _fail_n(breaker, 1)
    with pytest.raises(Deferred):
        breaker.call(_raise(Deferred("rate limited", delay_s=1)))
    assert breaker.snapshot().failures == 1
    _fail_n(breaker, 1)
    assert breaker.state() == "open"


def test_probe_success_closes(redis_client, unique):
    transitions = _Transitions()
    breaker = SharedBreaker(
        redis_client, f"llm-{unique}", fail_max=1, reset_timeout_s=0.3, listeners=[transitions]
    )
    _fail_n(breaker, 1)
    with pytest.raises(CircuitOpen):
        breaker.call(lambda: None)
    _wait_for_state(breaker, "half-open")

    assert breaker.call(lambda: "probe ok") == "probe ok"
    assert breaker.state() == "closed"
    assert breaker.snapshot().failures == 0
    assert transitions.seen == [("closed", "open"), ("open", "half-open"), ("half-open", "closed")]


def test_probe_failure_reopens_for_a_full_reset_timeout(redis_client, unique):
    breaker = SharedBreaker(redis_client, f"llm-{unique}", fail_max=1, reset_timeout_s=0.5)
    _fail_n(breaker, 1)
    _wait_for_state(breaker, "half-open")

    _fail_n(breaker, 1)  # the probe
    assert breaker.state() == "open"
    with pytest.raises(CircuitOpen) as refused:
        breaker.call(lambda: None)
    assert 0.3 < refused.value.delay_s <= 0.5


def test_while_the_probe_runs_everyone_else_sees_it_open(redis_client, unique):
    breaker = SharedBreaker(
        redis_client, f"llm-{unique}", fail_max=1, reset_timeout_s=0.2, probe_timeout_s=10
    )
    _fail_n(breaker, 1)
    _wait_for_state(breaker, "half-open")
    with breaker.guard():  # this block is the probe
        assert breaker.state() == "half-open"
        with pytest.raises(CircuitOpen) as refused:
            breaker.call(lambda: None)
        assert 9 < refused.value.delay_s <= 10
    assert breaker.state() == "closed"


def test_a_probe_that_never_reports_loses_its_lease(redis_client, unique):
    """A worker killed mid-probe must not leave the circuit half-open for ever."""
    breaker = SharedBreaker(
        redis_client, f"llm-{unique}", fail_max=1, reset_timeout_s=0.1, probe_timeout_s=0.3
    )
    _fail_n(breaker, 1)
    _wait_for_state(breaker, "half-open")
    lost_probe = breaker.guard()
    lost_probe.__enter__()  # admitted, then never heard of again
    with pytest.raises(CircuitOpen):
        breaker.call(lambda: None)
    time.sleep(0.35)
    assert breaker.call(lambda: "second probe") == "second probe"
    assert breaker.state() == "closed"


def test_a_probe_that_defers_hands_the_probe_on(redis_client, unique):
    breaker = SharedBreaker(
        redis_client, f"llm-{unique}", fail_max=1, reset_timeout_s=0.1, probe_timeout_s=30
    )
    _fail_n(breaker, 1)
    _wait_for_state(breaker, "half-open")
    with pytest.raises(Deferred):
        breaker.call(_raise(Deferred("not now", delay_s=1)))
    assert breaker.call(lambda: "next probe") == "next probe"
    assert breaker.state() == "closed"


def test_a_late_outcome_of_an_older_call_is_ignored(redis_client, unique):
    breaker = SharedBreaker(redis_client, f"llm-{unique}", fail_max=2, reset_timeout_s=0.1)
    slow_call = breaker.guard()
    slow_call.__enter__()  # admitted while closed, still running
    _fail_n(breaker, 2)
    _wait_for_state(breaker, "half-open")
    breaker.call(lambda: None)  # probe closes the circuit
    assert breaker.state() == "closed"

    late = ConnectionError("late")
    assert slow_call.__exit__(ConnectionError, late, None) is False  # re-raised to the caller
    assert breaker.snapshot().failures == 0, "a failure from before the reset must not count"


def test_pybreaker_reads_and_operator_transitions_use_the_shared_state(redis_client, unique):
    breaker = SharedBreaker(redis_client, f"llm-{unique}", fail_max=3, reset_timeout_s=30)
    _fail_n(breaker, 2)
    assert breaker.storage.counter == 2
    assert breaker.storage.state == "closed"

    other = SharedBreaker(redis_client, f"llm-{unique}", fail_max=3, reset_timeout_s=30)
    other.storage.state = "open"  # an operator trips it from another process
    assert breaker.state() == "open"
    assert breaker.storage.opened_at is not None
    other.storage.state = "closed"
    assert breaker.state() == "closed"
    assert breaker.snapshot().failures == 0


# --- several OS processes ---------------------------------------------------------------------


def _race_for_probe(redis_url: str, name: str, start: Any, release: Any, results: Any) -> None:
    breaker = SharedBreaker(
        redis.Redis.from_url(redis_url), name, fail_max=1, reset_timeout_s=1, probe_timeout_s=30
    )
    start.wait(timeout=30)
    try:
        with breaker.guard():
            results.put(("probe", 0.0))
            release.wait(timeout=30)
    except CircuitOpen as exc:
        results.put(("deferred", exc.delay_s))


def _fail_once(redis_url: str, name: str, start: Any, results: Any) -> None:
    transitions = _Transitions()
    breaker = SharedBreaker(
        redis.Redis.from_url(redis_url),
        name,
        fail_max=3,
        reset_timeout_s=30,
        listeners=[transitions],
    )
    start.wait(timeout=30)
    try:
        breaker.call(_fail)
    except ConnectionError:
        results.put(("failed", transitions.seen))
    except CircuitOpen:
        results.put(("deferred", transitions.seen))


def _run(processes: list[Any]) -> None:
    for process in processes:
        process.start()


def _join(processes: list[Any]) -> None:
    for process in processes:
        process.join(timeout=30)
        assert process.exitcode == 0


PROCESSES = 5


def test_exactly_one_probe_across_processes(redis_url, redis_client, unique):
    name = f"llm-{unique}"
    breaker = SharedBreaker(redis_client, name, fail_max=1, reset_timeout_s=1, probe_timeout_s=30)
    start = SPAWN.Barrier(PROCESSES + 1)
    release = SPAWN.Event()
    results = SPAWN.Queue()
    processes = [
        SPAWN.Process(target=_race_for_probe, args=(redis_url, name, start, release, results))
        for _ in range(PROCESSES)
    ]
    _run(processes)
    try:
        _fail_n(breaker, 1)
        _wait_for_state(breaker, "half-open")  # every racer is past its imports by now
        start.wait(timeout=30)
        outcomes = [results.get(timeout=30) for _ in range(PROCESSES)]
    finally:
        release.set()
        _join(processes)

    probes = [o for o in outcomes if o[0] == "probe"]
    deferred = [o for o in outcomes if o[0] == "deferred"]
    assert len(probes) == 1, outcomes
    assert len(deferred) == PROCESSES - 1
    assert all(25 < delay <= 30 for _, delay in deferred), deferred  # the probe's lease
    assert breaker.state() == "closed"


def test_exactly_one_process_opens_the_circuit(redis_url, redis_client, unique):
    name = f"llm-{unique}"
    start = SPAWN.Barrier(PROCESSES)
    results = SPAWN.Queue()
    processes = [
        SPAWN.Process(target=_fail_once, args=(redis_url, name, start, results))
        for _ in range(PROCESSES)
    ]
    _run(processes)
    try:
        outcomes = [results.get(timeout=30) for _ in range(PROCESSES)]
    finally:
        _join(processes)

    openers = [seen for _, seen in outcomes if ("closed", "open") in seen]
    assert len(openers) == 1, outcomes
    assert sum(1 for outcome, _ in outcomes if outcome == "failed") >= 3
    breaker = SharedBreaker(redis_client, name, fail_max=3, reset_timeout_s=30)
    assert breaker.state() == "open"
