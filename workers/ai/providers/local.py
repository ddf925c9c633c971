"""The built-in ``local`` provider: an echo for the dev stack and demos. It is NOT a model.

It streams back the last user message with its words in reverse order, behind a label that
says so, one word a chunk with a small delay, so dashboards and the whole job path can be seen
working with nothing installed. Deterministic: the same messages give the same answer. It keeps
the provider contract (deadline, cancellation, ``max_tokens`` as a word limit) and ignores
temperature and stop sequences; its token counts are estimates.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

from workers.ai.providers.base import (
    LOCAL,
    Cancelled,
    ChatRequest,
    Completion,
    Delta,
    ProviderConfig,
    check_deadline,
    deadline_for,
    estimate_prompt_tokens,
    estimate_tokens,
)

MODEL = "local-echo"
LABEL = "[local echo, not a model]"
#: Seconds between two words: slow enough to watch a stream, fast enough for a demo.
DEFAULT_DELAY_S = 0.02

_WORD = re.compile(r"\S+\s*")


def echo(messages: Sequence[Mapping[str, str]]) -> str:
    """The answer to ``messages``: the label, then the last user message's words reversed."""
    users = [m["content"] for m in messages if m["role"] == "user"]
    text = users[-1] if users else messages[-1]["content"]
    return " ".join([LABEL, *reversed(text.split())])


class LocalProvider:
    """Streams ``echo(messages)`` a word at a time."""

    def __init__(self, config: ProviderConfig | None = None, *, delay_s: float = DEFAULT_DELAY_S):
        self.config = config or ProviderConfig(name=LOCAL, kind="local", default_model=MODEL)
        self.delay_s = delay_s

    def close(self) -> None:
        """Nothing to release; here so every provider can be closed alike."""

    def generate(
        self, request: ChatRequest, on_delta: Callable[[str], None] = lambda _text: None
    ) -> Completion:
        """The echo, paced on the calling thread (no socket to hand to the stream reader)."""
        for piece in self.stream(request):
            if isinstance(piece, Completion):
                return piece
            on_delta(piece.text)
        raise AssertionError("the echo ends with a Completion")

    def stream(self, request: ChatRequest) -> Iterator[Delta | Completion]:
        name = self.config.name
        started = time.monotonic()
        deadline = deadline_for(request, self.config, started)
        words = _WORD.findall(echo(request.messages))
        finish_reason = "stop"
        if request.max_tokens is not None and len(words) > request.max_tokens:
            words, finish_reason = words[: request.max_tokens], "length"
        ttft: float | None = None
        for index, word in enumerate(words):
            if request.stopped():
                raise Cancelled(f"{name}: cancelled mid-stream")
            left = check_deadline(deadline, started, name)
            if index and self.delay_s > 0:
                time.sleep(min(self.delay_s, left))
                check_deadline(deadline, started, name)
            if ttft is None:
                ttft = time.monotonic() - started
            yield Delta(word)
        content = "".join(words)
        prompt_tokens = estimate_prompt_tokens(request.messages)
        completion_tokens = estimate_tokens(content)
        yield Completion(
            content=content,
            model=MODEL,
            finish_reason=finish_reason,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            tokens_estimated=True,
            latency_s=time.monotonic() - started,
            ttft_s=ttft,
        )
