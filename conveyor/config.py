"""The client's configuration, and the one way Conveyor reads its environment.

``Env`` is how every settings module (this one, ``workers/settings.py``, ``celeryconfig.py``,
``workers/dev/env.py``) reads a variable: typed, with an error that names the variable and
never shows a secret. ``ClientConfig`` is everything a submitting service needs and nothing a
worker does, so a worker-only variable (``CONVEYOR_EPISODES_PREFETCH``, ``N8N_WORKFLOWS``) can
never stop ``Submitter()`` inside another service. The broker's transport options are a
contract both sides must share (priorities, key separator, visibility): they live here, and
``celeryconfig`` takes them from here.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from conveyor.errors import ConfigError

__all__ = [
    "DEFAULT_REDIS_URL",
    "ClientConfig",
    "ConfigError",
    "Env",
    "broker_transport_options",
    "redact_url",
]

#: Where everything lives when nothing is configured.
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

#: Seconds; the longest hard time limit of the default pools (ai, maintenance: 300 s). A delayed
#: job waits unacknowledged in a worker until due, so it may be delayed by at most the
#: visibility timeout less this, or Redis would hand it to a second worker.
DEFAULT_LONGEST_TIME_LIMIT_S = 300


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``: safe to print."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + host))


class Env:
    """Typed reads of one environment mapping (``os.environ`` by default).

    A blank value counts as unset. A malformed value raises ``ConfigError`` naming the
    variable; values of ``secret`` variables are never shown, and URLs are shown redacted.
    """

    def __init__(self, environ: Mapping[str, str] | None = None):
        self._environ: Mapping[str, str] = os.environ if environ is None else environ

    def raw(self, name: str) -> str | None:
        value = self._environ.get(name)
        if value is None or not value.strip():
            return None
        return value.strip()

    def is_set(self, name: str) -> bool:
        return self.raw(name) is not None

    def text(self, name: str, default: str | None = None) -> str | None:
        raw = self.raw(name)
        return default if raw is None else raw

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        raw = self.raw(name)
        if raw is None:
            return default
        if raw not in choices:
            raise ConfigError(f"{name}={raw!r} must be one of {', '.join(choices)}")
        return raw

    def integer(
        self, name: str, default: int, *, minimum: int | None = None, maximum: int | None = None
    ) -> int:
        raw = self.raw(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not a whole number") from None
        if minimum is not None and value < minimum:
            raise ConfigError(f"{name}={value} is below its minimum of {minimum}")
        if maximum is not None and value > maximum:
            raise ConfigError(f"{name}={value} is above its maximum of {maximum}")
        return value

    def number(self, name: str, default: float, *, minimum: float | None = None) -> float:
        raw = self.raw(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not a number") from None
        if not math.isfinite(value):
            raise ConfigError(f"{name}={raw!r} must be a finite number")
        if minimum is not None and value < minimum:
            raise ConfigError(f"{name}={value:g} is below its minimum of {minimum:g}")
        return value

    def seconds(self, name: str, default: float) -> float:
        """A positive, finite number of seconds."""
        raw = self.raw(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not a number of seconds") from None
        if not value > 0 or not math.isfinite(value):
            raise ConfigError(f"{name}={raw!r} must be a positive number of seconds")
        return value

    def json(self, name: str) -> Any | None:
        """The parsed JSON value, or None when unset. The value is not shown in errors: JSON
        settings may hold names of secrets, and a parser's position is enough to find a typo."""
        raw = self.raw(name)
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise ConfigError(f"{name} is not valid JSON: {exc}") from None

    def url(self, name: str, default: str | None = None, *, schemes: tuple[str, ...]) -> str | None:
        """A URL with one of ``schemes`` and a host; shown redacted in errors."""
        raw = self.raw(name)
        if raw is None:
            return default
        try:
            parts = urlsplit(raw)
            parts.port  # noqa: B018 - raises ValueError on a malformed port
        except ValueError:
            raise ConfigError(f"{name}={redact_url(raw)!r} is not a URL") from None
        if parts.scheme not in schemes:
            starts = " or ".join(s + "://" for s in schemes)
            raise ConfigError(f"{name}={redact_url(raw)!r} must start with {starts}")
        return raw


#: The pools' default hard time limits (seconds), as workers/settings.py has them.
_POOL_TIME_LIMITS = {"AI": 300, "N8N": 120, "EPISODES": 60, "MAINTENANCE": 300}


def _longest_time_limit(env: Env) -> int:
    limits = []
    for pool, default in _POOL_TIME_LIMITS.items():
        raw = env.raw(f"CONVEYOR_{pool}_TIME_LIMIT")
        try:
            limits.append(int(raw) if raw is not None else default)
        except ValueError:
            limits.append(default)
    return max(limits)


def broker_transport_options(visibility_timeout_s: int) -> dict[str, Any]:
    """kombu's Redis transport options: a contract between the submitter and every worker (a
    priority is a list name, the separator is part of every queue key)."""
    return {
        "visibility_timeout": visibility_timeout_s,
        # Sweep for abandoned messages every unacked_restore_interval s (not 10 x that).
        "unacked_restore_interval": min(10, visibility_timeout_s),
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


_REDIS_SCHEMES = ("redis", "rediss", "unix")


@dataclass(frozen=True)
class ClientConfig:
    """What a submitting service needs: where to send, and the limits it checks before sending."""

    #: Redis for events, idempotency keys and cancel flags; by default broker and results too.
    redis_url: str = DEFAULT_REDIS_URL
    #: The broker (``CELERY_BROKER_URL``); ``redis_url`` when None.
    broker: str | None = None
    #: Where result envelopes are kept (``CELERY_RESULT_BACKEND``); ``redis_url`` when None.
    result_backend: str | None = None
    #: Bytes a payload may take as compact JSON (``CONVEYOR_MAX_PAYLOAD_BYTES``).
    max_payload_bytes: int = 256 * 1024
    #: Seconds an idempotency key keeps returning its job (``CONVEYOR_IDEMPOTENCY_TTL``).
    idempotency_ttl_s: int = 86_400
    #: Seconds a claimed idempotency key waits for its job to be sent before it lapses: a
    #: submitter that dies between claiming and sending does not leave a key returning, for a
    #: day, a job that was never sent.
    idempotency_pending_ttl_s: int = 60
    #: Seconds results, and the job index that says whose they are, are kept
    #: (``CONVEYOR_RESULT_TTL``, Celery's ``result_expires``).
    result_ttl_s: int = 86_400
    #: Records of ``episodes.record`` one packed message carries (``CONVEYOR_EPISODES_PACK``).
    episodes_pack: int = 100
    #: Seconds before Redis hands an unacknowledged job to another worker
    #: (``CONVEYOR_VISIBILITY_TIMEOUT``): bounds how far a job may be delayed.
    visibility_timeout_s: int = 1800
    #: Seconds: the longest hard time limit of the pools (``CONVEYOR_<POOL>_TIME_LIMIT``), read
    #: leniently (a malformed one is the worker's to refuse): a job delayed past the
    #: visibility timeout less this could be handed to a second worker.
    longest_time_limit_s: int = DEFAULT_LONGEST_TIME_LIMIT_S
    #: Priority of a job that names none: 0 (served first) .. 9.
    default_priority: int = 5
    #: Whether a submit publishes Celery's task-sent event (``CONVEYOR_TASK_SENT_EVENTS``):
    #: Flower then lists a job before a worker takes it, for one more round trip a submit.
    task_sent_events: bool = False
    #: Whether the broker came from configuration (False: the default, 127.0.0.1).
    configured: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ClientConfig:
        env = Env(environ)
        redis_url = env.url("REDIS_URL", DEFAULT_REDIS_URL, schemes=_REDIS_SCHEMES)
        assert redis_url is not None
        return cls(
            redis_url=redis_url,
            broker=env.text("CELERY_BROKER_URL"),
            result_backend=env.text("CELERY_RESULT_BACKEND"),
            max_payload_bytes=env.integer("CONVEYOR_MAX_PAYLOAD_BYTES", 256 * 1024, minimum=1024),
            idempotency_ttl_s=env.integer("CONVEYOR_IDEMPOTENCY_TTL", 86_400, minimum=1),
            result_ttl_s=env.integer("CONVEYOR_RESULT_TTL", 86_400, minimum=60),
            episodes_pack=env.integer("CONVEYOR_EPISODES_PACK", 100, minimum=1),
            visibility_timeout_s=env.integer("CONVEYOR_VISIBILITY_TIMEOUT", 1800, minimum=1),
            longest_time_limit_s=_longest_time_limit(env),
            configured=env.is_set("REDIS_URL") or env.is_set("CELERY_BROKER_URL"),
            task_sent_events=env.choice("CONVEYOR_TASK_SENT_EVENTS", "0", ("0", "1")) == "1",
        )

    @property
    def broker_url(self) -> str:
        return self.broker or self.redis_url

    @property
    def result_backend_url(self) -> str:
        return self.result_backend or self.redis_url

    @property
    def max_delay_s(self) -> float:
        """Seconds a job may be delayed (``countdown``, ``eta``): see longest_time_limit_s."""
        return float(max(0, self.visibility_timeout_s - self.longest_time_limit_s))

    def celery_settings(self) -> dict[str, Any]:
        """The Celery settings a sending-only app needs (JSON only, the shared transport)."""
        return {
            "broker_url": self.broker_url,
            "result_backend": self.result_backend_url,
            "task_serializer": "json",
            "result_serializer": "json",
            "accept_content": ["json"],
            "result_accept_content": ["json"],
            "event_serializer": "json",
            "broker_transport_options": broker_transport_options(self.visibility_timeout_s),
            "result_backend_transport_options": {"visibility_timeout": self.visibility_timeout_s},
            # Flower shows a job from the moment it is sent: a PUBLISH per submit, so off
            # unless asked for (CONVEYOR_TASK_SENT_EVENTS=1); workers' events show it anyway.
            "task_send_sent_event": self.task_sent_events,
            "task_default_priority": self.default_priority,
        }
