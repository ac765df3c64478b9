"""Origins by scheme: where a reference's bytes come from when the node misses."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import aiohttp

from agent.origins.base import Origin
from agent.origins.hf import HfOrigin
from agent.origins.http import PlainHttpOrigin
from agent.origins.local import LocalOrigin
from agent.origins.range_http import BUFFERS_PER_CONNECTION, RangeClient
from agent.origins.s3 import S3Origin
from agent.refs import ModelRef

__all__ = ["Origin", "Origins"]

log = logging.getLogger(__name__)


class Origins:
    """One origin of each kind, sharing one HTTP session and one range client; built once per agent."""

    def __init__(
        self, session: aiohttp.ClientSession, pool: ThreadPoolExecutor, read_timeout: float, connections: int = 1
    ) -> None:
        self.ranges = RangeClient(read_timeout)
        self.connections = connections  # the fetcher's concurrent origin requests: how many body buffers to reserve
        http = PlainHttpOrigin(session, self.ranges)
        self._by_scheme: dict[str, Origin] = {
            "s3": S3Origin(session, self.ranges),
            "hf": HfOrigin(session, self.ranges),
            "https": http,
            "http": http,
            "file": LocalOrigin(pool),
        }

    async def warm_up(self) -> None:
        """Build every origin's clients and the range client's body buffers now; a failure here only means the first request builds them."""
        started = time.monotonic()
        origins = set(self._by_scheme.values())
        *results, _ = await asyncio.gather(
            *(o.warm_up() for o in origins),
            asyncio.to_thread(self.ranges.buffers.reserve, self.connections * BUFFERS_PER_CONNECTION),
            return_exceptions=True,
        )  # the buffers' result is dropped: an allocation that failed is retried by the first answer
        for origin, result in zip(origins, results, strict=True):
            if isinstance(result, Exception):
                log.debug("warming up the %s origin failed (retried on first use): %s", origin.scheme, result)
        log.info("origin clients ready (%.2fs)", time.monotonic() - started)

    async def close(self) -> None:
        """Close the range client's kept-alive connections (the session is its owner's to close)."""
        await self.ranges.close()

    def for_ref(self, ref: ModelRef) -> Origin:
        return self._by_scheme[ref.scheme]

    def for_scheme(self, scheme: str) -> Origin:
        return self._by_scheme[scheme]
