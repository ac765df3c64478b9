"""Raw access to tensor memory for positional reads, without numpy (torch does not require it)."""

from __future__ import annotations

import ctypes

import torch


def writable_bytes(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU uint8 tensor's memory (pinned tensors included).

    The view does not keep ``t`` alive: the caller must.
    """
    if t.dtype != torch.uint8 or not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError("writable_bytes needs a contiguous CPU uint8 tensor")
    array = (ctypes.c_ubyte * t.numel()).from_address(t.data_ptr())
    return memoryview(array).cast("B")
