"""Running one generation for a job: which provider (its circuit, its fallbacks), within its
shared rate limit, streamed with progress coalesced to a bounded rate.

Plain code, no Celery: a job hands in chat messages and callbacks and gets a ``Generation``
back, or one of ``workers.failures``' errors. While a provider's circuit is open its jobs go
to the first fallback whose circuit is closed; with none, ``CircuitOpen`` (a ``Deferred``)
sends the job back to the queue without spending a retry.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from workers.breakers import CircuitOpen, SharedBreaker
from workers.failures import Deferred, Permanent
from workers.providers import ChatRequest, Completion, Delta, ProviderConfig, get_provider
from workers.providers.base import estimate_prompt_tokens
from workers.ratelimit import SharedRateLimit

#: Tokens reserved for the answer when a job sets no max_tokens (settled to the real count).
_ANSWER_ESTIMATE = 512


@dataclass(frozen=True)
class Generation:
    """A finished generation: which provider answered, and its completion."""

    provider: str
    completion: Completion


class ProgressCoalescer:
    """Collects streamed text and emits it at most once per ``interval_s``: a fast model must
    not turn every token into a Redis event."""

    def __init__(
        self,
        emit: Callable[[dict[str, Any]], None],
        interval_s: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._emit = emit
        self._interval = interval_s
        self._clock = clock
        self._pending: list[str] = []
        self._offset = 0  # characters already emitted
        self._last = clock()
        self.emitted = 0

    def add(self, text: str) -> None:
        if text:
            self._pending.append(text)
        if self._pending and self._clock() - self._last >= self._interval:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        delta = "".join(self._pending)
        self._pending.clear()
        self._emit({"delta": delta, "offset": self._offset})
        self._offset += len(delta)
        self._last = self._clock()
        self.emitted += 1


class Generator:
    """Generations over the configured providers; one per worker process, thread-safe."""

    def __init__(
        self,
        providers: Mapping[str, ProviderConfig],
        default_provider: str,
        client: redis.Redis,
        *,
        breaker_fail_max: int,
        breaker_reset_s: float,
        rate_wait_s: float,
        progress_interval_s: float,
    ):
        self.providers = dict(providers)
        self.default_provider = default_provider
        self._client = client
        self._fail_max = breaker_fail_max
        self._reset_s = breaker_reset_s
        self._rate_wait_s = rate_wait_s
        self._progress_interval_s = progress_interval_s
        self._lock = threading.Lock()
        self._breakers: dict[str, SharedBreaker] = {}
        self._limits: dict[str, SharedRateLimit] = {}

    def breaker(self, name: str) -> SharedBreaker:
        with self._lock:
            if name not in self._breakers:
                self._breakers[name] = SharedBreaker(
                    self._client,
                    f"llm:{name}",
                    fail_max=self._fail_max,
                    reset_timeout_s=self._reset_s,
                    # A probe's lease outlives the longest stream it may run.
                    probe_timeout_s=max(self._reset_s, self.providers[name].total_s + 5),
                )
            return self._breakers[name]

    def rate_limit(self, name: str) -> SharedRateLimit:
        config = self.providers[name]
        with self._lock:
            if name not in self._limits:
                self._limits[name] = SharedRateLimit(
                    self._client, f"llm:{name}", rpm=config.rpm, tpm=config.tpm
                )
            return self._limits[name]

    def chain(self, requested: str | None) -> list[str]:
        """The requested (or default) provider, then its fallbacks, each once."""
        first = requested or self.default_provider
        if first not in self.providers:
            known = ", ".join(sorted(self.providers))
            raise Permanent(f"unknown provider {first!r}; configured providers: {known}")
        names = [first]
        for name in self.providers[first].fallbacks:
            if name in self.providers and name not in names:
                names.append(name)
        return names

    def run(
        self,
        messages: Sequence[Mapping[str, str]],
        *,
        provider: str | None = None,
        model: str | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        stop: Sequence[str] = (),
        deadline: float | None = None,
        should_stop: Callable[[], bool] | None = None,
        on_progress: Callable[[dict[str, Any]], None] = lambda _: None,
        on_provider: Callable[[str, str], None] = lambda _p, _m: None,
    ) -> Generation:
        """Stream one answer; ``on_progress`` gets coalesced ``{"delta", "offset"}`` pieces and
        ``on_provider(provider, model)`` is told which provider is about to be asked."""
        deferred: Deferred | None = None
        for name in self.chain(provider):
            config = self.providers[name]
            breaker = self.breaker(name)
            snapshot = breaker.snapshot()
            if snapshot.state == "open":
                deferred = CircuitOpen(f"llm:{name}", delay_s=snapshot.retry_in_s)
                continue
            request = ChatRequest(
                messages=messages,
                model=model or config.default_model,
                temperature=temperature,
                max_tokens=max_tokens,
                stop=tuple(stop),
                deadline=deadline,
                should_stop=should_stop,
            )
            try:
                return Generation(
                    name, self._stream(config, breaker, request, on_progress, on_provider)
                )
            except CircuitOpen as exc:  # another worker holds the half-open probe
                deferred = exc
        assert deferred is not None
        raise deferred

    def _stream(
        self,
        config: ProviderConfig,
        breaker: SharedBreaker,
        request: ChatRequest,
        on_progress: Callable[[dict[str, Any]], None],
        on_provider: Callable[[str, str], None],
    ) -> Completion:
        estimate = estimate_prompt_tokens(request.messages) + (
            request.max_tokens or _ANSWER_ESTIMATE
        )
        reservation = self.rate_limit(config.name).acquire(estimate, timeout_s=self._rate_wait_s)
        coalescer = ProgressCoalescer(on_progress, self._progress_interval_s)
        completion: Completion | None = None
        with breaker.guard():
            for piece in get_provider(config).stream(request):
                if isinstance(piece, Delta):
                    coalescer.add(piece.text)
                else:
                    completion = piece
        coalescer.flush()
        assert completion is not None, "a provider stream ends with a Completion"
        reservation.settle(completion.total_tokens)
        return completion
