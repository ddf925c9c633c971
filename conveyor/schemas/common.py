"""Pieces shared by every payload schema."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

#: Identifiers of people and sessions as other services send them; bounded, never empty.
Identifier = Annotated[str, Field(min_length=1, max_length=200)]

#: A provider, model or workflow *name*: looked up in configuration, never a URL.
Name = Annotated[
    str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@/+-]*$")
]


class Payload(BaseModel):
    """Base of every payload: unknown fields are errors, not silently dropped."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False, frozen=True)


class Attribution(Payload):
    """Who a job is for; carried into the episode it records."""

    user_id: Identifier | None = None
    session_id: Identifier | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
