"""``conveyor gateway`` (the HTTP gateway on uvicorn) and ``conveyor gateway-key``."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(commands: Any) -> None:
    gateway = commands.add_parser("gateway", help="serve the HTTP API, its events and /ui")
    gateway.add_argument("--host", help="default: CONVEYOR_GATEWAY_HOST, else 127.0.0.1")
    gateway.add_argument("--port", type=int, help="default: CONVEYOR_GATEWAY_PORT, else 8000")
    gateway.add_argument(
        "--workers", type=int, default=1, help="processes (they share keys' rate limits)"
    )
    gateway.set_defaults(handler=_gateway)

    key = commands.add_parser(
        "gateway-key", help="make an API key for a tenant and print its configuration entry"
    )
    key.add_argument("tenant", help="1-64 letters, digits, '-', '_' or '.'")
    key.set_defaults(handler=_gateway_key)


def _gateway(args: argparse.Namespace, rest: list[str]) -> int:
    import uvicorn

    from workers import settings

    spec = settings.check_gateway()  # ConfigError: one line naming the variable, exit 78
    host = args.host or spec.host
    port = spec.port if args.port is None else args.port
    print(
        f"conveyor gateway: http://{host}:{port}  (live page /ui, API docs /docs)",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(
        "workers.gateway.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=args.workers,
        log_level="info",
        access_log=False,
        # Many idle event streams: do not let uvicorn's default cap refuse them.
        limit_concurrency=None,
        timeout_graceful_shutdown=5,
    )
    return 0


def _gateway_key(args: argparse.Namespace, rest: list[str]) -> int:
    from workers.gateway.auth import hash_key, new_key
    from workers.settings import TENANT_CHARS

    tenant = args.tenant
    if not tenant or len(tenant) > 64 or not set(tenant) <= TENANT_CHARS or not tenant[0].isalnum():
        print(
            "conveyor gateway-key: a tenant is 1-64 letters, digits, '-', '_' or '.'",
            file=sys.stderr,
        )
        return 2
    key = new_key()
    print(f"API key (give it to the tenant; it is shown once): {key}")
    print("Add to CONVEYOR_GATEWAY_KEYS (comma-separated):")
    print(f"{tenant}:{hash_key(key)}")
    return 0
