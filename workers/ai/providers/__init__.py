"""Clients of LLM providers, as plain Python: a request in, text deltas and a Completion out.

Failures are ``workers.failures.Retryable`` / ``Permanent``; no Celery in here.
"""

from workers.ai.providers.base import (
    Cancelled,
    ChatRequest,
    Completion,
    DeadlineExceeded,
    Delta,
    Provider,
    ProviderConfig,
    collect,
    default_provider_name,
    providers_from_env,
)
from workers.ai.providers.registry import close_providers, get_provider

__all__ = [
    "Cancelled",
    "ChatRequest",
    "Completion",
    "DeadlineExceeded",
    "Delta",
    "Provider",
    "ProviderConfig",
    "close_providers",
    "collect",
    "default_provider_name",
    "get_provider",
    "providers_from_env",
]
