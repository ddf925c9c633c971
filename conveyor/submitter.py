"""The thin submitter: how other Python services hand work to Conveyor.

It validates a payload against its task's schema before anything is enqueued, and enqueues
by task *name*: nothing from ``tasks/`` or ``workers/`` is imported, so a submitting service
needs neither the workers' code nor their dependencies.

    from conveyor import Submitter

    submitter = Submitter()                       # ClientConfig.from_env(): REDIS_URL, …
    job = submitter.submit("ai.chat", {"messages": [{"role": "user", "content": "hi"}]})
    for event in job.events():                    # replay, then follow live, until it ends
        print(event["event"], event["data"])
    print(job.result(timeout=60))                 # the result envelope

``submit_many`` of ``episodes.record`` packs its records into few messages (up to
``CONVEYOR_EPISODES_PACK`` each): see ``conveyor.messages``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import replace
from datetime import datetime
from typing import Any

import redis
from celery import Celery
from celery.result import AsyncResult

from conveyor import jobindex, keys
from conveyor.config import ClientConfig
from conveyor.envelopes import iso_ms, result_envelope
from conveyor.errors import (
    ConveyorError,
    IdempotencyConflict,
    IdempotencyKeyInFlight,
    JobFailed,
    PayloadError,
)
from conveyor.jobindex import Origin
from conveyor.messages import message_for
from conveyor.names import queue_for
from conveyor.schemas import schema_for, validate_payload
from conveyor.streams import Follower, decode

__all__ = ["Job", "Origin", "Submitter"]


class Job:
    """A handle on one submitted job: its id, state, result envelope and events."""

    def __init__(self, submitter: Submitter, job_id: str, task: str, *, duplicate: bool = False):
        self.id = job_id
        self.task = task
        #: True when an earlier submit with the same idempotency key created this job.
        self.duplicate = duplicate
        self._submitter = submitter

    def __repr__(self) -> str:
        return f"<Job {self.task} {self.id}>"

    def _async_result(self) -> AsyncResult:
        return AsyncResult(self.id, app=self._submitter.app)

    def status(self) -> str:
        """Celery's state: PENDING (queued or unknown), STARTED (its ``*_start`` event is
        out), RETRY, SUCCESS, FAILURE, or REVOKED (cancelled)."""
        [meta] = self._submitter.states([self.id])
        return "PENDING" if meta is None else str(meta.get("status"))

    def result(
        self, timeout: float | None = None, *, raise_on_failure: bool = False
    ) -> dict[str, Any]:
        """Wait for the job to end; its result envelope (``success`` false when it failed).

        Raises ``TimeoutError`` if it has not ended within ``timeout`` seconds.
        """
        async_result = self._async_result()
        try:
            value = async_result.get(timeout=timeout, propagate=False)
        except Exception as exc:  # celery.exceptions.TimeoutError is not the builtin
            if type(exc).__name__ == "TimeoutError":
                raise TimeoutError(f"job {self.id} did not finish within {timeout} s") from None
            raise
        if async_result.successful() and isinstance(value, dict) and "success" in value:
            return value
        envelope = result_envelope(
            self.id,
            success=False,
            error=_describe_failure(value),
            timestamp=iso_ms(async_result.date_done) if async_result.date_done else None,
        )
        if raise_on_failure:
            raise JobFailed(envelope["error"])
        return envelope

    def events(
        self, *, timeout: float | None = None, from_seq: int = 0
    ) -> Iterator[dict[str, Any]]:
        """The job's events after ``from_seq`` (from the first by default: replayed from its
        stream, then live), each once and in order, until a ``complete`` or ``error`` event;
        stops early after ``timeout`` seconds of waiting. Events trimmed from the capped
        stream come as one ``{"control": "gap", "from_seq", "to_seq"}`` marker instead (the
        result still says how the job ended)."""
        client = self._submitter.redis
        stream = keys.events_stream(self.id)
        deadline = None if timeout is None else time.monotonic() + timeout
        follower = Follower(self.id, from_seq)
        last_id: Any = "0"
        while True:
            block_ms = 1000
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                block_ms = max(1, min(block_ms, int(left * 1000)))
            # bytes replies (no decode_responses): typed loosely by redis-py's stubs
            replies: Any = client.xread({stream: last_id}, block=block_ms, count=500)
            for _, entries in replies or []:
                last_id = entries[-1][0]
                yield from follower.replay(decode(fields) for _, fields in entries)
                if follower.ended:
                    return


class _ClientApp(Celery):
    """A Celery app that talks to exactly the servers of its ``ClientConfig``.

    Celery reads ``CELERY_BROKER_URL`` (and ``_READ_URL``/``_WRITE_URL``) and
    ``CELERY_RESULT_BACKEND`` from the process's environment at every use, over any
    configuration: a service whose own Celery uses those variables would silently send
    Conveyor's jobs to its own broker, and wait on its own backend. Here the broker comes in
    through the connection methods and the backend through ``backend_cls``, which Celery
    consults before its settings (``tests/client/test_config.py`` holds it to that)."""

    def __init__(self, config: ClientConfig):
        super().__init__("conveyor-submitter", set_as_current=False)
        self._broker_url = config.broker_url
        self.backend_cls = config.result_backend_url
        self.conf.update(config.celery_settings())

    def connection_for_write(self, url: str | None = None, **kwargs: Any) -> Any:
        return super().connection_for_write(url or self._broker_url, **kwargs)

    def connection_for_read(self, url: str | None = None, **kwargs: Any) -> Any:
        return super().connection_for_read(url or self._broker_url, **kwargs)

    def _get_backend(self) -> Any:
        """Celery's backend, minus the result-channel subscription ``send_task`` makes for
        every job (a SUBSCRIBE now and an UNSUBSCRIBE later: two round trips a submit, for a
        handle most callers never wait on). A caller that waits subscribes then, and reads
        the stored result after subscribing, so a job that ended first is not missed.

        Private Celery behaviour, fenced here: ``Celery._get_backend``, ``send_task``'s call
        of ``backend.on_task_call``, and ``AsyncResult.get`` subscribing for itself;
        ``tests/client/test_fences.py`` fails loudly when an upgrade changes one of them."""
        backend = super()._get_backend()
        backend.on_task_call = _no_subscription
        return backend


def _no_subscription(producer: Any, task_id: str) -> None:
    return None


class Submitter:
    """Validates and enqueues jobs. One per process is enough; it is thread-safe."""

    def __init__(
        self,
        config: ClientConfig | None = None,
        *,
        broker_url: str | None = None,
        redis_url: str | None = None,
        result_backend: str | None = None,
    ):
        """``config`` defaults to ``ClientConfig.from_env()`` (``REDIS_URL``,
        ``CELERY_BROKER_URL``, ``CELERY_RESULT_BACKEND``, ``CONVEYOR_MAX_PAYLOAD_BYTES``, …);
        the keyword URLs override it. Nothing else of the environment is read."""
        config = config or ClientConfig.from_env()
        if redis_url:
            config = replace(
                config, redis_url=redis_url, result_backend=config.result_backend or redis_url
            )
        if broker_url:
            config = replace(config, broker=broker_url)
        if result_backend:
            config = replace(config, result_backend=result_backend)
        self.config = config
        self.app = _ClientApp(config)
        self.redis: redis.Redis = redis.Redis.from_url(
            config.redis_url, socket_timeout=30, socket_connect_timeout=5
        )
        self._pack: dict[str, int] = {"episodes.record": config.episodes_pack}

    def validate(self, task: str, payload: Any) -> None:
        """Raise ``UnknownTaskError`` or ``PayloadError`` exactly as ``submit`` would."""
        validate_payload(task, payload, max_bytes=self.config.max_payload_bytes)

    def submit(
        self,
        task: str,
        payload: dict[str, Any],
        *,
        idempotency_key: str | None = None,
        priority: int | None = None,
        countdown: float | None = None,
        eta: datetime | None = None,
        origin: Origin | None = None,
    ) -> Job:
        """Enqueue one job. With an ``idempotency_key`` already used for the same task and
        payload within the idempotency window, nothing is enqueued and the first job is
        returned; ``origin`` says whose it is and carries its correlation ids."""
        return self.submit_many(
            task,
            [payload],
            idempotency_keys=[idempotency_key],
            priority=priority,
            countdown=countdown,
            eta=eta,
            origin=origin,
        )[0]

    def submit_many(
        self,
        task: str,
        payloads: Iterable[dict[str, Any]],
        *,
        idempotency_keys: Iterable[str | None] | None = None,
        priority: int | None = None,
        countdown: float | None = None,
        eta: datetime | None = None,
        origin: Origin | None = None,
    ) -> list[Job]:
        """Validate every payload first (one bad payload enqueues nothing), then send them all
        over one broker connection. Jobs come back in the order of ``payloads``, one per
        payload, each with its own id, even where records share a packed message."""
        payloads = list(payloads)
        idem: list[str | None] = (
            list(idempotency_keys) if idempotency_keys is not None else [None] * len(payloads)
        )
        if len(idem) != len(payloads):
            raise ValueError("idempotency_keys must have one entry per payload")
        _check_priority(priority)
        self._check_delay(countdown, eta)
        schema_for(task)  # unknown task: refuse before anything else
        problems: list[str] = []
        for index, payload in enumerate(payloads):
            try:
                self.validate(task, payload)
            except PayloadError as exc:
                where = f"payload[{index}]: " if len(payloads) > 1 else ""
                problems += [where + p for p in exc.problems]
        if problems:
            raise PayloadError(task, problems)

        job_ids = [str(uuid.uuid4()) for _ in payloads]
        claims = [
            None if key is None else _Claim(key, job_ids[i], _digest(task, payloads[i]))
            for i, key in enumerate(idem)
        ]
        try:
            existing = self._claim_idempotency_keys(task, claims, origin)
        except redis.RedisError as exc:
            raise ConveyorError(f"could not reach Redis to check idempotency keys: {exc}") from exc
        to_send = [i for i, prior in enumerate(existing) if prior is None]
        ours = [claims[i] for i in to_send]
        try:
            self._send(
                task,
                [(job_ids[i], payloads[i]) for i in to_send],
                priority=priority,
                countdown=countdown,
                eta=eta,
                headers=origin.headers() if origin else None,
            )
        except _SendFailed as failed:
            # What went out keeps its key; what did not gives it back, so a retry sends it.
            # (Should Redis be away too, the claims lapse in idempotency_pending_ttl_s.)
            with contextlib.suppress(redis.RedisError):
                self._settle(
                    task,
                    [job_ids[i] for i in to_send[: failed.sent]],
                    origin,
                    ours[: failed.sent],
                    ours[failed.sent :],
                )
            raise ConveyorError(
                f"could not enqueue {task} ({failed.sent} of {len(to_send)} sent): {failed.cause}"
            ) from failed.cause
        # Sent. Should Redis fail right now, the keys stay pending and lapse in
        # idempotency_pending_ttl_s: a retry after that would send these jobs again.
        with contextlib.suppress(redis.RedisError):
            self._settle(task, [job_ids[i] for i in to_send], origin, ours, [])
        return [
            Job(self, prior, task, duplicate=True)
            if prior is not None
            else Job(self, job_ids[i], task)
            for i, prior in enumerate(existing)
        ]

    def cancel(self, job_id: str) -> str:
        """Ask a job to stop: a queued one is skipped when it comes up, a streaming generation
        stops within a fraction of a second; either ends with an ``error`` event (reason
        ``cancelled``). Returns ``"finished"`` for a job that already ended (nothing is
        changed), ``"running"`` for one that has started, ``"not started"`` for one that has
        not (queued, or unknown to this broker: the two look alike)."""
        if self.job(job_id).status() in ("SUCCESS", "FAILURE", "REVOKED"):
            return "finished"
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(keys.cancel(job_id), "1", ex=self.config.idempotency_ttl_s)
        pipe.exists(keys.events_stream(job_id))
        _, started = pipe.execute()
        return "running" if started else "not started"

    def states(self, job_ids: list[str]) -> list[dict[str, Any] | None]:
        """Celery's result metadata of each job (``status``, ``result``, ``date_done``); for
        a job with none yet, ``{"status": "STARTED"}`` once its events began (workers do not
        write a STARTED state: its event says it), else None (queued, or unknown). Two round
        trips on a Redis backend, whatever the number of jobs."""
        backend: Any = self.app.backend
        if not job_ids:
            return []
        metas: list[dict[str, Any] | None]
        if hasattr(backend, "mget") and hasattr(backend, "get_key_for_task"):
            raw = backend.mget([backend.get_key_for_task(job_id) for job_id in job_ids])
            metas = [None if value is None else backend.decode_result(value) for value in raw]
        else:
            found = [backend.get_task_meta(job_id) for job_id in job_ids]
            metas = [None if meta.get("status") == "PENDING" else meta for meta in found]
        waiting = [i for i, meta in enumerate(metas) if meta is None]
        if waiting:
            pipe = self.redis.pipeline(transaction=False)
            for i in waiting:
                pipe.exists(keys.events_stream(job_ids[i]))
            for i, started in zip(waiting, pipe.execute(), strict=True):
                if started:
                    metas[i] = {"status": "STARTED", "result": None}
        return metas

    def job(self, job_id: str, task: str = "") -> Job:
        """A handle on a job submitted earlier (by any process)."""
        return Job(self, job_id, task)

    # -- internals ---------------------------------------------------------------------------

    def _check_delay(self, countdown: float | None, eta: datetime | None) -> None:
        delay = countdown or 0.0
        if eta is not None:
            now = datetime.now(eta.tzinfo) if eta.tzinfo else datetime.now()
            delay = max(delay, (eta - now).total_seconds())
        if delay > 0 and delay > self.config.max_delay_s:
            raise ValueError(
                f"a job can be delayed by at most {self.config.max_delay_s:g} s "
                "(CONVEYOR_VISIBILITY_TIMEOUT less the longest CONVEYOR_<POOL>_TIME_LIMIT), not "
                f"{delay:g} s: schedule it later instead"
            )

    def _claim_idempotency_keys(
        self, task: str, claims: list[_Claim | None], origin: Origin | None
    ) -> list[str | None]:
        """For each payload: None when it is new (key claimed, or no key), else the prior job
        id. A key held for another payload (or task) raises ``IdempotencyConflict``; one whose
        first job is still being sent raises ``IdempotencyKeyInFlight``."""
        claimed = [(i, c) for i, c in enumerate(claims) if c is not None]
        if not claimed:
            return [None] * len(claims)
        tenant = origin.tenant if origin else None
        pipe = self.redis.pipeline(transaction=False)
        for _, c in claimed:
            name = keys.idempotency(tenant, c.key)
            pipe.set(name, c.pending, nx=True, ex=self.config.idempotency_pending_ttl_s)
            pipe.get(name)
        replies = pipe.execute()
        result: list[str | None] = [None] * len(claims)
        seen: dict[str, _Claim] = {}
        for n, (i, c) in enumerate(claimed):
            won, holder = replies[2 * n], replies[2 * n + 1]
            first = seen.get(c.key)
            if first is not None:  # the same key twice in one call: one job, one payload
                if first.digest != c.digest:
                    raise IdempotencyConflict(
                        f"idempotency key {c.key!r} is given twice with different payloads"
                    )
                result[i] = first.job_id
            elif not won:
                holder_text = holder.decode()
                prior_job, prior_digest = _parse_claim(holder_text)
                if prior_digest is not None and prior_digest != c.digest:
                    raise IdempotencyConflict(
                        f"idempotency key {c.key!r} was used for a different ask (another "
                        f"payload or task; job {prior_job}) within the last "
                        f"{self.config.idempotency_ttl_s} s; use a new key for a new ask"
                    )
                if holder_text.endswith("|pending"):
                    raise IdempotencyKeyInFlight(
                        f"idempotency key {c.key!r}: the first request with it is still being "
                        "sent; retry in a moment"
                    )
                result[i] = prior_job
            else:
                seen[c.key] = c
        return result

    def _settle(
        self,
        task: str,
        sent_ids: list[str],
        origin: Origin | None,
        sent: list[_Claim | None],
        unsent: list[_Claim | None],
    ) -> None:
        """One round trip after sending: the sent jobs into the job index; keys of jobs that
        reached the broker hold their job for the idempotency window, keys of jobs that did
        not are given back (each only if still this call's claim)."""
        pipe = self.redis.pipeline(transaction=False)
        jobindex.record(pipe, task, sent_ids, origin, ttl_s=self.config.result_ttl_s)
        sent_claims = [c for c in sent if c is not None]
        unsent_claims = [c for c in unsent if c is not None]
        if sent_claims or unsent_claims:
            tenant = origin.tenant if origin else None
            names = [keys.idempotency(tenant, c.key) for c in (*sent_claims, *unsent_claims)]
            args: list[Any] = [self.config.idempotency_ttl_s, len(sent_claims)]
            for c in (*sent_claims, *unsent_claims):
                args += [c.pending, c.sent]
            pipe.eval(_SETTLE_CLAIMS, len(names), *names, *args)
        pipe.execute()

    def _send(
        self,
        task: str,
        jobs: list[tuple[str, dict[str, Any]]],
        *,
        priority: int | None,
        countdown: float | None,
        eta: datetime | None,
        pack: int | None = None,
        queue: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Send ``jobs`` (job id, payload) of ``task``, up to ``pack`` a message (default: the
        task's setting, 1 for tasks that are not packed). Not validated here: ``submit_many``
        did that (``bench.episodes`` sends its bench-only tasks through here too, naming the
        queue of a task that is not public)."""
        if not jobs:
            return
        queue = queue or queue_for(task)
        if priority is None:
            priority = self.config.default_priority  # send_task does not apply it itself
        size = pack or self._pack.get(task, 1)
        options: dict[str, Any] = {
            "queue": queue,
            "routing_key": queue,
            "priority": priority,
            "countdown": countdown,
            "eta": eta,
        }
        if headers:
            options["headers"] = headers
        sent = 0
        try:
            with self.app.producer_or_acquire() as producer:
                for start in range(0, len(jobs), size):
                    message = message_for(jobs[start : start + size])
                    self.app.send_task(task, producer=producer, **message, **options)
                    sent = min(len(jobs), start + size)
        except Exception as exc:
            raise _SendFailed(sent, exc) from exc

    def close(self) -> None:
        self.redis.close()
        self.app.close()


# Settles idempotency claims. KEYS: the claims' keys, the sent ones first. ARGV[1]: the
# idempotency window (s); ARGV[2]: how many of KEYS were sent; then per key its pending value
# and its sent value. A sent key (still this call's claim) holds its job for the window; an
# unsent one (still this call's claim) is deleted.
_SETTLE_CLAIMS = """
local sent = tonumber(ARGV[2])
for i = 1, #KEYS do
  local pending, done = ARGV[1 + 2 * i], ARGV[2 + 2 * i]
  if redis.call('GET', KEYS[i]) == pending then
    if i <= sent then
      redis.call('SET', KEYS[i], done, 'EX', ARGV[1])
    else
      redis.call('DEL', KEYS[i])
    end
  end
end
return 0
"""


class _Claim:
    """One idempotency key's claim: the job it names and a digest of the payload it was for."""

    def __init__(self, key: str, job_id: str, digest: str):
        self.key = key
        self.job_id = job_id
        self.digest = digest
        #: While the job is on its way (lapses after ``idempotency_pending_ttl_s``).
        self.pending = f"{job_id}|{digest}|pending"
        #: Once its message is on the broker (held for the idempotency window).
        self.sent = f"{job_id}|{digest}|sent"


def _parse_claim(value: str) -> tuple[str, str | None]:
    """(job id, payload digest) of a key's value; a bare job id (an older Conveyor's) has no
    digest to compare."""
    job_id, _, rest = value.partition("|")
    digest = rest.partition("|")[0] or None
    return job_id, digest


def _digest(task: str, payload: Any) -> str:
    canonical = json.dumps([task, payload], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


class _SendFailed(Exception):
    """Sending stopped after ``sent`` of a call's jobs reached the broker."""

    def __init__(self, sent: int, cause: Exception):
        super().__init__(str(cause))
        self.sent = sent
        self.cause = cause


def _check_priority(priority: int | None) -> None:
    if priority is not None and (not isinstance(priority, int) or not 0 <= priority <= 9):
        raise ValueError(
            f"priority must be a whole number from 0 (served first) to 9, not {priority!r}"
        )


def _describe_failure(value: Any) -> str:
    if isinstance(value, BaseException):
        return str(value) or type(value).__name__
    return f"job ended without a result envelope: {value!r}"
