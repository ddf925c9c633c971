"""Payloads of the ``maintenance.*`` jobs."""

from __future__ import annotations

from pydantic import Field

from conveyor.schemas.common import Payload


class PingPayload(Payload):
    """A job that proves the path submit -> queue -> worker -> result -> events."""

    message: str = Field(default="ping", max_length=1000)
    #: Seconds the job holds its worker (0-60): lets an operator see a job in flight.
    hold_s: float = Field(strict=True, default=0.0, ge=0.0, le=60.0)


class NoPayload(Payload):
    """Beat jobs that take no input."""
