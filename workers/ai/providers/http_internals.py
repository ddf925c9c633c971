"""FENCE: the private behaviour of urllib3 and ``http.client`` the stream reader
(``reader.py``) relies on, and nothing else. Checked by ``check(response)``, which
``tests/ai/test_fences.py`` runs against a real response: an upgrade that moves any of it fails
there, naming what moved, instead of silently leaking or corrupting connections.

The reader takes over a response's socket after ``requests`` read its status and headers:

- ``urllib3.HTTPResponse._fp`` is the ``http.client.HTTPResponse`` under it; its ``chunked``,
  ``length`` and ``will_close`` say how the body is framed and whether the server closes after
  it; its ``fp`` (a buffered reader) may already hold body bytes read with the headers;
- ``http.client.HTTPResponse._close_conn()`` tells it the body ended (it never read it), so
  urllib3 gives the connection back to its pool for the next request;
- when the server closes after the answer, ``http.client`` lets go of the connection and only
  the buffered reader's raw ``SocketIO._sock`` still holds the socket.
"""

from __future__ import annotations

import socket
from typing import Any

import requests

__all__ = [
    "FenceBroken",
    "buffered_reader",
    "check",
    "framing_of",
    "mark_body_read",
    "server_closes",
    "socket_of",
]


class FenceBroken(RuntimeError):
    """urllib3 or http.client no longer behaves as this module relies on."""


def _client_response(response: requests.Response) -> Any:
    """The ``http.client.HTTPResponse`` under a streamed ``requests`` response."""
    return response.raw._fp


def framing_of(response: requests.Response) -> tuple[bool, int | None]:
    """(chunked, content length or None) of the body ``http.client`` was about to read."""
    raw = _client_response(response)
    length = getattr(raw, "length", None)
    return bool(getattr(raw, "chunked", False)), length if isinstance(length, int) else None


def buffered_reader(response: requests.Response) -> Any | None:
    """The buffered reader over the socket (it may hold body bytes read with the headers)."""
    return getattr(_client_response(response), "fp", None)


def server_closes(response: requests.Response) -> bool:
    """The server said it closes the connection after this answer (``Connection: close``,
    HTTP/1.0): it cannot serve another request."""
    return bool(getattr(_client_response(response), "will_close", True))


def mark_body_read(response: requests.Response) -> None:
    """Tell ``http.client`` its body ended (we read it ourselves, to its exact end): closes the
    file over the socket, not the socket, so urllib3 may pool the connection."""
    _client_response(response)._close_conn()


def socket_of(response: requests.Response) -> socket.socket | None:
    """The socket under a streamed response, or None when it is not one we can poll."""
    sock = getattr(getattr(response.raw, "connection", None), "sock", None)
    if sock is None:
        # The server said it closes after this answer: http.client let go of the connection,
        # and only the response's file still holds the socket.
        fileobj = getattr(getattr(response.raw, "_fp", None), "fp", None)
        sock = getattr(getattr(fileobj, "raw", None), "_sock", None)
    return sock if isinstance(sock, socket.socket) else None  # ssl.SSLSocket is one too


def check(response: requests.Response) -> None:
    """Raise ``FenceBroken`` naming what is gone, on a real streamed response (not yet read)."""
    problems: list[str] = []
    raw = getattr(response.raw, "_fp", None)
    if raw is None:
        problems.append("urllib3 HTTPResponse._fp (the http.client response)")
    else:
        for attribute in ("chunked", "length", "will_close", "fp"):
            if not hasattr(raw, attribute):
                problems.append(f"http.client HTTPResponse.{attribute}")
        if not callable(getattr(raw, "_close_conn", None)):
            problems.append("http.client HTTPResponse._close_conn()")
        if not hasattr(getattr(getattr(raw, "fp", None), "raw", None), "_sock"):
            problems.append("socket.SocketIO._sock under the response's buffered reader")
    if not callable(getattr(response.raw, "release_conn", None)):
        problems.append("urllib3 HTTPResponse.release_conn()")
    if socket_of(response) is None:
        problems.append("the socket under a streamed response (urllib3 connection.sock)")
    if problems:
        raise FenceBroken(
            "urllib3/http.client changed what the stream reader relies on (see "
            "workers/ai/providers/http_internals.py): " + "; ".join(problems)
        )
