"""Rate limits per upstream shared by every worker process: requests and tokens per minute.

Celery's ``rate_limit`` is per worker (celery#5732); a provider's limit is per account, so the
fleet shares one budget in Redis (``conveyor.keys.ratelimit``). Both budgets are GCRA (a token
bucket kept as one "theoretical arrival time" each) in one Lua script on one key, at Redis
server time, so a call takes a request *and* its tokens or neither, and workers with skewed
clocks agree. A bucket holds one minute's budget, so a burst of up to ``rpm`` calls passes at
once and the budget then refills evenly.

Tokens are known only after the call: ``acquire`` reserves an estimate, ``settle`` charges the
actual count (refunding or charging the difference). A reservation may be granted in the
future — the caller waits its turn, first come first served — but only up to the caller's
``timeout_s``; beyond it ``RateLimited`` (a ``Deferred``) sends the job back to the queue
instead of holding a worker.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import redis

from conveyor import keys
from workers.failures import Deferred, Permanent

log = logging.getLogger(__name__)

#: rpm and tpm are budgets per this window (ms).
_PERIOD_MS = 60_000

# KEYS[1] = keys.ratelimit(name). ARGV: period ms, ms per request (0 = unlimited),
# ms per token (0 = unlimited), tokens to reserve, longest acceptable wait ms.
# Returns {granted 0|1, wait ms}: granted reservations may start only after the wait.
_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local period = tonumber(ARGV[1])
local req_iv = tonumber(ARGV[2])
local tok_iv = tonumber(ARGV[3])
local f = redis.call('HMGET', KEYS[1], 'req_tat', 'tok_tat')
local wait = 0
local new_req, new_tok
if req_iv > 0 then
  new_req = math.max(tonumber(f[1] or '0'), now) + req_iv
  wait = math.max(wait, new_req - period - now)
end
if tok_iv > 0 then
  new_tok = math.max(tonumber(f[2] or '0'), now) + tonumber(ARGV[4]) * tok_iv
  wait = math.max(wait, new_tok - period - now)
end
if wait < 0.001 then wait = 0 end  -- float error on exact fits
if wait > tonumber(ARGV[5]) then
  return {0, math.ceil(wait)}
end
local last = now
if new_req then
  redis.call('HSET', KEYS[1], 'req_tat', string.format('%.17g', new_req))
  last = math.max(last, new_req)
end
if new_tok then
  redis.call('HSET', KEYS[1], 'tok_tat', string.format('%.17g', new_tok))
  last = math.max(last, new_tok)
end
redis.call('PEXPIRE', KEYS[1], math.ceil(last - now) + 1000)
return {1, math.ceil(wait)}
"""

# KEYS[1] = keys.ratelimit(name). ARGV: ms per token, tokens to charge (negative: refund).
# A refund never fills the bucket beyond full.
_SETTLE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local tat = math.max(tonumber(redis.call('HGET', KEYS[1], 'tok_tat') or '0'), now)
tat = math.max(tat + tonumber(ARGV[2]) * tonumber(ARGV[1]), now)
redis.call('HSET', KEYS[1], 'tok_tat', string.format('%.17g', tat))
local last = math.max(tat, tonumber(redis.call('HGET', KEYS[1], 'req_tat') or '0'))
redis.call('PEXPIRE', KEYS[1], math.ceil(last - now) + 1000)
return 1
"""


class RateLimited(Deferred):
    """The upstream's shared budget is spent for longer than the caller would wait: run the
    job again after ``delay_s`` without spending a retry."""

    def __init__(self, name: str, *, delay_s: float):
        super().__init__(f"rate limit {name!r}: next slot in {delay_s:.2f} s", delay_s=delay_s)
        self.name = name


@dataclass(frozen=True)
class Budget:
    """What is left right now: ``None`` for an unlimited budget; negative when in debt (calls
    charged more tokens than they reserved, or reservations are queued)."""

    requests: float | None
    tokens: float | None


@dataclass
class Reservation:
    """One admitted call. ``delay_s`` is how long it had to wait for its turn (``acquire``
    already waited it; ``reserve`` leaves that to the caller)."""

    limiter: SharedRateLimit
    delay_s: float
    #: Tokens charged so far for this call: the estimate, then whatever ``settle`` set.
    tokens: int = 0

    def settle(self, actual_tokens: int) -> None:
        """Make this call's charge ``actual_tokens``: refund or charge the difference from what
        was charged so far. May be called again (e.g. as a stream reports usage); 0 when the
        call never reached the upstream."""
        if actual_tokens < 0:
            raise ValueError("actual_tokens must be >= 0")
        delta = actual_tokens - self.tokens
        if delta == 0:
            return
        self.limiter._charge(delta)
        self.tokens = actual_tokens


class SharedRateLimit:
    """Requests-per-minute and tokens-per-minute budget of one upstream, shared by all workers.

    ``rpm``/``tpm`` None means that budget is unlimited (no Redis call when both are).
    """

    def __init__(
        self, client: redis.Redis, name: str, *, rpm: int | None = None, tpm: int | None = None
    ) -> None:
        for label, value in (("rpm", rpm), ("tpm", tpm)):
            if value is not None and value < 1:
                raise ValueError(f"{label} must be >= 1 or None (unlimited)")
        self.name = name
        self.rpm = rpm
        self.tpm = tpm
        self.key = keys.ratelimit(name)
        self._redis = client
        self._req_ms = _PERIOD_MS / rpm if rpm else 0.0
        self._tok_ms = _PERIOD_MS / tpm if tpm else 0.0
        self._reserve = client.register_script(_RESERVE)
        self._settle = client.register_script(_SETTLE)

    def acquire(self, tokens: int = 0, *, timeout_s: float = 0.0) -> Reservation:
        """Take one request and ``tokens`` (an estimate, settled later), waiting up to
        ``timeout_s`` for them; raises ``RateLimited`` when the wait would be longer."""
        reservation = self.reserve(tokens, max_wait_s=timeout_s)
        if reservation.delay_s > 0:
            time.sleep(reservation.delay_s)
        return reservation

    def reserve(self, tokens: int = 0, *, max_wait_s: float = 0.0) -> Reservation:
        """Like ``acquire`` but does not sleep: the caller must wait ``delay_s`` before calling
        (for callers with their own way to wait). Raises ``RateLimited`` beyond
        ``max_wait_s``, and ``Permanent`` for an estimate no minute's budget could ever hold."""
        if tokens < 0:
            raise ValueError("tokens must be >= 0")
        if self.tpm is not None and tokens > self.tpm:
            raise Permanent(
                f"rate limit {self.name!r}: {tokens} tokens exceed the whole budget of "
                f"{self.tpm} tokens per minute"
            )
        if self.rpm is None and self.tpm is None:
            return Reservation(self, delay_s=0.0, tokens=tokens)
        max_wait_ms = min(max(max_wait_s, 0.0), 1e9) * 1000
        granted, wait_ms = self._reserve(
            keys=[self.key],
            args=[_PERIOD_MS, repr(self._req_ms), repr(self._tok_ms), tokens, max_wait_ms],
        )
        delay_s = int(wait_ms) / 1000
        if not granted:
            raise RateLimited(self.name, delay_s=max(delay_s, 0.001))
        return Reservation(self, delay_s=delay_s, tokens=tokens)

    def budget(self) -> Budget:
        """What is left now, read atomically at Redis server time (for dashboards and tests)."""
        if self.rpm is None and self.tpm is None:
            return Budget(requests=None, tokens=None)
        pipe = self._redis.pipeline(transaction=True)
        pipe.time()
        pipe.hmget(self.key, ["req_tat", "tok_tat"])
        (secs, micros), (req_tat, tok_tat) = pipe.execute()
        now = secs * 1000 + micros / 1000

        def left(tat: bytes | None, per_ms: float) -> float:
            ahead = max(float(tat or 0) - now, 0.0)
            return (_PERIOD_MS - ahead) / per_ms

        return Budget(
            requests=left(req_tat, self._req_ms) if self.rpm else None,
            tokens=left(tok_tat, self._tok_ms) if self.tpm else None,
        )

    def _charge(self, tokens: int) -> None:
        if self.tpm is None:
            return
        try:
            self._settle(keys=[self.key], args=[repr(self._tok_ms), tokens])
        except redis.RedisError:
            # The call's outcome stands; the budget is off by ``tokens`` until it refills.
            log.warning(
                "rate limit %s: could not settle %d tokens", self.name, tokens, exc_info=True
            )


__all__ = ["Budget", "RateLimited", "Reservation", "SharedRateLimit"]
