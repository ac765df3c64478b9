"""Origins by scheme: where a reference's bytes come from when the node misses."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import aiohttp

from agent.origins.base import Origin, TransientOriginError
from agent.origins.hf import HfOrigin
from agent.origins.http import PlainHttpOrigin
from agent.origins.local import LocalOrigin
from agent.origins.s3 import S3Origin
from agent.refs import ModelRef

__all__ = ["Origin", "Origins", "TransientOriginError"]


class Origins:
    """One origin of each kind, sharing one HTTP session; built once per agent."""

    def __init__(self, session: aiohttp.ClientSession, pool: ThreadPoolExecutor) -> None:
        http = PlainHttpOrigin(session)
        self._by_scheme: dict[str, Origin] = {
            "s3": S3Origin(session),
            "hf": HfOrigin(session),
            "https": http,
            "http": http,
            "file": LocalOrigin(pool),
        }

    def for_ref(self, ref: ModelRef) -> Origin:
        return self._by_scheme[ref.scheme]

    def for_scheme(self, scheme: str) -> Origin:
        return self._by_scheme[scheme]
