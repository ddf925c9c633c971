"""Pieces shared by every payload schema."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

#: Identifiers of people and sessions as other services send them; bounded, never empty.
Identifier = Annotated[str, Field(min_length=1, max_length=200)]


def _not_a_url(value: str) -> str:
    if "://" in value:
        raise ValueError("must be a name from configuration, not a URL")
    return value


#: A model or language name (``llama3:8b``, ``meta-llama/Llama-3``), never a URL.
Name = Annotated[
    str,
    Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@/+-]*$"),
    AfterValidator(_not_a_url),
]

#: A provider configured by name (``default``, ``local``, ``openai``): no URL can hide in it.
ProviderName = Annotated[
    str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
]


class Payload(BaseModel):
    """Base of every payload: unknown fields are errors, not silently dropped; a float field
    refuses NaN and Infinity (``"NaN"`` and ``"inf"`` as strings too), which Postgres and JSON
    cannot hold."""

    model_config = ConfigDict(
        extra="forbid", str_strip_whitespace=False, frozen=True, allow_inf_nan=False
    )


class Attribution(Payload):
    """Who a job is for; carried into the episode it records."""

    user_id: Identifier | None = None
    session_id: Identifier | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
