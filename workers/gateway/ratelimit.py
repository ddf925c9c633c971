"""A per-key request budget shared by every gateway process, kept in Redis by ``limits``
(a moving window: a burst at a window's edge cannot pass twice the rate)."""

from __future__ import annotations

import time

from limits import RateLimitItem, parse
from limits.storage import RedisStorage
from limits.strategies import MovingWindowRateLimiter

from workers.gateway.responses import ApiError, retry_after_header


class KeyRateLimit:
    def __init__(self, redis_url: str, rate: str):
        self._item: RateLimitItem = parse(rate)
        self._limiter = MovingWindowRateLimiter(
            RedisStorage(redis_url, key_prefix="conveyor:gateway:rate", socket_timeout=5)
        )
        self.rate = rate

    def charge(self, key_id: str, cost: int = 1) -> None:
        """Take ``cost`` requests from the key's budget, or raise 429 with ``Retry-After``
        (nothing is taken then: a refused request costs nothing)."""
        if cost > self._item.amount:
            raise ApiError(
                429,
                f"{cost} jobs in one request is more than this key may send in a window "
                f"({self.rate}); send smaller batches",
                headers=retry_after_header(self._item.get_expiry()),
            )
        if self._limiter.hit(self._item, key_id, cost=cost):
            return
        stats = self._limiter.get_window_stats(self._item, key_id)
        raise ApiError(
            429,
            f"rate limit of {self.rate} for this key reached; retry later",
            headers=retry_after_header(stats.reset_time - time.time()),
        )
