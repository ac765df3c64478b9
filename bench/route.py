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
import asyncio, os, sys, tempfile, collections
from concurrent.futures import ThreadPoolExecutor
import aiohttp

import importlib.util
new = importlib.util.find_spec("agent.fetch") is not None
from agent.origins import Origins
if new:
    from agent.store.store import Store
    from agent.fetch.fetcher import Fetcher
    from agent.service import ModelService
    from agent.metrics import Metrics
else:
    from agent.store import Store
    from agent.fetcher import Fetcher
    from agent.models import ModelService

async def main() -> None:
    tmp = tempfile.mkdtemp()
    model = os.path.join(tmp, "m"); os.makedirs(model)
    for name, size in (("config.json", 1000), ("w.bin", 3 * 1024 * 1024 + 5)):
        with open(os.path.join(model, name), "wb") as f:
            f.write(os.urandom(size))
    pool = ThreadPoolExecutor(4)
    session = aiohttp.ClientSession()
    store = Store(os.path.join(tmp, "cache"), 1 << 34, pool)
    await store.open()
    origins = Origins(session, pool, 30.0)
    fetcher = Fetcher(store, Metrics(), 4, 3) if new else Fetcher(store, 4, 3)
    service = ModelService(store, fetcher, origins, 1024 * 1024)
    ref, manifest = await service.resolve(model)
    counts = collections.Counter()
    transitions = collections.Counter()
    def prof(frame, event, arg):
        if event != "call":
            return
        mod = frame.f_globals.get("__name__", "")
        caller = frame.f_back.f_globals.get("__name__", "") if frame.f_back else ""
        if mod.startswith("agent") and mod != caller:
            counts[mod] += 1
            transitions[(caller if caller.startswith("agent") else "-", mod)] += 1
    sys.setprofile(prof); import threading; threading.setprofile(prof)
    await service.ensure(ref, manifest)
    sys.setprofile(None); threading.setprofile(None)
    for mod, n in counts.most_common():
        print(f"{n:5d}  {mod}")
    print("modules entered in all:", sum(counts.values()))
    back = [(a, b, n) for (a, b), n in transitions.items() if a != "-" and (b, a) in transitions]
    print("pairs of modules calling each other both ways:", sorted({tuple(sorted((a, b))) for a, b, _ in back}))
    part = lambda m: ".".join(m.split(".")[:2]) if m.count(".") >= 2 else m
    value = ("agent.manifest", "agent.refs", "agent.units", "agent.singleflight", "agent.metrics", "agent.config")
    crossings = collections.Counter()
    for (a, b), n in transitions.items():
        if a == "-" or b in value or part(a) == part(b):
            continue
        crossings[(part(a), part(b))] += n
    print("calls between parts (value types and metrics left out):", sum(crossings.values()))
    for (a, b), n in sorted(crossings.items(), key=lambda x: -x[1]):
        print(f"   {n:4d}  {a} -> {b}")
    await session.close(); pool.shutdown()

asyncio.run(main())
