"""The HTTP plumbing both wire clients share: open a streaming request, hand its body to the
process's stream reader, and turn an HTTP failure into ``Retryable`` or ``Permanent``.

Celery's threads pool cannot kill a thread, so every wait is bounded by us: the connect
timeout and the read timeout for the headers here; then, once the answer's body streams, the
process's stream reader (``reader``) holds each stream to its deadline, its silence allowed
between chunks (``read_s``) and its cancel flag. The retry rules follow OpenAI's
own client: 408, 409, 429, 5xx and broken connections are retryable, honouring
``retry-after-ms`` / ``retry-after`` (capped); other 4xx are permanent, and so is a 429 that
says the quota is spent.
"""

from __future__ import annotations

import json
import queue
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from http.cookiejar import DefaultCookiePolicy
from typing import Any

import requests
import urllib3.exceptions
from requests.adapters import HTTPAdapter

from conveyor.config import Env
from workers.ai.providers.base import (
    Cancelled,
    ChatRequest,
    Completion,
    DeadlineExceeded,
    Delta,
    ProviderConfig,
    check_deadline,
    deadline_for,
    estimate_prompt_tokens,
)
from workers.ai.providers.reader import AnsweredStream, StreamHandle, StreamParser, stream_reader
from workers.failures import Permanent, Retryable
from workers.resilience.retry_after import retry_after_s

#: Bytes of an error body we read: enough for any JSON error, never a whole runaway page.
ERROR_BODY_LIMIT = 64 * 1024
#: Idle connections kept per provider for reuse. Each thread holds at most one at a time, so
#: this only has to be at least the ai pool's concurrency (CONVEYOR_AI_CONCURRENCY, which may
#: be hundreds): beyond it, urllib3 closes a finished job's connection (logging "Connection
#: pool is full" each time) and the next job connects anew; with 64 here, a third of the jobs
#: of a 250-thread worker did (bench/ai_inflight.py).
POOL_SIZE = 1024

#: Seconds ``stream`` waits past a provider's ``total_s`` before it gives up on the reader.
_STREAM_GRACE_S = 10.0

_RETRYABLE_STATUSES = frozenset({408, 409, 429})

#: Error types/codes that say the request itself is wrong: retrying cannot help.
_CLIENT_ERROR_KINDS = frozenset(
    {
        "invalid_request_error",
        "exceed_context_size_error",
        "context_length_exceeded",
        "insufficient_quota",
        "authentication_error",
        "permission_error",
        "invalid_api_key",
        "not_found_error",
        "model_not_found",
    }
)

_PHRASES = {
    400: "rejected the request",
    401: "refused the API key",
    403: "forbids this request",
    404: "does not know this model or endpoint",
    408: "timed out reading the request",
    409: "reported a conflict",
    422: "could not process the request",
    429: "is rate limiting us",
}


@dataclass(frozen=True)
class ServerError:
    """What a server said went wrong, from an error body or an in-stream error object."""

    message: str
    type: str | None = None
    code: str | int | None = None

    def kinds(self) -> set[str]:
        return {str(v) for v in (self.type, self.code) if v is not None}

    def label(self) -> str:
        """The error's type/code words (not a bare status number), for messages."""
        return "/".join(sorted(k for k in self.kinds() if not k.isdigit()))

    def is_client_error(self) -> bool:
        """True only when the server clearly blames the request (a 4xx code or kind)."""
        if self.kinds() & _CLIENT_ERROR_KINDS:
            return True
        try:
            code = int(self.code)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return False
        return 400 <= code < 500 and code not in _RETRYABLE_STATUSES


def new_session(base_url: str | None = None) -> requests.Session:
    """One session per provider: pooled keep-alive connections, no cookies, no silent retries
    (retrying is ``workers.runtime.job``'s decision). No state changes after this, so threads
    share it.

    The environment's proxy (``HTTPS_PROXY``, ``NO_PROXY`` …) and CA bundle
    (``REQUESTS_CA_BUNDLE``, ``CURL_CA_BUNDLE``) settings for ``base_url`` are read once, here:
    with ``trust_env`` requests reads them again for every request, ~0.7 ms of CPU each time
    on our 2-core machine (22 µs without). It would also read ``~/.netrc``, whose Basic
    credentials would replace the provider's API key.
    """
    session = requests.Session()
    session.trust_env = False
    if base_url:
        session.proxies.update(requests.utils.get_environ_proxies(base_url))
    env = Env()
    bundle = env.text("REQUESTS_CA_BUNDLE") or env.text("CURL_CA_BUNDLE")
    if bundle:
        session.verify = bundle
    adapter = HTTPAdapter(pool_connections=1, pool_maxsize=POOL_SIZE, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.cookies.set_policy(_NoCookies())
    return session


class _NoCookies(DefaultCookiePolicy):
    """A provider has no business setting cookies on a session shared by many jobs."""

    def set_ok(self, cookie: Any, request: Any) -> bool:
        return False


def parse_error(body: bytes | str | Any) -> ServerError:
    """Reads an error in any of the shapes servers use: OpenAI's ``{"error": {...}}``,
    Ollama's ``{"error": "..."}``, a framework's ``{"detail": ...}``, or plain text. The message
    is whole (the body is already bounded): it is shortened only after a key it may echo has
    been redacted, so no part of a key survives a cut."""
    data = body
    if isinstance(body, bytes | str):
        text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
        try:
            data = json.loads(text)
        except ValueError:
            return ServerError(message=text.strip() or "(no error message)")
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict):
            code = error.get("code")
            return ServerError(
                message=str(error.get("message") or "(no error message)"),
                type=error.get("type") if isinstance(error.get("type"), str) else None,
                code=code if isinstance(code, str | int) else None,
            )
        if isinstance(error, str):
            return ServerError(message=error)
        for key in ("detail", "message"):
            if data.get(key):
                return ServerError(message=str(data[key]))
    return ServerError(message=json.dumps(data))


def _shorten(text: str, limit: int = 500) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def redact(text: str, secret: str | None) -> str:
    """A server may echo the key it refused; it never reaches a log or a dead letter."""
    return text.replace(secret, "***") if secret else text


def safe_message(text: str, secret: str | None) -> str:
    """An upstream's error text as we may show it: the key redacted, then shortened."""
    return _shorten(redact(text, secret))


def failure_for_status(
    config: ProviderConfig, status: int, headers: Mapping[str, str], error: ServerError
) -> Retryable | Permanent:
    """The verdict on a non-2xx answer."""
    kind = f" {error.label()}" if error.label() else ""
    message = safe_message(error.message, config.api_key)
    if status == 429 and "insufficient_quota" in error.kinds():
        return Permanent(
            f"{config.name} has no quota left (HTTP 429 insufficient_quota): {message}"
        )
    phrase = _PHRASES.get(status) or ("failed" if status >= 500 else "answered an error")
    text = f"{config.name} {phrase} (HTTP {status}{kind}): {message}"
    if status in _RETRYABLE_STATUSES or status >= 500:
        return Retryable(text, delay_s=retry_after_s(headers))
    return Permanent(text)


def failure_in_stream(config: ProviderConfig, error: ServerError) -> Retryable | Permanent:
    """The verdict on an error that arrived inside a 200 stream: retryable unless it clearly
    blames the request (the server may well have broken under us)."""
    kind = f" ({error.label()})" if error.label() else ""
    text = f"{config.name} failed mid-stream{kind}: {safe_message(error.message, config.api_key)}"
    return Permanent(text) if error.is_client_error() else Retryable(text)


def check_fits(config: ProviderConfig, request: ChatRequest) -> None:
    """Refuse at once a prompt that cannot fit the model's context window (when configured):
    retrying cannot help, and some servers answer one with an empty stream."""
    if config.context_tokens is None:
        return
    prompt = estimate_prompt_tokens(request.messages)
    if prompt > config.context_tokens:
        raise Permanent(
            f"{config.name}: the prompt is about {prompt} tokens (estimated, ~4 characters "
            f"each), more than the model's context of {config.context_tokens} tokens "
            "(LLM_CONTEXT_TOKENS): shorten it or use a model with a larger context"
        )


def open_stream(
    session: requests.Session,
    url: str,
    *,
    body: dict[str, Any],
    headers: Mapping[str, str],
    config: ProviderConfig,
    request: ChatRequest,
    started: float,
    deadline: float,
) -> requests.Response:
    """POSTs ``body`` and returns the open 2xx response; every failure is Retryable/Permanent."""
    if request.stopped():
        raise Cancelled(f"{config.name}: cancelled before the request was sent")
    left = check_deadline(deadline, started, config.name)
    try:
        response = session.post(
            url,
            json=body,
            headers=dict(headers),
            stream=True,
            timeout=(min(config.connect_s, left), min(config.read_s, left)),
            allow_redirects=False,
        )
    except requests.ConnectTimeout:
        raise Retryable(
            f"{config.name}: could not connect within {config.connect_s:g} s ({url})"
        ) from None
    except requests.Timeout:
        if time.monotonic() >= deadline:
            raise DeadlineExceeded(f"{config.name}: no answer before the deadline") from None
        raise Retryable(
            f"{config.name}: no answer within {config.read_s:g} s (read timeout)"
        ) from None
    except requests.ConnectionError as exc:
        raise Retryable(f"{config.name}: connection failed: {exc}") from None
    except requests.RequestException as exc:
        raise Permanent(f"{config.name}: could not send the request: {exc}") from None
    if 200 <= response.status_code < 300:
        return response
    try:
        raw = response.raw.read(ERROR_BODY_LIMIT, decode_content=True)
    except (urllib3.exceptions.HTTPError, OSError):
        raw = b""
    finally:
        response.close()
    error = parse_error(raw) if raw else ServerError(message=response.reason or "(no body)")
    raise failure_for_status(config, response.status_code, response.headers, error)


class HTTPStreamingProvider:
    """What the two wire clients share: one session, the endpoint, the headers, and opening a
    stream under the request's deadline. Subclasses say ``path``, ``accept`` and ``_body``."""

    #: Endpoint under the base URL, and the media type of its stream.
    path = ""
    accept = ""

    def __init__(self, config: ProviderConfig, session: requests.Session | None = None):
        if not config.base_url:
            raise ValueError(f"provider {config.name!r} has no base_url")
        self.config = config
        self._session = session or new_session()
        self._url = f"{config.base_url}{self.path}"

    def close(self) -> None:
        self._session.close()

    def _body(self, request: ChatRequest, model: str) -> dict[str, Any]:
        raise NotImplementedError

    def _headers(self) -> dict[str, str]:
        # Compression would hold chunks back until a buffer fills.
        headers = {"Accept": self.accept, "Accept-Encoding": "identity"}
        if self.config.api_key:  # Ollama itself has no keys; a proxy in front of it may.
            headers["Authorization"] = f"Bearer {self.config.api_key}"
        return headers

    def _model(self, request: ChatRequest) -> str:
        model = request.model or self.config.default_model
        if not model:
            raise Permanent(
                f"{self.config.name}: no model named by the job nor configured (LLM_MODEL)"
            )
        return model

    def _parser(
        self, response: requests.Response, request: ChatRequest, model: str, started: float
    ) -> StreamParser:
        raise NotImplementedError

    def generate(
        self, request: ChatRequest, on_delta: Callable[[str], None] = lambda _text: None
    ) -> Completion:
        """Send the request, then let this process's stream reader read the answer;
        ``on_delta`` gets each piece of text on the reader's thread, as it arrives."""
        return self._start(request, on_delta).wait()

    def stream(self, request: ChatRequest) -> Iterator[Delta | Completion]:
        """``generate`` as an iterator: the deltas as they come, then the ``Completion``.
        Leaving the loop early closes the stream."""
        pieces: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        handle = self._start(request, pieces.put, on_end=lambda: pieces.put(None))
        # The reader ends every stream by its deadline; this bound is only a safety net.
        limit = time.monotonic() + self.config.total_s + _STREAM_GRACE_S
        try:
            while True:
                try:
                    piece = pieces.get(timeout=max(limit - time.monotonic(), 0.001))
                except queue.Empty:
                    raise DeadlineExceeded(f"{self.config.name}: the stream never ended") from None
                if piece is None:
                    break
                yield Delta(piece)
            yield handle.wait()
        finally:
            if not handle.ended.is_set():
                handle.abort(Cancelled(f"{self.config.name}: the caller stopped reading"))

    def _start(
        self,
        request: ChatRequest,
        on_delta: Callable[[str], None],
        on_end: Callable[[], None] | None = None,
    ) -> StreamHandle | AnsweredStream:
        model = self._model(request)
        check_fits(self.config, request)
        started = time.monotonic()
        deadline = deadline_for(request, self.config, started)
        response = open_stream(
            self._session,
            self._url,
            body=self._body(request, model),
            headers=self._headers(),
            config=self.config,
            request=request,
            started=started,
            deadline=deadline,
        )
        return stream_reader().start(
            response,
            self._parser(response, request, model, started),
            on_delta,
            config=self.config,
            request=request,
            started=started,
            deadline=deadline,
            on_end=on_end,
        )
