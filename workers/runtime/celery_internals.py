"""FENCE: the private behaviour of Celery and kombu the batcher (``runtime.batching``) relies
on, and nothing else. Checked by ``check()``, which ``tests/runtime/test_fences.py`` runs: an
upgrade that moves any of it fails there, naming what moved, instead of silently losing acks.

What is leaned on, and why:

- a task's ``Strategy`` hook (as celery-batches does): the consumer hands each message of the
  task to our handler instead of the pool;
- the consumer's ``pool``, ``timer``, ``call_soon`` and ``connection_errors``, to run batches,
  flush on time and call back on the consumer's loop thread;
- ``celery.worker.state.total_count`` / ``all_total_count``: the worker's "total" stats
  (what ``ops/healthcheck.py`` reads) count each batched record;
- kombu's Redis ``QoS`` bookkeeping (``pipe_or_acquire``, ``_remove_from_indices``, and the
  virtual ``QoS.ack``) and ``Message._state``, to acknowledge a whole batch of messages in one
  Redis round trip instead of one ``MULTI`` pipeline each (a third of the consumer's time).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from celery import Task, states
from celery.backends.base import BaseKeyValueStoreBackend
from celery.backends.redis import RedisBackend
from celery.exceptions import BackendStoreError
from celery.worker import state as worker_state
from celery.worker.consumer import Consumer
from kombu.message import Message
from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import base as virtual_base

__all__ = [
    "FenceBroken",
    "bulk_ack",
    "check",
    "count_started",
    "event_dispatcher",
    "store_successes",
]

log = logging.getLogger(__name__)


class FenceBroken(RuntimeError):
    """A library no longer behaves as this module relies on: pin it back or update us."""


def event_dispatcher(consumer: Any) -> Any | None:
    """The consumer's task-event dispatcher, when task events are on (``--task-events``)."""
    dispatcher = getattr(consumer, "event_dispatcher", None)
    return dispatcher if dispatcher is not None and dispatcher.enabled else None


def count_started(task_name: str, records: int) -> None:
    """Count ``records`` started jobs of ``task_name`` in the worker's stats."""
    worker_state.total_count.update({task_name: records})
    worker_state.all_total_count[0] += records


def bulk_ack(messages: Sequence[Any], ack_one: Callable[[Any], None], *, what: str) -> None:
    """Acknowledge ``messages`` (all of one channel): in one Redis round trip where the
    transport is kombu's Redis one; through ``ack_one`` (Celery's own way, which logs what it
    cannot do) anywhere else, or when the round trip fails."""
    if not messages:
        return
    qos = getattr(messages[0].channel, "qos", None)
    if not isinstance(qos, kombu_redis.QoS):
        for message in messages:
            ack_one(message)
        return
    try:
        with qos.pipe_or_acquire() as pipe:
            for message in messages:
                qos._remove_from_indices(message.delivery_tag, pipe)  # type: ignore[no-untyped-call]
            pipe.execute()
    except Exception as exc:
        log.warning("%s: bulk acknowledgement failed (%r)", what, exc)
        for message in messages:
            ack_one(message)
        return
    for message in messages:  # what message.ack() does besides the Redis writes
        virtual_base.QoS.ack(qos, message.delivery_tag)  # type: ignore[no-untyped-call]
        message._state = "ACK"


def store_successes(app: Any, results: Sequence[tuple[str, Any]]) -> None:
    """Store SUCCESS for many tasks: one pipelined round trip on Celery's Redis backend, each
    written and published as ``RedisBackend._set`` does (the meta is the backend's documented
    result format); one ``store_result`` each elsewhere."""
    backend = app.backend
    client = getattr(backend, "client", None)
    if not isinstance(backend, RedisBackend) or client is None:
        for task_id, result in results:
            backend.store_result(task_id, result, states.SUCCESS)
        return
    done = datetime.now(UTC).isoformat()
    with client.pipeline(transaction=False) as pipe:
        for task_id, result in results:
            meta = {
                "status": states.SUCCESS,
                "result": result,
                "traceback": None,
                "children": [],
                "date_done": done,
                "task_id": task_id,
            }
            key = backend.get_key_for_task(task_id)
            value = backend.encode(meta)
            pipe.set(key, value, ex=backend.expires or None)
            pipe.publish(key, value)  # what a waiting AsyncResult listens for, as _set does
        pipe.execute()


# Stores a result unless the job's stored state is already SUCCESS (Celery's guard against a
# lost worker's late copy overwriting a success), then publishes it to waiting callers: the
# read and the write in one round trip instead of two. KEYS[1] the result key; ARGV[1] the
# encoded meta (JSON, the only serializer we accept), ARGV[2] seconds to keep it (0: always).
_STORE_UNLESS_SUCCESS = """
local current = redis.call('GET', KEYS[1])
if current then
  local ok, meta = pcall(cjson.decode, current)
  if ok and type(meta) == 'table' and meta['status'] == 'SUCCESS' then
    return 0
  end
end
if tonumber(ARGV[2]) > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
"""


class ResultBackend(RedisBackend):
    """Celery's Redis result backend, storing a job's end in one round trip (a script) where
    Celery reads the state and then writes it (two). The workers' app uses it
    (``workers.app``); the meta it stores is the one Celery builds (``_get_result_meta``), so
    every reader (``AsyncResult``, Flower, the gateway) reads it unchanged.

    Private Celery behaviour, fenced here: ``BaseKeyValueStoreBackend._store_result``'s
    contract (build the meta, skip when SUCCESS is stored, ``_set_with_state``) and
    ``RedisBackend``'s ``_MAX_STR_VALUE_SIZE`` and ``client``; ``check()`` names any that
    is gone."""

    def _store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        traceback: Any = None,
        request: Any = None,
        **kwargs: Any,
    ) -> Any:
        meta = self._get_result_meta(
            result=result, state=state, traceback=traceback, request=request
        )
        meta["task_id"] = str(task_id)
        value = self.encode(meta)
        if isinstance(value, str) and len(value) > self._MAX_STR_VALUE_SIZE:
            raise BackendStoreError(
                "value too large for Redis backend", state=state, task_id=task_id
            )
        script = self.__dict__.get("_conveyor_store")
        if script is None:
            script = self.__dict__["_conveyor_store"] = self.client.register_script(
                _STORE_UNLESS_SUCCESS
            )
        self.ensure(script, ([self.get_key_for_task(task_id)], [value, int(self.expires or 0)]))
        return result


def check() -> None:
    """Raise ``FenceBroken`` naming the first private behaviour that is gone."""
    problems: list[str] = []

    def need(ok: bool, what: str) -> None:
        if not ok:
            problems.append(what)

    need(hasattr(Task, "Strategy"), "celery.Task.Strategy (the task strategy hook)")
    need(
        hasattr(RedisBackend, "_get_result_meta") and hasattr(RedisBackend, "_MAX_STR_VALUE_SIZE"),
        "celery RedisBackend._get_result_meta / _MAX_STR_VALUE_SIZE (ResultBackend builds on them)",
    )
    need(
        "_get_task_meta_for" in inspect.getsource(BaseKeyValueStoreBackend._store_result),
        "BaseKeyValueStoreBackend._store_result no longer reads before writing: ResultBackend "
        "copies its guard, compare them",
    )
    need(callable(getattr(Consumer, "call_soon", None)), "celery Consumer.call_soon")
    need(
        callable(getattr(Consumer, "on_connection_error_after_connected", None)),
        "celery Consumer.on_connection_error_after_connected (runtime/consumer.py overrides it)",
    )
    init = inspect.getsource(Consumer.__init__)
    # runtime/consumer.py widens connection_errors after Celery's __init__ sets it.
    for attribute in ("self.pool", "self.timer", "self.connection_errors"):
        need(attribute in init, f"celery Consumer.__init__ setting {attribute}")
    need(hasattr(worker_state, "total_count"), "celery.worker.state.total_count")
    need(
        isinstance(getattr(worker_state, "all_total_count", None), list),
        "celery.worker.state.all_total_count (a one-item list)",
    )
    qos = kombu_redis.QoS
    need(callable(getattr(qos, "pipe_or_acquire", None)), "kombu redis QoS.pipe_or_acquire")
    remove = getattr(qos, "_remove_from_indices", None)
    need(callable(remove), "kombu redis QoS._remove_from_indices")
    if callable(remove):
        params = list(inspect.signature(remove).parameters)
        need(params[:3] == ["self", "delivery_tag", "pipe"], "QoS._remove_from_indices(tag, pipe)")
    ack = getattr(virtual_base.QoS, "ack", None)
    need(
        callable(ack) and list(inspect.signature(ack).parameters)[:2] == ["self", "delivery_tag"],
        "kombu virtual QoS.ack(delivery_tag)",
    )
    need("_state" in inspect.getsource(Message.__init__), "kombu Message._state")
    need("self._state = 'ACK'" in inspect.getsource(Message.ack), "kombu Message.ack sets ACK")
    setter = getattr(RedisBackend, "_set", None)
    need(
        callable(setter) and "publish" in inspect.getsource(setter),
        "celery RedisBackend._set publishing each result to its waiters",
    )
    for name in ("client", "get_key_for_task", "encode", "expires"):
        need(
            name in inspect.getsource(RedisBackend) or hasattr(RedisBackend, name),
            f"celery RedisBackend.{name}",
        )
    if problems:
        raise FenceBroken(
            "Celery/kombu changed what runtime.batching relies on (see "
            "workers/runtime/celery_internals.py): " + "; ".join(problems)
        )
