"""What one gateway process holds: its clients, its keys, its event hub; made at start-up
(``Gateway.open``) and closed at shutdown."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis
from sqlalchemy import Engine, create_engine

from conveyor import keys
from conveyor.config import ClientConfig
from conveyor.submitter import Submitter
from workers import settings
from workers.gateway.auth import KeyRing, Tokens
from workers.gateway.ratelimit import KeyRateLimit
from workers.gateway.streams import EventHub
from workers.store.db import sqlalchemy_url


@dataclass
class Gateway:
    submitter: Submitter
    redis: redis.Redis
    aredis: aioredis.Redis
    hub: EventHub
    keys: KeyRing
    tokens: Tokens
    limit: KeyRateLimit
    spec: settings.GatewaySettings
    core: settings.CoreSettings

    @classmethod
    def open(cls) -> Gateway:
        core = settings.core()
        spec = settings.check_gateway()
        client = ClientConfig.from_env()
        # Blocking: a burst of new streams waits for a connection (each read is short)
        # instead of failing with "too many connections".
        aredis = aioredis.Redis(
            connection_pool=aioredis.BlockingConnectionPool.from_url(
                core.redis_url,
                max_connections=256,
                timeout=20,
                socket_timeout=30,
                socket_connect_timeout=5,
            )
        )

        async def job_tenant(job_id: str) -> str | None:
            value: Any = await aredis.get(keys.job(job_id))
            if value is None:
                return None
            tenant = json.loads(value).get("tenant")
            return None if tenant is None else str(tenant)

        return cls(
            submitter=Submitter(client),
            redis=redis.Redis.from_url(core.redis_url, socket_timeout=15, socket_connect_timeout=5),
            aredis=aredis,
            hub=EventHub(aredis, job_tenant, redis_url=core.redis_url),
            keys=KeyRing(dict(spec.key_tenants), dev=core.env == "dev"),
            tokens=Tokens(spec.token_secret, spec.token_ttl_s),
            limit=KeyRateLimit(core.redis_url, spec.rate_limit),
            spec=spec,
            core=core,
        )

    @functools.cached_property
    def engine(self) -> Engine:
        return create_engine(
            sqlalchemy_url(self.core.database_url),
            pool_pre_ping=True,
            pool_size=self.core.db_pool_size,
            max_overflow=self.core.db_max_overflow,
            pool_timeout=10,
            connect_args={"connect_timeout": 5, "application_name": "conveyor-gateway"},
        )

    async def close(self) -> None:
        await self.hub.stop()
        await self.aredis.aclose()
        self.redis.close()
        self.submitter.close()
        if "engine" in self.__dict__:
            self.engine.dispose()
