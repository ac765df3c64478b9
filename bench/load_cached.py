"""Load benchmark (issue 3): get every tensor of a model already in the node cache into one buffer.

A multi-shard safetensors model of transformer-like tensors (bf16 projections,
fp32 norms, fp16 embeddings; random bytes) is generated, put into a real agent's
cache (``agent prefetch`` of the local directory, tests.servers.agent_proc), and
then, round by round (contender order reversed every other round), each
contender copies every tensor exactly once into ONE preallocated destination
buffer (``torch.empty(total, dtype=uint8)``, allocated and touched before the
clock; it stands in for device memory), twice:

- ``cold``: page cache dropped (``echo 3 > /proc/sys/vm/drop_caches``) just before the clock;
- ``warm``: every blob file read once just before the clock, so it is all in the page cache.

Contenders (all on the same blob files of the agent's cache; imports and the
destination are outside the clock, opening the files and the agent round trip inside):

- ``ws-open``: ``client.open_tensors(ref)`` (zero-copy mmap views), then each tensor copied;
- ``ws-iter``: ``client.iter_tensors(ref)``, each tensor copied as it is yielded;
- ``ws-copy``: ``client.open_tensors(ref, copy=True)`` (client/copy_read.py: each file read
  once into one buffer of its own, O_DIRECT where not cached), then each tensor copied;
- ``ws-copy-4k``: ``ws-copy`` without its huge-page advice (``client.copy_read.HUGE_PAGES`` off);
- ``ws-copy-nopf``: ``ws-copy`` without its prefaulting thread (``client.copy_read.PREFAULT`` off);
- ``ws-copy-noahead``: ``ws-copy`` reading each file only in its turn (``client.loader.READ_AHEAD`` off:
  the next file's reads do not start while the current one's last reads finish);
- ``ws-copy-prev``: ``ws-copy`` through the previous copy path (bench/copy_prev.py: per tensor,
  the checker's read into the page cache, then a read into fresh memory): old against new;
- ``ws-open-nocheck``, ``ws-iter-nocheck``: ``ws-open`` and ``ws-iter`` with the client's
  check of cached blobs against their piece hashes (client/verify.py) switched off by the
  bench: the A/B of what that check costs, in the same run;
- ``ws-open-prev``, ``ws-iter-prev``: ``ws-open`` and ``ws-iter`` with the previous checker
  (bench/blobcheck_prev.py: one thread faulting through a mapping of the blob) in place of
  the current one: old against new check, in the same run;
- ``ws-open-willneed``, ``ws-iter-willneed``: the current checker with ``client.verify.WILLNEED``
  switched on (it hands its read-ahead window to the kernel with ``posix_fadvise``);
- ``safetensors``: ``safetensors.torch.load_file(blob)`` per shard, then each tensor copied;
- ``runai``: Run:ai Model Streamer, ``SafetensorsStreamer().stream_files(blobs)`` and
  ``get_tensors()`` (default settings), each tensor copied as it is yielded;
- ``pread-buf``: the machine's limit as the issue defines it: sequential ``os.preadv`` of
  each whole file, ``--chunk`` bytes at a time, into one reused buffer (nothing lands in the
  destination); ``pread-buf-t4``: the same from ``--threads`` threads (one buffer each)
  pulling chunks in file order;
- ``pread-dest``: the ideal loader: ``os.preadv`` of each file's data section straight into
  its place in the destination (one copy, no intermediate buffer); ``pread-dest-t4``: threaded.

To a GPU (``--device cuda``): the destination and the reference live in device memory, so
every contender above that fills it ends with a host-to-device copy of each tensor (what a
loader that reads to CPU and then calls ``.to("cuda")`` pays), and these ``-dev`` contenders
load to the device themselves (``--device cpu``, the default, runs them on CPU as plumbing):

- ``ws-iter-dev``, ``ws-open-dev``: ``client.iter_tensors`` / ``open_tensors(ref, device=D)``,
  through the client's ring of pinned buffers and its copy stream (client/device_ring.py);
- ``safetensors-dev``: ``safetensors.torch.load_file(blob, device=D)``;
- ``runai-dev``: Run:ai's ``stream_files(blobs, device=D)``;
- ``pread-dev``: the limit for page cache -> GPU: ``os.preadv`` of each file's data section,
  ``--chunk`` at a time, into two alternating pinned buffers, each copied asynchronously to its
  place on the device while the other is read; ``pread-dev-t4``: ``--threads`` threads, two
  buffers and a stream each.

The clock of a ``-dev`` contender stops after ``torch.cuda.synchronize()``. ``pread-dest*``
need a CPU destination and are refused with ``--device cuda``.

Every run that fills the destination is checked byte for byte against a reference
(outside the clock; the destination is zeroed before each run).

Usage::

    python bench/load_cached.py --size 1GiB --shards 4 --rounds 5
    python bench/load_cached.py --device cuda --size 4GiB --rounds 3 \
        --only ws-iter-dev,ws-open-dev,safetensors-dev,safetensors,runai,pread-dev,pread-dev-t4

Writes bench/out/load_cached-<time>.json (raw per-run numbers, with page faults,
blocks read and CPU time of each run) and prints markdown tables of medians and ratios.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import itertools
import json
import os
import resource
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from cold_miss import drop_caches  # noqa: E402

from agent.units import parse_size  # noqa: E402
from tests.servers.agent_proc import AgentProcess  # noqa: E402

INDEX = "model.safetensors.index.json"
HIDDEN, INTER, KV, VOCAB = 2048, 5632, 256, 32000

# ---------------------------------------------------------------------- the model


def layer_tensors(i: int) -> list[tuple[str, list[int], torch.dtype]]:
    """One decoder layer, Llama/Qwen-like shapes (GQA with 8x fewer KV heads, q/k/v biases)."""
    p = f"model.layers.{i}."
    return [
        (p + "input_layernorm.weight", [HIDDEN], torch.float32),
        (p + "self_attn.q_proj.weight", [HIDDEN, HIDDEN], torch.bfloat16),
        (p + "self_attn.q_proj.bias", [HIDDEN], torch.bfloat16),
        (p + "self_attn.k_proj.weight", [KV, HIDDEN], torch.bfloat16),
        (p + "self_attn.k_proj.bias", [KV], torch.bfloat16),
        (p + "self_attn.v_proj.weight", [KV, HIDDEN], torch.bfloat16),
        (p + "self_attn.v_proj.bias", [KV], torch.bfloat16),
        (p + "self_attn.o_proj.weight", [HIDDEN, HIDDEN], torch.bfloat16),
        (p + "post_attention_layernorm.weight", [HIDDEN], torch.float32),
        (p + "mlp.gate_proj.weight", [INTER, HIDDEN], torch.bfloat16),
        (p + "mlp.up_proj.weight", [INTER, HIDDEN], torch.bfloat16),
        (p + "mlp.down_proj.weight", [HIDDEN, INTER], torch.bfloat16),
    ]


def nbytes(shape: list[int], dtype: torch.dtype) -> int:
    n = dtype.itemsize
    for d in shape:
        n *= d
    return n


def model_tensors(size: int) -> list[tuple[str, list[int], torch.dtype]]:
    """Embeddings, as many layers as it takes to reach ``size`` bytes, final norm, lm_head."""
    head = [("model.embed_tokens.weight", [VOCAB, HIDDEN], torch.float16)]
    tail = [("model.norm.weight", [HIDDEN], torch.float32), ("lm_head.weight", [VOCAB, HIDDEN], torch.float16)]
    fixed = sum(nbytes(s, d) for _, s, d in head + tail)
    per_layer = sum(nbytes(s, d) for _, s, d in layer_tensors(0))
    layers = max(1, -(-(size - fixed) // per_layer))
    return head + [t for i in range(layers) for t in layer_tensors(i)] + tail


def write_model(src: Path, size: int, shards: int) -> None:
    """``shards`` safetensors files (save_file) of random bytes plus model.safetensors.index.json."""
    from safetensors.torch import save_file

    specs = model_tensors(size)
    total = sum(nbytes(s, d) for _, s, d in specs)
    per_shard = -(-total // shards)
    groups: list[list[tuple[str, list[int], torch.dtype]]] = [[]]
    filled = 0
    for spec in specs:  # fill shards in order, as transformers' sharding does
        if groups[-1] and filled + nbytes(spec[1], spec[2]) > per_shard and len(groups) < shards:
            groups.append([])
            filled = 0
        groups[-1].append(spec)
        filled += nbytes(spec[1], spec[2])
    src.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, shape, dtype in group:
            raw = torch.empty(nbytes(shape, dtype), dtype=torch.uint8).random_()
            tensors[name] = raw.view(dtype).view(shape)
            weight_map[name] = fname
        save_file(tensors, str(src / fname), metadata={"format": "pt"})
        del tensors
    (src / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))


# ---------------------------------------------------------------------- layout


def read_header(path: str) -> tuple[int, list[tuple[str, int, int]]]:
    """(data section start, [(name, offset in file, nbytes)] in file order) of a safetensors file."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    start = 8 + n
    out = [(k, start + v["data_offsets"][0], v["data_offsets"][1] - v["data_offsets"][0]) for k, v in header.items()]
    out.sort(key=lambda t: t[1])
    return start, out


class Plan:
    """Where each tensor goes in the destination: the shards' data sections back to back, in file order."""

    def __init__(self, blobs: list[str]) -> None:
        self.blobs = blobs
        self.where: dict[str, tuple[int, int]] = {}
        # (path, file offset of the data section, its length, its offset in the destination)
        self.sections: list[tuple[str, int, int, int]] = []
        self.file_bytes = sum(os.path.getsize(p) for p in blobs)
        pos = 0
        for p in blobs:
            start, tensors = read_header(p)
            sec = pos
            for name, off, n in tensors:
                if off - start != pos - sec:
                    raise ValueError(f"{p}: data section has a gap before {name}")
                self.where[name] = (pos, n)
                pos += n
            self.sections.append((p, start, pos - sec, sec))
        self.total = pos


class Placer:
    """Copies tensors into the destination, each exactly once; notes when the first one landed."""

    def __init__(self, dest: torch.Tensor, plan: Plan, t0: float) -> None:
        self.dest, self.plan, self.t0 = dest, plan, t0
        self.seen: set[str] = set()
        self.first: float | None = None

    def __call__(self, name: str, t: torch.Tensor) -> None:
        off, n = self.plan.where[name]
        if name in self.seen:
            raise RuntimeError(f"{name} copied twice")
        flat = t.reshape(-1).view(torch.uint8)
        if flat.numel() != n:
            raise RuntimeError(f"{name}: {flat.numel()} bytes, want {n}")
        self.dest[off : off + n].copy_(flat)
        self.seen.add(name)
        if self.first is None:
            self.first = time.perf_counter() - self.t0

    def done(self) -> dict:
        if len(self.seen) != len(self.plan.where):
            raise RuntimeError(f"placed {len(self.seen)} tensors, want {len(self.plan.where)}")
        return {"first_tensor_s": self.first}


def pread_full(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise RuntimeError(f"file ended at {offset + done}")
        done += n


def as_view(t: torch.Tensor) -> memoryview:
    return memoryview(t.numpy()).cast("B")


# ---------------------------------------------------------------------- contenders
# Each takes (ctx, dest, t0) and returns an info dict; the caller holds the clock.


def run_ws(ctx: dict, dest: torch.Tensor, t0: float, how: str) -> dict:
    import client

    place = Placer(dest, ctx["plan"], t0)
    if how == "iter":
        for name, t in client.iter_tensors(ctx["ref"]):
            place(name, t)
            del t
    else:
        tensors = client.open_tensors(ctx["ref"], copy=how == "copy")
        for name, t in tensors.items():
            place(name, t)
        del tensors, t
    return place.done()


def run_patched(ctx: dict, dest: torch.Tensor, t0: float, how: str, target: object, **values: object) -> dict:
    """``run_ws`` with attributes of ``target`` (a module or class) set to ``values`` for this round only: each
    A/B below swaps one part of the client, in the bench only, for a comparison in the same run."""
    with mock.patch.multiple(target, **values):
        return run_ws(ctx, dest, t0, how)


def run_unchecked(ctx: dict, dest: torch.Tensor, t0: float, how: str) -> dict:
    """``run_ws`` with the client's piece-hash check of cached blobs (client/verify.py) switched off here, in
    the bench only: the client as it was before the check, for an A/B in the same run."""
    from client.stream import ModelStream

    return run_patched(ctx, dest, t0, how, ModelStream, check=lambda self, path, fd, local: None)


def run_prev_check(ctx: dict, dest: torch.Tensor, t0: float, how: str) -> dict:
    """``run_ws`` with the client's previous checker (bench/blobcheck_prev.py: one thread faulting through a
    mapping) in place of client/verify.py's ``BlobCheck``: old against new check, in the same run."""
    from blobcheck_prev import PrevBlobCheck

    import client.stream

    return run_patched(ctx, dest, t0, how, client.stream, BlobCheck=PrevBlobCheck)


def run_copy_prev(ctx: dict, dest: torch.Tensor, t0: float) -> dict:
    """``open_tensors(copy=True)`` through the previous copy path (bench/copy_prev.py: per tensor, the checker's
    read into the page cache, then a read into fresh memory) in place of client/copy_read.py's ``FileCopy``;
    each file read in its turn, as the previous path did."""
    from copy_prev import PrevFileCopy

    import client.loader

    return run_patched(ctx, dest, t0, "copy", client.loader, FileCopy=PrevFileCopy, READ_AHEAD=False)


def run_copy_small_pages(ctx: dict, dest: torch.Tensor, t0: float) -> dict:
    """``ws-copy`` without the huge-page advice on its buffer (client/copy_read.py ``HUGE_PAGES`` off here):
    4 KiB first-touch faults, for an A/B of that advice in the same run."""
    from client import copy_read

    return run_patched(ctx, dest, t0, "copy", copy_read, HUGE_PAGES=False)


def run_copy_no_prefault(ctx: dict, dest: torch.Tensor, t0: float) -> dict:
    """``ws-copy`` without the thread that faults its buffer in ahead of the reads (client/copy_read.py
    ``PREFAULT`` off here): each read faults its own fresh pages, for an A/B of the prefaulter in the same run."""
    from client import copy_read

    return run_patched(ctx, dest, t0, "copy", copy_read, PREFAULT=False)


def run_copy_no_read_ahead(ctx: dict, dest: torch.Tensor, t0: float) -> dict:
    """``ws-copy`` with each file read only in its turn (client/loader.py ``READ_AHEAD`` off here): the disk's
    queue drains between files, for an A/B of reading the next file ahead in the same run."""
    from client import loader

    return run_patched(ctx, dest, t0, "copy", loader, READ_AHEAD=False)


def run_willneed(ctx: dict, dest: torch.Tensor, t0: float, how: str) -> dict:
    """``run_ws`` with the checker handing its read-ahead window to the kernel first (client/verify.py
    ``WILLNEED``, off by default): deeper disk queues against page-cache pages in 4 KiB folios."""
    from client import verify

    return run_patched(ctx, dest, t0, how, verify, WILLNEED=True)


def run_safetensors(ctx: dict, dest: torch.Tensor, t0: float) -> dict:
    from safetensors.torch import load_file

    place = Placer(dest, ctx["plan"], t0)
    for p in ctx["plan"].blobs:
        sd = load_file(p)
        for name, t in sd.items():
            place(name, t)
        del sd, t
    return place.done()


def run_runai(ctx: dict, dest: torch.Tensor, t0: float) -> dict:
    from runai_model_streamer import SafetensorsStreamer

    place = Placer(dest, ctx["plan"], t0)
    with SafetensorsStreamer() as streamer:
        streamer.stream_files(ctx["plan"].blobs)
        for name, t in streamer.get_tensors():
            place(name, t)
            del t
    return place.done()


def _parallel(items: list, work: Callable[[int, object], None], threads: int) -> None:
    """Run ``work(thread_index, item)`` over ``items`` in order from ``threads`` threads."""
    counter = itertools.count()  # next() on a count is atomic under the GIL
    errors: list[BaseException] = []

    def loop(k: int) -> None:
        try:
            while (i := next(counter)) < len(items):
                work(k, items[i])
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    pool = [threading.Thread(target=loop, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    if errors:
        raise errors[0]


def run_pread_buf(ctx: dict, dest: torch.Tensor, t0: float, threads: int) -> dict:
    chunk = ctx["chunk"]
    bufs = ctx["bufs"][:threads]
    fds = [os.open(p, os.O_RDONLY) for p in ctx["plan"].blobs]
    try:
        if threads == 1:
            for fd in fds:
                size = os.fstat(fd).st_size
                for off in range(0, size, chunk):
                    pread_full(fd, bufs[0][: min(chunk, size - off)], off)
        else:
            items = [(fd, off, min(chunk, os.fstat(fd).st_size - off))
                     for fd in fds for off in range(0, os.fstat(fd).st_size, chunk)]  # fmt: skip
            _parallel(items, lambda k, it: pread_full(it[0], bufs[k][: it[2]], it[1]), threads)
    finally:
        for fd in fds:
            os.close(fd)
    return {"first_tensor_s": None}


def run_pread_dest(ctx: dict, dest: torch.Tensor, t0: float, threads: int) -> dict:
    chunk = ctx["chunk"]
    view = as_view(dest)
    items = []
    fds = []
    try:
        for path, start, length, at in ctx["plan"].sections:
            fd = os.open(path, os.O_RDONLY)
            fds.append(fd)
            items += [(fd, start + o, at + o, min(chunk, length - o)) for o in range(0, length, chunk)]
        if threads == 1:
            for fd, off, at, n in items:
                pread_full(fd, view[at : at + n], off)
        else:
            _parallel(items, lambda k, it: pread_full(it[0], view[it[2] : it[2] + it[3]], it[1]), threads)
    finally:
        for fd in fds:
            os.close(fd)
    return {"first_tensor_s": None}


# ---------------------------------------------------------------------- contenders that load to --device


def device_sync(ctx: dict) -> None:
    """Wait for the device's queued copies, so a clock stops when the bytes are there, not when they were queued."""
    if ctx["device"].type == "cuda":
        torch.cuda.synchronize(ctx["device"])


def run_ws_dev(ctx: dict, dest: torch.Tensor, t0: float, how: str) -> dict:
    """The client loading to the device itself (``device=``): reads into its pinned ring, copies on its stream."""
    import client

    place = Placer(dest, ctx["plan"], t0)
    if how == "iter":
        for name, t in client.iter_tensors(ctx["ref"], device=ctx["device"]):
            place(name, t)
            del t
    else:
        tensors = client.open_tensors(ctx["ref"], device=ctx["device"])
        for name, t in tensors.items():
            place(name, t)
        del tensors, t
    device_sync(ctx)
    return place.done()


def run_safetensors_dev(ctx: dict, dest: torch.Tensor, t0: float) -> dict:
    from safetensors.torch import load_file

    place = Placer(dest, ctx["plan"], t0)
    for p in ctx["plan"].blobs:
        sd = load_file(p, device=str(ctx["device"]))
        for name, t in sd.items():
            place(name, t)
        del sd, t
    device_sync(ctx)
    return place.done()


def run_runai_dev(ctx: dict, dest: torch.Tensor, t0: float) -> dict:
    from runai_model_streamer import SafetensorsStreamer

    place = Placer(dest, ctx["plan"], t0)
    with SafetensorsStreamer() as streamer:
        streamer.stream_files(ctx["plan"].blobs, device=str(ctx["device"]))
        for name, t in streamer.get_tensors():
            place(name, t)
            del t
    device_sync(ctx)
    return place.done()


def run_pread_dev(ctx: dict, dest: torch.Tensor, t0: float, threads: int) -> dict:
    """The limit to the device: positional reads into pinned buffers, each copied asynchronously into place.

    Each thread owns two buffers and a stream and alternates them, so its next read
    overlaps the copy of the previous chunk; before a buffer is refilled, the event of
    its last copy is waited for.
    """
    cuda = ctx["device"].type == "cuda"
    items = []
    fds = []
    try:
        for path, start, length, at in ctx["plan"].sections:
            fd = os.open(path, os.O_RDONLY)
            fds.append(fd)
            items += [(fd, start + o, at + o, min(ctx["chunk"], length - o)) for o in range(0, length, ctx["chunk"])]
        for stream in ctx["dev_streams"][:threads]:  # after the destination's zeroing on the current stream
            stream.wait_stream(torch.cuda.current_stream(ctx["device"]))
        turn = [0] * threads
        events: list[list[torch.cuda.Event | None]] = [[None, None] for _ in range(threads)]

        def work(k: int, it: object) -> None:
            fd, off, at, n = it  # type: ignore[misc]
            b = turn[k]
            turn[k] ^= 1
            buf = ctx["dev_bufs"][k][b]
            if events[k][b] is not None:
                events[k][b].synchronize()  # type: ignore[union-attr]
            pread_full(fd, as_view(buf)[:n], off)
            if not cuda:
                dest[at : at + n].copy_(buf[:n])
                return
            stream = ctx["dev_streams"][k]
            with torch.cuda.stream(stream):
                dest[at : at + n].copy_(buf[:n], non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(stream)
            events[k][b] = ev

        if threads == 1:
            for it in items:
                work(0, it)
        else:
            _parallel(items, work, threads)
        device_sync(ctx)
    finally:
        for fd in fds:
            os.close(fd)
    return {"first_tensor_s": None}


CONTENDERS: dict[str, Callable[[dict, torch.Tensor, float], dict]] = {
    "ws-open": lambda c, d, t0: run_ws(c, d, t0, "open"),
    "ws-iter": lambda c, d, t0: run_ws(c, d, t0, "iter"),
    "ws-copy": lambda c, d, t0: run_ws(c, d, t0, "copy"),
    "ws-copy-prev": lambda c, d, t0: run_copy_prev(c, d, t0),
    "ws-copy-4k": run_copy_small_pages,
    "ws-copy-nopf": run_copy_no_prefault,
    "ws-copy-noahead": run_copy_no_read_ahead,
    "ws-open-nocheck": lambda c, d, t0: run_unchecked(c, d, t0, "open"),
    "ws-iter-nocheck": lambda c, d, t0: run_unchecked(c, d, t0, "iter"),
    "ws-open-prev": lambda c, d, t0: run_prev_check(c, d, t0, "open"),
    "ws-iter-prev": lambda c, d, t0: run_prev_check(c, d, t0, "iter"),
    "ws-open-willneed": lambda c, d, t0: run_willneed(c, d, t0, "open"),
    "ws-iter-willneed": lambda c, d, t0: run_willneed(c, d, t0, "iter"),
    "safetensors": run_safetensors,
    "runai": run_runai,
    "pread-buf": lambda c, d, t0: run_pread_buf(c, d, t0, 1),
    "pread-buf-t4": lambda c, d, t0: run_pread_buf(c, d, t0, c["threads"]),
    "pread-dest": lambda c, d, t0: run_pread_dest(c, d, t0, 1),
    "pread-dest-t4": lambda c, d, t0: run_pread_dest(c, d, t0, c["threads"]),
    "ws-iter-dev": lambda c, d, t0: run_ws_dev(c, d, t0, "iter"),
    "ws-open-dev": lambda c, d, t0: run_ws_dev(c, d, t0, "open"),
    "safetensors-dev": run_safetensors_dev,
    "runai-dev": run_runai_dev,
    "pread-dev": lambda c, d, t0: run_pread_dev(c, d, t0, 1),
    "pread-dev-t4": lambda c, d, t0: run_pread_dev(c, d, t0, c["threads"]),
}
DEV = [n for n in CONTENDERS if n.endswith("-dev") or n.startswith("pread-dev")]
CPU_DEST_ONLY = ("pread-dest", "pread-dest-t4")  # they preadv straight into the destination's host memory
FILLS_DEST = {n for n in CONTENDERS if not n.startswith("pread-buf")}
LIMITS = ("pread-buf", "pread-buf-t4")
# each has a -nocheck twin
CHECKED = ("ws-open", "ws-iter", "ws-open-prev", "ws-iter-prev", "ws-open-willneed", "ws-iter-willneed")


def warm_up(plan: Plan, buf: memoryview) -> None:
    """Read every blob once so it is all in the page cache."""
    for p in plan.blobs:
        fd = os.open(p, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            for off in range(0, size, len(buf)):
                pread_full(fd, buf[: min(len(buf), size - off)], off)
        finally:
            os.close(fd)


def disk_stat_path(path: str) -> str | None:
    """/sys/dev/block/MAJ:MIN/stat of the block device holding ``path`` (a disk or a partition), if readable."""
    st = os.stat(path)
    p = f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/stat"
    return p if os.path.exists(p) else None


def usage(ctx: dict) -> dict:
    """This process's faults, blocks read and CPU; the disk's reads, sectors read and ms spent reading."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    out = {"minflt": r.ru_minflt, "majflt": r.ru_majflt, "inblock": r.ru_inblock, "user_s": r.ru_utime,
           "sys_s": r.ru_stime}  # fmt: skip
    if ctx.get("disk_stat"):
        f = Path(ctx["disk_stat"]).read_text().split()
        out |= {"disk_reads": int(f[0]), "disk_sectors": int(f[2]), "disk_read_ms": int(f[3])}
    return out


def machine_busy_s() -> float:
    """CPU seconds all cores of the machine have been busy since boot (/proc/stat)."""
    f = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def wait_quiet(ctx: dict, window: float = 0.25, threshold: float = 0.25) -> float:
    """Wait (within what is left of ``ctx['quiet_budget']``) until other processes use < ``threshold`` cores.

    The machine is shared: another session's tests or installs steal the CPU a load needs
    (and its copies). Returns the seconds waited; the budget bounds the whole run's waiting.
    """
    waited = 0.0
    while ctx["quiet_budget"] > 0:
        b0, c0 = machine_busy_s(), own_cpu_s()
        time.sleep(window)
        others = (machine_busy_s() - b0 - (own_cpu_s() - c0)) / window
        if others < threshold:
            break
        waited += window
        ctx["quiet_budget"] -= window
    return waited


def io_shape(d: dict, secs: float) -> dict:
    """Average request size and reads in flight (Little's law: ms reading / wall ms) from disk stat deltas."""
    if not d.get("disk_reads"):
        return {"disk_read_mib": 0.0}
    return {
        "disk_read_mib": round(d["disk_sectors"] * 512 / 2**20, 1),
        "disk_avg_read_kib": round(d["disk_sectors"] * 512 / d["disk_reads"] / 1024, 1),
        "disk_reads_in_flight": round(d["disk_read_ms"] / (secs * 1000), 2),
    }


def measure(ctx: dict, name: str, temp: str, dest: torch.Tensor, ref: torch.Tensor, drop: bool) -> dict:
    dest.zero_()
    gc.collect()
    dropped = drop_caches() if temp == "cold" and drop else False
    if temp == "warm":
        warm_up(ctx["plan"], ctx["bufs"][0])
    waited = wait_quiet(ctx)
    u0 = usage(ctx)
    busy0 = machine_busy_s()
    t0 = time.perf_counter()
    try:
        info = CONTENDERS[name](ctx, dest, t0)
        secs = time.perf_counter() - t0
        u1 = usage(ctx)
        busy = machine_busy_s() - busy0
        err = None
        if name in FILLS_DEST and not torch.equal(dest, ref):
            bad = int((dest != ref).nonzero()[0])
            raise RuntimeError(f"destination differs from the reference at byte {bad}")
    except Exception as exc:  # noqa: BLE001
        secs, info, err, u1, busy = float("nan"), {}, repr(exc)[-3000:], usage(ctx), float("nan")
    rec = {
        "contender": name,
        "temp": temp,
        "seconds": secs,
        "gb_per_s": ctx["plan"].total / secs / 1e9 if err is None else None,
        "page_cache_dropped": dropped,
        "loadavg_1m": os.getloadavg()[0],
        "waited_for_quiet_s": waited,
        "error": err,
        **info,
        **{k: round(u1[k] - u0[k], 3) for k in u0},
    }
    rec |= io_shape(rec, secs)
    # cores other processes (the agent included) kept busy during the run: interference on a shared machine
    rec["others_cores"] = round((busy - rec["user_s"] - rec["sys_s"]) / secs, 2) if err is None else None
    return rec


# ---------------------------------------------------------------------- report


def medians(rounds: list[dict]) -> dict[str, dict[str, float]]:
    """{contender: {temp: median seconds}} over the runs without error."""
    secs: dict[str, dict[str, list[float]]] = {}
    for r in rounds:
        if r["error"] is None:
            secs.setdefault(r["contender"], {}).setdefault(r["temp"], []).append(r["seconds"])
    return {k: {t: statistics.median(v) for t, v in d.items()} for k, d in secs.items()}


def _ok(rounds: list[dict], name: str, temp: str) -> list[dict]:
    return [r for r in rounds if r["contender"] == name and r["temp"] == temp and r["error"] is None]


def _med(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def table(rounds: list[dict], total: int) -> str:
    """Markdown: median seconds (min-max) and GB/s of each contender, cold and warm."""
    names = list(dict.fromkeys(r["contender"] for r in rounds))
    lines = [
        "| contender | cold median s (min-max) | cold GB/s | warm median s (min-max) | warm GB/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for n in names:
        cells = [n]
        for temp in ("cold", "warm"):
            s = [r["seconds"] for r in _ok(rounds, n, temp)]
            if not s:
                cells += ["-", "-"]
                continue
            m = statistics.median(s)
            cells += [f"{m:.3f} ({min(s):.3f}-{max(s):.3f})", f"{total / m / 1e9:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def shape_table(rounds: list[dict]) -> str:
    """Markdown: per-run medians of what each contender costs: CPU, page faults, and the disk reads it made (cold)."""
    names = list(dict.fromkeys(r["contender"] for r in rounds))
    lines = [
        "| contender | CPU s cold / warm | minor faults cold / warm | major faults cold | disk MiB read cold / warm "
        "| avg disk read KiB (cold) | disk reads in flight (cold) | first tensor s cold / warm "
        "| other processes' cores cold / warm |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def fmt(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    for n in names:
        cold, warm = _ok(rounds, n, "cold"), _ok(rounds, n, "warm")
        cpu = [_med([{"c": r["user_s"] + r["sys_s"]} for r in rows], "c") for rows in (cold, warm)]
        lines.append(
            f"| {n} | {fmt(cpu[0], '.2f')} / {fmt(cpu[1], '.2f')} "
            f"| {fmt(_med(cold, 'minflt'), '.0f')} / {fmt(_med(warm, 'minflt'), '.0f')} "
            f"| {fmt(_med(cold, 'majflt'), '.0f')} "
            f"| {fmt(_med(cold, 'disk_read_mib'), '.0f')} / {fmt(_med(warm, 'disk_read_mib'), '.0f')} "
            f"| {fmt(_med(cold, 'disk_avg_read_kib'), '.0f')} | {fmt(_med(cold, 'disk_reads_in_flight'), '.1f')} "
            f"| {fmt(_med(cold, 'first_tensor_s'), '.3f')} / {fmt(_med(warm, 'first_tensor_s'), '.3f')} "
            f"| {fmt(_med(cold, 'others_cores'), '.2f')} / {fmt(_med(warm, 'others_cores'), '.2f')} |"
        )
    return "\n".join(lines)


def ratios(rounds: list[dict]) -> str:
    """warmstart against safetensors, Run:ai and the limit: ratio of medians, and the median of per-round ratios.

    A per-round ratio compares runs made a few seconds apart, so interference that
    comes and goes over minutes (other sessions on a shared machine) cancels better.
    Two limits: the issue's own (``pread-buf``: one sequential reader into one reused
    buffer) and the stricter faster-of-both ``pread-buf`` lines of the round.
    """
    secs: dict[tuple[str, str], dict[int, float]] = {}
    for r in rounds:
        if r["error"] is None:
            secs.setdefault((r["contender"], r["temp"]), {})[r["round"]] = r["seconds"]
    for temp in ("cold", "warm"):
        lim = [secs.get((n, temp), {}) for n in LIMITS]
        secs[("limit", temp)] = {k: min(d[k] for d in lim if k in d) for k in set().union(*lim)}
    lines = [
        (
            "| | vs safetensors | vs runai | vs the issue's limit (pread-buf) | vs the faster pread-buf line "
            "| vs the unchecked client |"
        ),
        "|---|---:|---:|---:|---:|---:|",
    ]
    for temp in ("cold", "warm"):
        copies = ("ws-copy", "ws-copy-4k", "ws-copy-nopf", "ws-copy-noahead", "ws-copy-prev")
        for ws in ("ws-open", "ws-iter", *copies, *CHECKED[2:], "ws-open-nocheck", "ws-iter-nocheck"):
            mine = secs.get((ws, temp))
            if not mine:
                continue
            cells = [f"{ws} {temp}"]
            unchecked = "-".join(ws.split("-")[:2]) + "-nocheck" if ws in CHECKED else ""
            for other in ("safetensors", "runai", "pread-buf", "limit", unchecked):
                theirs = secs.get((other, temp), {})
                common = sorted(mine.keys() & theirs.keys())
                if not common:
                    cells.append("-")
                    continue
                of_medians = statistics.median(theirs.values()) / statistics.median(mine.values())
                paired = statistics.median(theirs[k] / mine[k] for k in common)
                cells.append(f"{of_medians:.2f}x (per round {paired:.2f}x)")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def device_ratios(rounds: list[dict]) -> str:
    """The ``-dev`` contenders: warmstart's device loads against safetensors, Run:ai and the device limit.

    Same two figures as :func:`ratios` (ratio of medians, median of per-round ratios);
    the limit is the faster ``pread-dev`` line of each round. Values above 1 mean
    warmstart is faster.
    """
    secs: dict[tuple[str, str], dict[int, float]] = {}
    for r in rounds:
        if r["error"] is None:
            secs.setdefault((r["contender"], r["temp"]), {})[r["round"]] = r["seconds"]
    for temp in ("cold", "warm"):
        lim = [secs.get((n, temp), {}) for n in ("pread-dev", "pread-dev-t4")]
        secs[("limit", temp)] = {k: min(d[k] for d in lim if k in d) for k in set().union(*lim)}
    others = ("safetensors-dev", "safetensors", "runai-dev", "runai", "limit")
    lines = [
        "| | "
        + " | ".join("vs the limit (faster pread-dev line)" if o == "limit" else f"vs {o}" for o in others)
        + " |",
        "|---|" + "---:|" * len(others),
    ]
    for temp in ("cold", "warm"):
        for ws in ("ws-iter-dev", "ws-open-dev"):
            mine = secs.get((ws, temp))
            if not mine:
                continue
            cells = [f"{ws} {temp}"]
            for other in others:
                theirs = secs.get((other, temp), {})
                common = sorted(mine.keys() & theirs.keys())
                if not common:
                    cells.append("-")
                    continue
                of_medians = statistics.median(theirs.values()) / statistics.median(mine.values())
                paired = statistics.median(theirs[k] / mine[k] for k in common)
                cells.append(f"{of_medians:.2f}x (per round {paired:.2f}x)")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1GiB", help="model size, at least (default 1GiB)")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--only", default=None,
                    help="comma-separated contenders (default: all but the -dev ones on CPU; all but pread-dest* "
                         "with --device cuda)")  # fmt: skip
    ap.add_argument("--device", default="cpu",
                    help="where the destination lives and the -dev contenders load to: cpu (default) or cuda[:N]")
    ap.add_argument("--temps", default="cold,warm")
    ap.add_argument("--chunk", default="64MiB", help="read size of the pread contenders (default 64MiB)")
    ap.add_argument("--threads", type=int, default=4, help="threads of the -t4 pread contenders")
    ap.add_argument("--workdir", default=str(ROOT / "bench" / "out" / "load-work"))
    ap.add_argument("--reuse", action="store_true", help="keep a model and cache already in --workdir")
    ap.add_argument("--no-drop-caches", action="store_true")
    ap.add_argument("--quiet-budget", type=float, default=60.0,
                    help="seconds the whole run may spend waiting for other processes to go quiet before a "
                         "measurement (default 60; 0: never wait)")  # fmt: skip
    args = ap.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
    if args.only is None:
        skip = DEV if device.type == "cpu" else CPU_DEST_ONLY
        args.only = ",".join(n for n in CONTENDERS if n not in skip)
    names = [n for n in args.only.split(",") if n]
    for n in names:
        if n not in CONTENDERS:
            ap.error(f"unknown contender {n}; known: {', '.join(CONTENDERS)}")
        if device.type != "cpu" and n in CPU_DEST_ONLY:
            ap.error(f"{n} reads straight into host memory; it cannot run with --device {args.device}")
    temps = [t for t in args.temps.split(",") if t]
    work = Path(args.workdir)
    src = work / "model"
    if not (args.reuse and (src / INDEX).exists()):
        shutil.rmtree(work, ignore_errors=True)
        t_gen = time.perf_counter()
        write_model(src, parse_size(args.size), args.shards)
        print(f"generated {src} in {time.perf_counter() - t_gen:.1f}s", flush=True)

    agent = AgentProcess(work / "agent", capacity="64GiB", cache_dir=work / "cache")
    agent.start()
    try:
        t_pf = time.perf_counter()
        agent.cli("prefetch", str(src), check=True, timeout=600)
        print(f"prefetched into the agent's cache in {time.perf_counter() - t_pf:.1f}s", flush=True)
        os.environ["WARMSTART_SOCKET"] = str(agent.socket_path)
        import client

        # imported here, not by the first timed run of each contender
        runai = ["runai_model_streamer"] if any(n.startswith("runai") for n in names) else []
        for module in ("client.loader", "safetensors.torch", *runai):
            importlib.import_module(module)

        snap = Path(client.snapshot(str(src)))
        shard_names = sorted(set(json.loads((snap / INDEX).read_text())["weight_map"].values()))
        blobs = [os.path.realpath(snap / s) for s in shard_names]
        plan = Plan(blobs)
        chunk = parse_size(args.chunk)
        ctx = {
            "ref": str(src),
            "plan": plan,
            "chunk": chunk,
            "threads": args.threads,
            "disk_stat": disk_stat_path(blobs[0]),
            "quiet_budget": args.quiet_budget,
            "bufs": [as_view(torch.empty(chunk, dtype=torch.uint8).fill_(1)) for _ in range(max(1, args.threads))],
            "device": device,
        }
        if any(n.startswith("pread-dev") for n in names):  # two pinned buffers and a stream per thread
            pin = device.type == "cuda"
            ctx["dev_bufs"] = [[torch.empty(chunk, dtype=torch.uint8, pin_memory=pin).fill_(1) for _ in range(2)]
                               for _ in range(max(1, args.threads))]  # fmt: skip
            ctx["dev_streams"] = [torch.cuda.Stream(device) for _ in range(max(1, args.threads))] if pin else []
        print(f"{len(plan.where)} tensors, {plan.total} bytes in {len(blobs)} blobs under {agent.cache_dir}",
              flush=True)

        dest = torch.empty(plan.total, dtype=torch.uint8, device=device).fill_(1)  # allocated, touched before clocks
        ref = torch.empty(plan.total, dtype=torch.uint8)
        run_pread_dest(ctx, ref, 0.0, 1)
        from safetensors import safe_open  # check the reference against safetensors itself, once

        for p in blobs:
            with safe_open(p, "pt") as f:
                for k in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    off, n = plan.where[k]
                    if not torch.equal(f.get_tensor(k).reshape(-1).view(torch.uint8), ref[off : off + n]):
                        raise RuntimeError(f"reference differs from safetensors at {k}")
        ref = ref.to(device)  # compared where the destination lives

        stamp = time.strftime("%Y%m%d-%H%M%S")
        rounds: list[dict] = []
        t_all = time.perf_counter()
        for r in range(args.rounds):
            order = names if r % 2 == 0 else list(reversed(names))
            for n in order:
                for temp in temps:
                    rec = {"round": r, **measure(ctx, n, temp, dest, ref, not args.no_drop_caches)}
                    rounds.append(rec)
                    print(json.dumps(rec), flush=True)
        print(f"measured in {time.perf_counter() - t_all:.0f}s", flush=True)
    finally:
        agent.close()

    med = medians(rounds)
    out_dir = ROOT / "bench" / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = {
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "time": stamp,
        "total_bytes": plan.total,
        "file_bytes": plan.file_bytes,
        "tensors": len(plan.where),
        "shards": len(blobs),
        "rounds": args.rounds,
        "chunk": chunk,
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "versions": {m: _version(m) for m in ("torch", "safetensors", "runai-model-streamer")},
        "waited_for_quiet_s": round(sum(r["waited_for_quiet_s"] for r in rounds), 2),
        "page_cache_dropped": all(r["page_cache_dropped"] for r in rounds if r["temp"] == "cold"),
        "medians": med,
        "per_round": rounds,
    }
    out = out_dir / f"load_cached-{stamp}.json"
    out.write_text(json.dumps(raw, indent=1))
    (out_dir / "load_cached-latest.json").write_text(json.dumps(raw, indent=1))
    print()
    print(table(rounds, plan.total))
    print()
    print(shape_table(rounds))
    print()
    print(ratios(rounds))
    if any(n in DEV for n in names):
        print()
        print(device_ratios(rounds))
    print(f"\nraw numbers: {out}")
    return 0


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
