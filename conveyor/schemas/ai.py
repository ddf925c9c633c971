"""Payloads of the ``ai.*`` jobs. A job names a provider and model; it never carries a URL."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from conveyor.schemas.common import Attribution, Name, Payload, ProviderName


class GenerationOptions(Attribution):
    provider: ProviderName | None = None
    model: Name | None = None
    temperature: float | None = Field(strict=True, default=None, ge=0.0, le=2.0)
    max_tokens: int | None = Field(strict=True, default=None, ge=1, le=1_000_000)
    stop: list[str] = Field(default_factory=list, max_length=4)
    system: str | None = Field(default=None, max_length=100_000)
    #: Prepend this many of the session's last episodes as context (needs session_id).
    history: int = Field(strict=True, default=0, ge=0, le=100)

    @model_validator(mode="after")
    def _history_needs_session(self) -> GenerationOptions:
        if self.history and not self.session_id:
            raise ValueError("history needs a session_id to recall episodes from")
        return self


class GeneratePayload(GenerationOptions):
    prompt: str = Field(min_length=1)


class ChatMessage(Payload):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatPayload(GenerationOptions):
    messages: list[ChatMessage] = Field(min_length=1)


class CodePayload(GenerationOptions):
    instruction: str = Field(min_length=1)
    language: Name | None = None
    #: Existing code the instruction refers to.
    code: str | None = None


class AnalyzePayload(GenerationOptions):
    text: str = Field(min_length=1)
    kind: Literal["summarize", "classify", "sentiment", "extract"]
    labels: list[str] = Field(default_factory=list, max_length=100)
    fields: list[str] = Field(default_factory=list, max_length=100)

    @model_validator(mode="after")
    def _kind_arguments(self) -> AnalyzePayload:
        if self.kind == "classify" and len(self.labels) < 2:
            raise ValueError("classify needs at least two labels")
        if self.kind == "extract" and not self.fields:
            raise ValueError("extract needs at least one field name")
        return self
