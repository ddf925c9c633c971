"""A real HTTP server that speaks like an LLM provider, scripted per request.

It serves OpenAI's chat completions (``POST /v1/chat/completions``: server-sent events when the
request says ``stream: true``, one JSON object otherwise) and Ollama's ``POST /api/chat`` (NDJSON
by default), over real sockets with chunked transfer encoding, as the real servers do. Each
request takes the next scripted ``Reply`` (or ``default`` when the script is empty), so a test
can produce the failures providers really show: 429s with ``Retry-After``, a spent quota, 5xx,
llama.cpp's context-size 400, 401, 404, a stall, a malformed chunk, an error after HTTP 200, a
connection cut mid-stream, a stream without usage. Every request is recorded (path, headers,
JSON body) for assertions.

    with FakeLLMServer() as server:
        server.script(Reply.rate_limited(retry_after="3"), Reply.ok("Hi there"))
        ... ProviderConfig(base_url=server.openai_url) ...
        assert server.requests[0].body["stream"] is True

The wire shapes follow OpenAI's API reference and client (``chat.completion.chunk`` objects,
``usage: null`` on every chunk when usage was asked for, then a usage chunk with empty
``choices``, then ``data: [DONE]``), Ollama's API docs and scheduler (``ErrMaxQueue`` -> 503), and
llama.cpp's server (``exceed_context_size_error``).
"""

from __future__ import annotations

import json
import select
import socket
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

import pytest

OPENAI_PATH = "/v1/chat/completions"
OLLAMA_PATH = "/api/chat"

Breaking = Literal["cut", "stall", "malformed", "error"]


@dataclass(frozen=True)
class Reply:
    """What the server does with one request. Build it with the class methods.

    A streamed answer sends ``chunks`` (default: ``text`` split after each space) with
    ``chunk_delay_s`` between them. ``break_after`` content chunks into the stream, ``breaking``
    happens instead of the rest: ``cut`` closes the connection, ``stall`` goes silent for
    ``stall_s``, ``malformed`` sends a truncated JSON chunk, ``error`` sends ``stream_error``.
    A ``stall_s`` without ``break_after`` is silence before the status line.
    """

    text: str = "Hello from the fake model."
    chunks: tuple[str, ...] | None = None
    chunk_delay_s: float = 0.0
    model: str = "fake-model"
    finish_reason: str = "stop"
    #: False: no usage chunk (OpenAI) / no eval counts (Ollama), as from a server without them.
    usage: bool = True
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    #: SSE comment lines sent before the first chunk, as proxies send keep-alives.
    keepalive: bool = False
    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    #: The error of a non-200 reply, in OpenAI's shape ({"message", "type", "code", ...}).
    #: Ollama answers ``{"error": message}`` instead.
    error: dict[str, Any] | None = None
    stall_s: float = 0.0
    break_after: int | None = None
    breaking: Breaking | None = None
    stream_error: dict[str, Any] | None = None
    #: Bytes sent verbatim as the body (a recorded transcript), in these pieces.
    raw: tuple[bytes, ...] | None = None
    raw_content_type: str = "text/event-stream"
    #: Seconds between the last piece (``[DONE]``) and the chunked body's last chunk, which
    #: a real server may send a moment later.
    end_delay_s: float = 0.0

    # --- answers ------------------------------------------------------------------------------

    @classmethod
    def ok(cls, text: str = "Hello from the fake model.", **options: Any) -> Reply:
        return cls(text=text, **options)

    @classmethod
    def no_usage(cls, text: str = "Hello from the fake model.", **options: Any) -> Reply:
        return cls(text=text, usage=False, **options)

    @classmethod
    def replay(cls, *pieces: bytes, content_type: str = "text/event-stream") -> Reply:
        return cls(raw=pieces, raw_content_type=content_type)

    # --- HTTP failures ------------------------------------------------------------------------

    @classmethod
    def rate_limited(
        cls, *, retry_after: str | None = None, retry_after_ms: str | None = None
    ) -> Reply:
        headers = []
        if retry_after is not None:
            headers.append(("retry-after", retry_after))
        if retry_after_ms is not None:
            headers.append(("retry-after-ms", retry_after_ms))
        return cls(
            status=429,
            headers=tuple(headers),
            error={
                "message": "Rate limit reached for fake-model in organization org-fake on "
                "requests per min (RPM): Limit 3, Used 3, Requested 1.",
                "type": "requests",
                "param": None,
                "code": "rate_limit_exceeded",
            },
        )

    @classmethod
    def quota_exceeded(cls) -> Reply:
        return cls(
            status=429,
            error={
                "message": "You exceeded your current quota, please check your plan and "
                "billing details.",
                "type": "insufficient_quota",
                "param": None,
                "code": "insufficient_quota",
            },
        )

    @classmethod
    def server_error(cls, status: int = 500, message: str | None = None) -> Reply:
        return cls(
            status=status,
            error={
                "message": message
                or "The server had an error while processing your request. Sorry about that!",
                "type": "server_error",
                "param": None,
                "code": None,
            },
        )

    @classmethod
    def context_exceeded(cls, n_prompt_tokens: int = 4476, n_ctx: int = 4096) -> Reply:
        """llama.cpp's answer to a prompt longer than its context."""
        return cls(
            status=400,
            error={
                "code": 400,
                "message": f"request ({n_prompt_tokens} tokens) exceeds the available context "
                f"size ({n_ctx} tokens), try increasing it",
                "type": "exceed_context_size_error",
                "n_prompt_tokens": n_prompt_tokens,
                "n_ctx": n_ctx,
            },
        )

    @classmethod
    def unauthorized(cls) -> Reply:
        return cls(
            status=401,
            error={
                "message": "Incorrect API key provided: sk-fa***ey. You can find your API key "
                "at https://platform.openai.com/account/api-keys.",
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_api_key",
            },
        )

    @classmethod
    def forbidden(cls) -> Reply:
        return cls(
            status=403,
            error={
                "message": "Project does not have access to model fake-model",
                "type": "invalid_request_error",
                "param": None,
                "code": "model_not_found",
            },
        )

    @classmethod
    def not_found(cls, model: str = "fake-model") -> Reply:
        return cls(
            status=404,
            error={
                "message": f"The model `{model}` does not exist or you do not have access to it.",
                "type": "invalid_request_error",
                "param": None,
                "code": "model_not_found",
            },
        )

    @classmethod
    def http_error(cls, status: int, message: str = "fake error") -> Reply:
        return cls(
            status=status,
            error={"message": message, "type": "invalid_request_error", "code": None},
        )

    @classmethod
    def ollama_busy(cls) -> Reply:
        """Ollama beyond ``OLLAMA_MAX_QUEUE``."""
        return cls.server_error(
            503, "server busy, please try again.  maximum pending requests exceeded"
        )

    @classmethod
    def ollama_model_missing(cls, model: str = "fake-model") -> Reply:
        return cls(
            status=404,
            error={"message": f'model "{model}" not found, try pulling it first'},
        )

    # --- failures inside a stream -------------------------------------------------------------

    @classmethod
    def stall(cls, seconds: float, *, after: int | None = None, **options: Any) -> Reply:
        breaking = None if after is None else "stall"
        return cls(stall_s=seconds, break_after=after, breaking=breaking, **options)

    @classmethod
    def cut(cls, *, after: int = 2) -> Reply:
        return cls(break_after=after, breaking="cut")

    @classmethod
    def malformed(cls, *, after: int = 1) -> Reply:
        return cls(break_after=after, breaking="malformed")

    @classmethod
    def error_midstream(
        cls,
        *,
        after: int = 1,
        message: str = "The server had an error while processing your request.",
        type: str = "server_error",
        code: str | int | None = None,
    ) -> Reply:
        return cls(
            break_after=after,
            breaking="error",
            stream_error={"message": message, "type": type, "param": None, "code": code},
        )

    def pieces(self) -> list[str]:
        if self.chunks is not None:
            return list(self.chunks)
        words = self.text.split(" ")
        return [w + " " for w in words[:-1]] + [words[-1]] if self.text else []


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    #: Header names in lower case.
    headers: dict[str, str]
    body: Any
    #: The client's port: the same on two requests means one kept-alive connection.
    client_port: int = 0


@dataclass
class FakeLLMServer:
    """The server; start it with ``with`` (or ``start()``/``stop()``)."""

    default: Reply = field(default_factory=Reply.ok)
    requests: list[RecordedRequest] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._script: deque[Reply] = deque()
        self._lock = threading.Lock()
        self.stopping = threading.Event()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self._hangups = threading.Semaphore(0)

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> FakeLLMServer:
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.fake = self
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()  # wakes stalled and slow replies
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeLLMServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The server root: Ollama's base URL."""
        assert self._httpd is not None, "start the server first"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def openai_url(self) -> str:
        """The OpenAI-compatible base URL (with its ``/v1``)."""
        return f"{self.url}/v1"

    # --- scripting ----------------------------------------------------------------------------

    def script(self, *replies: Reply) -> None:
        """Queues replies for the next requests, in order."""
        with self._lock:
            self._script.extend(replies)

    def next_reply(self) -> Reply:
        with self._lock:
            return self._script.popleft() if self._script else self.default

    def record(self, request: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def wait_for_hangup(self, timeout: float) -> bool:
        """True once a client has hung up on a stream before its end (one hang-up per call)."""
        return self._hangups.acquire(timeout=timeout)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    #: Connections waiting to be accepted: tests open dozens at once, as a worker does.
    request_queue_size = 128
    fake: FakeLLMServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up on a stall or a cut is the point of the test, not an error."""
        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    #: Seconds an idle keep-alive connection is kept before its thread ends.
    timeout = 30

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes; without this, delayed ACKs add ~40 ms.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: tests assert on ``requests`` instead."""

    def do_POST(self) -> None:
        fake = self.server.fake
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        fake.record(
            RecordedRequest(
                method="POST",
                path=self.path,
                headers={k.lower(): v for k, v in self.headers.items()},
                body=body,
                client_port=self.client_address[1],
            )
        )
        if self.path not in (OPENAI_PATH, OLLAMA_PATH):
            self._json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
            return
        reply = fake.next_reply()
        ollama = self.path == OLLAMA_PATH
        if reply.stall_s and reply.break_after is None and self._silence(reply.stall_s):
            return
        if reply.status != 200:
            error = reply.error or {"message": "error"}
            self._json(
                reply.status,
                {"error": error["message"]} if ollama else {"error": error},
                reply.headers,
            )
            return
        if reply.raw is not None:
            self._stream(reply.raw_content_type, reply.raw, reply)
            return
        if ollama:
            streaming = not isinstance(body, dict) or body.get("stream", True) is not False
            self._ollama(reply, body if isinstance(body, dict) else {}, streaming)
        else:
            streaming = isinstance(body, dict) and body.get("stream") is True
            self._openai(reply, body if isinstance(body, dict) else {}, streaming)

    def _silence(self, seconds: float) -> bool:
        """Says nothing for ``seconds``; True (stop replying) when the server stops or the
        client hangs up meanwhile, which a silent server notices as its socket reading EOF."""
        fake = self.server.fake
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if fake.stopping.wait(min(0.05, left)):
                return True
            readable, _, _ = select.select([self.connection], [], [], 0)
            if readable:
                try:
                    data = self.connection.recv(1, socket.MSG_PEEK)
                except OSError:
                    data = b""
                if not data:
                    self.close_connection = True
                    fake._hangups.release()
                    return True
        return False

    # --- writing ------------------------------------------------------------------------------

    def _json(self, status: int, payload: Any, headers: tuple[tuple[str, str], ...] = ()) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _stream(self, content_type: str, pieces: Any, reply: Reply) -> None:
        """Sends ``pieces`` as HTTP chunks; a piece that is a ``Breaking`` acts it out."""
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        for name, value in reply.headers:
            self.send_header(name, value)
        self.end_headers()
        fake = self.server.fake
        try:
            for index, piece in enumerate(pieces):
                if piece == "cut":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if piece == "stall":
                    if self._silence(reply.stall_s):
                        return
                    continue
                if index and reply.chunk_delay_s and fake.stopping.wait(reply.chunk_delay_s):
                    return
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            if reply.end_delay_s:
                self.wfile.flush()
                if fake.stopping.wait(reply.end_delay_s):
                    return
            self.wfile.write(b"0\r\n\r\n")
        except ConnectionError:  # the client hung up (a timeout, a cancel): what tests look for
            self.close_connection = True
            fake._hangups.release()

    def _usage(self, reply: Reply, body: dict[str, Any], pieces: list[str]) -> tuple[int, int]:
        words = sum(len(str(m.get("content", "")).split()) for m in body.get("messages") or [])
        return (
            reply.prompt_tokens if reply.prompt_tokens is not None else words,
            reply.completion_tokens if reply.completion_tokens is not None else len(pieces),
        )

    def _openai(self, reply: Reply, body: dict[str, Any], streaming: bool) -> None:
        pieces = reply.pieces()
        prompt_tokens, completion_tokens = self._usage(reply, body, pieces)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
        }
        head = {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "created": int(time.time()),
            "model": reply.model,
            "system_fingerprint": "fp_fake",
        }
        if not streaming:
            answer = {
                **head,
                "object": "chat.completion",
                "choices": [
                    {
                        "index": 0,
                        "message": {
                            "role": "assistant",
                            "content": "".join(pieces),
                            "refusal": None,
                        },
                        "logprobs": None,
                        "finish_reason": reply.finish_reason,
                    }
                ],
            }
            if reply.usage:
                answer["usage"] = usage
            self._json(200, answer)
            return
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def event(payload: Any) -> bytes:
            return b"data: " + json.dumps(payload).encode() + b"\n\n"

        def chunk(delta: dict[str, Any], finish_reason: str | None) -> bytes:
            payload: dict[str, Any] = {
                **head,
                "object": "chat.completion.chunk",
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
                ],
            }
            if include_usage:
                payload["usage"] = None
            return event(payload)

        out: list[Any] = []
        if reply.keepalive:
            out.append(b": keep-alive\n\n")
        out.append(chunk({"role": "assistant", "content": "", "refusal": None}, None))
        content = [chunk({"content": piece}, None) for piece in pieces]
        malformed = b'data: {"id": "chatcmpl-x", "choices": [{"ind\n\n'
        out.extend(self._break(reply, content, malformed, event({"error": reply.stream_error})))
        if reply.breaking is None:
            out.append(chunk({}, reply.finish_reason))
            if include_usage and reply.usage:
                out.append(event({**head, "object": "chat.completion.chunk", "choices": [],
                                  "usage": usage}))  # fmt: skip
            out.append(b"data: [DONE]\n\n")
        self._stream("text/event-stream; charset=utf-8", out, reply)

    def _ollama(self, reply: Reply, body: dict[str, Any], streaming: bool) -> None:
        pieces = reply.pieces()
        prompt_tokens, completion_tokens = self._usage(reply, body, pieces)
        model = str(body.get("model") or reply.model)

        def line(payload: Any) -> bytes:
            return json.dumps(payload).encode() + b"\n"

        def head() -> dict[str, Any]:
            now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
            return {"model": model, "created_at": now}

        final: dict[str, Any] = {
            **head(),
            "message": {"role": "assistant", "content": ""},
            "done_reason": reply.finish_reason,
            "done": True,
            "total_duration": 4_883_583_458,
            "load_duration": 1_334_875,
            "prompt_eval_duration": 342_546_000,
            "eval_duration": 4_535_599_000,
        }
        if reply.usage:
            final["prompt_eval_count"] = prompt_tokens
            final["eval_count"] = completion_tokens
        if not streaming:
            final["message"]["content"] = "".join(pieces)
            self._json(200, final)
            return
        content = [
            line({**head(), "message": {"role": "assistant", "content": p}, "done": False})
            for p in pieces
        ]
        error = line({"error": (reply.stream_error or {}).get("message", "error")})
        out = self._break(reply, content, b'{"model": "x", "message": {"ro\n', error)
        if reply.breaking is None:
            out.append(line(final))
        self._stream("application/x-ndjson", out, reply)

    @staticmethod
    def _break(
        reply: Reply, content: list[bytes], malformed: bytes, error: bytes
    ) -> list[bytes | Breaking]:
        """``content`` cut at ``break_after``, followed by what breaks it."""
        if reply.breaking is None or reply.break_after is None:
            return list(content)
        kept: list[bytes | Breaking] = list(content[: reply.break_after])
        if reply.breaking == "malformed":
            return [*kept, malformed]
        if reply.breaking == "error":
            return [*kept, error]
        if reply.breaking == "stall":
            return [*kept, "stall", *content[reply.break_after :]]
        return [*kept, "cut"]


@pytest.fixture
def llm_server() -> Iterator[FakeLLMServer]:
    """A fresh fake LLM server for one test."""
    with FakeLLMServer() as server:
        yield server
