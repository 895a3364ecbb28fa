"""Rate limits with the `limits` library: requests per key, per team and per client address, tokens per team.

Counters live in Redis when the broker is Redis (so every API process shares them) and in memory
otherwise. Requests use a moving window, generated tokens a sliding-window counter. If Redis is down,
limits fail open (logged): an outage of the counter store must not take the whole API down with it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable

from limits import RateLimitItem, RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage, RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter, SlidingWindowCounterRateLimiter
from limits.errors import StorageError
from redis.exceptions import RedisError

from api.metrics import count_limited
from core.errors import ApiError
from core.notify import redis_url

log = logging.getLogger("patchbay.ratelimit")
NAMESPACE = "patchbay"


def duration_text(seconds: float) -> str:
    """OpenAI's reset format: `20ms`, `12s`, `1m3s`."""
    if seconds < 1:
        return f"{max(1, round(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    minutes, rest = divmod(whole, 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"


def limit_headers(kind: str, limit: int, remaining: int, reset_in: float) -> dict[str, str]:
    """The `x-ratelimit-*-<kind>` headers OpenAI sends (kind: requests or tokens)."""
    return {f"x-ratelimit-limit-{kind}": str(limit), f"x-ratelimit-remaining-{kind}": str(max(0, remaining)),
            f"x-ratelimit-reset-{kind}": duration_text(reset_in)}


def too_many(what: str, kind: str, limit: int, reset_in: float, headers: dict[str, str] | None = None) -> ApiError:
    """429 with Retry-After and the rate-limit headers, which the openai client's retry understands."""
    wait = max(reset_in, 0.001)
    all_headers = {"Retry-After": str(max(1, math.ceil(wait))), "retry-after-ms": str(math.ceil(wait * 1000)),
                   **limit_headers(kind, limit, 0, wait), **(headers or {})}
    return ApiError(429, f"Rate limit reached for {what}: limit {limit} {kind} per minute. "
                         f"Retry in {duration_text(wait)}.", code="rate_limit_exceeded", headers=all_headers,
                    extra={"limit": limit, "current": limit})


STORE_ERRORS = (StorageError, RedisError, OSError)
LIMIT_NAMES = {"key": "key_requests_per_minute", "team-requests": "requests_per_minute",
               "failed-auth": "failed_auth_per_minute"}
"""The setting each counter scope enforces, as 429s are counted in the metrics."""


class RateLimits:
    """Every rate limit of one API process, over one counter store."""

    def __init__(self) -> None:
        url = redis_url()
        storage = (RedisStorage(f"async+{url}", implementation="redispy", wrap_exceptions=True,
                                key_prefix="patchbay-limits", socket_timeout=1, socket_connect_timeout=1)
                   if url else MemoryStorage())
        self.requests = MovingWindowRateLimiter(storage)
        self.tokens = SlidingWindowCounterRateLimiter(storage)
        self._warned_at = 0.0

    async def _fail_open(self, action: Callable[[], Awaitable[float | None]]) -> float | None:
        """Run a counter operation; when the store is down, log (at most every 30 s) and let the request pass."""
        try:
            return await action()
        except STORE_ERRORS as exc:
            if time.monotonic() - self._warned_at > 30:
                self._warned_at = time.monotonic()
                log.warning("rate-limit counters unavailable, limits are off until they return: %s", exc)
            return None

    async def hit(self, scope: str, identity: str, per_minute: int, what: str, *, team: str = "") -> None:
        """Count one request against `scope`/`identity`; 429 once `per_minute` is spent (0: no limit).
        `team` (its name) labels the 429 in the metrics."""
        reset_in = await self._fail_open(lambda: self._spend(self.requests, per_minute, 1, scope, identity))
        if reset_in is not None:
            count_limited(team, LIMIT_NAMES.get(scope, scope))
            raise too_many(what, "requests", per_minute, reset_in)

    async def exhausted(self, scope: str, identity: str, per_minute: int) -> float | None:
        """Seconds until `scope`/`identity` may go on when its requests are spent, else None (nothing counted)."""
        return await self._fail_open(lambda: self._spent(self.requests, per_minute, scope, identity))

    async def count_only(self, scope: str, identity: str, per_minute: int) -> None:
        """Count an event without refusing anything (failed authentications)."""
        await self._fail_open(lambda: self._spend(self.requests, per_minute, 1, scope, identity))

    async def check_tokens(self, team_id: str, per_minute: int, what: str, *, team: str = "") -> None:
        """429 when the team's generated tokens of the last minute already reach `per_minute` (0: no limit);
        `team` (its name) labels the 429 in the metrics."""
        reset_in = await self._fail_open(lambda: self._spent(self.tokens, per_minute, "tokens", team_id))
        if reset_in is not None:
            count_limited(team, "tokens_per_minute")
            raise too_many(what, "tokens", per_minute, reset_in)

    async def add_tokens(self, team_id: str, per_minute: int, tokens: int) -> None:
        """Count tokens a team's request generated, up to what the window has left (the next request waits)."""

        async def spend_what_is_left() -> None:
            item = RateLimitItemPerMinute(per_minute)
            left = (await self.tokens.get_window_stats(item, NAMESPACE, "tokens", team_id)).remaining
            if min(tokens, left) > 0:
                await self.tokens.hit(item, NAMESPACE, "tokens", team_id, cost=min(tokens, left))

        if per_minute > 0 and tokens > 0:
            await self._fail_open(spend_what_is_left)

    @staticmethod
    async def _spend(limiter, per_minute: int, cost: int, *identifiers: str) -> float | None:
        """Take `cost` from the window; seconds until it has room again when it had none, else None."""
        if per_minute <= 0:
            return None
        item = RateLimitItemPerMinute(per_minute)
        if await limiter.hit(item, NAMESPACE, *identifiers, cost=cost):
            return None
        return await RateLimits._reset_in(limiter, item, *identifiers)

    @staticmethod
    async def _spent(limiter, per_minute: int, *identifiers: str) -> float | None:
        """Seconds until the window has room again when it has none now, else None (nothing is taken)."""
        if per_minute <= 0:
            return None
        item = RateLimitItemPerMinute(per_minute)
        if await limiter.test(item, NAMESPACE, *identifiers):
            return None
        return await RateLimits._reset_in(limiter, item, *identifiers)

    @staticmethod
    async def _reset_in(limiter, item: RateLimitItem, *identifiers: str) -> float:
        stats = await limiter.get_window_stats(item, NAMESPACE, *identifiers)
        return max(stats.reset_time - time.time(), 0.001)
