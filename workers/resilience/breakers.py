"""Circuit breakers shared by every worker process, one per upstream (an LLM provider, n8n).

Built on pybreaker: its ``CircuitBreaker`` holds the settings, decides what counts as a system
error (``exclude``: a caller's ``Permanent`` 4xx never counts) and carries the listeners; the
state lives in ``RedisBreakerStorage``, a ``pybreaker.CircuitBreakerStorage``. pybreaker's own
call path is not used: it reads, compares and writes in separate steps (so several processes
open the same circuit, pybreaker#24, #26, #88) and lets *every* caller through while half-open.
Here each decision is one Lua script on one key (``conveyor.keys.breaker``):

- closed: calls go through; ``fail_max`` consecutive system failures open the circuit;
- open: calls raise ``CircuitOpen`` (a ``Deferred``: the job runs again later without spending
  a retry) until ``reset_timeout_s`` has passed;
- then exactly one caller in the fleet becomes the probe (half-open), the others still see it
  open; the probe's success closes the circuit, its failure re-opens it. A probe that never
  reports (its worker was killed) loses its lease after ``probe_timeout_s``.

Needs Redis >= 5 (scripts that read ``TIME`` before writing).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, ParamSpec, TypeVar, cast

import pybreaker
import redis

from conveyor import keys
from workers.failures import Deferred, Permanent

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")
State = Literal["closed", "open", "half-open"]

CLOSED: State = "closed"
OPEN: State = "open"
HALF_OPEN: State = "half-open"

#: An idle breaker's state is kept at least this long (ms), then forgotten (= closed).
_MIN_TTL_MS = 24 * 3600 * 1000

# Every script: KEYS[1] = keys.breaker(name); "now" is Redis server time in ms.
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# ARGV: probe lease ms, ttl ms.
# Returns {allowed 0|1, gen the caller reports back with, state after, wait ms, opened->probe 0|1}.
_ADMIT = (
    _NOW
    + """
local f = redis.call('HMGET', KEYS[1], 'state', 'gen', 'retry_at_ms')
local state = f[1] or 'closed'
local gen = tonumber(f[2] or '0')
if state == 'closed' then
  return {1, gen, state, 0, 0}
end
local retry_at = tonumber(f[3] or '0')
if now < retry_at then
  return {0, gen, state, retry_at - now, 0}
end
gen = gen + 1
redis.call('HSET', KEYS[1], 'state', 'half-open', 'gen', gen,
           'retry_at_ms', now + tonumber(ARGV[1]))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {1, gen, 'half-open', 0, state == 'open' and 1 or 0}
"""
)

# ARGV: gen from admit, outcome ('success' | 'failure' | 'release'), fail_max, reset ms, ttl ms.
# Returns {state before, state after, failures}. An outcome whose gen is not the current one
# (a slow call admitted before the last transition) changes nothing.
_RECORD = (
    _NOW
    + """
local f = redis.call('HMGET', KEYS[1], 'state', 'gen', 'failures')
local state = f[1] or 'closed'
local gen = tonumber(f[2] or '0')
local failures = tonumber(f[3] or '0')
local outcome = ARGV[2]
if tonumber(ARGV[1]) ~= gen or state == 'open' then
  return {state, state, failures}
end
if state == 'closed' then
  if outcome == 'success' and failures > 0 then
    redis.call('HSET', KEYS[1], 'failures', 0)
    redis.call('PEXPIRE', KEYS[1], ARGV[5])
    return {state, state, 0}
  elseif outcome == 'failure' then
    failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
    if failures >= tonumber(ARGV[3]) then
      redis.call('HSET', KEYS[1], 'state', 'open', 'gen', gen + 1, 'opened_at_ms', now,
                 'retry_at_ms', now + tonumber(ARGV[4]))
      state = 'open'
    end
    redis.call('PEXPIRE', KEYS[1], ARGV[5])
    return {'closed', state, failures}
  end
  return {state, state, failures}
end
-- half-open, and the caller is the current probe
if outcome == 'success' then
  redis.call('HSET', KEYS[1], 'state', 'closed', 'gen', gen + 1, 'failures', 0,
             'retry_at_ms', 0)
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  return {state, 'closed', 0}
elseif outcome == 'failure' then
  failures = failures + 1
  redis.call('HSET', KEYS[1], 'state', 'open', 'gen', gen + 1, 'failures', failures,
             'opened_at_ms', now, 'retry_at_ms', now + tonumber(ARGV[4]))
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  return {state, 'open', failures}
end
-- release: the probe learned nothing (it never reached the upstream); the next caller probes
redis.call('HSET', KEYS[1], 'retry_at_ms', now)
return {state, state, failures}
"""
)

# ARGV: state to force, reset ms, ttl ms. pybreaker's ``state`` setter (an operator's open/close).
_FORCE = (
    _NOW
    + """
local gen = redis.call('HINCRBY', KEYS[1], 'gen', 1)
if ARGV[1] == 'open' then
  redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at_ms', now,
             'retry_at_ms', now + tonumber(ARGV[2]))
elseif ARGV[1] == 'half-open' then
  redis.call('HSET', KEYS[1], 'state', 'half-open', 'retry_at_ms', now)
else
  redis.call('HSET', KEYS[1], 'state', 'closed', 'failures', 0, 'retry_at_ms', 0)
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return gen
"""
)

# Returns {state, failures, wait ms until a probe may go (0 if it may now)}.
_PEEK = (
    _NOW
    + """
local f = redis.call('HMGET', KEYS[1], 'state', 'failures', 'retry_at_ms')
local wait = tonumber(f[3] or '0') - now
if wait < 0 then wait = 0 end
return {f[1] or 'closed', tonumber(f[2] or '0'), wait}
"""
)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class CircuitOpen(Deferred):
    """The upstream's circuit is open: run the job again after ``delay_s`` (or, catching this,
    route it to a fallback upstream now). Raised before the guarded call runs."""

    def __init__(self, name: str, *, delay_s: float):
        super().__init__(
            f"circuit {name!r} is open; next probe in {delay_s:.1f} s", delay_s=delay_s
        )
        self.name = name


@dataclass(frozen=True)
class BreakerSnapshot:
    """What a dashboard or a router wants to know, read atomically at Redis server time."""

    state: State
    failures: int
    #: Seconds until a probe may go; 0 when closed or when the next caller would be the probe.
    retry_in_s: float


@dataclass(frozen=True)
class _Ticket:
    """One admitted call: the generation it must report back with, and whether it is the probe."""

    gen: int
    probe: bool


class RedisBreakerStorage(pybreaker.CircuitBreakerStorage):
    """pybreaker storage whose every write is atomic in Redis, plus the admit/record scripts.

    The pybreaker interface (``state``, ``counter``, ``opened_at`` …) is implemented, each
    write atomic, so pybreaker's accessors work and an operator can force a state
    (``storage.state = "open"``); ``SharedBreaker`` makes its own transitions through
    ``admit``/``record``.
    """

    def __init__(
        self,
        client: redis.Redis,
        name: str,
        *,
        reset_timeout_s: float,
        probe_timeout_s: float,
    ) -> None:
        super().__init__("conveyor-redis")
        self.key = keys.breaker(name)
        self._redis = client
        self.reset_ms = max(1, round(reset_timeout_s * 1000))
        self.probe_ms = max(1, round(probe_timeout_s * 1000))
        self.ttl_ms = max(_MIN_TTL_MS, 2 * (self.reset_ms + self.probe_ms))
        self._admit = client.register_script(_ADMIT)
        self._record = client.register_script(_RECORD)
        self._force = client.register_script(_FORCE)
        self._peek = client.register_script(_PEEK)

    # --- the atomic transitions SharedBreaker uses -------------------------------------------

    def admit(self) -> tuple[bool, int, State, float, bool]:
        """(allowed, gen, state after, seconds to wait if refused, this call took the open
        circuit to half-open)."""
        allowed, gen, state, wait_ms, opened_probe = self._admit(
            keys=[self.key], args=[self.probe_ms, self.ttl_ms]
        )
        state_after = cast(State, _text(state))
        return bool(allowed), int(gen), state_after, int(wait_ms) / 1000, bool(opened_probe)

    def record(self, gen: int, outcome: str, fail_max: int) -> tuple[State, State, int]:
        """Report one call's outcome (``success``, ``failure`` or ``release``); returns
        (state before, state after, consecutive failures)."""
        before, after, failures = self._record(
            keys=[self.key], args=[gen, outcome, fail_max, self.reset_ms, self.ttl_ms]
        )
        return cast(State, _text(before)), cast(State, _text(after)), int(failures)

    def peek(self) -> BreakerSnapshot:
        state, failures, wait_ms = self._peek(keys=[self.key])
        stored = cast(State, _text(state))
        wait_s = int(wait_ms) / 1000
        if stored == OPEN and wait_s == 0:
            stored = HALF_OPEN  # the next caller will be the probe
        return BreakerSnapshot(state=stored, failures=int(failures), retry_in_s=wait_s)

    # --- pybreaker.CircuitBreakerStorage ------------------------------------------------------

    @property
    def state(self) -> str:
        return _text(self._redis.hget(self.key, "state") or b"closed")

    @state.setter
    def state(self, state: str) -> None:
        if state not in (CLOSED, OPEN, HALF_OPEN):
            raise ValueError(f"unknown circuit state {state!r}")
        self._force(keys=[self.key], args=[state, self.reset_ms, self.ttl_ms])

    def increment_counter(self) -> None:
        self._redis.hincrby(self.key, "failures", 1)

    def reset_counter(self) -> None:
        self._redis.hset(self.key, "failures", 0)

    def increment_success_counter(self) -> None:
        self._redis.hincrby(self.key, "successes", 1)

    def reset_success_counter(self) -> None:
        self._redis.hset(self.key, "successes", 0)

    @property
    def counter(self) -> int:
        return int(self._redis.hget(self.key, "failures") or 0)

    @property
    def success_counter(self) -> int:
        return int(self._redis.hget(self.key, "successes") or 0)

    @property
    def opened_at(self) -> datetime | None:
        ms = self._redis.hget(self.key, "opened_at_ms")
        return datetime.fromtimestamp(int(ms) / 1000, tz=UTC) if ms else None

    @opened_at.setter
    def opened_at(self, when: datetime) -> None:
        # The ``state`` setter stamps server time when it opens; this only keeps pybreaker's
        # own ``open()`` (which sets both) from failing.
        pass


class SharedBreaker:
    """The circuit breaker of one upstream, shared through Redis by every worker process.

    ``with breaker.guard(): ...`` or ``breaker.call(fn, *args)``. Outcomes: a return is a
    success; an exception pybreaker does not count as a system error (``Permanent`` and
    ``exclude``) is a success too, since the upstream answered; ``Deferred`` raised inside the
    block (e.g. by a rate limit) and ``BaseException``s such as ``SystemExit`` count for
    nothing, since the upstream was never judged; every other exception is a failure. The
    exception is always re-raised unchanged.
    """

    def __init__(
        self,
        client: redis.Redis,
        name: str,
        *,
        fail_max: int = 5,
        reset_timeout_s: float = 60.0,
        probe_timeout_s: float | None = None,
        exclude: Iterable[type[BaseException] | Callable[[BaseException], bool]] = (),
        listeners: Sequence[pybreaker.CircuitBreakerListener] = (),
    ) -> None:
        """``probe_timeout_s`` (default: ``reset_timeout_s``) is the probe's lease: after it, a
        probe that never reported is presumed dead and another caller probes. Keep it longer
        than the guarded call's own deadline, or two probes may overlap."""
        if fail_max < 1:
            raise ValueError("fail_max must be >= 1")
        if reset_timeout_s <= 0:
            raise ValueError("reset_timeout_s must be > 0")
        self.name = name
        self.storage = RedisBreakerStorage(
            client,
            name,
            reset_timeout_s=reset_timeout_s,
            probe_timeout_s=reset_timeout_s if probe_timeout_s is None else probe_timeout_s,
        )
        self._circuit = pybreaker.CircuitBreaker(
            fail_max=fail_max,
            reset_timeout=reset_timeout_s,
            exclude=[Permanent, *exclude],
            listeners=listeners,
            state_storage=self.storage,
            name=name,
        )

    @property
    def fail_max(self) -> int:
        return self._circuit.fail_max

    @property
    def reset_timeout_s(self) -> float:
        return self._circuit.reset_timeout

    def state(self) -> State:
        """``half-open`` once the open period is over, even before a probe has claimed it."""
        return self.storage.peek().state

    def snapshot(self) -> BreakerSnapshot:
        return self.storage.peek()

    def call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Call ``fn`` through the breaker. For a streaming call use ``guard()`` around the
        whole consumption of the stream: a generator returned from ``fn`` is not followed."""
        with self.guard():
            return fn(*args, **kwargs)

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Run the block through the breaker; raises ``CircuitOpen`` before it if refused.

        If Redis is unreachable its error propagates: a retryable infrastructure failure, like
        the broker's own outage."""
        ticket = self._admit()
        try:
            yield
        except BaseException as exc:
            self._settle(ticket, self._outcome_of(exc), exc)
            raise
        else:
            self._settle(ticket, "success", None)

    # --- internals ---------------------------------------------------------------------------

    def _admit(self) -> _Ticket:
        allowed, gen, state, wait_s, opened_probe = self.storage.admit()
        if not allowed:
            raise CircuitOpen(self.name, delay_s=max(wait_s, 0.001))
        if opened_probe:
            log.info("circuit %s half-open: this call is the probe", self.name)
            self._notify_state_change(OPEN, HALF_OPEN)
        return _Ticket(gen=gen, probe=state == HALF_OPEN)

    def _outcome_of(self, exc: BaseException) -> str:
        if not isinstance(exc, Exception) or isinstance(exc, Deferred):
            return "release"
        return "failure" if self._circuit.is_system_error(exc) else "success"

    def _settle(self, ticket: _Ticket, outcome: str, exc: BaseException | None) -> None:
        for listener in self._circuit.listeners:
            if outcome == "failure" and exc is not None:
                listener.failure(self._circuit, exc)
            elif outcome == "success":
                listener.success(self._circuit)
        if outcome == "release" and not ticket.probe:
            return  # nothing to say about the upstream, and no probe lease to give back
        try:
            before, after, failures = self.storage.record(ticket.gen, outcome, self.fail_max)
        except redis.RedisError:
            # The call's own outcome stands; the breaker misses one data point.
            log.warning("circuit %s: could not record a %s", self.name, outcome, exc_info=True)
            return
        if before == after:
            return
        if after == OPEN:
            log.warning(
                "circuit %s opened after %d consecutive failures; next probe in %.1f s",
                self.name,
                failures,
                self.reset_timeout_s,
            )
        else:
            log.info("circuit %s %s -> %s", self.name, before, after)
        self._notify_state_change(before, after)

    def _notify_state_change(self, before: State, after: State) -> None:
        """pybreaker listeners hear of each transition once in the fleet: from the process
        whose script made it."""
        if not self._circuit.listeners:
            return
        classes = {
            CLOSED: pybreaker.CircuitClosedState,
            OPEN: pybreaker.CircuitOpenState,
            HALF_OPEN: pybreaker.CircuitHalfOpenState,
        }
        old = classes[before](self._circuit, None, notify=False)
        new = classes[after](self._circuit, None, notify=False)
        for listener in self._circuit.listeners:
            listener.state_change(self._circuit, old, new)


__all__ = ["BreakerSnapshot", "CircuitOpen", "RedisBreakerStorage", "SharedBreaker", "State"]
