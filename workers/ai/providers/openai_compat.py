"""Client of OpenAI-compatible chat completions (OpenAI, vLLM, llama.cpp, LiteLLM, OpenRouter…).

``POST {base_url}/chat/completions`` with ``stream: true`` answers server-sent events:
``data: {chunk}`` events, then ``data: [DONE]``. Token usage only comes when the request asks
for it (``stream_options.include_usage``), in a last chunk with empty ``choices``, and is lost
when the stream breaks: then we estimate it and say so. A stream is complete only with a
``finish_reason`` and ``[DONE]``; an error can still arrive inside a 200 stream.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import requests

from workers.ai.providers.base import (
    ChatRequest,
    Completion,
    ProviderConfig,
    estimate_prompt_tokens,
    estimate_tokens,
)
from workers.ai.providers.reader import ParserBase, StreamParser
from workers.ai.providers.transport import (
    HTTPStreamingProvider,
    ServerError,
    failure_in_stream,
    safe_message,
)
from workers.failures import Permanent, Retryable

#: Bytes of one SSE line we accept; a server streaming more without a newline is broken.
MAX_LINE_BYTES = 1024 * 1024
#: Bytes of a non-streamed JSON answer we accept (a server that ignored ``stream: true``).
MAX_BODY_BYTES = 16 * 1024 * 1024


class SSEDecoder:
    """Server-sent events from bytes, as the WHATWG spec reads them: ``field: value`` lines up
    to a blank line make one event, several ``data`` lines join with newlines, and lines that
    start with ``:`` are comments (keep-alives) and ignored."""

    def __init__(self) -> None:
        self._buffer = b""
        self._event: str | None = None
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[tuple[str | None, str]]:
        """The complete events in ``chunk`` (plus what was buffered), as (event, data)."""
        lines = (self._buffer + chunk).splitlines(keepends=True)  # at \r\n, \n or \r
        # A last line without its end (or ending in \r, maybe half of a \r\n) waits for more.
        self._buffer = lines.pop() if lines and not lines[-1].endswith(b"\n") else b""
        if len(self._buffer) > MAX_LINE_BYTES:
            raise ValueError(f"an event line longer than {MAX_LINE_BYTES} bytes")
        events: list[tuple[str | None, str]] = []
        for raw in lines:
            event = self._line(raw.rstrip(b"\r\n").decode("utf-8", "replace"))
            if event is not None:
                events.append(event)
        return events

    def _line(self, line: str) -> tuple[str | None, str] | None:
        if not line:
            if not self._data:
                self._event = None
                return None
            event = (self._event, "\n".join(self._data))
            self._event, self._data = None, []
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        return None  # id, retry and unknown fields mean nothing to a chat completion


class OpenAICompatProvider(HTTPStreamingProvider):
    """Streams chat completions from one OpenAI-compatible server."""

    path = "/chat/completions"
    accept = "text/event-stream"

    def _body(self, request: ChatRequest, model: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": model,
            "messages": request.wire_messages(),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.max_tokens is not None:
            body["max_tokens"] = request.max_tokens
        if request.stop:
            body["stop"] = list(request.stop)
        return body

    def _parser(
        self, response: requests.Response, request: ChatRequest, model: str, started: float
    ) -> StreamParser:
        if response.headers.get("content-type", "").startswith("application/json"):
            return WholeAnswerParser(self.config, request, model, started)
        return ChatStreamParser(self.config, request, model, started)


class ChatStreamParser(ParserBase):
    """A chat completion's server-sent events, as they come: the text of each chunk's first
    choice, the finish reason, the usage chunk; complete at ``[DONE]``."""

    def __init__(self, config: ProviderConfig, request: ChatRequest, model: str, started: float):
        super().__init__(config, request, model, started)
        self._decoder = SSEDecoder()
        self._finish_reason: str | None = None
        self._usage: dict[str, Any] | None = None
        #: Data events seen (keep-alive comments are not events).
        self.events = 0

    def feed(self, data: bytes, emit: Callable[[str], None]) -> None:
        name = self.config.name
        self.received += len(data)
        try:
            events = self._decoder.feed(data)
        except ValueError as exc:
            raise Retryable(f"{name}: malformed stream: {exc}") from None
        for event, text in events:
            self.events += 1
            if text.strip() == "[DONE]":
                self.done = True
                return
            payload = _json_chunk(name, text, self.config.api_key)
            error = payload.get("error")
            if error or event == "error":
                raise failure_in_stream(self.config, _stream_error(error, text))
            self.model = payload.get("model") or self.model
            if isinstance(payload.get("usage"), dict):
                self._usage = payload["usage"]
            for choice in payload.get("choices") or ():
                if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                    continue
                delta = choice.get("delta") or {}
                piece = delta.get("content") if isinstance(delta, dict) else None
                if isinstance(piece, str) and piece:
                    self.take(piece, emit)
                if choice.get("finish_reason"):
                    self._finish_reason = str(choice["finish_reason"])

    def finish(self, emit: Callable[[str], None]) -> Completion:
        name = self.config.name
        if not self.done:
            if self.body_complete and self.events == 0:
                # An empty answer, not a cut one: retrying cannot help.
                raise Permanent(
                    f"{name} answered with an empty stream (no text, no [DONE], no error). "
                    "llama.cpp's server does this for a prompt longer than its context: this one "
                    f"is about {estimate_prompt_tokens(self.request.messages)} tokens (set "
                    "LLM_CONTEXT_TOKENS to refuse such prompts before they are sent)"
                )
            if self.body_complete:
                raise Retryable(f"{name}: the server ended the stream before [DONE]")
            raise Retryable(f"{name}: the stream ended before [DONE] (connection cut?)")
        if self._finish_reason is None:
            raise Retryable(f"{name}: the stream ended without a finish_reason")
        return _completion(
            self.request,
            "".join(self.parts),
            self.model,
            self._finish_reason,
            self._usage,
            self.started,
            self.ttft,
        )


class WholeAnswerParser(ParserBase):
    """A server that ignored ``stream: true`` answers one chat.completion object."""

    def __init__(self, config: ProviderConfig, request: ChatRequest, model: str, started: float):
        super().__init__(config, request, model, started)  # done stays False: only the body's end
        self._body = bytearray()

    def feed(self, data: bytes, emit: Callable[[str], None]) -> None:
        self._body += data
        if len(self._body) > MAX_BODY_BYTES:
            raise Retryable(f"{self.config.name}: answer larger than {MAX_BODY_BYTES} bytes")

    def finish(self, emit: Callable[[str], None]) -> Completion:
        name = self.config.name
        payload = _json_chunk(name, self._body.decode("utf-8", "replace"), self.config.api_key)
        if payload.get("error"):
            raise failure_in_stream(self.config, _stream_error(payload["error"], ""))
        choices = payload.get("choices") or []
        choice = choices[0] if choices and isinstance(choices[0], dict) else {}
        message = choice.get("message") or {}
        text = message.get("content") if isinstance(message, dict) else None
        if not isinstance(text, str) or not choice.get("finish_reason"):
            raise Retryable(f"{name}: an answer without content or finish_reason")
        if text:
            self.take(text, emit)
        usage = payload.get("usage") if isinstance(payload.get("usage"), dict) else None
        return _completion(
            self.request,
            text,
            payload.get("model") or self.model,
            str(choice["finish_reason"]),
            usage,
            self.started,
            self.ttft,
        )


def _json_chunk(name: str, data: str, secret: str | None) -> dict[str, Any]:
    try:
        payload = json.loads(data)
    except ValueError:
        shown = safe_message(data, secret)[:200]
        raise Retryable(f"{name}: malformed JSON in a stream chunk: {shown!r}") from None
    if not isinstance(payload, dict):
        shown = safe_message(data, secret)[:200]
        raise Retryable(f"{name}: a stream chunk is not a JSON object: {shown!r}")
    return payload


def _stream_error(error: Any, data: str) -> ServerError:
    if isinstance(error, dict):
        code = error.get("code")
        return ServerError(
            message=str(error.get("message") or "an error occurred during streaming"),
            type=error.get("type") if isinstance(error.get("type"), str) else None,
            code=code if isinstance(code, str | int) else None,
        )
    if isinstance(error, str):
        return ServerError(message=error)
    return ServerError(message=data or "an error occurred during streaming")


def _completion(
    request: ChatRequest,
    content: str,
    model: str,
    finish_reason: str,
    usage: dict[str, Any] | None,
    started: float,
    ttft: float | None,
) -> Completion:
    reported_prompt = usage.get("prompt_tokens") if usage else None
    reported_completion = usage.get("completion_tokens") if usage else None
    if isinstance(reported_prompt, int) and isinstance(reported_completion, int):
        estimated, prompt, completion = False, reported_prompt, reported_completion
    else:
        estimated = True
        prompt = estimate_prompt_tokens(request.messages)
        completion = estimate_tokens(content)
    total = usage.get("total_tokens") if usage and not estimated else None
    return Completion(
        content=content,
        model=model,
        finish_reason=finish_reason,
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=total if isinstance(total, int) else prompt + completion,
        tokens_estimated=estimated,
        latency_s=time.monotonic() - started,
        ttft_s=ttft,
    )
