"""What every LLM provider client shares: the request, the streamed pieces, the configuration.

A provider turns a ``ChatRequest`` into a stream of ``Delta`` pieces that ends with exactly one
``Completion``. Clients raise ``workers.failures.Retryable`` / ``Permanent`` (or the two
subclasses below) and nothing else, so one place (``workers.runtime.job``) decides what a
failure means.

Providers are configured from the environment (``providers_from_env``): the conventional
``LLM_*`` variables describe the provider named ``default``; ``CONVEYOR_PROVIDERS`` adds named
ones; ``local`` (an echo for demos, not a model) always exists. A job names a provider; it
never carries a URL.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

from conveyor.config import Env, redact_url
from conveyor.errors import ConfigError
from workers.failures import Cancelled as Cancelled  # re-exported: providers raise it
from workers.failures import Retryable

ProviderKind = Literal["openai", "ollama", "local"]

#: The provider the ``LLM_*`` variables describe.
DEFAULT = "default"
#: The built-in echo provider; it needs nothing and is always there.
LOCAL = "local"

#: Characters per token when a server did not report usage: OpenAI's rule of thumb for English
#: text. It undercounts code and most other languages, so such counts are marked estimated.
CHARS_PER_TOKEN = 4

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class DeadlineExceeded(Retryable):
    """The stream outlived its deadline. Our own timeout, since a threads pool cannot kill a
    thread; retryable like any timeout."""


@dataclass(frozen=True)
class ChatRequest:
    """One chat completion to run.

    ``deadline`` is an absolute ``time.monotonic()`` value: the caller's budget, which the
    client enforces together with its provider's ``total_s``. ``should_stop`` is called before
    the request, then every ``reader.SWEEP_S`` on the stream reader's thread (so it must be
    cheap, thread-safe and never block: it would hold up every stream); True cancels it.
    """

    messages: Sequence[Mapping[str, str]]
    model: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    stop: Sequence[str] = ()
    deadline: float | None = None
    should_stop: Callable[[], bool] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            raise ValueError("stop is a list of sequences, not one string")
        if not self.messages:
            raise ValueError("a chat request needs at least one message")
        for message in self.messages:
            if not isinstance(message.get("role"), str) or not isinstance(
                message.get("content"), str
            ):
                raise ValueError("every message needs a string 'role' and 'content'")

    def wire_messages(self) -> list[dict[str, str]]:
        """The messages as both wire formats want them: only role and content."""
        return [{"role": m["role"], "content": m["content"]} for m in self.messages]

    def stopped(self) -> bool:
        return self.should_stop is not None and bool(self.should_stop())


@dataclass(frozen=True)
class Delta:
    """A piece of generated text, as it arrives."""

    text: str


@dataclass(frozen=True)
class Completion:
    """The end of a stream: the whole text and what it cost.

    ``tokens_estimated`` is True when the server did not report usage (a broken stream, a
    server without ``include_usage``, the local echo) and we counted ~4 characters a token.
    ``ttft_s`` (time to first token) is None when no text came at all.
    """

    content: str
    model: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    tokens_estimated: bool
    latency_s: float
    ttft_s: float | None


class Provider(Protocol):
    """A client of one configured provider. Safe to share between threads."""

    config: ProviderConfig

    def generate(
        self, request: ChatRequest, on_delta: Callable[[str], None] = lambda _text: None
    ) -> Completion:
        """The answer; ``on_delta`` gets each piece of text as it arrives (perhaps on another
        thread). Raises Retryable/Permanent."""
        ...

    def stream(self, request: ChatRequest) -> Iterator[Delta | Completion]:
        """Deltas as they come, then exactly one ``Completion``; raises Retryable/Permanent."""
        ...

    def close(self) -> None:
        """Releases pooled connections."""
        ...


def collect(events: Iterable[Delta | Completion]) -> Completion:
    """Drains a stream when only the result matters."""
    completion: Completion | None = None
    for event in events:
        if isinstance(event, Completion):
            completion = event
    if completion is None:
        raise RuntimeError("a provider stream ended without a Completion")
    return completion


def estimate_tokens(text: str) -> int:
    """Tokens in ``text`` at ``CHARS_PER_TOKEN`` characters each, rounded up."""
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def estimate_prompt_tokens(messages: Sequence[Mapping[str, str]]) -> int:
    """The prompt's tokens, with the few a chat template adds around each message."""
    return sum(estimate_tokens(m["content"]) + 4 for m in messages)


def deadline_for(request: ChatRequest, config: ProviderConfig, started: float) -> float:
    """The earlier of the caller's deadline and the provider's own ``total_s`` budget."""
    own = started + config.total_s
    return own if request.deadline is None else min(own, request.deadline)


def check_deadline(deadline: float, started: float, provider: str) -> float:
    """Seconds left before ``deadline``; raises ``DeadlineExceeded`` when none are."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceeded(
            f"{provider}: no complete answer within {time.monotonic() - started:.1f} s "
            "(deadline passed)"
        )
    return left


# --- Configuration ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProviderConfig:
    """How to reach one provider. The API key is never shown by ``repr``/``str``.

    Timeouts are seconds: ``connect_s`` to open the connection, ``read_s`` the longest silence
    between two chunks (a local model's prompt processing counts as silence before the first),
    ``total_s`` the whole answer — kept below the ai pool's soft time limit (240 s) so a stalled
    stream ends with our error rather than Celery's. ``rpm``/``tpm`` are the provider's limits
    (requests/tokens per minute) for the rate limiter; None means unlimited. ``fallbacks`` are
    provider names to try, in order, when this one is unavailable.
    """

    name: str
    kind: ProviderKind
    base_url: str | None = None
    api_key: str | None = field(default=None, repr=False)
    default_model: str | None = None
    rpm: int | None = None
    tpm: int | None = None
    connect_s: float = 5.0
    read_s: float = 60.0
    total_s: float = 180.0
    fallbacks: tuple[str, ...] = ()
    #: The model's context window in tokens (``LLM_CONTEXT_TOKENS``, ``context_tokens``): a
    #: prompt that cannot fit is refused before it is sent (llama.cpp's server answers one
    #: with an empty stream, which looks like a cut and would be retried). None: unknown.
    context_tokens: int | None = None


#: Keys a ``CONVEYOR_PROVIDERS`` entry may have; anything else is a typo worth an error.
_ENTRY_KEYS = frozenset(
    {
        "kind",
        "base_url",
        "api_key_env",
        "model",
        "rpm",
        "tpm",
        "fallbacks",
        "connect_s",
        "read_s",
        "total_s",
        "context_tokens",
    }
)


def _base_url(raw: str, where: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{where}={redact_url(raw)!r} is not an http(s) URL")
    if parts.username or parts.password:
        raise ConfigError(f"{where} must not hold credentials; give the API key by variable")
    if parts.query or parts.fragment:
        raise ConfigError(f"{where}={raw!r} must not have a query or fragment")
    return raw.rstrip("/")


def _limit(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            raise ConfigError(f"{where}={value!r} is not a whole number") from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}={value!r} must be a whole number of at least 1")
    return value


def _seconds(value: Any, where: str, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{where}={value!r} is not a number of seconds") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"{where}={value!r} must be a positive number of seconds")
    return float(value)


def _names(values: Iterable[Any], where: str) -> tuple[str, ...]:
    names = tuple(values)
    for name in names:
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(f"{where}: {name!r} is not a provider name")
    return names


def _default_from_env(env: Env) -> ProviderConfig | None:
    base_url = env.raw("LLM_BASE_URL")
    if base_url is None:
        stray = [v for v in ("LLM_PROVIDER", "LLM_API_KEY", "LLM_MODEL") if env.raw(v)]
        if stray:
            # Better to stop than to answer with the local echo where a model was meant.
            raise ConfigError(f"{', '.join(stray)} set but LLM_BASE_URL is not")
        return None
    kind = (env.raw("LLM_PROVIDER") or "openai").lower()
    if kind not in ("openai", "ollama"):
        raise ConfigError(f"LLM_PROVIDER={kind!r} must be 'openai' or 'ollama'")
    fallbacks = env.raw("LLM_FALLBACKS") or ""
    return ProviderConfig(
        name=DEFAULT,
        kind=kind,  # type: ignore[arg-type]  # checked just above
        base_url=_base_url(base_url, "LLM_BASE_URL"),
        api_key=env.raw("LLM_API_KEY"),
        default_model=env.raw("LLM_MODEL"),
        rpm=_limit(env.raw("LLM_RPM"), "LLM_RPM"),
        tpm=_limit(env.raw("LLM_TPM"), "LLM_TPM"),
        connect_s=_seconds(env.raw("LLM_CONNECT_TIMEOUT"), "LLM_CONNECT_TIMEOUT", 5.0),
        read_s=_seconds(env.raw("LLM_READ_TIMEOUT"), "LLM_READ_TIMEOUT", 60.0),
        total_s=_seconds(env.raw("LLM_TIMEOUT"), "LLM_TIMEOUT", 180.0),
        context_tokens=_limit(env.raw("LLM_CONTEXT_TOKENS"), "LLM_CONTEXT_TOKENS"),
        fallbacks=_names((n.strip() for n in fallbacks.split(",") if n.strip()), "LLM_FALLBACKS"),
    )


def _named_from_env(env: Env) -> list[ProviderConfig]:
    raw = env.raw("CONVEYOR_PROVIDERS")
    if raw is None:
        return []
    entries = env.json("CONVEYOR_PROVIDERS")
    if not isinstance(entries, dict):
        raise ConfigError("CONVEYOR_PROVIDERS must be a JSON object of name -> provider")
    configs = []
    for name, entry in entries.items():
        where = f"CONVEYOR_PROVIDERS[{name!r}]"
        if not _NAME.match(name):
            raise ConfigError(f"CONVEYOR_PROVIDERS: {name!r} is not a provider name")
        if name == LOCAL:
            raise ConfigError(f"{where}: 'local' is built in and cannot be redefined")
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} must be a JSON object")
        if "api_key" in entry:
            raise ConfigError(
                f"{where} has an inline api_key: name the variable holding it with api_key_env"
            )
        unknown = sorted(set(entry) - _ENTRY_KEYS)
        if unknown:
            raise ConfigError(f"{where} has unknown keys {unknown}; known: {sorted(_ENTRY_KEYS)}")
        kind = entry.get("kind", "openai")
        if kind not in ("openai", "ollama"):
            raise ConfigError(f"{where}.kind={kind!r} must be 'openai' or 'ollama'")
        if not isinstance(entry.get("base_url"), str):
            raise ConfigError(f"{where}.base_url is required")
        api_key = None
        key_env = entry.get("api_key_env")
        if key_env is not None:
            if not isinstance(key_env, str):
                raise ConfigError(f"{where}.api_key_env must name a variable")
            api_key = env.raw(key_env)
            if api_key is None:
                raise ConfigError(f"{where}.api_key_env names {key_env}, which is not set")
        model = entry.get("model")
        if model is not None and (not isinstance(model, str) or not model.strip()):
            raise ConfigError(f"{where}.model must be a model name")
        fallbacks = entry.get("fallbacks", [])
        if not isinstance(fallbacks, list):
            raise ConfigError(f"{where}.fallbacks must be a list of provider names")
        configs.append(
            ProviderConfig(
                name=name,
                kind=kind,
                base_url=_base_url(entry["base_url"], f"{where}.base_url"),
                api_key=api_key,
                default_model=model,
                rpm=_limit(entry.get("rpm"), f"{where}.rpm"),
                tpm=_limit(entry.get("tpm"), f"{where}.tpm"),
                connect_s=_seconds(entry.get("connect_s"), f"{where}.connect_s", 5.0),
                read_s=_seconds(entry.get("read_s"), f"{where}.read_s", 60.0),
                total_s=_seconds(entry.get("total_s"), f"{where}.total_s", 180.0),
                context_tokens=_limit(entry.get("context_tokens"), f"{where}.context_tokens"),
                fallbacks=_names(fallbacks, f"{where}.fallbacks"),
            )
        )
    return configs


def providers_from_env(environ: Env | Mapping[str, str]) -> dict[str, ProviderConfig]:
    """Every configured provider by name; raises ``ConfigError`` naming a bad variable.

    ``LLM_BASE_URL`` (+ ``LLM_PROVIDER`` openai|ollama, ``LLM_API_KEY``, ``LLM_MODEL``,
    ``LLM_RPM``, ``LLM_TPM``, ``LLM_CONNECT_TIMEOUT``, ``LLM_READ_TIMEOUT``, ``LLM_TIMEOUT``,
    ``LLM_FALLBACKS``) makes ``default``. An OpenAI-compatible base URL includes its ``/v1``;
    Ollama's is the server root. ``CONVEYOR_PROVIDERS`` is a JSON object of named providers
    whose keys come only through ``api_key_env``.
    """
    env = environ if isinstance(environ, Env) else Env(environ)
    configs: dict[str, ProviderConfig] = {
        LOCAL: ProviderConfig(name=LOCAL, kind="local", default_model="local-echo")
    }
    default = _default_from_env(env)
    if default is not None:
        configs[DEFAULT] = default
    for config in _named_from_env(env):
        if config.name in configs:
            raise ConfigError(
                f"CONVEYOR_PROVIDERS defines {config.name!r}, which LLM_BASE_URL already defines"
            )
        configs[config.name] = config
    for config in configs.values():
        where = "LLM_FALLBACKS" if config.name == DEFAULT else "CONVEYOR_PROVIDERS"
        for fallback in config.fallbacks:
            if fallback == config.name:
                raise ConfigError(f"{where}: {config.name!r} cannot fall back to itself")
            if fallback not in configs:
                raise ConfigError(f"{where}: fallback {fallback!r} is not a configured provider")
    return configs


def default_provider_name(providers: Mapping[str, ProviderConfig]) -> str:
    """The provider a job gets when it names none: ``default`` if configured, else ``local``."""
    return DEFAULT if DEFAULT in providers else LOCAL
