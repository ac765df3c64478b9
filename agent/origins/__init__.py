"""Origins by scheme: where a reference's bytes come from when the node misses."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import aiohttp

from agent.origins.azure import AzureOrigin
from agent.origins.base import Origin
from agent.origins.gcs import GcsOrigin
from agent.origins.hf import HfOrigin
from agent.origins.http import PlainHttpOrigin
from agent.origins.local import LocalOrigin
from agent.origins.policy import AddressPolicy, AddressRefusedError
from agent.origins.range_http import BUFFERS_PER_CONNECTION, RangeClient
from agent.origins.s3 import S3Origin
from agent.refs import ModelRef
from client.errors import BadReferenceError

__all__ = ["AddressPolicy", "AddressRefusedError", "Origin", "Origins"]

log = logging.getLogger(__name__)


class Origins:
    """One origin of each kind, sharing one HTTP session and one range client; built once per agent.

    ``policy`` says where redirects and peer-named references may go
    (agent/origins/policy.py); the default refuses every non-public address.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        pool: ThreadPoolExecutor,
        read_timeout: float,
        connections: int = 1,
        *,
        policy: AddressPolicy | None = None,
    ) -> None:
        self.policy = policy if policy is not None else AddressPolicy()
        self.ranges = RangeClient(read_timeout, policy=self.policy)
        self.connections = connections  # the fetcher's concurrent origin requests: how many body buffers to reserve
        http = PlainHttpOrigin(session, self.ranges, self.policy)
        self._by_scheme: dict[str, Origin] = {
            "s3": S3Origin(session, self.ranges),
            "gs": GcsOrigin(session, self.ranges),
            "az": AzureOrigin(session, self.ranges),
            "hf": HfOrigin(session, self.ranges),
            "https": http,
            "http": http,
            "file": LocalOrigin(pool),
        }

    async def warm_up(self) -> None:
        """Build every origin's clients and the range client's body buffers now.

        A failure here only means the first request builds them.
        """
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
        """Close the range client's kept-alive connections and the origins' open streams (the session is
        its owner's to close)."""
        for origin in set(self._by_scheme.values()):
            await origin.close()
        await self.ranges.close()

    async def check_peer_ref(self, ref: ModelRef) -> None:
        """Refuse (AddressRefusedError) a reference a peer named whose host is not a public address.

        A peer is trusted less than the local socket: its ``https://`` URL is
        judged like a redirect. s3, gs, az and hf references go to the operator's own
        endpoints and are not judged.
        """
        if ref.scheme not in ("https", "http") or self.policy.allow_private:
            return
        parts = urlsplit(f"{ref.scheme}://{ref.location}")
        try:
            port = parts.port or (443 if ref.scheme == "https" else 80)
        except ValueError:
            raise BadReferenceError(f"{ref.base!r} has a malformed port") from None
        await self.policy.addresses(parts.hostname or "", port, f"a reference from a peer ({ref.scheme}://{parts.hostname}/…)")

    def for_ref(self, ref: ModelRef) -> Origin:
        return self._by_scheme[ref.scheme]
