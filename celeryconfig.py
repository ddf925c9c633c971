"""Every setting of Conveyor, read from the environment: Celery's first, then Conveyor's own.

Each value says its unit and why it is what it is. A malformed variable stops the process at
import with an error that names it (``conveyor.settings.ConfigError``). README.md's
configuration table lists the same variables.
"""

from __future__ import annotations

from kombu import Exchange, Queue

from beat_schedule import BEAT_SCHEDULE
from conveyor.names import MAINTENANCE, QUEUES, TASK_QUEUES
from conveyor.settings import ConfigError, env_float, env_int, env_str, load_dev_env

# A shell with nothing configured talks to the running `conveyor dev` stack, if there is one.
load_dev_env()

# --- Where things live ----------------------------------------------------------------------

#: Redis for events, idempotency keys and (by default) the broker and results.
redis_url = env_str("REDIS_URL", "redis://127.0.0.1:6379/0")
broker_url = env_str("CELERY_BROKER_URL", redis_url)
result_backend = env_str("CELERY_RESULT_BACKEND", redis_url)

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
task_default_priority = 5

# --- Delivery guarantees --------------------------------------------------------------------
# Acknowledge after the task ran, and give a job back when its worker process dies, so a
# killed worker loses nothing (celery#1628, #3541). Redelivery is capped by
# conveyor_max_deliveries, after which the job goes to dead_letters instead of looping.
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
# When the broker connection drops, running acks_late jobs cannot be acknowledged any more and
# will be redelivered: cancel them instead of finishing them twice.
worker_cancel_long_running_tasks_on_connection_loss = True

#: Seconds a worker may hold a message unacknowledged before Redis hands it to another worker.
#: This is also how long a job of a SIGKILLed worker waits before it runs again. It must exceed
#: the longest hard time limit plus the longest retry delay (a retry waits, unacknowledged, in
#: the worker until its ETA), or a healthy long job is delivered twice (celery#2599, kombu#337).
visibility_timeout = env_int("CONVEYOR_VISIBILITY_TIMEOUT", 1800, minimum=1)
_redis_transport = {
    "visibility_timeout": visibility_timeout,
    # Sweep for abandoned messages every unacked_restore_interval s (not 10 x that).
    "unacked_restore_interval": min(10, visibility_timeout),
    "unacked_restore_throttle": 1,
    # Four lists per queue; a priority 0-9 is served from the nearest step.
    "priority_steps": [0, 3, 6, 9],
    "sep": ":",
    "queue_order_strategy": "priority",
    # Notice a half-open connection within about a minute instead of never.
    "health_check_interval": 25,
    "socket_timeout": 30,
    "socket_connect_timeout": 5,
}
broker_transport_options = dict(_redis_transport)
result_backend_transport_options = {"visibility_timeout": visibility_timeout}
broker_connection_retry_on_startup = True
#: Attempts to reach the broker before a process gives up (one every few seconds).
broker_connection_max_retries = env_int("CONVEYOR_BROKER_MAX_RETRIES", 100, minimum=0)

#: Our consumer dead-letters the messages Celery refuses (pickle, unknown task) instead of
#: dropping them.
worker_consumer = "workers.runtime.consumer:Consumer"

# --- Results --------------------------------------------------------------------------------
#: Seconds a finished job's result envelope is kept in Redis (Redis must never have to evict).
result_expires = env_int("CONVEYOR_RESULT_TTL", 86_400, minimum=60)
#: Off: extended results repeat the job's arguments (an ai job's whole prompt) and its worker
#: and queue in every state written to the backend: a tenth of a busy ai worker's CPU
#: (bench/ai_inflight.py) and that much more Redis memory, for nothing a caller reads. Flower
#: shows arguments from the task events; dead letters keep failed payloads.
result_extended = False
# STARTED tells a caller the job left the queue; Flower shows it too.
task_track_started = True

# --- Monitoring: Flower sees every job from sent to done. --------------------------------------
worker_send_task_events = True
task_send_sent_event = True
#: Seconds an events queue of a gone monitor lives, so a stopped Flower leaves no growing queue.
event_queue_expires = 60.0

# --- Beat: one lock-holding scheduler (celery-redbeat), so two beats never both fire. --------
beat_scheduler = "redbeat.RedBeatScheduler"
beat_schedule = BEAT_SCHEDULE
redbeat_redis_url = env_str("CONVEYOR_BEAT_REDIS_URL", redis_url)
redbeat_key_prefix = "conveyor:beat:"
#: Seconds before another beat may take over from one that stopped renewing its lock.
redbeat_lock_timeout = env_int("CONVEYOR_BEAT_LOCK_TIMEOUT", 60, minimum=5)
redbeat_redis_options = {"socket_timeout": 30, "socket_connect_timeout": 5}
beat_max_loop_interval = 5
timezone = "UTC"
enable_utc = True

# --- Conveyor's own settings ------------------------------------------------------------------

#: ``dev`` relaxes what production must have (authentication on Flower); anything else is prod.
conveyor_env = env_str("CONVEYOR_ENV", "prod")
#: SQLAlchemy URL of the Postgres database holding episodes, executions and dead letters.
conveyor_database_url = env_str("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/conveyor")
#: Postgres connections one worker process keeps open, and may add under a burst. Multiply by
#: the processes of the fleet and keep the total under the server's max_connections.
conveyor_db_pool_size = env_int("CONVEYOR_DB_POOL_SIZE", 5, minimum=1)
conveyor_db_max_overflow = env_int("CONVEYOR_DB_MAX_OVERFLOW", 10, minimum=0)
#: Bytes a payload may take as compact JSON; checked at submit and again on receipt.
conveyor_max_payload_bytes = env_int("CONVEYOR_MAX_PAYLOAD_BYTES", 256 * 1024, minimum=1024)
#: Seconds an idempotency key keeps returning the job it first created.
conveyor_idempotency_ttl = env_int("CONVEYOR_IDEMPOTENCY_TTL", 86_400, minimum=1)
#: Deliveries of one attempt of a job (a worker died under it each time) before it is
#: dead-lettered as poison instead of being handed out again.
conveyor_max_deliveries = env_int("CONVEYOR_MAX_DELIVERIES", 5, minimum=1)
#: Retries of a job that keeps failing with a retryable error, before it is dead-lettered.
conveyor_max_retries = env_int("CONVEYOR_MAX_RETRIES", 6, minimum=0)
#: Exponential backoff between retries (seconds): base x 2^attempt with jitter, capped.
conveyor_retry_base_s = env_float("CONVEYOR_RETRY_BASE", 1.0, minimum=0.0)
conveyor_retry_cap_s = env_float("CONVEYOR_RETRY_CAP", 120.0, minimum=0.0)
#: Events kept per job in its replay stream (approximate cap, as XADD MAXLEN ~).
conveyor_event_stream_maxlen = env_int("CONVEYOR_EVENT_STREAM_MAXLEN", 1000, minimum=10)
#: Seconds a job's event stream is kept after its last event.
conveyor_event_ttl = env_int("CONVEYOR_EVENT_TTL", 86_400, minimum=60)

# --- AI generation. Providers themselves (LLM_BASE_URL, LLM_API_KEY, LLM_MODEL, LLM_PROVIDER,
# CONVEYOR_PROVIDERS, ...) are read by workers.ai.providers.base.providers_from_env when the ai
# task module loads, so a malformed one stops the worker at start.
#: Seconds between two progress events of one generation: a fast model's tokens are
#: coalesced so one job cannot flood Redis (10 events/s at most by default).
conveyor_ai_progress_interval_s = env_float("CONVEYOR_AI_PROGRESS_INTERVAL", 0.1, minimum=0.0)
#: Consecutive provider failures (5xx, timeouts, cut streams) that open its circuit, and the
#: seconds it stays open before one probe may go (Temporal's outbound breaker: >5, 60 s).
conveyor_breaker_fail_max = env_int("CONVEYOR_BREAKER_FAIL_MAX", 5, minimum=1)
conveyor_breaker_reset_s = env_float("CONVEYOR_BREAKER_RESET", 60.0, minimum=0.1)
#: Seconds a job may wait its turn under a provider's rate limit while holding a worker
#: thread; a longer wait sends it back to the queue instead.
conveyor_rate_wait_s = env_float("CONVEYOR_RATE_LIMIT_WAIT", 5.0, minimum=0.0)
#: Tokens (estimated, ~4 characters each) of recalled episodes a job with ``history`` may
#: prepend: the newest turns that fit, so recall never crowds out the question.
conveyor_ai_history_tokens = env_int("CONVEYOR_AI_HISTORY_TOKENS", 2000, minimum=0)
#: Seconds between two reads of the cancel keys of a process's streaming jobs (one MGET).
conveyor_cancel_check_s = env_float("CONVEYOR_CANCEL_CHECK", 0.5, minimum=0.05)

# --- n8n workflows. The instance (N8N_BASE_URL, N8N_API_KEY, N8N_WORKFLOWS, N8N_CONNECT_TIMEOUT,
# N8N_READ_TIMEOUT) is read by workers.n8n.client.n8n_from_env when the n8n task module loads, so a
# malformed one stops the worker at start, and the API key never enters this configuration
# (Flower and `celery inspect conf` show it).
#: Seconds before the first read of an async execution. Later reads wait about the execution's
#: age (most webhooks finish in seconds) up to the cap (seconds), so a fleet following long
#: runs does not hammer n8n's API.
conveyor_n8n_poll_base_s = env_float("CONVEYOR_N8N_POLL_BASE", 0.5, minimum=0.01)
conveyor_n8n_poll_cap_s = env_float("CONVEYOR_N8N_POLL_CAP", 30.0, minimum=0.01)
#: Seconds one delivery may keep polling in place (holding a thread and its message) before it
#: sends the job back to the queue for its next read. Never more than the n8n pool's soft time
#: limit, which the visibility-timeout check below already covers.
conveyor_n8n_poll_hold_s = env_float("CONVEYOR_N8N_POLL_HOLD", 10.0, minimum=0.0)
#: Consecutive n8n failures (unreachable, timeouts, 5xx; never a 404/401 or a failed workflow)
#: that open n8n's circuit for every worker, and the seconds it stays open before one probe.
conveyor_n8n_breaker_fail_max = env_int("CONVEYOR_N8N_BREAKER_FAIL_MAX", 5, minimum=1)
conveyor_n8n_breaker_reset_s = env_float("CONVEYOR_N8N_BREAKER_RESET", 60.0, minimum=0.1)
#: Seconds after a job's deadline before maintenance.reconcile_workflows takes over an execution
#: the job handed over: room for the job's last read, so the two rarely race (a conditional
#: update settles it when they do).
conveyor_n8n_reconcile_grace_s = env_float("CONVEYOR_N8N_RECONCILE_GRACE", 30.0, minimum=0.0)
#: Executions one reconciler run reads at most; beat runs it again 30 s later.
conveyor_n8n_reconcile_batch = env_int("CONVEYOR_N8N_RECONCILE_BATCH", 200, minimum=1)

# --- Episodes (workers.runtime.batching, tasks/episodes.py) -------------------------------
#: Records one batch writes in one round trip. A few hundred rows a statement is where
#: Postgres' multi-row insert levels off (~37k rows/s here, against ~2.6k one row a commit).
conveyor_episodes_batch_size = env_int("CONVEYOR_EPISODES_BATCH_SIZE", 500, minimum=1)
#: Milliseconds a part-filled batch waits for more records before it is written anyway: the
#: most batching adds to an episode's latency when traffic is light.
conveyor_episodes_flush_ms = env_int("CONVEYOR_EPISODES_FLUSH_MS", 200, minimum=1)
#: Records one message carries at most when ``Submitter.submit_many`` sends episodes together.
#: Celery spends ~0.7 ms of consumer CPU per message whatever it holds (it cannot drain more
#: than ~1,800 messages/s on 2 cores), so one message per record caps the whole path there;
#: 100 records a message make that cost ~7 us a record. The consumer may hold
#: prefetch x concurrency messages, so up to this many times as many records, in memory.
conveyor_episodes_pack = env_int("CONVEYOR_EPISODES_PACK", 100, minimum=1)
#: Milliseconds an ai worker process gathers its jobs' episodes into one message (see
#: workers/episode_log.py): a job's end waits at most this long for its episode to be sent.
#: Against a job of seconds it is nothing, and it turns ~45 messages a second into ~10.
conveyor_episode_outbox_ms = env_int("CONVEYOR_EPISODE_OUTBOX_MS", 100, minimum=0)
#: Days an episode is kept before maintenance.episode_retention deletes it; 0 keeps them all.
conveyor_episode_retention_days = env_int("CONVEYOR_EPISODE_RETENTION_DAYS", 90, minimum=0)
#: Rows one retention statement deletes: each chunk is its own short transaction, so the
#: table is never locked for long and writers go on between chunks.
conveyor_episode_retention_chunk = env_int("CONVEYOR_EPISODE_RETENTION_CHUNK", 5000, minimum=1)


def _pool(
    name: str,
    pool: str,
    concurrency: int,
    prefetch: int,
    time_limit: int,
    max_tasks_per_child: int | None = None,
) -> dict:
    """One pool's spec; each number can be overridden by ``CONVEYOR_<POOL>_<SETTING>``."""
    var = f"CONVEYOR_{name.upper()}_"
    hard = env_int(var + "TIME_LIMIT", time_limit, minimum=1)
    return {
        "queues": [name],
        "pool": env_str(var + "POOL", pool),
        "concurrency": env_int(var + "CONCURRENCY", concurrency, minimum=1),
        "prefetch_multiplier": env_int(var + "PREFETCH", prefetch, minimum=1),
        # Seconds. The soft limit raises inside the task first, so it can report and clean up.
        "time_limit": hard,
        "soft_time_limit": max(1, hard * 4 // 5),
        # Recycle processes after this many jobs to bound slow leaks (prefork only).
        "max_tasks_per_child": max_tasks_per_child,
    }


#: The worker pools: what each consumes, how, and how much at once.
#: ``ai`` and ``n8n`` wait on HTTP, so threads (their deadlines are request timeouts);
#: ``episodes`` and ``maintenance`` touch Postgres in short bursts, so a few processes.
conveyor_pools = {
    "ai": _pool("ai", "threads", concurrency=32, prefetch=1, time_limit=300),
    "n8n": _pool("n8n", "threads", concurrency=16, prefetch=1, time_limit=120),
    # Prefetch per slot: a whole batch, so the consumer can fill the next batch while each
    # process writes one (it holds every record, unacknowledged, until its batch commits).
    "episodes": _pool(
        "episodes",
        "prefork",
        concurrency=2,
        prefetch=conveyor_episodes_batch_size,
        time_limit=60,
        max_tasks_per_child=10_000,
    ),
    "maintenance": _pool(
        "maintenance",
        "prefork",
        concurrency=1,
        prefetch=1,
        time_limit=300,
        max_tasks_per_child=1_000,
    ),
}

_longest_hold = max(p["time_limit"] for p in conveyor_pools.values()) + conveyor_retry_cap_s
if visibility_timeout <= _longest_hold:
    raise ConfigError(
        f"CONVEYOR_VISIBILITY_TIMEOUT={visibility_timeout} must exceed the longest hard time limit "
        f"plus CONVEYOR_RETRY_CAP ({_longest_hold:g} s), or long jobs are delivered twice"
    )

_episodes = conveyor_pools["episodes"]
if _episodes["prefetch_multiplier"] * _episodes["concurrency"] < conveyor_episodes_batch_size:
    raise ConfigError(
        f"CONVEYOR_EPISODES_PREFETCH x CONVEYOR_EPISODES_CONCURRENCY "
        f"({_episodes['prefetch_multiplier']} x {_episodes['concurrency']}) must be at least "
        f"CONVEYOR_EPISODES_BATCH_SIZE ({conveyor_episodes_batch_size}), or no batch ever fills"
    )
