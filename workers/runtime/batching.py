"""Batched tasks: the worker's consumer collects a task's messages, the pool runs them in
batches, and each message is acknowledged only once its batches have settled every record in it.

``@batch_job("episodes.record", family="episodes")`` registers ``fn(ctx, items) -> Verdict``.
Messages of that task are not run one by one: the consumer keeps them (unacknowledged) in a
buffer and hands the pool a batch when it holds ``size`` of them or when the oldest has waited
``flush`` ms. In the pool process the function validates, writes and returns a ``Verdict``;
back in the consumer each settled message is acknowledged and the rest wait and go again.

A message may carry many records (``conveyor.messages.PACK_HEADER``: the args are the records,
that header their job ids, in order). The consumer expands it into one ``Item`` per record, each
with its own job id, so everything below holds per record; ``size`` counts records, and the
message is acknowledged once all of its records are settled (written, already there, or
dead-lettered), or given back to the queue once, whole, when the worker shuts down.

What each message still gets, as with ``workers.runtime.job.job``:

- validation on receipt: the function validates each payload, and ``ctx.fail`` dead-letters a
  poison one (an ``*_error`` event and a failed result go with it);
- nothing lost: a message is acknowledged after the batches holding its records committed. A
  batch that could not be written (an outage: ``workers.failures.classify`` says retryable)
  keeps its records, unacknowledged, and retries them with capped exponential backoff for as
  long as it takes.
  A killed worker's messages go back to the queue (Redis' visibility timeout), to be written
  again: the function must make that a no-op (episodes: ``ON CONFLICT DO NOTHING``);
- poison that kills its worker: a batch whose pool process died (or hit the hard time limit)
  is split in halves and each half runs again, down to the one record that keeps killing it,
  which is dead-lettered after ``CONVEYOR_MAX_DELIVERIES`` kills; a batch failing with a
  permanent error is split the same way, and the one record it belongs to is dead-lettered
  (its siblings in a packed message are settled on their own).

What a batched message does not get, on purpose: per-message start/complete events. At
thousands of messages a second those would cost Redis more than the work itself (each event is
a stream, a counter and a publish, kept a day). A batch function may store its records' success
results in one round trip (``runtime.outcome.settle_quietly``: the episodes writer does).
Failures keep both. Task events go per message (``task-received``, ``task-succeeded``), not
per record, so Flower shows each message settled. Nor does ``celery inspect`` list them;
the worker's ``total`` count (what ``ops/healthcheck.py`` reads) does include them (a record
each).

What it leans on, beyond Celery's public API, is fenced in ``runtime/celery_internals.py``
(with a test that fails naming what an upgrade moved): a task's ``Strategy`` (as celery-batches
does), the consumer's pool, timer and connection errors, the worker-state counters, and, to
acknowledge a batch in one Redis round trip, kombu's Redis ``QoS`` bookkeeping. After a broker
reconnect Celery cancels the old connection's timers: records held at that moment come back
through Redis' visibility timeout, like any prefetched message.

Why not celery-batches (0.11, checked against its source): it acknowledges an ``acks_late``
batch in the pool's success callback, which also fires when the batch function raised (its
tracer logs and returns None), so a batch that failed on a database outage is acknowledged and
lost; a batch whose pool process dies is neither acknowledged nor rejected (no error
callback), so it waits out the visibility timeout and a message that kills its process does so
forever; and one message cannot fail or retry without the whole batch. It does show the way
in: a task ``Strategy`` that buffers the messages, with prefetch at least the batch size
(``celeryconfig`` checks that).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery import Task
from celery.exceptions import InvalidTaskError

from conveyor.envelopes import FAMILIES
from conveyor.jobindex import Origin
from conveyor.messages import PACK_HEADER
from workers import settings
from workers.app import app
from workers.failures import Retryable, classify, compute_backoff
from workers.runtime import celery_internals
from workers.runtime.context import BatchContext, Item, Verdict

log = logging.getLogger(__name__)


BatchFunction = Callable[[BatchContext, list[Item]], Verdict]

#: Seconds at most between two tries of a batch waiting on an outage, whatever
#: CONVEYOR_RETRY_CAP says: its records land soon after Postgres is back, and each try counts
#: as work started for ops/healthcheck.py, which must not restart a worker for an outage.
_RETRY_CAP_S = 30.0

#: task name -> (batch function, family); pool processes find the function here by name.
_BATCH_FUNCTIONS: dict[str, tuple[BatchFunction, str]] = {}


class BatchTask(Task):
    """A task whose messages the consumer collects into batches (see the module's docs)."""

    # A success leaves no result (see the module's docs); failures store theirs.
    ignore_result = True
    typing = False
    #: Records a batch, and ms a part-filled batch may wait (``workers.settings.episodes``).
    batch_size: Callable[[], int] = staticmethod(lambda: settings.episodes().batch_size)
    batch_flush_ms: Callable[[], int] = staticmethod(lambda: settings.episodes().flush_ms)

    def Strategy(self, task: BatchTask, app: Any, consumer: Any) -> Callable[..., None]:
        """Celery asks each task for the handler of its messages: ours buffers them."""
        core = settings.core()
        batcher = Batcher(
            task.name,
            consumer,
            size=task.batch_size(),
            flush_s=task.batch_flush_ms() / 1000,
            max_crashes=core.max_deliveries,
            retry_base_s=core.retry_base_s,
            retry_cap_s=min(core.retry_cap_s, _RETRY_CAP_S),
        )
        return batcher.on_message


def batch_job(name: str, *, family: str) -> Callable[[BatchFunction], Task]:
    """Register ``fn(ctx, items) -> Verdict`` as the batched public task ``name``."""
    FAMILIES[family]  # an unknown family fails here, at import, not at the first failure

    def register(fn: BatchFunction) -> Task:
        _BATCH_FUNCTIONS[name] = (fn, family)

        def run(task: Task, payload: Any) -> dict[str, Any]:
            """Called directly (``apply()``, a test): a batch of one, here and now."""
            item = Item(job_id=task.request.id or str(uuid.uuid4()), payload=payload)
            verdict = fn(BatchContext(name, family), [item])
            return {"settled": not verdict.retry, "reason": verdict.reason}

        run.__name__ = run.__qualname__ = fn.__name__
        run.__doc__ = fn.__doc__
        return app.task(name=name, bind=True, base=BatchTask)(run)

    return register


# --- In the pool process ----------------------------------------------------------------------
# Module-level functions, so the prefork pool sends them to its children by name.


def _run_batch(task_name: str, items: list[Item]) -> tuple[str, Any]:
    """``("ok", Verdict)``, or ``("failed", error)`` when the function raised a permanent error
    (retryable ones mean: every item waits and goes again). Never raises."""
    fn, family = _BATCH_FUNCTIONS[task_name]
    try:
        return "ok", fn(BatchContext(task_name, family), items)
    except Exception as exc:
        verdict = classify(exc)
        if isinstance(verdict, Retryable):
            return "ok", Verdict(retry=tuple(range(len(items))), reason=str(verdict))
        log.exception("%s: a batch of %d failed", task_name, len(items))
        return "failed", str(verdict)


def _fail_item(task_name: str, item: Item, reason: str, error: str, attempts: int) -> Verdict:
    _, family = _BATCH_FUNCTIONS[task_name]
    try:
        BatchContext(task_name, family).fail(item, reason, error, attempts=attempts)
        return Verdict()
    except Exception as exc:
        return Verdict(retry=(0,), reason=f"could not dead-letter it: {exc}")


# --- In the consumer --------------------------------------------------------------------------


@dataclass(eq=False)
class _Delivery:
    """A message the consumer holds, unacknowledged, until every record in it is settled."""

    message: Any
    ack: Any
    reject: Any
    #: Records of it not settled yet.
    pending: int
    #: ``held``, then ``acked`` (all settled) or ``given back`` (rejected to the queue, whole).
    state: str = "held"
    #: When the consumer took it (``time.monotonic()``), for its task-succeeded event.
    received: float = 0.0


@dataclass(eq=False)
class _Held:
    """One record the consumer holds until a batch settles it."""

    item: Item
    delivery: _Delivery
    #: Times its batch could not be written (an outage).
    attempt: int = 0
    #: Times it was alone in a batch whose pool process died.
    crashes: int = 0
    settled: bool = False


class Batcher:
    """Buffers one task's messages in a worker's consumer and hands the pool batches of them.

    Lives in the consumer's thread (timers and pool callbacks run there too; the lock is for
    pools that would call back from elsewhere). A new one is made each time the consumer
    (re)connects; messages of the old connection that were never acknowledged come back
    through Redis.
    """

    def __init__(
        self,
        task_name: str,
        consumer: Any,
        *,
        size: int,
        flush_s: float,
        max_crashes: int,
        retry_base_s: float,
        retry_cap_s: float,
    ):
        self.task_name = task_name
        self._pool = consumer.pool
        self._timer = consumer.timer
        # Pool callbacks run on the consumer's loop thread, where kombu's channel lives (the
        # threads pool calls them from its own threads; the hub wakes up for them).
        self._in_loop = consumer.call_soon
        self._errors = consumer.connection_errors
        # Task events per message (not per record), so Flower shows each message settled and
        # counts what the worker processed: two events a message, ~0.02 a record when packed.
        self._events = celery_internals.event_dispatcher(consumer)
        self._size = size
        self._flush_s = flush_s
        self._max_crashes = max_crashes
        self._retry_base_s = retry_base_s
        self._retry_cap_s = retry_cap_s
        self._buffer: list[_Held] = []
        self._flush_entry: Any = None
        self._lock = threading.RLock()

    # -- messages in

    def on_message(
        self, message: Any, body: Any, ack: Any, reject: Any, *_: Any, **__: Any
    ) -> None:
        """Celery's task-strategy call for one message. Raising ``InvalidTaskError`` (or the
        decoding errors ``message.payload`` raises) makes the consumer dead-letter it."""
        decoded = message.payload
        headers = message.headers or {}
        if isinstance(decoded, dict):  # task protocol 1
            args, kwargs, job_id = decoded.get("args", ()), decoded.get("kwargs"), decoded.get("id")
        else:
            try:
                args, kwargs, _embed = decoded
            except (TypeError, ValueError):
                raise InvalidTaskError("the body is not [args, kwargs, embed]") from None
            job_id = headers.get("id")
        if not job_id:
            raise InvalidTaskError("the message has no task id")
        args = list(args or ())
        packed = headers.get(PACK_HEADER)
        if packed is None:
            job_ids = [str(job_id)]
            payloads = [
                args[0] if len(args) == 1 and not kwargs else {"args": args, "kwargs": kwargs}
            ]
        else:
            if not isinstance(packed, list) or not all(isinstance(j, str) and j for j in packed):
                raise InvalidTaskError(f"{PACK_HEADER} is not a list of job ids")
            if kwargs or len(packed) != len(args) or not args:
                raise InvalidTaskError(
                    f"a packed message must carry one job id per record, no kwargs: "
                    f"{len(packed)} job ids, {len(args)} records"
                )
            job_ids, payloads = packed, args
        info = message.delivery_info or {}
        queue = info.get("routing_key")
        redelivered = bool(info.get("redelivered") or headers.get("redelivered"))
        origin = Origin.from_headers(headers.get) if isinstance(headers, dict) else Origin()
        delivery = _Delivery(message, ack, reject, pending=len(payloads), received=time.monotonic())
        self._send_event(
            "task-received",
            uuid=str(job_id),
            name=self.task_name,
            args=message.headers.get("argsrepr") if isinstance(message.headers, dict) else "",
            kwargs="{}",
            retries=0,
            eta=None,
        )
        self.add(
            [
                _Held(Item(job_id, payload, queue, redelivered, origin), delivery)
                for job_id, payload in zip(job_ids, payloads, strict=True)
            ]
        )

    def add(self, held: list[_Held]) -> None:
        with self._lock:
            # A record coming back for a retry after its message was given back has nothing
            # left to do here: the whole message is on the queue again.
            self._buffer.extend(h for h in held if h.delivery.state != "given back")
            while len(self._buffer) >= self._size:
                batch = self._buffer[: self._size]
                del self._buffer[: self._size]
                self._dispatch(batch)
            if not self._buffer and self._flush_entry is not None:
                self._flush_entry.cancel()
                self._flush_entry = None
            elif self._buffer and self._flush_entry is None:
                self._flush_entry = self._timer.call_after(self._flush_s, self._flush_due)

    def _flush_due(self) -> None:
        with self._lock:
            self._flush_entry = None
            batch, self._buffer = self._buffer, []
            if batch:
                self._dispatch(batch)

    # -- batches out

    def _dispatch(self, batch: list[_Held]) -> None:
        celery_internals.count_started(self.task_name, len(batch))
        args = (self.task_name, [h.item for h in batch])
        self._apply(batch, _run_batch, args, self._on_result, self._on_crash)

    def _apply(
        self,
        batch: list[_Held],
        target: Any,
        args: tuple[Any, ...],
        on_result: Any,
        on_crash: Any,
    ) -> None:
        try:
            self._pool.apply_async(
                target,
                args=args,
                callback=functools.partial(self._in_loop, on_result, batch),
                error_callback=functools.partial(self._in_loop, on_crash, batch),
            )
        except Exception as exc:
            self._refused_by_pool(batch, target, args, exc)

    def _refused_by_pool(
        self, batch: list[_Held], target: Any, args: tuple[Any, ...], exc: Exception
    ) -> None:
        """The pool would not take the work (a record it cannot pickle, nested too deep):
        split the batch until the record it chokes on is alone, and dead-letter that one here,
        in the consumer. Never give it back whole: it would come straight back, for ever."""
        if not self._pool.active:  # shutting down: every message goes back to the queue
            self._give_back(batch)
            return
        what = f"{type(exc).__name__}: {exc}"[:300]
        if len(batch) > 1:
            log.warning(
                "%s: the pool refused a batch of %d (%s); handing its halves apart",
                self.task_name,
                len(batch),
                what,
            )
            middle = len(batch) // 2
            self._dispatch(batch[:middle])
            self._dispatch(batch[middle:])
            return
        (held,) = batch
        if target is _fail_item:  # the dead letter itself could not go: write it from here
            _, item, reason, error, attempts = args
        else:
            item, reason, attempts = held.item, "poison", held.attempt + held.crashes + 1
            error = f"the worker's pool could not take this record: {what}"
        self._settle([held], _fail_item(self.task_name, item, reason, error, attempts))

    def _on_result(self, batch: list[_Held], result: tuple[str, Any]) -> None:
        status, value = result
        if status != "ok":
            self._isolate(batch, value, killed=False)
            return
        self._settle(batch, value)

    def _settle(self, batch: list[_Held], verdict: Verdict) -> None:
        later = set(verdict.retry)
        self._ack_all([held for i, held in enumerate(batch) if i not in later])
        if later:
            self._retry_later([batch[i] for i in sorted(later)], verdict.reason)

    def _ack_all(self, batch: list[_Held]) -> None:
        """Settle a batch's records and acknowledge the messages whose every record is now
        settled: in one Redis round trip where the transport is kombu's Redis one (each
        ``message.ack()`` costs a client, a MULTI pipeline and a round trip: a third of the
        consumer's time at this rate); one by one anywhere else."""
        done: list[_Delivery] = []
        for held in batch:
            if held.settled:
                continue
            held.settled = True
            delivery = held.delivery
            delivery.pending -= 1
            if delivery.pending == 0 and delivery.state == "held":
                delivery.state = "acked"
                done.append(delivery)
        for delivery in done:
            headers = delivery.message.headers if isinstance(delivery.message.headers, dict) else {}
            self._send_event(
                "task-succeeded",
                uuid=str(headers.get("id", "")),
                result=f"{len(headers.get(PACK_HEADER) or [None])} record(s) settled",
                runtime=round(time.monotonic() - delivery.received, 6),
            )
        by_channel: dict[int, list[_Delivery]] = {}
        for delivery in done:
            by_channel.setdefault(id(delivery.message.channel), []).append(delivery)
        for group in by_channel.values():
            acks = {id(d.message): d.ack for d in group}

            def ack_one(message: Any, acks: dict[int, Any] = acks) -> None:
                acks[id(message)](log, self._errors)

            celery_internals.bulk_ack([d.message for d in group], ack_one, what=self.task_name)

    def _send_event(self, kind: str, **fields: Any) -> None:
        if self._events is None:
            return
        try:
            self._events.send(kind, **fields)
        except Exception:  # monitoring only: never the consumer's problem
            log.debug("could not send %s", kind, exc_info=True)

    def _on_crash(self, batch: list[_Held], exc_info: Any) -> None:
        """The pool process running the batch died, or was killed at the hard time limit."""
        self._isolate(batch, _describe(exc_info), killed=True)

    def _isolate(self, batch: list[_Held], error: str, *, killed: bool) -> None:
        """Split a failing batch until the one message it fails on is alone, then fail that."""
        if not self._pool.active:  # shutting down: give every message back to the queue
            self._give_back(batch)
            return
        what = "killed its pool process" if killed else "failed"
        if len(batch) > 1:
            log.warning(
                "%s: a batch of %d %s (%s); running its halves apart to find the message",
                self.task_name,
                len(batch),
                what,
                error,
            )
            middle = len(batch) // 2
            self._dispatch(batch[:middle])
            self._dispatch(batch[middle:])
            return
        (held,) = batch
        if not killed:
            self._fail(held, "permanent", error)
            return
        held.crashes += 1
        if held.crashes < self._max_crashes:
            self._dispatch(batch)
            return
        self._fail(held, "poison", f"it killed its pool process {held.crashes} times: {error}")

    def _fail(self, held: _Held, reason: str, error: str) -> None:
        args = (self.task_name, held.item, reason, error, held.attempt + held.crashes + 1)
        self._apply([held], _fail_item, args, self._settle, self._on_fail_crash)

    def _on_fail_crash(self, batch: list[_Held], exc_info: Any) -> None:
        self._retry_later(
            batch, f"dead-lettering it killed its pool process: {_describe(exc_info)}"
        )

    def _retry_later(self, batch: list[_Held], reason: str) -> None:
        attempt = max(h.attempt for h in batch)
        for held in batch:
            held.attempt += 1
        delay = compute_backoff(attempt, base_s=self._retry_base_s, cap_s=self._retry_cap_s)
        log.warning(
            "%s: %d messages not settled (%s); trying again in %.1f s",
            self.task_name,
            len(batch),
            reason,
            delay,
        )
        self._timer.call_after(delay, self.add, (batch,))

    def _give_back(self, batch: list[_Held]) -> None:
        """Reject the messages of ``batch`` back to the queue, each once and whole: every
        record of a packed message comes back with it (those already written are no-ops).
        Their other records still buffered here are dropped with them."""
        back = []
        for held in batch:
            delivery = held.delivery
            if delivery.state == "held":
                delivery.state = "given back"
                back.append(delivery)
        if not back:
            return
        with self._lock:
            self._buffer = [h for h in self._buffer if h.delivery.state == "held"]
        for delivery in back:
            delivery.reject(log, self._errors, True)


def _describe(exc_info: Any) -> str:
    """``WorkerLostError: Worker exited prematurely: exitcode 1`` from what the pool reports."""
    exc = getattr(exc_info, "exception", exc_info)
    exc = getattr(exc, "exc", exc)  # billiard's ExceptionWithTraceback wraps the real one
    return f"{type(exc).__name__}: {exc}"


__all__ = ["BatchContext", "BatchTask", "Item", "Verdict", "batch_job"]
