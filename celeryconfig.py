"""Celery's settings for every Conveyor process, read from the environment; nothing else.

Each value says its unit and why it is what it is. Conveyor's own settings (pools, retries,
families) are typed in ``workers/settings.py``; what a submitting service shares with the
workers (serializer, transport options) comes from ``conveyor/config.py``. A malformed variable
stops the process at import with a ``ConfigError`` that names it. README.md's configuration
table lists every variable.
"""

from __future__ import annotations

from kombu import Exchange, Queue

from beat_schedule import BEAT_SCHEDULE
from conveyor.config import ClientConfig, Env
from conveyor.config import broker_transport_options as _transport_options
from conveyor.names import MAINTENANCE, QUEUES, TASK_QUEUES

_env = Env()
_client = ClientConfig.from_env()

# --- Where things live ----------------------------------------------------------------------

#: The broker and the results (by default REDIS_URL, which also holds events: workers/settings).
broker_url = _client.broker_url
result_backend = _client.result_backend_url

# --- Serialization: JSON only. Pickle in a message is remote code execution (CVE-2021-23727). -
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
result_accept_content = ["json"]
event_serializer = "json"

# --- Queues and routing ---------------------------------------------------------------------
# One direct exchange per queue, routed by task name from conveyor.names (the one source).
# A task sent to a queue nobody declared is an error, not a silently created queue.
task_queues = tuple(Queue(name, Exchange(name, type="direct"), routing_key=name) for name in QUEUES)
task_routes = {name: {"queue": queue, "routing_key": queue} for name, queue in TASK_QUEUES.items()}
task_default_queue = MAINTENANCE
task_create_missing_queues = False
#: Redis serves priority 0 first. Unprioritised jobs sit in the middle (5) so a caller can
#: both hurry (0-4) and defer (6-9) a job.
task_default_priority = _client.default_priority

# --- Delivery guarantees --------------------------------------------------------------------
# Acknowledge after the task ran, and give a job back when its worker process dies, so a
# killed worker loses nothing (celery#1628, #3541). Redelivery is capped by
# CONVEYOR_MAX_DELIVERIES, after which the job goes to dead_letters instead of looping.
task_acks_late = True
task_reject_on_worker_lost = True
# A task that failed for good, or overran its hard time limit (having ignored the soft one that
# makes it retry), is acknowledged: workers.runtime.job records it in dead_letters.
task_acks_on_failure = True
task_acks_on_timeout = True
# Long jobs must not sit behind a prefetched backlog; pools that batch raise this themselves.
worker_prefetch_multiplier = 1
# A redelivered message whose job already stored SUCCESS (its worker died between storing the
# result and acknowledging) is not run again: one backend read, and only on redelivery.
worker_deduplicate_successful_tasks = True
# When the broker connection drops, let running jobs finish. Cancelling them (Celery's option)
# stores a FAILURE ("terminated") that a caller reads as the job's end, although the message
# comes back and the job runs again (tests/faults/test_redis_restart.py). Finishing is safe:
# the ack goes out once Redis is back (the Redis transport acknowledges on the reconnected
# client), and if it is lost the job runs again, which is at-least-once, with effects made
# idempotent and worker_deduplicate_successful_tasks skipping a job whose SUCCESS was stored.
worker_cancel_long_running_tasks_on_connection_loss = False

#: Seconds a worker may hold a message unacknowledged before Redis hands it to another worker.
#: This is also how long a job of a SIGKILLed worker waits before it runs again. It must exceed
#: the longest hard time limit plus the longest retry delay (a retry waits, unacknowledged, in
#: the worker until its ETA), or a healthy long job is delivered twice (celery#2599, kombu#337):
#: each worker checks that for its own pool when it starts (``workers/settings.py``).
visibility_timeout = _client.visibility_timeout_s
broker_transport_options = _transport_options(visibility_timeout)
result_backend_transport_options = {"visibility_timeout": visibility_timeout}
broker_connection_retry_on_startup = True
#: Attempts to reach the broker before a process gives up (one every few seconds).
broker_connection_max_retries = _env.integer("CONVEYOR_BROKER_MAX_RETRIES", 100, minimum=0)

#: Our consumer dead-letters the messages Celery refuses (pickle, unknown task) instead of
#: dropping them.
worker_consumer = "workers.runtime.consumer:Consumer"

# --- Results --------------------------------------------------------------------------------
#: A result that cannot be stored while Redis is away waits for it (exponential backoff, 0.1 s
#: to 10 s, about four minutes in all) instead of turning a job that did its work into a failure
#: (tests/faults/test_redis_restart.py). A job's hard time limit still bounds the wait.
result_backend_always_retry = True
#: Seconds a result-backend call may wait on a Redis that stopped answering (Celery's default,
#: 120, outlasts the episodes pool's 60 s hard limit: a batch would be killed after its rows
#: were written, over the results it stores). Connection refused fails at once anyway.
redis_socket_timeout = 15
redis_socket_connect_timeout = 5
result_backend_max_retries = 30
result_backend_base_sleep_between_retries_ms = 100
result_backend_max_sleep_between_retries_ms = 10_000
#: Seconds a finished job's result envelope is kept in Redis (Redis must never have to evict).
result_expires = _env.integer("CONVEYOR_RESULT_TTL", 86_400, minimum=60)
#: Off: extended results repeat the job's arguments (an ai job's whole prompt) and its worker
#: and queue in every state written to the backend: a tenth of a busy ai worker's CPU
#: (bench/ai_inflight.py) and that much more Redis memory, for nothing a caller reads. Flower
#: shows arguments from the task events; dead letters keep failed payloads.
result_extended = False
# Off: a STARTED state cost every job two more round trips (Celery reads the state, then writes
# it). A job's ``*_start`` event already says it left the queue: ``Job.status()`` and the
# gateway read "running" from its event stream; Flower has its task-started event.
task_track_started = False

# --- Monitoring: Flower sees every job a worker receives, runs and ends. ------------------------
worker_send_task_events = True
#: A task-sent event costs every submit a round trip: on only with CONVEYOR_TASK_SENT_EVENTS=1.
task_send_sent_event = _client.task_sent_events
#: Seconds an events queue of a gone monitor lives, so a stopped Flower leaves no growing queue.
event_queue_expires = 60.0

# --- Beat: one lock-holding scheduler (celery-redbeat), so two beats never both fire. --------
beat_scheduler = "redbeat.RedBeatScheduler"
beat_schedule = BEAT_SCHEDULE
# redbeat_redis_url (CONVEYOR_BEAT_REDIS_URL) is set by `conveyor beat` in the beat process only:
# a setting here would show its password in Flower and `celery inspect conf`, which censor only
# settings named like secrets and the broker/backend URLs.
redbeat_key_prefix = "conveyor:beat:"
#: Seconds before another beat may take over from one that stopped renewing its lock.
redbeat_lock_timeout = _env.integer("CONVEYOR_BEAT_LOCK_TIMEOUT", 60, minimum=5)
redbeat_redis_options = {"socket_timeout": 30, "socket_connect_timeout": 5}
beat_max_loop_interval = 5
timezone = "UTC"
enable_utc = True
