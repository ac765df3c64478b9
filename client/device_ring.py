"""Load tensors from a file into device memory through a small ring of reusable pinned buffers.

The path to a GPU that costs the least: the file is read with large positional
reads (a few in flight, from threads, GIL released) into page-locked host
buffers, and each buffer is copied to the device asynchronously on a dedicated
CUDA stream while the next buffers are being read. Host memory stays at the
ring's size whatever the model's size; the bytes are copied once on the host
(disk or page cache into the pinned buffer) and once over the bus, never
through a pageable intermediate (``tensor.to("cuda")`` from pageable memory
stages every byte through a driver buffer and blocks the caller).

A slot is refilled only after the copy out of it has finished (a CUDA event per
slot), and every tensor is handed out only after the current stream has been
made to wait for the copies that fill it, so a consumer on the default stream
never sees a half-copied tensor. On devices without CUDA streams (CPU, used by
the tests; other accelerators) the same pipeline runs with plain buffers and
synchronous copies.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from client._buffers import writable_bytes
from client.errors import BadRequestError, MalformedFileError
from client.safetensors_header import TensorInfo

DEFAULT_RING_BYTES = 256 * 1024 * 1024
DEFAULT_SLOTS = 4
_ALIGN = 4096
_MAX_READ = 1 << 30  # Linux returns at most 0x7ffff000 bytes per read


def check_device(device: str | torch.device) -> torch.device:
    """The device tensors go to, refused with one line when this process cannot use it.

    Without this, ``device="cuda:0"`` on a torch build or a node without CUDA
    failed deep in the first copy with torch's own message, after the agent had
    been asked for the model.
    """
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise BadRequestError(f"device {device!r} is not a torch device: {exc}") from None
    if target.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise BadRequestError(
                f"device {device!r}: this process sees no CUDA device (torch {torch.__version__}, {build}); "
                'load to device="cpu", or run where a GPU and a CUDA build of torch are present'
            )
        if target.index is not None and target.index >= torch.cuda.device_count():
            raise BadRequestError(
                f"device {device!r}: this process sees {torch.cuda.device_count()} CUDA device(s) "
                "(CUDA_VISIBLE_DEVICES may hide the others)"
            )
    return target


@dataclass(slots=True)
class _Placement:
    """Bytes [buf_off, buf_off + length) of a slot go to bytes [dest_off, ...) of tensor ``index``."""

    index: int
    buf_off: int
    dest_off: int
    length: int


@dataclass(slots=True)
class _Batch:
    """What one slot carries: file ranges to read back to back, and where their bytes go."""

    reads: list[tuple[int, int]] = field(default_factory=list)  # (file offset, length), packed from slot start
    placements: list[_Placement] = field(default_factory=list)
    finishes: list[int] = field(default_factory=list)  # tensors whose last bytes are in this batch
    size: int = 0


def plan_batches(infos: Sequence[TensorInfo], slot_bytes: int) -> list[_Batch]:
    """Cut the tensors' bytes, in file order, into slot-sized batches.

    Adjacent tensors (the usual safetensors layout) share one read; a tensor
    larger than a slot spans several batches.
    """
    batches: list[_Batch] = []
    current = _Batch()
    order = sorted(range(len(infos)), key=lambda i: infos[i].offset)
    for index in order:
        info = infos[index]
        done = 0
        while done < info.nbytes:
            if current.size == slot_bytes:
                batches.append(current)
                current = _Batch()
            n = min(info.nbytes - done, slot_bytes - current.size)
            src = info.offset + done
            if current.reads and sum(current.reads[-1]) == src:
                off, length = current.reads[-1]
                current.reads[-1] = (off, length + n)
            else:
                current.reads.append((src, n))
            current.placements.append(_Placement(index, current.size, done, n))
            current.size += n
            done += n
        if info.nbytes:
            current.finishes.append(index)
    if current.size:
        batches.append(current)
    return batches


class DeviceRing:
    """Reusable pinned buffers, a copy stream and reader threads for one device.

    Make one per load (or keep one for several files: buffers are reused);
    :meth:`close` frees the pinned memory. ``ring_bytes`` bounds the host
    memory the load uses.
    """

    def __init__(
        self,
        device: str | torch.device,
        ring_bytes: int = DEFAULT_RING_BYTES,
        slots: int = DEFAULT_SLOTS,
    ) -> None:
        self.device = torch.device(device)
        if slots < 2:
            raise ValueError("a ring needs at least 2 slots to overlap reads with copies")
        slot_bytes = max(_ALIGN, ring_bytes // slots // _ALIGN * _ALIGN)
        self.cuda = self.device.type == "cuda"
        if self.cuda and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.slot_bytes = slot_bytes
        self.buffers = [torch.empty(slot_bytes, dtype=torch.uint8, pin_memory=self.cuda) for _ in range(slots)]
        # torch.cuda.Stream/Event have unannotated constructors
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None  # type: ignore[no-untyped-call]
        self._events: list[torch.cuda.Event | None] = [None] * slots
        self._pool = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="warmstart-ring")

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self.stream is not None:
            self.stream.synchronize()
        self.buffers = []

    def __enter__(self) -> DeviceRing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def load(
        self,
        fd: int,
        path: str,
        infos: Sequence[TensorInfo],
        wait: Callable[[int, int], None] | None = None,
    ) -> Generator[tuple[str, torch.Tensor]]:
        """Yield ``infos``' tensors on the device as their bytes arrive (file order).

        ``fd`` must stay open until the generator is exhausted or closed.
        ``wait(offset, length)``, when given, is called on a reader thread before
        each read and blocks until those bytes of a still-filling file are verified.
        """
        dests = [torch.empty(t.nbytes, dtype=torch.uint8, device=self.device) for t in infos]
        for t in infos:
            if t.nbytes == 0:
                yield t.name, torch.empty(t.shape, dtype=t.dtype, device=self.device)
        batches = plan_batches(infos, self.slot_bytes)
        slots = len(self.buffers)
        pending: dict[int, Future[None]] = {}
        try:
            for i in range(min(slots, len(batches))):
                pending[i] = self._pool.submit(self._read, fd, path, batches[i], i % slots, wait)
            for i, batch in enumerate(batches):
                slot = i % slots
                pending.pop(i).result()
                finished = self._copy_out(batch, slot, dests)
                nxt = i + slots
                if nxt < len(batches):
                    pending[nxt] = self._pool.submit(self._read, fd, path, batches[nxt], slot, wait)
                for index in finished:
                    t = infos[index]
                    yield t.name, dests[index].view(t.dtype).view(t.shape)
                    dests[index] = _HANDED_OUT
        finally:
            for fut in pending.values():  # never free a buffer a thread is still reading into
                fut.cancel() or fut.exception()
            if self.stream is not None:
                self.stream.synchronize()

    def _read(
        self, fd: int, path: str, batch: _Batch, slot: int, wait: Callable[[int, int], None] | None
    ) -> None:
        """Fill a slot with a batch's file ranges (runs on a reader thread)."""
        event = self._events[slot]
        if event is not None:
            event.synchronize()  # the previous batch's copies out of this slot are done
        view = writable_bytes(self.buffers[slot])
        pos = 0
        for offset, length in batch.reads:
            if wait is not None:
                wait(offset, length)
            done = 0
            while done < length:
                chunk = min(length - done, _MAX_READ)
                n = os.preadv(fd, [view[pos + done : pos + done + chunk]], offset + done)
                if n == 0:
                    raise MalformedFileError(f"{path}: file ended at byte {offset + done} (truncated while loading?)")
                done += n
            pos += length

    def _copy_out(self, batch: _Batch, slot: int, dests: list[torch.Tensor]) -> list[int]:
        """Queue the slot's bytes into their tensors; return the tensors that are now complete."""
        buf = self.buffers[slot]
        if self.stream is None:
            for p in batch.placements:
                dests[p.index][p.dest_off : p.dest_off + p.length].copy_(buf[p.buf_off : p.buf_off + p.length])
            return batch.finishes
        with torch.cuda.stream(self.stream):
            for p in batch.placements:
                dests[p.index][p.dest_off : p.dest_off + p.length].copy_(
                    buf[p.buf_off : p.buf_off + p.length], non_blocking=True
                )
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]  # unannotated in torch
            event.record(self.stream)
        self._events[slot] = event
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)  # consumers on the current stream see the finished copies
        for index in batch.finishes:
            # allocated on the current stream, written on the copy stream: keep the
            # allocator from reusing the memory before the copy stream is done with it
            dests[index].record_stream(self.stream)
        return batch.finishes


_HANDED_OUT = torch.empty(0, dtype=torch.uint8)
