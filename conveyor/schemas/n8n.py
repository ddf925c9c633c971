"""Payload of ``n8n.execute``. The base URL and API key come from configuration, never here."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from conveyor.schemas.common import Attribution


class N8nExecutePayload(Attribution):
    workflow: str = Field(
        min_length=1, max_length=300, pattern=r"^[A-Za-z0-9][A-Za-z0-9._~-]*(/[A-Za-z0-9._~:-]+)*$"
    )
    data: dict[str, Any] = Field(default_factory=dict)
    mode: Literal["sync", "async"] = "sync"
    timeout_s: float = Field(strict=True, default=300.0, gt=0, le=86_400)
