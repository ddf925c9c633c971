"""A small server-sent-events client over httpx: the messages of one stream, parsed as the
EventSource spec reads them (id, event, data; comments skipped)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import httpx


@dataclass
class Message:
    id: str | None
    event: str
    data: dict

    @property
    def seq(self) -> int | None:
        return self.data.get("seq")


def messages(response: httpx.Response) -> Iterator[Message]:
    """The messages of an open streaming response, until the server closes it."""
    event_id: str | None = None
    event = "message"
    data: list[str] = []
    for line in response.iter_lines():
        if line == "":
            if data:
                yield Message(event_id, event, json.loads("\n".join(data)))
            event_id, event, data = None, "message", []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "id":
            event_id = value
        elif field == "event":
            event = value
        elif field == "data":
            data.append(value)


def read_all(url: str, *, headers: dict | None = None, timeout: float = 30) -> list[Message]:
    with httpx.stream("GET", url, headers=headers or {}, timeout=timeout) as response:
        response.raise_for_status()
        return list(messages(response))
