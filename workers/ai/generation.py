"""Running one generation for a job: which provider (its circuit, its fallbacks), within its
shared rate limit, streamed with progress coalesced to a bounded rate.

Plain code, no Celery: a job hands in chat messages and callbacks and gets a ``Generation``
back, or one of ``workers.failures``' errors. While a provider's circuit is open its jobs go
to the first fallback whose circuit is closed; with none, ``CircuitOpen`` (a ``Deferred``)
sends the job back to the queue without spending a retry. ``CancelWatch`` tells the streams of
a process which of them were asked to stop, with one Redis read for all of them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from conveyor import keys
from workers.ai.providers import ChatRequest, Completion, ProviderConfig, get_provider
from workers.ai.providers.base import estimate_prompt_tokens
from workers.failures import Deferred, Permanent
from workers.resilience.breakers import CircuitOpen, SharedBreaker
from workers.resilience.ratelimit import SharedRateLimit

log = logging.getLogger(__name__)

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
    ) -> Generation:
        """Stream one answer; ``on_progress`` gets coalesced ``{"delta", "offset"}`` pieces."""
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
                return Generation(name, self._stream(config, breaker, request, on_progress))
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
    ) -> Completion:
        estimate = estimate_prompt_tokens(request.messages) + (
            request.max_tokens or _ANSWER_ESTIMATE
        )
        reservation = self.rate_limit(config.name).acquire(estimate, timeout_s=self._rate_wait_s)
        coalescer = ProgressCoalescer(on_progress, self._progress_interval_s)
        with breaker.guard():
            completion = get_provider(config).generate(request, coalescer.add)
        coalescer.flush()
        reservation.settle(completion.total_tokens)
        return completion


class CancelWatch:
    """Which of this process's streaming jobs were asked to stop (``Submitter.cancel``).

    One thread reads the cancel keys of every job being watched in one ``MGET`` every
    ``every_s``, instead of each stream reading its own key: with hundreds of streams in a
    process that is one round trip per interval instead of hundreds. A stop is noticed within
    ``every_s``, and the stream reader acts on it within its sweep (``reader.SWEEP_S``).
    """

    def __init__(self, client: Callable[[], redis.Redis], every_s: float):
        self._client = client
        self._every_s = every_s
        self._cancelled: dict[str, bool] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = 0

    @contextlib.contextmanager
    def watching(self, job_id: str) -> Iterator[Callable[[], bool]]:
        """``should_stop`` for ``job_id`` while the block runs."""
        with self._lock:
            self._cancelled[job_id] = False
            if self._thread is None or self._pid != os.getpid():
                self._pid = os.getpid()  # a forked child needs a thread of its own
                self._thread = threading.Thread(
                    target=self._watch_forever, name="cancel-watch", daemon=True
                )
                self._thread.start()
        try:
            yield lambda: self._cancelled.get(job_id, False)
        finally:
            with self._lock:
                self._cancelled.pop(job_id, None)

    def check(self) -> None:
        """Read the cancel keys of every watched job once."""
        with self._lock:
            job_ids = [j for j, stop in self._cancelled.items() if not stop]
        if not job_ids:
            return
        values = self._client().mget([keys.cancel(j) for j in job_ids])
        with self._lock:
            for job_id, value in zip(job_ids, values, strict=True):
                if value is not None and job_id in self._cancelled:
                    self._cancelled[job_id] = True

    def _watch_forever(self) -> None:
        while True:
            time.sleep(self._every_s)
            try:
                self.check()
            except Exception:  # Redis away: streams go on, as they would without a cancel
                log.exception("could not read the cancel keys of running generations")
