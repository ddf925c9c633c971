"""Conveyor's worker settings: typed, read once from the environment, a section per family.

Every value says its unit and why it is what it is. Sections are read on first use and kept
(``functools.cache``); a worker reads the core section, its own pool's and its family's when it
starts (``check_pool``, called by ``conveyor worker``), so a malformed setting of one family
stops only that family's workers, at start, with a one-line ``ConfigError`` that names the
variable. ``celeryconfig.py`` holds Celery's own settings; README's configuration table lists
both.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from conveyor.config import DEFAULT_REDIS_URL, Env
from conveyor.errors import ConfigError
from conveyor.names import AI, EPISODES, MAINTENANCE, N8N, QUEUES

if TYPE_CHECKING:
    from workers.ai.providers.base import ProviderConfig
    from workers.n8n.client import N8nConfig

__all__ = [
    "AiSettings",
    "ConfigError",
    "CoreSettings",
    "EpisodeSettings",
    "GatewaySettings",
    "N8nSettings",
    "PoolSettings",
    "ai",
    "check_gateway",
    "check_pool",
    "core",
    "episodes",
    "gateway",
    "n8n",
    "pool",
    "pools",
    "reset",
]

#: Celery pool implementations a worker pool may run on.
POOL_KINDS = ("prefork", "threads", "solo", "gevent", "eventlet")


def _env() -> Env:
    return Env()


# --- Core: every worker ----------------------------------------------------------------------


@dataclass(frozen=True)
class CoreSettings:
    #: ``dev`` relaxes what production must have (authentication on Flower); else prod.
    env: str
    #: Redis for events, idempotency keys, breakers and rate limits.
    redis_url: str
    #: Where celery-redbeat keeps the schedule and its lock (``CONVEYOR_BEAT_REDIS_URL``).
    beat_redis_url: str
    #: SQLAlchemy URL of the Postgres database holding episodes, executions and dead letters.
    database_url: str
    #: Postgres connections one worker process keeps open, and may add under a burst. Multiply
    #: by the processes of the fleet and keep the total under the server's max_connections.
    db_pool_size: int
    db_max_overflow: int
    #: Bytes a payload may take as compact JSON; checked at submit and again on receipt.
    max_payload_bytes: int
    #: Seconds an idempotency key (and a cancel flag) lives.
    idempotency_ttl_s: int
    #: Celery's two INFO lines a job ("received", "succeeded in") in worker logs
    #: (``CONVEYOR_LOG_JOBS=1``); off, a job logs only when something goes wrong.
    log_jobs: bool
    #: Deliveries of one attempt (a worker died under it each time) before the job is
    #: dead-lettered as poison instead of being handed out again.
    max_deliveries: int
    #: Retries of a job that keeps failing with a retryable error, before it is dead-lettered.
    max_retries: int
    #: Exponential backoff between retries (seconds): base x 2^attempt with jitter, capped.
    retry_base_s: float
    retry_cap_s: float
    #: Events kept per job in its replay stream (approximate cap, as XADD MAXLEN ~).
    event_stream_maxlen: int
    #: Seconds a job's event stream is kept after its last event.
    event_ttl_s: int
    #: Seconds before Redis hands an unacknowledged job to another worker (celeryconfig).
    visibility_timeout_s: int


@functools.cache
def core() -> CoreSettings:
    env = _env()
    redis_url = env.url("REDIS_URL", DEFAULT_REDIS_URL, schemes=("redis", "rediss", "unix"))
    database_url = env.url(
        "DATABASE_URL",
        "postgresql://postgres@127.0.0.1:5432/conveyor",
        schemes=("postgres", "postgresql", "postgresql+psycopg2"),
    )
    assert redis_url is not None and database_url is not None
    return CoreSettings(
        env=env.text("CONVEYOR_ENV", "prod") or "prod",
        redis_url=redis_url,
        beat_redis_url=env.text("CONVEYOR_BEAT_REDIS_URL") or redis_url,
        database_url=database_url,
        db_pool_size=env.integer("CONVEYOR_DB_POOL_SIZE", 5, minimum=1),
        db_max_overflow=env.integer("CONVEYOR_DB_MAX_OVERFLOW", 10, minimum=0),
        max_payload_bytes=env.integer("CONVEYOR_MAX_PAYLOAD_BYTES", 256 * 1024, minimum=1024),
        idempotency_ttl_s=env.integer("CONVEYOR_IDEMPOTENCY_TTL", 86_400, minimum=1),
        log_jobs=env.choice("CONVEYOR_LOG_JOBS", "0", ("0", "1")) == "1",
        max_deliveries=env.integer("CONVEYOR_MAX_DELIVERIES", 5, minimum=1),
        max_retries=env.integer("CONVEYOR_MAX_RETRIES", 6, minimum=0),
        retry_base_s=env.number("CONVEYOR_RETRY_BASE", 1.0, minimum=0.0),
        retry_cap_s=env.number("CONVEYOR_RETRY_CAP", 120.0, minimum=0.0),
        event_stream_maxlen=env.integer("CONVEYOR_EVENT_STREAM_MAXLEN", 1000, minimum=10),
        event_ttl_s=env.integer("CONVEYOR_EVENT_TTL", 86_400, minimum=60),
        visibility_timeout_s=env.integer("CONVEYOR_VISIBILITY_TIMEOUT", 1800, minimum=1),
    )


# --- Pools -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PoolSettings:
    """One worker pool: what it consumes, how, and how much at once."""

    name: str
    queues: tuple[str, ...]
    #: Celery pool implementation (``POOL_KINDS``).
    pool: str
    #: Jobs at once per worker.
    concurrency: int
    #: Messages reserved per slot.
    prefetch_multiplier: int
    #: Seconds. The soft limit (80 %) raises inside the task first, so it can report and clean
    #: up; prefork and solo enforce both, a threads pool's jobs keep their own deadlines.
    time_limit_s: int
    soft_time_limit_s: int
    #: Recycle a prefork child once it holds this much memory (KiB), to bound slow leaks. By
    #: memory, not by count: replacing a child every 1,000 jobs stalled the queue 0.3-3.6 s each
    #: time for children that had leaked nothing (``CONVEYOR_<POOL>_MAX_MEMORY_MB``).
    max_memory_per_child_kb: int | None


#: The defaults: ``ai`` and ``n8n`` wait on HTTP, so threads (their deadlines are request
#: timeouts); ``episodes`` and ``maintenance`` touch Postgres in short bursts, so a few
#: processes. (pool, concurrency, prefetch (None: the episodes batch), hard limit s, recycle
#: at MB)
_POOL_DEFAULTS: dict[str, tuple[str, int, int | None, int, int | None]] = {
    AI: ("threads", 32, 1, 300, None),
    N8N: ("threads", 16, 1, 120, None),
    # Prefetch per slot: a whole batch, so the consumer can fill the next batch while each
    # process writes one (it holds every record, unacknowledged, until its batch commits).
    EPISODES: ("prefork", 2, None, 60, 512),
    MAINTENANCE: ("prefork", 1, 1, 300, 512),
}


@functools.cache
def pool(name: str) -> PoolSettings:
    """A pool's settings; each number can be overridden by ``CONVEYOR_<POOL>_<SETTING>``."""
    if name not in _POOL_DEFAULTS:
        raise KeyError(f"unknown pool {name!r}; pools: {', '.join(QUEUES)}")
    kind, concurrency, prefetch, time_limit, recycle = _POOL_DEFAULTS[name]
    env = _env()
    var = f"CONVEYOR_{name.upper()}_"
    hard = env.integer(var + "TIME_LIMIT", time_limit, minimum=1)
    if prefetch is None:
        prefetch = episodes().batch_size
    spec = PoolSettings(
        name=name,
        queues=(name,),
        pool=env.choice(var + "POOL", kind, POOL_KINDS),
        concurrency=env.integer(var + "CONCURRENCY", concurrency, minimum=1),
        prefetch_multiplier=env.integer(var + "PREFETCH", prefetch, minimum=1),
        time_limit_s=hard,
        soft_time_limit_s=max(1, hard * 4 // 5),
        max_memory_per_child_kb=(
            None
            if recycle is None
            else env.integer(var + "MAX_MEMORY_MB", recycle, minimum=64) * 1024
        ),
    )
    _check_visibility(spec)
    if name == EPISODES:
        batch = episodes().batch_size
        if spec.prefetch_multiplier * spec.concurrency < batch:
            raise ConfigError(
                f"CONVEYOR_EPISODES_PREFETCH x CONVEYOR_EPISODES_CONCURRENCY "
                f"({spec.prefetch_multiplier} x {spec.concurrency}) must be at least "
                f"CONVEYOR_EPISODES_BATCH_SIZE ({batch}), or no batch ever fills"
            )
    return spec


def _check_visibility(spec: PoolSettings) -> None:
    """A job of this pool must be acknowledged before Redis hands it to another worker: its
    hard time limit plus the longest retry delay (a retry waits, unacknowledged, in the worker
    until its ETA) must fit in the visibility timeout (celery#2599, kombu#337)."""
    settings = core()
    hold = spec.time_limit_s + settings.retry_cap_s
    if settings.visibility_timeout_s <= hold:
        raise ConfigError(
            f"CONVEYOR_VISIBILITY_TIMEOUT={settings.visibility_timeout_s} must exceed "
            f"CONVEYOR_{spec.name.upper()}_TIME_LIMIT plus CONVEYOR_RETRY_CAP ({hold:g} s), "
            "or long jobs are delivered twice"
        )


def pools() -> dict[str, PoolSettings]:
    """Every pool's settings (raises on the first malformed one)."""
    return {name: pool(name) for name in QUEUES}


#: The pool this process runs, when it is a worker (set by ``conveyor worker`` before it
#: starts): connections are sized for it.
_current_pool: list[str] = []


def set_current_pool(name: str) -> None:
    _current_pool[:] = [name]


def current_pool() -> PoolSettings | None:
    return pool(_current_pool[0]) if _current_pool else None


# --- AI --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AiSettings:
    #: Seconds between two progress events of one generation: a fast model's tokens are
    #: coalesced so one job cannot flood Redis (10 events/s at most by default).
    progress_interval_s: float
    #: Consecutive provider failures (5xx, timeouts, cut streams) that open its circuit, and
    #: the seconds it stays open before one probe (Temporal's outbound breaker: >5, 60 s).
    breaker_fail_max: int
    breaker_reset_s: float
    #: Seconds a job may wait its turn under a provider's rate limit while holding a worker
    #: thread; a longer wait sends it back to the queue instead.
    rate_wait_s: float
    #: Tokens (estimated, ~4 characters each) of recalled episodes a job with ``history`` may
    #: prepend: the newest turns that fit, so recall never crowds out the question.
    history_tokens: int
    #: Seconds between two reads of the cancel keys of a process's streaming jobs (one MGET).
    cancel_check_s: float
    #: Milliseconds a worker process gathers its jobs' episodes into one message
    #: (``workers/episodes/outbox.py``): a job's end waits at most this long for its episode
    #: to be sent. Against a job of seconds it is nothing, and it turns ~45 messages a second
    #: into ~10.
    episode_outbox_ms: int
    #: Records one outbox message carries at most (``CONVEYOR_EPISODES_PACK``).
    episodes_pack: int
    #: Every configured LLM provider by name (``LLM_*``, ``CONVEYOR_PROVIDERS``).
    providers: Mapping[str, ProviderConfig]


@functools.cache
def ai() -> AiSettings:
    from workers.ai.providers.base import providers_from_env

    env = _env()
    return AiSettings(
        progress_interval_s=env.number("CONVEYOR_AI_PROGRESS_INTERVAL", 0.1, minimum=0.0),
        breaker_fail_max=env.integer("CONVEYOR_BREAKER_FAIL_MAX", 5, minimum=1),
        breaker_reset_s=env.number("CONVEYOR_BREAKER_RESET", 60.0, minimum=0.1),
        rate_wait_s=env.number("CONVEYOR_RATE_LIMIT_WAIT", 5.0, minimum=0.0),
        history_tokens=env.integer("CONVEYOR_AI_HISTORY_TOKENS", 2000, minimum=0),
        cancel_check_s=env.number("CONVEYOR_CANCEL_CHECK", 0.5, minimum=0.05),
        episode_outbox_ms=env.integer("CONVEYOR_EPISODE_OUTBOX_MS", 100, minimum=0),
        episodes_pack=env.integer("CONVEYOR_EPISODES_PACK", 100, minimum=1),
        providers=providers_from_env(env),
    )


# --- n8n -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class N8nSettings:
    #: Seconds before the first read of an async execution. Later reads wait about the
    #: execution's age (most webhooks finish in seconds) up to the cap, so a fleet following
    #: long runs does not hammer n8n's API.
    poll_base_s: float
    poll_cap_s: float
    #: Seconds one delivery may keep polling in place (holding a thread and its message) before
    #: it sends the job back to the queue for its next read (at most the pool's soft limit).
    poll_hold_s: float
    #: Consecutive n8n failures (unreachable, timeouts, 5xx; never a 404/401 or a failed
    #: workflow) that open n8n's circuit for every worker, and the seconds it stays open.
    breaker_fail_max: int
    breaker_reset_s: float
    #: Seconds after a job's deadline before maintenance.reconcile_workflows takes over an
    #: execution the job handed over: room for the job's last read.
    reconcile_grace_s: float
    #: Executions one reconciler run reads at most; beat runs it again 30 s later.
    reconcile_batch: int
    #: The instance (``N8N_BASE_URL``, ``N8N_API_KEY``, ``N8N_WORKFLOWS``, timeouts); None when
    #: ``N8N_BASE_URL`` is unset. Kept out of Celery's configuration, which Flower shows.
    instance: N8nConfig | None


@functools.cache
def n8n() -> N8nSettings:
    from workers.n8n.client import n8n_config_from_env

    env = _env()
    return N8nSettings(
        poll_base_s=env.number("CONVEYOR_N8N_POLL_BASE", 0.5, minimum=0.01),
        poll_cap_s=env.number("CONVEYOR_N8N_POLL_CAP", 30.0, minimum=0.01),
        poll_hold_s=env.number("CONVEYOR_N8N_POLL_HOLD", 10.0, minimum=0.0),
        breaker_fail_max=env.integer("CONVEYOR_N8N_BREAKER_FAIL_MAX", 5, minimum=1),
        breaker_reset_s=env.number("CONVEYOR_N8N_BREAKER_RESET", 60.0, minimum=0.1),
        reconcile_grace_s=env.number("CONVEYOR_N8N_RECONCILE_GRACE", 30.0, minimum=0.0),
        reconcile_batch=env.integer("CONVEYOR_N8N_RECONCILE_BATCH", 200, minimum=1),
        instance=n8n_config_from_env(env),
    )


# --- Episodes --------------------------------------------------------------------------------


@dataclass(frozen=True)
class EpisodeSettings:
    #: Records one batch writes in one round trip. A few hundred rows a statement is where
    #: Postgres' multi-row insert levels off (~37k rows/s here, against ~2.6k one row a commit).
    batch_size: int
    #: Milliseconds a part-filled batch waits for more records before it is written anyway:
    #: the most batching adds to an episode's latency when traffic is light.
    flush_ms: int
    #: Days an episode is kept before maintenance.episode_retention deletes it; 0 keeps all.
    retention_days: int
    #: Rows one retention statement deletes: each chunk is its own short transaction, so the
    #: table is never locked for long and writers go on between chunks.
    retention_chunk: int


@functools.cache
def episodes() -> EpisodeSettings:
    env = _env()
    return EpisodeSettings(
        batch_size=env.integer("CONVEYOR_EPISODES_BATCH_SIZE", 500, minimum=1),
        flush_ms=env.integer("CONVEYOR_EPISODES_FLUSH_MS", 200, minimum=1),
        retention_days=env.integer("CONVEYOR_EPISODE_RETENTION_DAYS", 90, minimum=0),
        retention_chunk=env.integer("CONVEYOR_EPISODE_RETENTION_CHUNK", 5000, minimum=1),
    )


# --- At start --------------------------------------------------------------------------------

#: The sections each pool's jobs read; what ``check_pool`` validates before a worker starts.
_FAMILY_SECTIONS = {
    AI: (ai,),
    N8N: (n8n,),
    EPISODES: (episodes,),
    # Retention is the maintenance pool's; n8n's reconciler reads n8n's settings when it runs
    # and skips, saying why, when they are malformed: n8n's settings never stop this pool.
    MAINTENANCE: (episodes,),
}


# --- Gateway: ``conveyor gateway`` ------------------------------------------------------------


@dataclass(frozen=True)
class GatewaySettings:
    host: str
    port: int
    #: sha256 hex digest of each API key -> its tenant (``CONVEYOR_GATEWAY_KEYS``,
    #: ``tenant:digest,…``; ``conveyor gateway-key TENANT`` makes a key and its entry). Keys
    #: themselves are never configured, so a leaked config leaks no key.
    key_tenants: Mapping[str, str]
    #: Requests (jobs, for a batch) one key may make, as ``limits`` writes it: ``100/second``,
    #: ``5000/minute``; shared by every gateway process through Redis.
    rate_limit: str
    #: Signs the short-lived tokens that let a browser follow one job's events. Every gateway
    #: process must share it; dev mode makes one per process when unset.
    token_secret: str | None
    token_ttl_s: int
    #: Bytes a request body may take (a batch holds up to ``max_batch`` payloads).
    max_body_bytes: int
    max_batch: int
    #: Seconds between keep-alive comments on an idle event stream (proxies close silent ones).
    keepalive_s: float
    #: Events a WebSocket client may have waiting before its slowest ones are dropped for a
    #: gap marker: one slow reader never stalls the others, nor grows without bound.
    client_buffer: int


TENANT_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


@functools.cache
def gateway() -> GatewaySettings:
    env = _env()
    key_tenants: dict[str, str] = {}
    raw_keys = env.raw("CONVEYOR_GATEWAY_KEYS")
    for n, entry in enumerate((raw_keys or "").split(","), start=1):
        if not entry.strip():
            continue
        tenant, sep, digest = entry.strip().partition(":")
        digest = digest.strip().lower()
        if (
            not sep
            or not tenant
            or not set(tenant) <= TENANT_CHARS
            or len(tenant) > 64
            or not tenant[0].isalnum()
        ):
            raise ConfigError(
                f"CONVEYOR_GATEWAY_KEYS: entry {n} must be tenant:sha256-hex, the tenant 1-64 "
                "letters, digits, '-', '_' or '.', starting with a letter or digit"
            )
        if len(digest) != 64 or not set(digest) <= set("0123456789abcdef"):
            raise ConfigError(
                f"CONVEYOR_GATEWAY_KEYS: entry {n} ({tenant}) must hold the key's sha256 hex "
                "digest (64 characters), not the key: `conveyor gateway-key TENANT` makes both"
            )
        key_tenants[digest] = tenant
    rate_limit = env.text("CONVEYOR_GATEWAY_RATE_LIMIT", "200/second") or "200/second"
    try:
        from limits import parse

        parse(rate_limit)
    except ValueError:
        raise ConfigError(
            f"CONVEYOR_GATEWAY_RATE_LIMIT={rate_limit!r} is not a rate such as 100/second"
        ) from None
    secret = env.raw("CONVEYOR_GATEWAY_SECRET")
    if secret is not None and len(secret) < 32:
        raise ConfigError("CONVEYOR_GATEWAY_SECRET must be at least 32 characters long")
    return GatewaySettings(
        host=env.text("CONVEYOR_GATEWAY_HOST", "127.0.0.1") or "127.0.0.1",
        port=env.integer("CONVEYOR_GATEWAY_PORT", 8000, minimum=0, maximum=65535),
        key_tenants=key_tenants,
        rate_limit=rate_limit,
        token_secret=secret,
        token_ttl_s=env.integer("CONVEYOR_GATEWAY_TOKEN_TTL", 3600, minimum=10),
        max_body_bytes=env.integer(
            "CONVEYOR_GATEWAY_MAX_BODY_BYTES", 16 * 1024 * 1024, minimum=1024
        ),
        max_batch=env.integer("CONVEYOR_GATEWAY_MAX_BATCH", 1000, minimum=1),
        keepalive_s=env.seconds("CONVEYOR_GATEWAY_KEEPALIVE", 15.0),
        client_buffer=env.integer("CONVEYOR_GATEWAY_CLIENT_BUFFER", 1000, minimum=10),
    )


def check_gateway() -> GatewaySettings:
    """Everything ``conveyor gateway`` needs, checked at start: outside dev mode it refuses
    to serve without API keys or without a token secret."""
    spec = gateway()
    if core().env != "dev":
        if not spec.key_tenants:
            raise ConfigError(
                "CONVEYOR_GATEWAY_KEYS is not set: outside dev mode (CONVEYOR_ENV=dev) the "
                "gateway serves no one without API keys (`conveyor gateway-key TENANT`)"
            )
        if spec.token_secret is None:
            raise ConfigError(
                "CONVEYOR_GATEWAY_SECRET is not set: outside dev mode every gateway process "
                "must sign event tokens with the same secret (32+ characters)"
            )
    return spec


def check_pool(name: str) -> PoolSettings:
    """Read everything a worker of pool ``name`` needs; ``ConfigError`` names what is wrong."""
    core()
    spec = pool(name)
    for section in _FAMILY_SECTIONS[name]:
        section()
    return spec


#: Passwords that are placeholders from examples, never real ones.
_PLACEHOLDERS = {"change_me", "changeme", "change-me", "password", "secret", "xxx"}


def flower_authenticated() -> bool:
    """Whether Flower is given credentials (``FLOWER_BASIC_AUTH`` or ``FLOWER_AUTH``); a
    ``FLOWER_BASIC_AUTH`` with an empty or placeholder part is refused, naming the variable and
    never showing a password."""
    env = _env()
    basic = env.raw("FLOWER_BASIC_AUTH")
    if basic is not None:
        for n, pair in enumerate(basic.split(","), start=1):
            user, sep, password = pair.partition(":")
            if not sep or not user.strip() or not password:
                raise ConfigError(
                    f"FLOWER_BASIC_AUTH: credential {n} must be user:password, both non-empty"
                )
            if password.strip().lower() in _PLACEHOLDERS:
                raise ConfigError(
                    f"FLOWER_BASIC_AUTH: credential {n} has a placeholder password; set a real one"
                )
        return True
    return env.is_set("FLOWER_AUTH")


def allow_unauthenticated_flower_api() -> None:
    """Dev mode, bound to localhost: let dashboards and tests use Flower's API without
    credentials (Flower reads this from its environment only)."""
    os.environ.setdefault("FLOWER_UNAUTHENTICATED_API", "true")


def reset() -> None:
    """Forget what was read (tests change the environment between cases)."""
    for cached in (core, pool, ai, n8n, episodes, gateway):
        cached.cache_clear()
    _current_pool.clear()
