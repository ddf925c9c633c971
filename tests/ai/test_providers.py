"""LLM provider clients against a real HTTP server that speaks their wire formats.

No mocks: every client call crosses a socket to ``tests.fakes.llm_server``, scripted to answer
as OpenAI, llama.cpp and Ollama do, including the ways they fail.
"""

from __future__ import annotations

import email.utils
import json
import socket
import threading
import time
from collections.abc import Callable, Iterable

import pytest

from conveyor.errors import ConfigError
from tests.fakes import llm_server as fake_llm
from tests.fakes.llm_server import FakeLLMServer, Reply
from workers.ai.providers import (
    Cancelled,
    ChatRequest,
    Completion,
    DeadlineExceeded,
    Delta,
    ProviderConfig,
    close_providers,
    collect,
    default_provider_name,
    get_provider,
    providers_from_env,
)
from workers.ai.providers.local import LABEL, LocalProvider, echo
from workers.ai.providers.ollama import OllamaProvider
from workers.ai.providers.openai_compat import OpenAICompatProvider
from workers.failures import Permanent, Retryable
from workers.resilience.retry_after import retry_after_s

#: The fake server's fixture (a conftest may provide it too).
llm_server = fake_llm.llm_server

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hello to the queue"},
]


def request(**options) -> ChatRequest:
    return ChatRequest(messages=MESSAGES, **options)


def openai(server: FakeLLMServer, **options) -> OpenAICompatProvider:
    settings = {"read_s": 0.5, "total_s": 5.0, "default_model": "fake-model", **options}
    return OpenAICompatProvider(
        ProviderConfig(name="fake", kind="openai", base_url=server.openai_url, **settings)
    )


def ollama(server: FakeLLMServer, **options) -> OllamaProvider:
    settings = {"read_s": 0.5, "total_s": 5.0, "default_model": "llama3.2", **options}
    return OllamaProvider(
        ProviderConfig(name="fake-ollama", kind="ollama", base_url=server.url, **settings)
    )


def run(events: Iterable[Delta | Completion]) -> tuple[list[str], Completion]:
    """Deltas' texts and the one Completion; fails if the stream breaks the contract."""
    texts: list[str] = []
    completions: list[Completion] = []
    for event in events:
        assert not completions, "nothing may follow the Completion"
        if isinstance(event, Delta):
            texts.append(event.text)
        else:
            completions.append(event)
    assert len(completions) == 1
    return texts, completions[0]


def failure(events: Iterable[Delta | Completion]) -> tuple[list[str], BaseException]:
    """The deltas that came before the stream failed, and its failure."""
    texts: list[str] = []
    with pytest.raises((Retryable, Permanent)) as caught:
        for event in events:
            assert isinstance(event, Delta), "a failing stream must not complete"
            texts.append(event.text)
    return texts, caught.value


# --- OpenAI-compatible: answers ------------------------------------------------------------------


def test_openai_streams_deltas_and_takes_usage_from_the_usage_chunk(llm_server):
    llm_server.script(Reply.ok("The queue says hello back", prompt_tokens=21, completion_tokens=6))
    texts, done = run(openai(llm_server, api_key="sk-test").stream(request(max_tokens=50)))

    assert texts == ["The ", "queue ", "says ", "hello ", "back"]
    assert done.content == "".join(texts) == "The queue says hello back"
    assert (done.prompt_tokens, done.completion_tokens, done.total_tokens) == (21, 6, 27)
    assert done.tokens_estimated is False
    assert done.finish_reason == "stop"
    assert done.model == "fake-model"
    assert done.ttft_s is not None and 0 <= done.ttft_s <= done.latency_s

    sent = llm_server.requests[0]
    assert sent.path == "/v1/chat/completions"
    assert sent.headers["authorization"] == "Bearer sk-test"
    assert sent.body == {
        "model": "fake-model",
        "messages": MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 50,
    }


def test_openai_sends_the_job_options_and_no_authorization_without_a_key(llm_server):
    run(openai(llm_server).stream(request(model="other", temperature=0.2, stop=["\n\n"])))
    sent = llm_server.requests[0]
    assert "authorization" not in sent.headers
    assert sent.body["model"] == "other"
    assert sent.body["temperature"] == 0.2
    assert sent.body["stop"] == ["\n\n"]
    assert "max_tokens" not in sent.body


def test_openai_without_usage_estimates_tokens_and_says_so(llm_server):
    llm_server.script(Reply.no_usage("x" * 40))
    _, done = run(openai(llm_server).stream(request()))
    assert done.tokens_estimated is True
    assert done.completion_tokens == 10  # 40 characters at ~4 a token
    assert done.prompt_tokens > 0
    assert done.total_tokens == done.prompt_tokens + done.completion_tokens


def test_openai_ignores_keepalive_comments_and_reports_length_finish(llm_server):
    llm_server.script(Reply.ok("cut short", keepalive=True, finish_reason="length"))
    texts, done = run(openai(llm_server).stream(request()))
    assert "".join(texts) == "cut short"
    assert done.finish_reason == "length"


#: A chat completion stream as OpenAI documents it, split at awkward places (inside a line and
#: between the \r and \n of a line end) and with a multi-line data field, to test the SSE reader.
DOCUMENTED_STREAM = (
    b'data: {"id":"chatcmpl-123","object":"chat.completion.chunk","created":1694268190,'
    b'"model":"gpt-4o-mini","system_fingerprint":"fp_44709d6fcb","choices":[{"index":0,'
    b'"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}],'
    b'"usage":null}\r\n\r\n',
    b'data: {"id":"chatcmpl-123","object":"chat.completion.chunk","created":1694268190,"mo',
    b'del":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":"Hel"},"logprobs":null,'
    b'"finish_reason":null}],"usage":null}\r',
    b"\n\r\n: OPENROUTER PROCESSING\r\n\r\n",
    b'data: {"id":"chatcmpl-123","object":"chat.completion.chunk","created":1694268190,\r\n'
    b'data: "model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":"lo"},'
    b'"logprobs":null,"finish_reason":null}],"usage":null}\r\n\r\n',
    b'data: {"id":"chatcmpl-123","object":"chat.completion.chunk","created":1694268190,'
    b'"model":"gpt-4o-mini","choices":[{"index":0,"delta":{},"logprobs":null,'
    b'"finish_reason":"stop"}],"usage":null}\r\n\r\n',
    b'data: {"id":"chatcmpl-123","object":"chat.completion.chunk","created":1694268190,'
    b'"model":"gpt-4o-mini","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2,'
    b'"total_tokens":11}}\r\n\r\n',
    b"data: [DONE]\r\n\r\n",
)


def test_openai_reads_a_documented_stream_split_at_awkward_places(llm_server):
    llm_server.script(Reply.replay(*DOCUMENTED_STREAM))
    texts, done = run(openai(llm_server).stream(request()))
    assert texts == ["Hel", "lo"]
    assert done.model == "gpt-4o-mini"
    assert (done.prompt_tokens, done.completion_tokens, done.total_tokens) == (9, 2, 11)


def test_openai_accepts_a_server_that_ignored_stream_true(llm_server):
    body = (
        b'{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"llama",'
        b'"choices":[{"index":0,"message":{"role":"assistant","content":"Whole answer"},'
        b'"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":2,'
        b'"total_tokens":7}}'
    )
    llm_server.script(Reply.replay(body, content_type="application/json"))
    texts, done = run(openai(llm_server).stream(request()))
    assert texts == ["Whole answer"]
    assert (done.content, done.model, done.total_tokens) == ("Whole answer", "llama", 7)


def test_openai_without_a_model_anywhere_is_permanent(llm_server):
    provider = openai(llm_server, default_model=None)
    with pytest.raises(Permanent, match="no model"):
        collect(provider.stream(request()))
    assert llm_server.requests == []


def test_one_provider_serves_many_threads_at_once(llm_server):
    provider = openai(llm_server)
    results: list[str] = []
    errors: list[BaseException] = []

    def job() -> None:
        try:
            results.append(collect(provider.stream(request())).content)
        except BaseException as exc:  # surfaced below, with the thread's failure
            errors.append(exc)

    threads = [threading.Thread(target=job) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert errors == []
    assert results == ["Hello from the fake model."] * 8
    assert len(llm_server.requests) == 8


# --- OpenAI-compatible: HTTP failures -------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "delay_s", "words"),
    [
        (Reply.rate_limited(retry_after="7"), 7.0, "HTTP 429"),
        (Reply.rate_limited(retry_after="7", retry_after_ms="1500"), 1.5, "HTTP 429"),
        (Reply.rate_limited(retry_after="900"), 120.0, "HTTP 429"),
        (Reply.rate_limited(), None, "rate_limit_exceeded"),
        (Reply.server_error(500), None, "HTTP 500"),
        (Reply.server_error(502), None, "HTTP 502"),
        (Reply.server_error(503), None, "Sorry about that"),
        (Reply.http_error(408, "request timeout"), None, "HTTP 408"),
        (Reply.http_error(409, "conflict"), None, "HTTP 409"),
    ],
    ids=lambda value: getattr(value, "status", None) and str(value.status),
)
def test_openai_retryable_statuses(llm_server, reply, delay_s, words):
    llm_server.script(reply)
    with pytest.raises(Retryable) as caught:
        collect(openai(llm_server).stream(request()))
    assert caught.value.delay_s == delay_s
    assert words in str(caught.value)
    assert not isinstance(caught.value, Permanent)


def test_openai_honours_retry_after_as_an_http_date(llm_server):
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    llm_server.script(Reply.rate_limited(retry_after=when))
    with pytest.raises(Retryable) as caught:
        collect(openai(llm_server).stream(request()))
    assert caught.value.delay_s is not None and 25 <= caught.value.delay_s <= 30


@pytest.mark.parametrize(
    ("reply", "words"),
    [
        (Reply.context_exceeded(), "exceeds the available context size (4096 tokens)"),
        (Reply.context_exceeded(), "exceed_context_size_error"),
        (Reply.unauthorized(), "refused the API key (HTTP 401"),
        (Reply.forbidden(), "HTTP 403"),
        (Reply.not_found("gpt-9"), "The model `gpt-9` does not exist"),
        (Reply.http_error(422, "messages: field required"), "HTTP 422"),
        (Reply.quota_exceeded(), "no quota left (HTTP 429 insufficient_quota)"),
    ],
)
def test_openai_permanent_statuses_carry_the_server_message(llm_server, reply, words):
    llm_server.script(reply)
    with pytest.raises(Permanent) as caught:
        collect(openai(llm_server).stream(request()))
    assert words in str(caught.value)
    assert not isinstance(caught.value, Retryable)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "soon"}, None),
        ({"retry-after": "0"}, None),
        ({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, None),  # past: clock skew
        ({"retry-after-ms": "junk", "retry-after": "2"}, 2.0),
        ({}, None),
    ],
)
def test_retry_after_values_that_give_no_usable_wait(headers, expected):
    assert retry_after_s(headers) == expected


def test_an_api_key_the_server_echoes_never_reaches_the_error(llm_server):
    llm_server.script(Reply.http_error(401, "Incorrect API key provided: sk-live-secret-42"))
    with pytest.raises(Permanent) as caught:
        collect(openai(llm_server, api_key="sk-live-secret-42").stream(request()))
    assert "sk-live-secret-42" not in str(caught.value)
    assert "Incorrect API key provided: ***" in str(caught.value)


def test_a_refused_connection_is_retryable():
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    provider = OpenAICompatProvider(
        ProviderConfig(name="gone", kind="openai", base_url=f"http://127.0.0.1:{port}/v1")
    )
    with pytest.raises(Retryable, match="connection failed"):
        collect(provider.stream(request(model="m")))


# --- OpenAI-compatible: failures inside a 200 stream --------------------------------------------


def test_openai_stream_cut_midway_is_retryable_after_the_deltas_it_gave(llm_server):
    llm_server.script(Reply.cut(after=2))
    texts, error = failure(openai(llm_server).stream(request()))
    assert texts == ["Hello ", "from "]
    assert isinstance(error, Retryable)
    assert "connection broke" in str(error)


def test_openai_stream_ended_without_done_is_retryable(llm_server):
    llm_server.script(Reply.replay(*DOCUMENTED_STREAM[:-1]))  # ends cleanly, but no [DONE]
    _, error = failure(openai(llm_server).stream(request()))
    assert isinstance(error, Retryable)
    assert "before [DONE]" in str(error)


def test_openai_stream_without_finish_reason_is_retryable(llm_server):
    llm_server.script(Reply.replay(*DOCUMENTED_STREAM[:3], DOCUMENTED_STREAM[-1]))
    _, error = failure(openai(llm_server).stream(request()))
    assert isinstance(error, Retryable)
    assert "finish_reason" in str(error)


def test_openai_malformed_chunk_is_retryable(llm_server):
    llm_server.script(Reply.malformed(after=1))
    texts, error = failure(openai(llm_server).stream(request()))
    assert texts == ["Hello "]
    assert isinstance(error, Retryable)
    assert "malformed JSON" in str(error)


def test_openai_error_after_200_is_retryable_with_its_message(llm_server):
    llm_server.script(Reply.error_midstream(after=2, message="The model overloaded mid-answer"))
    texts, error = failure(openai(llm_server).stream(request()))
    assert texts == ["Hello ", "from "]
    assert isinstance(error, Retryable)
    assert "The model overloaded mid-answer" in str(error)


def test_openai_error_after_200_that_blames_the_request_is_permanent(llm_server):
    llm_server.script(
        Reply.error_midstream(message="context too long", type="invalid_request_error", code=400)
    )
    _, error = failure(openai(llm_server).stream(request()))
    assert isinstance(error, Permanent)
    assert "context too long" in str(error)


# --- Deadlines and cancellation -----------------------------------------------------------------


def test_a_stream_that_stalls_midway_fails_after_the_read_timeout(llm_server):
    llm_server.script(Reply.stall(30, after=1))
    started = time.monotonic()
    texts, error = failure(openai(llm_server, read_s=0.5).stream(request()))
    elapsed = time.monotonic() - started
    assert texts == ["Hello "]
    assert isinstance(error, Retryable)
    assert "stalled" in str(error)
    assert 0.4 <= elapsed < 2
    assert llm_server.wait_for_hangup(timeout=2)


def test_a_server_that_never_answers_fails_after_the_read_timeout(llm_server):
    llm_server.script(Reply.stall(30))
    started = time.monotonic()
    with pytest.raises(Retryable, match="no answer within"):
        collect(openai(llm_server, read_s=0.5).stream(request()))
    assert time.monotonic() - started < 2
    assert llm_server.wait_for_hangup(timeout=2)


def test_the_deadline_holds_even_while_the_server_is_silent(llm_server):
    """Chunks for ~0.5 s, then silence. read_s alone would wait 10 s, and a read timeout fixed
    when the request began (0.9 s) would end near 1.4 s; the deadline ends it at 0.9 s."""
    llm_server.script(Reply.stall(30, after=6, text="a b c d e f g h", chunk_delay_s=0.1))
    started = time.monotonic()
    texts, error = failure(openai(llm_server, read_s=10).stream(request(deadline=started + 0.9)))
    elapsed = time.monotonic() - started
    assert isinstance(error, DeadlineExceeded)
    assert len(texts) == 6
    assert 0.85 <= elapsed < 1.2


def test_the_total_budget_ends_a_slow_trickle(llm_server):
    """Every chunk comes within read_s, but the whole answer would take 3 s; total_s is 0.8."""
    llm_server.script(Reply.ok(" ".join(["word"] * 30), chunk_delay_s=0.1))
    started = time.monotonic()
    texts, error = failure(openai(llm_server, read_s=1, total_s=0.8).stream(request()))
    assert isinstance(error, DeadlineExceeded)
    assert isinstance(error, Retryable)
    assert 0 < len(texts) < 30
    assert time.monotonic() - started < 1.5


def test_should_stop_cancels_between_chunks_and_hangs_up(llm_server):
    llm_server.script(Reply.ok(" ".join(["word"] * 50), chunk_delay_s=0.05))
    seen: list[str] = []
    stream = openai(llm_server).stream(request(should_stop=lambda: len(seen) >= 3))
    started = time.monotonic()
    with pytest.raises(Cancelled) as caught:
        for event in stream:
            assert isinstance(event, Delta)
            seen.append(event.text)
    assert caught.value.reason == "cancelled"
    assert isinstance(caught.value, Permanent)
    assert 3 <= len(seen) < 50
    assert time.monotonic() - started < 1.5
    assert llm_server.wait_for_hangup(timeout=2), "the cancelled stream's connection stayed open"


def test_a_request_already_cancelled_is_never_sent(llm_server):
    with pytest.raises(Cancelled):
        collect(openai(llm_server).stream(request(should_stop=lambda: True)))
    assert llm_server.requests == []


# --- Ollama ---------------------------------------------------------------------------------------


def test_ollama_streams_ndjson_and_takes_its_counts(llm_server):
    llm_server.script(Reply.ok("Hi from llama", prompt_tokens=26, completion_tokens=3))
    provider = ollama(llm_server)
    texts, done = run(provider.stream(request(temperature=0.1, max_tokens=64, stop=["END"])))
    assert texts == ["Hi ", "from ", "llama"]
    assert done.content == "Hi from llama"
    assert (done.prompt_tokens, done.completion_tokens, done.total_tokens) == (26, 3, 29)
    assert done.tokens_estimated is False
    assert (done.model, done.finish_reason) == ("llama3.2", "stop")
    sent = llm_server.requests[0]
    assert sent.path == "/api/chat"
    assert sent.body == {
        "model": "llama3.2",
        "messages": MESSAGES,
        "stream": True,
        "options": {"temperature": 0.1, "num_predict": 64, "stop": ["END"]},
    }


#: Ollama's /api/chat stream as its docs show it; the last line split across two writes.
DOCUMENTED_OLLAMA = (
    b'{"model":"gemma2:2b","created_at":"2024-08-07T03:57:33.0365888Z","message":'
    b'{"role":"assistant","content":"Hello"},"done":false}\n',
    b'{"model":"gemma2:2b","created_at":"2024-08-07T03:57:33.2801449Z","message":'
    b'{"role":"assistant","content":"!"},"done":false}\n{"model":"gemma2:2b",',
    b'"created_at":"2024-08-07T03:57:37.0774624Z","message":{"role":"assistant","content":""},'
    b'"done_reason":"length","done":true,"total_duration":4353619900,"load_duration":63915300,'
    b'"prompt_eval_count":10,"prompt_eval_duration":246847000,"eval_count":17,'
    b'"eval_duration":4032296000}\n',
)


def test_ollama_reads_its_documented_stream(llm_server):
    llm_server.script(Reply.replay(*DOCUMENTED_OLLAMA, content_type="application/x-ndjson"))
    texts, done = run(ollama(llm_server).stream(request()))
    assert texts == ["Hello", "!"]
    assert (done.model, done.finish_reason, done.total_tokens) == ("gemma2:2b", "length", 27)


def test_ollama_without_counts_estimates(llm_server):
    llm_server.script(Reply.no_usage("y" * 20))
    _, done = run(ollama(llm_server).stream(request()))
    assert done.tokens_estimated is True
    assert done.completion_tokens == 5


def test_ollama_error_line_mid_stream_is_retryable(llm_server):
    llm_server.script(Reply.error_midstream(after=1, message="llama runner process has terminated"))
    texts, error = failure(ollama(llm_server).stream(request()))
    assert texts == ["Hello "]
    assert isinstance(error, Retryable)
    assert "llama runner process has terminated" in str(error)


@pytest.mark.parametrize(
    ("reply", "kind", "words"),
    [
        (Reply.ollama_busy(), Retryable, "maximum pending requests exceeded"),
        (Reply.server_error(500), Retryable, "HTTP 500"),
        (Reply.ollama_model_missing("llama9"), Permanent, 'model "llama9" not found'),
        (Reply.http_error(400, "invalid options: num_gpu"), Permanent, "invalid options"),
        (Reply.cut(after=1), Retryable, "connection broke"),
        (Reply.malformed(after=1), Retryable, "malformed JSON"),
    ],
)
def test_ollama_failures(llm_server, reply, kind, words):
    llm_server.script(reply)
    _, error = failure(ollama(llm_server).stream(request()))
    assert isinstance(error, kind)
    assert words in str(error)


def test_ollama_stream_ended_before_done_is_retryable(llm_server):
    llm_server.script(Reply.replay(*DOCUMENTED_OLLAMA[:1], content_type="application/x-ndjson"))
    texts, error = failure(ollama(llm_server).stream(request()))
    assert texts == ["Hello"]
    assert isinstance(error, Retryable)
    assert "before its done line" in str(error)


def test_ollama_stall_and_cancellation(llm_server):
    llm_server.script(
        Reply.stall(30, after=1), Reply.ok(" ".join("abcdefghijklmnop"), chunk_delay_s=0.1)
    )
    started = time.monotonic()
    _, error = failure(ollama(llm_server, read_s=0.4).stream(request()))
    assert isinstance(error, Retryable) and "stalled" in str(error)
    assert time.monotonic() - started < 1.5

    seen: list[Delta | Completion] = []
    with pytest.raises(Cancelled):  # should_stop is read between chunks, every SWEEP_S at most
        for event in ollama(llm_server).stream(request(should_stop=lambda: len(seen) >= 2)):
            seen.append(event)
    assert 2 <= len(seen) < 16


# --- The local echo -------------------------------------------------------------------------------


def test_local_echo_is_labelled_deterministic_and_streamed_word_by_word():
    provider = LocalProvider(delay_s=0)
    texts, first = run(provider.stream(request()))
    _, second = run(provider.stream(request()))
    assert first.content == second.content == "".join(texts)
    assert first.content == f"{LABEL} queue the to hello Say"
    assert len(texts) == len(first.content.split())
    assert first.model == "local-echo"
    assert first.tokens_estimated is True
    assert first.total_tokens == first.prompt_tokens + first.completion_tokens > 0


def test_local_echo_takes_the_last_user_message_and_honours_max_tokens():
    messages = [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "an answer"},
        {"role": "user", "content": "one two three four"},
    ]
    assert echo(messages).endswith("four three two one")
    done = collect(LocalProvider(delay_s=0).stream(ChatRequest(messages=messages, max_tokens=3)))
    assert done.finish_reason == "length"
    assert len(done.content.split()) == 3


def test_local_echo_paces_its_words_and_can_be_cancelled():
    slow = LocalProvider(delay_s=0.05)
    done = collect(slow.stream(request()))
    words = len(done.content.split())
    assert done.latency_s >= 0.05 * (words - 1) * 0.9

    seen: list[Delta | Completion] = []
    with pytest.raises(Cancelled):
        for event in slow.stream(request(should_stop=lambda: len(seen) >= 2)):
            seen.append(event)
    assert len(seen) == 2


def test_local_echo_keeps_the_deadline():
    with pytest.raises(DeadlineExceeded):
        collect(LocalProvider(delay_s=0.2).stream(request(deadline=time.monotonic() + 0.3)))


# --- Configuration --------------------------------------------------------------------------------


def test_no_llm_settings_means_only_the_local_echo():
    providers = providers_from_env({})
    assert list(providers) == ["local"]
    assert providers["local"].kind == "local"
    assert default_provider_name(providers) == "local"


def test_llm_variables_make_the_default_provider():
    providers = providers_from_env(
        {
            "LLM_BASE_URL": "https://api.example.com/v1/",
            "LLM_API_KEY": "sk-abc123",
            "LLM_MODEL": "gpt-4o-mini",
            "LLM_RPM": "500",
            "LLM_TPM": "200000",
            "LLM_READ_TIMEOUT": "30",
            "LLM_FALLBACKS": "local",
        }
    )
    default = providers["default"]
    assert default_provider_name(providers) == "default"
    assert default.kind == "openai"
    assert default.base_url == "https://api.example.com/v1"
    assert (default.api_key, default.default_model) == ("sk-abc123", "gpt-4o-mini")
    assert (default.rpm, default.tpm, default.read_s) == (500, 200000, 30.0)
    assert default.fallbacks == ("local",)
    assert "local" in providers


def test_llm_provider_ollama_and_named_providers_from_json():
    providers = providers_from_env(
        {
            "LLM_BASE_URL": "http://ollama:11434",
            "LLM_PROVIDER": "ollama",
            "LLM_MODEL": "llama3.2",
            "FAST_KEY": "sk-fast",
            "CONVEYOR_PROVIDERS": '{"fast": {"kind": "openai", "base_url": "https://x.test/v1",'
            ' "api_key_env": "FAST_KEY", "model": "small", "rpm": 60, "tpm": 1000,'
            ' "fallbacks": ["default", "local"], "total_s": 30}}',
        }
    )
    assert providers["default"].kind == "ollama"
    fast = providers["fast"]
    assert (fast.kind, fast.api_key, fast.default_model) == ("openai", "sk-fast", "small")
    assert (fast.rpm, fast.tpm, fast.total_s) == (60, 1000, 30.0)
    assert fast.fallbacks == ("default", "local")


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({"LLM_BASE_URL": "ftp://files.example.com"}, "LLM_BASE_URL"),
        ({"LLM_BASE_URL": "https://user:pw@api.example.com/v1"}, "LLM_BASE_URL"),
        ({"LLM_BASE_URL": "http://x.test", "LLM_PROVIDER": "anthropic"}, "LLM_PROVIDER"),
        ({"LLM_API_KEY": "sk-orphan"}, "LLM_BASE_URL"),
        ({"LLM_BASE_URL": "http://x.test", "LLM_RPM": "lots"}, "LLM_RPM"),
        ({"LLM_BASE_URL": "http://x.test", "LLM_TPM": "0"}, "LLM_TPM"),
        ({"LLM_BASE_URL": "http://x.test", "LLM_TIMEOUT": "-1"}, "LLM_TIMEOUT"),
        ({"LLM_BASE_URL": "http://x.test", "LLM_FALLBACKS": "nowhere"}, "LLM_FALLBACKS"),
        ({"CONVEYOR_PROVIDERS": "{not json"}, "CONVEYOR_PROVIDERS"),
        ({"CONVEYOR_PROVIDERS": '["a list"]'}, "CONVEYOR_PROVIDERS"),
        (
            {"CONVEYOR_PROVIDERS": '{"p": {"base_url": "http://p.test", "api_key": "sk-x"}}'},
            "api_key_env",
        ),
        (
            {"CONVEYOR_PROVIDERS": '{"p": {"base_url": "http://p.test", "api_key_env": "NOPE"}}'},
            "NOPE",
        ),
        ({"CONVEYOR_PROVIDERS": '{"p": {"base_url": "http://p.test", "mdoel": "m"}}'}, "mdoel"),
        ({"CONVEYOR_PROVIDERS": '{"p": {"kind": "grpc", "base_url": "http://p"}}'}, "kind"),
        ({"CONVEYOR_PROVIDERS": '{"p": {"kind": "openai"}}'}, "base_url"),
        ({"CONVEYOR_PROVIDERS": '{"local": {"base_url": "http://p.test"}}'}, "built in"),
        ({"CONVEYOR_PROVIDERS": '{"p": {"base_url": "http://p", "rpm": true}}'}, "rpm"),
        (
            {"CONVEYOR_PROVIDERS": '{"p": {"base_url": "http://p", "fallbacks": ["p"]}}'},
            "itself",
        ),
        (
            {"CONVEYOR_PROVIDERS": '{"p": {"base_url": "http://p", "fallbacks": ["q"]}}'},
            "CONVEYOR_PROVIDERS",
        ),
        (
            {
                "LLM_BASE_URL": "http://x.test",
                "CONVEYOR_PROVIDERS": '{"default": {"base_url": "http://p.test"}}',
            },
            "already defines",
        ),
    ],
)
def test_bad_provider_settings_name_the_culprit(environ, variable):
    with pytest.raises(ConfigError, match=variable):
        providers_from_env(environ)


def test_the_api_key_never_shows_in_a_config_repr_or_str():
    providers = providers_from_env(
        {
            "LLM_BASE_URL": "https://api.example.com/v1",
            "LLM_API_KEY": "sk-very-secret-1",
            "SECOND_KEY": "sk-very-secret-2",
            "CONVEYOR_PROVIDERS": '{"second": {"base_url": "https://b.test",'
            ' "api_key_env": "SECOND_KEY"}}',
        }
    )
    assert providers["second"].api_key == "sk-very-secret-2"
    for shown in (repr(providers), str(providers), str(providers["default"])):
        assert "sk-very-secret" not in shown
    assert "api.example.com" in repr(providers["default"])


# --- Registry -------------------------------------------------------------------------------------


@pytest.fixture
def registry() -> Iterable[Callable[[ProviderConfig], object]]:
    yield get_provider
    close_providers()


def test_the_registry_shares_one_client_per_provider(registry, llm_server):
    providers = providers_from_env({"LLM_BASE_URL": llm_server.openai_url, "LLM_MODEL": "m"})
    client = registry(providers["default"])
    assert isinstance(client, OpenAICompatProvider)
    assert registry(providers["default"]) is client
    assert isinstance(registry(providers["local"]), LocalProvider)
    assert collect(client.stream(request())).content == "Hello from the fake model."

    changed = providers_from_env({"LLM_BASE_URL": llm_server.url, "LLM_PROVIDER": "ollama"})
    assert isinstance(registry(changed["default"]), OllamaProvider)


@pytest.mark.parametrize("offset", [0, 440, 455, 460, 520])
def test_a_key_echoed_in_a_long_error_never_survives_the_cut(offset):
    """The key is redacted before the message is shortened: no prefix of it is left either."""
    from workers.ai.providers.transport import failure_for_status, parse_error

    key = "sk-" + "S3cr3tK3y" * 6
    config = ProviderConfig(name="p", kind="openai", base_url="http://x/v1", api_key=key)
    text = "x" * offset + f"Incorrect API key provided: {key}. " + "y" * 600
    body = json.dumps({"error": {"message": text, "type": "invalid_request_error"}}).encode()
    verdict = failure_for_status(config, 401, {}, parse_error(body))
    assert key[:12] not in str(verdict)
    assert len(str(verdict)) < 700


def test_a_prompt_longer_than_the_context_is_refused_before_it_is_sent(llm_server):
    config = ProviderConfig(
        name="small", kind="openai", base_url=llm_server.openai_url, default_model="m",
        context_tokens=50,
    )  # fmt: skip
    before = len(llm_server.requests)
    request = ChatRequest(messages=({"role": "user", "content": "x" * 400},))
    with pytest.raises(Permanent, match=r"about 104 tokens.*context of 50 tokens"):
        OpenAICompatProvider(config).generate(request)
    assert len(llm_server.requests) == before  # nothing sent
    env = {"LLM_BASE_URL": llm_server.openai_url, "LLM_CONTEXT_TOKENS": "8192"}
    assert providers_from_env(env)["default"].context_tokens == 8192
