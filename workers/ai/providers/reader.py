"""One thread per worker process reads the body of every open LLM stream.

A threads pool that read each stream in its own job thread paid a thread wake-up, a GIL
hand-over and a trip through urllib3 and http.client for every chunk a model sends: about
160 µs of CPU a chunk on our 2-core machine, most of an ``ai`` job's cost
(bench/ai_inflight.py). Here the job's thread still sends the request with ``requests`` and
reads the status and headers (so every HTTP failure is decided as before, in ``transport``),
then hands the open socket to this reader and sleeps until its answer is complete. The reader
waits on all the sockets at once (``selectors``), undoes the body's framing (chunked, a
``Content-Length``, or up to the end of the connection; gzip if a server insists), feeds the
bytes to the stream's parser, and passes the text to the stream's ``on_delta`` — all on its
own thread, so a chunk costs one ``recv`` and the parsing.

What the job's thread used to check between chunks the reader checks for it, every
``SWEEP_S``: the stream's ``should_stop`` (-> ``Cancelled``, and the connection is closed so
the server stops generating), its deadline (-> ``DeadlineExceeded``) and the silence allowed
between chunks (``read_s`` -> ``Retryable``). A stream that fails or is cancelled has its
connection closed, so the server stops generating; one read to the exact end of its body gives
its connection back to the pool for the next job.

Taking a socket over from ``requests`` leans on private behaviour of urllib3 and http.client:
all of it is fenced in ``http_internals.py``, with a test that fails naming what moved.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Callable
from typing import Any, Protocol

import requests
import urllib3

from workers.ai.providers import http_internals
from workers.ai.providers.base import (
    Cancelled,
    ChatRequest,
    Completion,
    DeadlineExceeded,
    ProviderConfig,
)
from workers.failures import Permanent, Retryable

log = logging.getLogger(__name__)

#: Seconds between two checks of every stream's cancel flag, deadline and silence.
SWEEP_S = 0.2
#: Seconds an answered stream's connection may wait for the rest of its body's framing before
#: it is closed instead of given back to the pool.
DRAIN_S = 1.0
#: Bytes asked of a socket per ``recv``; the reader reads until the socket has no more.
READ_SIZE = 64 * 1024
#: Reads of one stream in one turn at most: a server sending as fast as we read must not keep
#: the reader from every other stream (epoll reports the rest again next turn).
_READS_PER_TURN = 16
#: Seconds a job's thread waits past its stream's deadline for the reader to answer, should
#: the reader itself be stuck: a safety net, never reached while the reader runs.
_WAIT_GRACE_S = 10.0
#: Bytes of one chunk-size or trailer line we accept: a server sending more is broken.
_MAX_LINE = 4096


class StreamParser(Protocol):
    """Turns a stream's body into text pieces and, at its end, one ``Completion``."""

    #: True once the answer is complete: whatever the body still holds does not matter.
    done: bool
    #: Set by the reader before ``finish``: the body ended as its framing said it would.
    body_complete: bool

    def feed(self, data: bytes, emit: Callable[[str], None]) -> None:
        """Parse the next bytes of the body; ``emit`` each piece of text. Raises
        ``Retryable``/``Permanent`` for a malformed stream or an error sent inside it."""
        ...

    def finish(self, emit: Callable[[str], None]) -> Completion:
        """The answer, at the end of the body; raises ``Retryable`` when it is incomplete."""
        ...


class ParserBase:
    """What every parser keeps: whose answer it reads, for which request and model, since when
    (for the time to first token and the latency), the text so far, and whether the answer is
    complete."""

    def __init__(self, config: ProviderConfig, request: ChatRequest, model: str, started: float):
        self.config = config
        self.request = request
        self.model = model
        self.started = started
        self.done = False
        self.parts: list[str] = []
        self.ttft: float | None = None
        #: Bytes of body fed so far.
        self.received = 0
        #: The body ended as its framing said it would (chunked end, or Content-Length): an
        #: answer that stops short then is what the server sent, not a cut connection.
        self.body_complete = False

    def take(self, text: str, emit: Callable[[str], None]) -> None:
        """One piece of the answer's text: kept, timed if it is the first, passed on."""
        if self.ttft is None:
            self.ttft = time.monotonic() - self.started
        self.parts.append(text)
        emit(text)


# --- Body framing -------------------------------------------------------------------------------


class _Framing:
    """Undoes one body framing: ``feed`` returns the body bytes in ``data``; ``complete`` is
    set once the body has ended (a body that ends with the connection never sets it)."""

    complete = False

    def feed(self, data: bytes) -> bytes:
        raise NotImplementedError

    def reusable(self) -> bool:
        """The body ended exactly, nothing after it: the connection can serve another request."""
        return False


class _Chunked(_Framing):
    """``Transfer-Encoding: chunked`` (RFC 9112 §7.1), decoded as bytes arrive."""

    def __init__(self) -> None:
        self._buffer = b""
        self._left = 0  # body bytes left in the current chunk
        self._state = "size"  # size -> data -> data-end -> size ... -> trailer

    def feed(self, data: bytes) -> bytes:
        self._buffer += data
        out: list[bytes] = []
        while not self.complete:
            if self._state == "data":
                piece = self._buffer[: self._left]
                self._buffer = self._buffer[len(piece) :]
                self._left -= len(piece)
                out.append(piece)
                if self._left:
                    break
                self._state = "data-end"
                continue
            line = self._line()
            if line is None:
                break
            if self._state == "size":
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise ValueError(f"a bad chunk size line {line[:40]!r}") from None
                if size < 0:
                    raise ValueError(f"a negative chunk size {line[:40]!r}")
                self._left, self._state = size, ("data" if size else "trailer")
            elif self._state == "data-end":
                if line:
                    raise ValueError("a chunk longer than its size line says")
                self._state = "size"
            elif not line:  # trailer: fields until an empty line
                self.complete = True
        return b"".join(out)

    def reusable(self) -> bool:
        return self.complete and not self._buffer

    def _line(self) -> bytes | None:
        end = self._buffer.find(b"\n")
        if end < 0:
            if len(self._buffer) > _MAX_LINE:
                raise ValueError(f"a chunk framing line longer than {_MAX_LINE} bytes")
            return None
        line = self._buffer[:end].rstrip(b"\r")
        self._buffer = self._buffer[end + 1 :]
        return line


class _Length(_Framing):
    """A body of ``Content-Length`` bytes."""

    def __init__(self, length: int):
        self._left = length
        self.complete = length == 0
        self._extra = False  # bytes past the body: the connection is out of step

    def feed(self, data: bytes) -> bytes:
        piece = data[: self._left]
        self._left -= len(piece)
        self.complete = self._left == 0
        self._extra = self._extra or len(piece) < len(data)
        return piece

    def reusable(self) -> bool:
        return self.complete and not self._extra


class _UntilClose(_Framing):
    """A body that ends when the server closes the connection."""

    def feed(self, data: bytes) -> bytes:
        return data


def _framing(response: requests.Response) -> _Framing:
    """The framing of the body ``http.client`` was about to read."""
    chunked, length = http_internals.framing_of(response)
    if chunked:
        return _Chunked()
    if length is not None:
        return _Length(length)
    return _UntilClose()


def _decompressor(config: ProviderConfig, encoding: str) -> Any:
    """We ask for ``identity``; a server that compresses anyway gets understood (gzip, zlib)."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return None
    if encoding in ("gzip", "x-gzip", "deflate"):
        return zlib.decompressobj(zlib.MAX_WBITS | 32)  # either header, detected
    raise Permanent(f"{config.name}: answered in an encoding we cannot read ({encoding!r})")


# --- Streams ------------------------------------------------------------------------------------


class StreamHandle:
    """One stream the reader follows; the job's thread waits on it."""

    def __init__(
        self,
        response: requests.Response,
        sock: socket.socket,
        parser: StreamParser,
        on_delta: Callable[[str], None],
        *,
        config: ProviderConfig,
        request: ChatRequest,
        started: float,
        deadline: float,
        on_end: Callable[[], None] | None,
    ):
        self.response = response
        self.sock = sock
        self.parser = parser
        self.on_delta = on_delta
        self.config = config
        self.request = request
        self.started = started
        self.deadline = deadline
        self.on_end = on_end
        self.framing = _framing(response)
        self.decompress = _decompressor(config, response.headers.get("content-encoding", ""))
        self.last_data = time.monotonic()
        self.completion: Completion | None = None
        self.error: BaseException | None = None
        self.ended = threading.Event()
        #: When the answer was complete but the body not yet (reader thread only).
        self.draining_since = 0.0
        #: No longer followed: the connection is closed or back in its pool.
        self.released = False
        self._abort: BaseException | None = None

    def wait(self) -> Completion:
        """Block until the stream ended; its ``Completion``, or the error that ended it."""
        if not self.ended.wait(max(self.deadline - time.monotonic(), 0) + _WAIT_GRACE_S):
            self.abort(DeadlineExceeded(f"{self.config.name}: the stream reader did not answer"))
            raise DeadlineExceeded(f"{self.config.name}: the stream reader did not answer")
        if self.error is not None:
            raise self.error
        assert self.completion is not None
        return self.completion

    def abort(self, error: BaseException) -> None:
        """Ask the reader to end this stream with ``error`` at its next sweep (any thread)."""
        self._abort = error

    def feed(self, data: bytes) -> None:
        """Body bytes as they came off the socket (reader thread only)."""
        self.last_data = time.monotonic()
        body = self.framing.feed(data)
        if self.decompress is not None and body:
            body = self.decompress.decompress(body)
        if body:
            self.parser.feed(body, self.on_delta)

    def overdue(self, now: float) -> BaseException | None:
        """Why this stream must end now, if it must (reader thread only)."""
        name = self.config.name
        if self._abort is not None:
            return self._abort
        if self.request.stopped():
            return Cancelled(f"{name}: cancelled mid-stream")
        if now >= self.deadline:
            return DeadlineExceeded(
                f"{name}: no complete answer within {now - self.started:.1f} s (deadline passed)"
            )
        if now - self.last_data >= self.config.read_s:
            return Retryable(
                f"{name}: the stream stalled for {self.config.read_s:g} s (read timeout)"
            )
        return None


class StreamReader:
    """The reader thread of one process and the streams it follows."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._streams: set[StreamHandle] = set()
        self._incoming: list[StreamHandle] = []
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._run, name="llm-stream-reader", daemon=True)
        self._thread.start()

    def start(
        self,
        response: requests.Response,
        parser: StreamParser,
        on_delta: Callable[[str], None],
        *,
        config: ProviderConfig,
        request: ChatRequest,
        started: float,
        deadline: float,
        on_end: Callable[[], None] | None = None,
    ) -> StreamHandle | AnsweredStream:
        """Follow ``response`` (2xx, headers read, body untouched) from now on.

        A connection this thread cannot poll (TLS inside TLS, to an ``https://`` proxy, is
        urllib3's own object, not a socket) is read on the calling thread instead, the
        deltas arriving as they come but a stop or the deadline noticed between chunks only.
        """
        options: dict[str, Any] = {
            "config": config,
            "request": request,
            "started": started,
            "deadline": deadline,
        }
        sock = http_internals.socket_of(response)
        try:
            if sock is None:
                return _read_here(response, parser, on_delta, on_end, **options)
            handle = StreamHandle(response, sock, parser, on_delta, on_end=on_end, **options)
            sock.setblocking(False)
        except BaseException:
            response.close()
            raise
        with self._lock:
            self._incoming.append(handle)
        with contextlib.suppress(BlockingIOError):  # full: the reader has wake-ups pending
            self._wake_w.send(b"\0")
        return handle

    # -- the reader thread

    def _run(self) -> None:
        next_sweep = time.monotonic() + SWEEP_S
        while True:
            try:
                ready = self._selector.select(max(next_sweep - time.monotonic(), 0))
                for key, _ in ready:
                    if key.data is None:
                        self._admit()
                    else:
                        self._read(key.data)
                now = time.monotonic()
                if now >= next_sweep:
                    self._sweep(now)
                    next_sweep = now + SWEEP_S
            except Exception:  # never let one bad stream stop every other
                log.exception("the LLM stream reader failed a turn; going on")
                time.sleep(0.05)

    def _admit(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass
        with self._lock:
            incoming, self._incoming = self._incoming, []
        for handle in incoming:
            self._streams.add(handle)
            try:
                self._drain_buffered(handle)
                if not handle.ended.is_set():
                    self._maybe_done(handle)  # a body with nothing in it (Content-Length: 0)
                if handle.released:
                    continue
                self._selector.register(handle.sock, selectors.EVENT_READ, handle)
            except BaseException as exc:
                self._end(handle, _failure(handle, exc))
                continue
            self._read(handle)  # what arrived before it was registered

    def _drain_buffered(self, handle: StreamHandle) -> None:
        """Body bytes ``http.client`` read ahead with the headers, still in its buffer."""
        buffered = http_internals.buffered_reader(handle.response)
        while buffered is not None:
            try:
                data = buffered.read1(READ_SIZE)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            if not data:
                return
            handle.feed(data)
            if self._maybe_done(handle):
                return

    def _read(self, handle: StreamHandle) -> None:
        if handle.released:
            return
        try:
            for _ in range(_READS_PER_TURN):
                try:
                    data = handle.sock.recv(READ_SIZE)
                except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    return
                if not data:
                    self._at_eof(handle)
                    return
                if handle.ended.is_set():  # answered: only the end of the body is awaited
                    handle.framing.feed(data)
                    if handle.framing.complete:
                        self._release(handle)
                        return
                    continue
                handle.feed(data)
                if self._maybe_done(handle):
                    return
        except BaseException as exc:
            self._end(handle, _failure(handle, exc))

    def _maybe_done(self, handle: StreamHandle) -> bool:
        """Answer the job as soon as its answer is complete. Its connection goes back to the
        pool once the body's framing has ended too (a chunked body's last chunk often comes a
        moment after ``[DONE]``); a body still open ``DRAIN_S`` later is closed."""
        if not (handle.parser.done or handle.framing.complete):
            return False
        handle.parser.body_complete = handle.framing.complete
        self._finish(handle)
        if handle.framing.complete or handle.error is not None:
            self._release(handle)
        else:
            handle.draining_since = time.monotonic()
        return True

    def _at_eof(self, handle: StreamHandle) -> None:
        """The server closed the connection: the end of a body that ends so; else a cut."""
        if handle.ended.is_set():
            self._release(handle)
        elif isinstance(handle.framing, _UntilClose) or handle.framing.complete:
            handle.parser.body_complete = not isinstance(handle.framing, _UntilClose)
            self._finish(handle)
            self._release(handle)
        else:
            self._end(
                handle,
                Retryable(
                    f"{handle.config.name}: the connection broke mid-stream "
                    "(closed before the end of the body)"
                ),
            )

    def _finish(self, handle: StreamHandle) -> None:
        """Resolve the stream with its parser's ``Completion``, or the parser's error."""
        try:
            if handle.decompress is not None:
                tail = handle.decompress.flush()
                if tail:
                    handle.parser.feed(tail, handle.on_delta)
            handle.completion = handle.parser.finish(handle.on_delta)
        except BaseException as exc:
            self._resolve(handle, _failure(handle, exc))
            return
        self._resolve(handle, None)

    def _sweep(self, now: float) -> None:
        for handle in list(self._streams):
            if handle.ended.is_set():
                if now - handle.draining_since >= DRAIN_S:
                    self._release(handle)
                continue
            try:
                error = handle.overdue(now)
            except Exception as exc:  # a should_stop that fails ends its own stream only
                error = exc
            if error is not None:
                self._end(handle, error)

    def _end(self, handle: StreamHandle, error: BaseException) -> None:
        """End a stream that failed or was stopped: its connection is closed."""
        self._resolve(handle, error)
        self._release(handle)

    def _resolve(self, handle: StreamHandle, error: BaseException | None) -> None:
        """Tell the job's thread how its stream ended (once)."""
        if handle.ended.is_set():
            return
        handle.error = error
        handle.ended.set()
        if handle.on_end is not None:
            try:
                handle.on_end()
            except Exception:
                log.exception("a stream's on_end callback failed")

    def _release(self, handle: StreamHandle) -> None:
        """Stop following a resolved stream: give its connection back if its body ended
        exactly and well, else close it (the server stops generating)."""
        if handle.released:
            return
        handle.released = True
        self._streams.discard(handle)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(handle.sock)
        # will_close: the server said it closes (Connection: close, HTTP/1.0).
        if (
            handle.error is None
            and handle.framing.reusable()
            and not http_internals.server_closes(handle.response)
        ):
            _give_back(handle)
            return
        try:
            handle.response.close()
        except Exception:
            log.debug("closing a stream's connection failed", exc_info=True)


def _give_back(handle: StreamHandle) -> None:
    """Return a connection whose body was read to its exact end to its pool, for the next
    job (no new connect, and for https no new handshake). ``http.client`` never read that
    body, so it is told the body ended, as it tells itself at the end of one it read."""
    try:
        http_internals.mark_body_read(handle.response)
        handle.sock.setblocking(True)  # the next request sets its own timeouts
        handle.response.raw.release_conn()
    except Exception:
        log.debug("could not give a stream's connection back; closing it", exc_info=True)
        with contextlib.suppress(Exception):
            handle.response.close()


def _failure(handle: StreamHandle, exc: BaseException) -> BaseException:
    """What a failure while reading a stream means to the job."""
    if isinstance(exc, Retryable | Permanent):
        return exc
    name = handle.config.name
    if isinstance(exc, ValueError | zlib.error):
        return Retryable(f"{name}: malformed stream: {exc}")
    if isinstance(exc, OSError):
        return Retryable(f"{name}: the connection broke mid-stream: {exc}")
    return exc


class AnsweredStream:
    """The handle of a stream read to its end on the calling thread (``_read_here``)."""

    def __init__(self, completion: Completion | None, error: BaseException | None):
        self.completion = completion
        self.error = error
        self.ended = threading.Event()
        self.ended.set()

    def wait(self) -> Completion:
        if self.error is not None:
            raise self.error
        assert self.completion is not None
        return self.completion

    def abort(self, error: BaseException) -> None:
        """Nothing to stop: it has ended."""


def _read_here(
    response: requests.Response,
    parser: StreamParser,
    on_delta: Callable[[str], None],
    on_end: Callable[[], None] | None,
    *,
    config: ProviderConfig,
    request: ChatRequest,
    started: float,
    deadline: float,
) -> AnsweredStream:
    """Read a stream on this thread, urllib3 undoing its framing; the socket's read timeout
    is the one the request was sent with (at most ``read_s``)."""
    name = config.name
    completion: Completion | None = None
    error: BaseException | None = None
    try:
        while not parser.done:
            if request.stopped():
                raise Cancelled(f"{name}: cancelled mid-stream")
            if time.monotonic() >= deadline:
                raise DeadlineExceeded(
                    f"{name}: no complete answer within {time.monotonic() - started:.1f} s "
                    "(deadline passed)"
                )
            try:
                data = response.raw.read1(READ_SIZE, decode_content=True)
            except (urllib3.exceptions.ReadTimeoutError, TimeoutError):
                raise Retryable(
                    f"{name}: the stream stalled for {config.read_s:g} s (read timeout)"
                ) from None
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                raise Retryable(f"{name}: the connection broke mid-stream: {exc}") from None
            if not data:
                break
            parser.feed(data, on_delta)
        chunked, length = http_internals.framing_of(response)
        parser.body_complete = chunked or length is not None  # urllib3 raises on a short one
        completion = parser.finish(on_delta)
    except (Retryable, Permanent) as exc:
        error = exc
    finally:
        response.close()
    if on_end is not None:
        on_end()
    return AnsweredStream(completion, error)


_reader: StreamReader | None = None
_reader_pid = 0
_reader_lock = threading.Lock()


def stream_reader() -> StreamReader:
    """This process's reader (a forked child starts one of its own)."""
    global _reader, _reader_pid
    with _reader_lock:
        if _reader is None or _reader_pid != os.getpid():
            _reader, _reader_pid = StreamReader(), os.getpid()
        return _reader
