"""The private behaviour of urllib3 and http.client the stream reader relies on is still
there, on real responses of each framing; when an upgrade moves it, this fails naming what
moved (workers/ai/providers/http_internals.py)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from workers.ai.providers import http_internals
from workers.ai.providers.http_internals import FenceBroken


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = b"data: hello\n\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        if self.path == "/chunked":
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
            return
        if self.path == "/close":
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True
            return
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.mark.parametrize(
    ("path", "chunked", "length", "closes"),
    [("/chunked", True, None, False), ("/length", False, 13, False), ("/close", False, None, True)],
)
def test_urllib3_and_http_client_still_behave_as_the_reader_relies_on(
    server, path, chunked, length, closes
):
    with requests.Session() as session:
        response = session.get(server + path, stream=True, timeout=5)
        http_internals.check(response)
        assert http_internals.framing_of(response) == (chunked, length)
        assert http_internals.server_closes(response) is closes
        assert http_internals.buffered_reader(response) is not None
        response.close()


def test_a_moved_private_name_fails_loudly_naming_it(server, monkeypatch):
    with requests.Session() as session:
        response = session.get(server + "/length", stream=True, timeout=5)
        monkeypatch.setattr(response.raw._fp, "_close_conn", None)
        with pytest.raises(FenceBroken, match=r"_close_conn"):
            http_internals.check(response)
        monkeypatch.undo()
        response.close()
