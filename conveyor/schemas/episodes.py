"""Payload of ``episodes.record``: one episodic log, as other services send it."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import Field

from conveyor.schemas.common import Identifier, Payload


class Tokens(Payload):
    prompt: int = Field(default=0, ge=0)
    completion: int = Field(default=0, ge=0)
    total: int = Field(default=0, ge=0)
    #: True when the counts were estimated (~4 characters a token), not reported by a provider.
    estimated: bool = False


class EpisodePayload(Payload):
    #: Client-given id; a second record with the same id is a no-op.
    episode_id: Identifier | None = None
    timestamp: datetime | None = None
    user_id: Identifier
    session_id: Identifier | None = None
    model_type: str = Field(min_length=1, max_length=200)
    prompt: str = ""
    response: str = ""
    tokens: Tokens = Field(default_factory=Tokens)
    latency_ms: float | None = Field(default=None, ge=0)
    status: str = Field(default="success", min_length=1, max_length=50)
    job_id: Identifier | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
