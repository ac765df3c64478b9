"""The route of one cold prefetch through the agent's parts: which modules it enters, how often, and which call back.

A refactor that only moves methods into files makes this route longer, not
shorter; measure it before and after (docs/ARCHITECTURE.md). One cold
``ModelService.ensure`` of a local model of two files (1 MiB pieces) runs under
a profiler that counts every call whose callee's module differs from the
caller's, and prints: entries per module, pairs of modules that call each other
both ways, and the calls between parts (folders; value types and metrics left
out). It also runs against an older checkout of the flat layout::

    PYTHONPATH=. python bench/route.py
    PYTHONPATH=/path/to/old/checkout python bench/route.py
"""

from __future__ import annotations

import asyncio
import collections
import importlib
import importlib.util
import os
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from types import FrameType
from typing import Any

import aiohttp

VALUE_TYPES = ("agent.manifest", "agent.refs", "agent.units", "agent.singleflight", "agent.metrics", "agent.config")


def _parts() -> tuple[Any, Any, Any, Any]:
    """Store, Fetcher factory, ModelService and Origins of whichever layout is on the path."""
    origins = importlib.import_module("agent.origins").Origins
    if importlib.util.find_spec("agent.fetch") is not None:
        store = importlib.import_module("agent.store.store").Store
        fetcher_cls = importlib.import_module("agent.fetch.fetcher").Fetcher
        metrics = importlib.import_module("agent.metrics").Metrics
        service = importlib.import_module("agent.service").ModelService
        return store, lambda s: fetcher_cls(s, metrics(), 4, 3), service, origins
    store = importlib.import_module("agent.store").Store
    fetcher_cls = importlib.import_module("agent.fetcher").Fetcher
    service = importlib.import_module("agent.models").ModelService
    return store, lambda s: fetcher_cls(s, 4, 3), service, origins


def _write_model(root: str) -> str:
    model = os.path.join(root, "m")
    os.makedirs(model)
    for name, size in (("config.json", 1000), ("w.bin", 3 * 1024 * 1024 + 5)):
        with open(os.path.join(model, name), "wb") as f:
            f.write(os.urandom(size))
    return model


def _part(module: str) -> str:
    return ".".join(module.split(".")[:2]) if module.count(".") >= 2 else module


async def main() -> None:
    store_cls, make_fetcher, service_cls, origins_cls = _parts()
    tmp = tempfile.mkdtemp()
    model = _write_model(tmp)
    counts: collections.Counter[str] = collections.Counter()
    transitions: collections.Counter[tuple[str, str]] = collections.Counter()
    active = threading.Event()  # count only while the prefetch runs

    def profile(frame: FrameType, event: str, arg: object) -> None:
        if event != "call" or not active.is_set():
            return
        module = frame.f_globals.get("__name__", "")
        caller = frame.f_back.f_globals.get("__name__", "") if frame.f_back else ""
        if module.startswith("agent") and module != caller:
            counts[module] += 1
            transitions[(caller if caller.startswith("agent") else "-", module)] += 1

    threading.setprofile(profile)  # before the pool's threads exist: the file work in them is counted too
    pool = ThreadPoolExecutor(4)
    session = aiohttp.ClientSession()
    store = store_cls(os.path.join(tmp, "cache"), 1 << 34, pool)
    await store.open()
    service = service_cls(store, make_fetcher(store), origins_cls(session, pool, 30.0), 1024 * 1024)
    ref, manifest = await service.resolve(model)
    sys.setprofile(profile)
    active.set()
    await service.ensure(ref, manifest)
    active.clear()
    sys.setprofile(None)
    for module, n in counts.most_common():
        print(f"{n:5d}  {module}")
    print("modules entered in all:", sum(counts.values()))
    both = sorted({tuple(sorted((a, b))) for (a, b) in transitions if a != "-" and (b, a) in transitions})
    print("pairs of modules calling each other both ways:", both)
    crossings: collections.Counter[tuple[str, str]] = collections.Counter()
    for (a, b), n in transitions.items():
        if a != "-" and b not in VALUE_TYPES and _part(a) != _part(b):
            crossings[(_part(a), _part(b))] += n
    print("calls between parts (value types and metrics left out):", sum(crossings.values()))
    for (a, b), n in crossings.most_common():
        print(f"   {n:4d}  {a} -> {b}")
    await session.close()
    pool.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
