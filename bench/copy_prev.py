"""``open_tensors(copy=True)`` as it read before client/copy_read.py (bench only).

Per tensor: wait for its bytes, have the checker (client/verify.py's ``BlobCheck``, its
own threads reading the blob into the page cache) confirm the pieces under it, then
read it with positional reads from the page cache into fresh memory of its own
(``torch.empty`` per tensor, first-touch page faults). Kept so that
bench/load_cached.py can measure it against ``FileCopy`` in the same process
(contender ``ws-copy-prev``: the bench puts :class:`PrevFileCopy` in place of
``client.loader.FileCopy``); not used by the client.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Generator, Sequence

import torch

from client._buffers import writable_bytes
from client.copy_read import PieceCheck, Wait
from client.errors import MalformedFileError
from client.safetensors_header import MAX_HEADER_BYTES, TensorInfo, read_header

_MAX_READ = 1 << 30


class PrevFileCopy:
    """The old copy path behind ``FileCopy``'s interface: header through the checker, then one read per tensor."""

    def __init__(
        self, fd: int, name: str, *, check: PieceCheck | None = None, wait: Wait | None = None, chunk: int = 0,
        direct: bool = True,
    ) -> None:
        self.name, self._fd, self._check, self._wait = name, fd, check, wait
        self._ensure(0, 8)
        raw = os.pread(fd, 8, 0)
        length = struct.unpack("<Q", raw)[0] if len(raw) == 8 else 0
        self._ensure(0, 8 + min(length, MAX_HEADER_BYTES))
        self.header = read_header(fd, name=name)

    def _ensure(self, offset: int, nbytes: int) -> None:
        if self._wait is not None:
            self._wait(offset, nbytes)
        if self._check is not None:
            self._check.ensure(offset, nbytes)  # type: ignore[attr-defined]

    def tensors(self, infos: Sequence[TensorInfo]) -> Generator[tuple[str, torch.Tensor]]:
        for t in infos:
            self._ensure(t.offset, t.nbytes)
            yield t.name, self._read_tensor(t)

    def _read_tensor(self, t: TensorInfo) -> torch.Tensor:
        buf = torch.empty(t.nbytes, dtype=torch.uint8)
        if t.nbytes:
            dest = writable_bytes(buf)
            done = 0
            while done < t.nbytes:
                n = os.preadv(self._fd, [dest[done : done + _MAX_READ]], t.offset + done)
                if n == 0:
                    raise MalformedFileError(f"{self.name}: file ended inside tensor {t.name!r}")
                done += n
        return buf.view(t.dtype).view(t.shape)

    def close(self) -> None:
        """Nothing of its own to release (the checker and descriptor are the loader's)."""
