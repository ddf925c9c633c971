"""One client per configured provider, shared by every thread of a worker process.

A client holds a ``requests.Session`` (its pooled keep-alive connections), so building one per
job would open a new connection per job. Clients are built on first use and rebuilt only when
their provider's configuration changes.
"""

from __future__ import annotations

import threading

from workers.ai.providers.base import Provider, ProviderConfig
from workers.ai.providers.local import LocalProvider
from workers.ai.providers.ollama import OllamaProvider
from workers.ai.providers.openai_compat import OpenAICompatProvider

_lock = threading.Lock()
_clients: dict[str, Provider] = {}


def build_provider(config: ProviderConfig) -> Provider:
    """A new client for ``config``, with sessions of its own."""
    if config.kind == "openai":
        return OpenAICompatProvider(config)
    if config.kind == "ollama":
        return OllamaProvider(config)
    if config.kind == "local":
        return LocalProvider(config)
    raise ValueError(f"provider {config.name!r} has an unknown kind {config.kind!r}")


def get_provider(config: ProviderConfig) -> Provider:
    """The shared client of ``config``'s provider."""
    with _lock:
        client = _clients.get(config.name)
        if client is None or client.config != config:
            if client is not None:
                client.close()
            client = _clients[config.name] = build_provider(config)
        return client


def close_providers() -> None:
    """Closes every client's connections (worker shutdown, tests)."""
    with _lock:
        for client in _clients.values():
            client.close()
        _clients.clear()
