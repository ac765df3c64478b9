"""Fuzz: models of many files of many sizes fill with at most --open-files partial files open at once.

The shape issue 23 found (a model of 50,000 files opened a partial file per file at
once and ran the agent out of descriptors) as a property over random models: any
number of files, sizes around the piece size, nested directories, any open-files
limit and connection count, and two models filling at once (so the limit must hold
across requests, not only within one). Every example runs the real store, fetcher and
local origin in-process, samples how many partial files are open while they fill, and
checks every blob against the source bytes. Bounded and derandomized.
"""

from __future__ import annotations

import asyncio
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import MIN_PIECE_SIZE
from agent.fetch.fetcher import Fetcher
from agent.metrics import Metrics
from agent.origins import Origins
from agent.service import ModelService
from agent.store.store import Store

SIZES = st.sampled_from([0, 1, 4096, MIN_PIECE_SIZE - 1, MIN_PIECE_SIZE, MIN_PIECE_SIZE + 1])


@pytest.mark.slow
@settings(max_examples=20, deadline=None, derandomize=True, database=None)
@given(
    sizes=st.lists(SIZES, min_size=64, max_size=300),  # more files than two models can hold open
    depth=st.integers(1, 3),
    limit=st.integers(8, 24),
    connections=st.integers(1, 4),
)
def test_fuzz_many_files_fill_within_the_open_files_limit(
    sizes: list[int], depth: int, limit: int, connections: int
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        expected: dict[str, dict[str, str]] = {"m0": {}, "m1": {}}
        for i, size in enumerate(sizes):
            model = f"m{i % 2}"
            rel = "/".join(f"d{(i >> (4 * k)) % 16}" for k in range(depth)) + f"/f{i}.bin"
            data = xxhash.xxh3_128_digest(i.to_bytes(8, "little")) * (size // 16 + 1)
            (root / model / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / model / rel).write_bytes(data[:size])
            expected[model][rel] = xxhash.xxh3_128_hexdigest(data[:size])
        peak = asyncio.run(_prefetch(root, limit, connections, {m: e for m, e in expected.items() if e}))
    assert peak <= limit, f"{peak} partial files open at once, limit {limit}"


async def _prefetch(root: Path, limit: int, connections: int, expected: dict[str, dict[str, str]]) -> int:
    pool = ThreadPoolExecutor(4)
    session = aiohttp.ClientSession()
    try:
        store = Store(str(root / "cache"), 1 << 40, pool)
        await store.open()
        fetcher = Fetcher(store, Metrics(), connections, 3, open_files=limit)
        service = ModelService(store, fetcher, Origins(session, pool, 30.0), MIN_PIECE_SIZE)
        resolved = {m: await service.resolve(str(root / m)) for m in expected}
        peak = 0
        done = asyncio.Event()

        async def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, len(fetcher.fills))
                await asyncio.sleep(0)

        sampler = asyncio.create_task(sample())
        try:
            complete = await asyncio.gather(*(service.ensure(ref, manifest) for ref, manifest in resolved.values()))
        finally:
            done.set()
            await sampler
        for model, manifest in zip(resolved, complete, strict=True):
            assert {f.path: f.digest for f in manifest.files} == expected[model]
        return peak
    finally:
        await session.close()
        pool.shutdown(wait=True)
