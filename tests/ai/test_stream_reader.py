"""The stream reader: one thread per process reading every open LLM stream (body framing,
many streams at once, connections given back to the pool or closed), against the fake LLM
server over real sockets. What a stream's content means is tests/ai/test_providers.py's."""

from __future__ import annotations

import threading
import time

import pytest

from tests.fakes import llm_server as fake_llm
from tests.fakes.llm_server import FakeLLMServer, Reply
from workers.ai.providers import ChatRequest, ProviderConfig
from workers.ai.providers.openai_compat import OpenAICompatProvider
from workers.ai.providers.reader import DRAIN_S, _Chunked, _Length, _read_here
from workers.ai.providers.transport import open_stream
from workers.failures import Retryable

llm_server = fake_llm.llm_server

BODY = b'data: {"a": 1}\n\ndata: [DONE]\n\n'
#: The same body, chunked as a server may: an extension, an empty line of trailers.
CHUNKED = b"7;ext=1\r\ndata: {\r\n17\r\n" + BODY[7:] + b"\r\n0\r\nX-Trailer: 1\r\n\r\n"


def provider(server: FakeLLMServer, **options) -> OpenAICompatProvider:
    settings = {"read_s": 2.0, "total_s": 10.0, "default_model": "fake-model", **options}
    return OpenAICompatProvider(
        ProviderConfig(name="fake", kind="openai", base_url=server.openai_url, **settings)
    )


def request(text: str = "hi") -> ChatRequest:
    return ChatRequest(messages=[{"role": "user", "content": text}])


@pytest.mark.parametrize("step", [1, 2, 3, 7, len(CHUNKED)])
def test_chunked_bodies_decode_whatever_the_reads_cut(step):
    decoder = _Chunked()
    body = b"".join(decoder.feed(CHUNKED[i : i + step]) for i in range(0, len(CHUNKED), step))
    assert body == BODY
    assert decoder.complete and decoder.reusable()


def test_chunked_framing_errors_are_named():
    with pytest.raises(ValueError, match="bad chunk size"):
        _Chunked().feed(b"zz\r\n")
    with pytest.raises(ValueError, match="longer than its size"):
        _Chunked().feed(b"2\r\nabc\r\n")
    after_the_end = _Chunked()
    after_the_end.feed(b"1\r\na\r\n0\r\n\r\nHTTP/1.1 200")
    assert after_the_end.complete and not after_the_end.reusable()


def test_a_length_body_ends_at_its_length_and_notices_extra_bytes():
    exact = _Length(5)
    assert exact.feed(b"abc") + exact.feed(b"de") == b"abcde"
    assert exact.complete and exact.reusable()
    over = _Length(2)
    assert over.feed(b"abc") == b"ab"
    assert over.complete and not over.reusable()


def test_a_finished_stream_gives_its_connection_to_the_next_request(llm_server):
    client = provider(llm_server)
    for _ in range(3):
        assert client.generate(request()).content == "Hello from the fake model."
        # The answer is complete at [DONE]; the connection returns to the pool when the body's
        # last chunk has been read, a moment later (another job would take it from there).
        time.sleep(0.1)
    ports = {r.client_port for r in llm_server.requests}
    assert len(llm_server.requests) == 3 and len(ports) == 1, ports


def test_a_cut_stream_closes_its_connection_and_the_next_opens_another(llm_server):
    llm_server.script(Reply.cut(after=2), Reply.ok())
    client = provider(llm_server)
    with pytest.raises(Retryable, match="connection broke"):
        client.generate(request())
    assert client.generate(request()).content == "Hello from the fake model."
    first, second = (r.client_port for r in llm_server.requests)
    assert first != second


def test_many_streams_at_once_share_one_reader_thread(llm_server):
    text = " ".join(f"w{i}" for i in range(20))
    llm_server.script(*[Reply.ok(text, chunk_delay_s=0.02) for _ in range(40)])
    client = provider(llm_server)
    results: list[tuple[str, str]] = []
    errors: list[BaseException] = []

    def one() -> None:
        pieces: list[str] = []
        try:
            completion = client.generate(request(), pieces.append)
            results.append(("".join(pieces), completion.content))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors, errors[:3]
    assert len(results) == 40
    assert all(streamed == content == text for streamed, content in results)
    readers = [t for t in threading.enumerate() if t.name == "llm-stream-reader"]
    assert len(readers) == 1


@pytest.mark.parametrize(("end_delay_s", "reused"), [(0.4, True), (DRAIN_S + 0.5, False)])
def test_the_answer_comes_at_done_and_the_connection_waits_for_the_body_end(
    llm_server, end_delay_s, reused
):
    llm_server.script(Reply.ok(end_delay_s=end_delay_s), Reply.ok())
    client = provider(llm_server)
    started = time.monotonic()
    assert client.generate(request()).content == "Hello from the fake model."
    assert time.monotonic() - started < end_delay_s, "the job waited for the body's last chunk"
    time.sleep(end_delay_s + 0.3)  # the last chunk came (or the reader gave up waiting)
    assert client.generate(request()).content == "Hello from the fake model."
    first, second = (r.client_port for r in llm_server.requests)
    assert (first == second) is reused


def test_an_answer_the_server_closes_after_is_read_and_not_reused(llm_server):
    llm_server.script(Reply.ok(headers=(("Connection", "close"),)), Reply.ok())
    client = provider(llm_server)
    pieces: list[str] = []
    assert client.generate(request(), pieces.append).content == "Hello from the fake model."
    assert "".join(pieces) == "Hello from the fake model."
    time.sleep(0.1)
    assert client.generate(request()).content == "Hello from the fake model."
    first, second = (r.client_port for r in llm_server.requests)
    assert first != second


def test_a_connection_the_reader_cannot_poll_is_read_on_the_calling_thread(llm_server):
    """What an https proxy's TLS-in-TLS connection gets: the same parser, on this thread."""
    llm_server.script(Reply.ok(chunk_delay_s=0.01), Reply.cut(after=2))
    client = provider(llm_server)
    for expect_cut in (False, True):
        req = request()
        started = time.monotonic()
        response = open_stream(
            client._session,
            client._url,
            body=client._body(req, "fake-model"),
            headers=client._headers(),
            config=client.config,
            request=req,
            started=started,
            deadline=started + 10,
        )
        parser = client._parser(response, req, "fake-model", started)
        pieces: list[str] = []
        answered = _read_here(
            response,
            parser,
            pieces.append,
            None,
            config=client.config,
            request=req,
            started=started,
            deadline=started + 10,
        )
        if expect_cut:
            with pytest.raises(Retryable, match=r"connection broke|ended before"):
                answered.wait()
            assert pieces == ["Hello ", "from "]
        else:
            assert answered.wait().content == "".join(pieces) == "Hello from the fake model."
