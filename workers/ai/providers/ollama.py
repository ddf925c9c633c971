"""Client of Ollama's native chat API.

``POST {base_url}/api/chat`` streams NDJSON: one ``{"message": {"content": …}, "done": false}``
object a line, and a last line with ``"done": true`` carrying ``done_reason``,
``prompt_eval_count``, ``eval_count`` and durations in nanoseconds. A failure after the 200 comes
as an ``{"error": "…"}`` line. Beyond its queue (``OLLAMA_MAX_QUEUE``) Ollama answers 503; an
unknown model is a 404. Timeouts, deadline and cancellation follow ``transport``.
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
from workers.ai.providers.transport import HTTPStreamingProvider, safe_message
from workers.failures import Retryable

#: Bytes of one NDJSON line we accept; more without a newline means a broken server.
MAX_LINE_BYTES = 1024 * 1024


class OllamaProvider(HTTPStreamingProvider):
    """Streams chat completions from one Ollama server."""

    path = "/api/chat"
    accept = "application/x-ndjson"

    def _body(self, request: ChatRequest, model: str) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if request.temperature is not None:
            options["temperature"] = request.temperature
        if request.max_tokens is not None:
            options["num_predict"] = request.max_tokens
        if request.stop:
            options["stop"] = list(request.stop)
        body: dict[str, Any] = {"model": model, "messages": request.wire_messages(), "stream": True}
        if options:
            body["options"] = options
        return body

    def _parser(
        self, response: requests.Response, request: ChatRequest, model: str, started: float
    ) -> StreamParser:
        return ChatLinesParser(self.config, request, model, started)


class ChatLinesParser(ParserBase):
    """``/api/chat``'s NDJSON lines, as they come; complete at the ``"done": true`` line."""

    def __init__(self, config: ProviderConfig, request: ChatRequest, model: str, started: float):
        super().__init__(config, request, model, started)
        self._buffer = b""
        self._final: dict[str, Any] | None = None

    def feed(self, data: bytes, emit: Callable[[str], None]) -> None:
        name = self.config.name
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        if len(self._buffer) > MAX_LINE_BYTES:
            raise Retryable(f"{name}: malformed stream: a line over {MAX_LINE_BYTES} bytes")
        for line in lines:
            if not line.strip():
                continue
            payload = _json_line(name, line, self.config.api_key)
            if payload.get("error"):
                message = safe_message(str(payload["error"]), self.config.api_key)
                raise Retryable(f"{name} failed mid-stream: {message}")
            message_part = payload.get("message") or {}
            text = message_part.get("content") if isinstance(message_part, dict) else None
            if isinstance(text, str) and text:
                self.take(text, emit)
            if payload.get("done") is True:
                self._final = payload
                self.done = True
                return

    def finish(self, emit: Callable[[str], None]) -> Completion:
        if self._final is None:
            raise Retryable(
                f"{self.config.name}: the stream ended before its done line (connection cut?)"
            )
        return _completion(
            self.request, "".join(self.parts), self._final, self.model, self.started, self.ttft
        )


def _json_line(name: str, line: bytes, secret: str | None) -> dict[str, Any]:
    try:
        payload = json.loads(line)
    except ValueError:
        shown = safe_message(line.decode("utf-8", "replace"), secret)[:200]
        raise Retryable(f"{name}: malformed JSON in a stream line: {shown!r}") from None
    if not isinstance(payload, dict):
        shown = safe_message(line.decode("utf-8", "replace"), secret)[:200]
        raise Retryable(f"{name}: a stream line is not a JSON object: {shown!r}")
    return payload


def _completion(
    request: ChatRequest,
    content: str,
    final: dict[str, Any],
    model: str,
    started: float,
    ttft: float | None,
) -> Completion:
    """Ollama leaves a count out when it had nothing to evaluate (e.g. a cached prompt); the
    missing side is estimated, and the completion says so."""
    prompt = final.get("prompt_eval_count")
    completion = final.get("eval_count")
    estimated = False
    if not isinstance(prompt, int):
        prompt, estimated = estimate_prompt_tokens(request.messages), True
    if not isinstance(completion, int):
        completion, estimated = estimate_tokens(content), True
    return Completion(
        content=content,
        model=str(final.get("model") or model),
        finish_reason=str(final.get("done_reason") or "stop"),
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        tokens_estimated=estimated,
        latency_s=time.monotonic() - started,
        ttft_s=ttft,
    )
