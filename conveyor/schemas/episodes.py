"""Payload of ``episodes.record``: one episodic log, as other services send it."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from pydantic import Field, ValidationInfo, field_validator, model_validator

from conveyor.schemas.common import Identifier, Payload
from conveyor.schemas.storable import CHECKED, INT32_MAX, NUL, json_problems

#: Postgres text cannot hold a NUL character: refused here, with a clear error, rather than
#: failing the database write later.
_NUL = "\x00"


class Tokens(Payload):
    """Token counts: ``episodic_logs`` keeps them in ``INTEGER`` columns (at most 2**31-1)."""

    prompt: int = Field(strict=True, default=0, ge=0, le=INT32_MAX)
    completion: int = Field(strict=True, default=0, ge=0, le=INT32_MAX)
    #: 0: prompt + completion.
    total: int = Field(strict=True, default=0, ge=0, le=INT32_MAX)
    #: True when the counts were estimated (~4 characters a token), not reported by a provider.
    estimated: bool = False

    @model_validator(mode="after")
    def _total_fits(self) -> Tokens:
        if not self.total and self.prompt + self.completion > INT32_MAX:
            raise ValueError(f"prompt + completion is over {INT32_MAX}, the most a total can be")
        return self


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
    latency_ms: float | None = Field(strict=True, default=None, ge=0)
    status: str = Field(default="success", min_length=1, max_length=50)
    job_id: Identifier | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("user_id", "session_id", "model_type", "prompt", "response", "status")
    @classmethod
    def _no_nul_in_text(cls, value: str | None) -> str | None:
        if value is not None and _NUL in value:
            raise ValueError("must not contain NUL (\\x00) characters")
        return value

    @field_validator("metadata")
    @classmethod
    def _no_nul_in_metadata(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if info.context and info.context.get(CHECKED):  # validate_payload looked already
            return value
        # One C-speed dump finds every candidate; the walk tells a NUL from the text "\\u0000".
        try:
            suspect = "\\u0000" in json.dumps(value, default=str)
        except (ValueError, RecursionError):
            suspect = True
        if suspect and any(p.kind == NUL for p in json_problems(value, limit=2**31)):
            raise ValueError("must not contain NUL (\\u0000) characters")
        return value


class EpisodeRetentionPayload(Payload):
    """``maintenance.episode_retention``: beat sends ``{}``; an operator may override the age."""

    #: Delete episodes older than this many days (default: CONVEYOR_EPISODE_RETENTION_DAYS).
    days: int | None = Field(strict=True, default=None, ge=1, le=36_500)
