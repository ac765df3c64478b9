"""A device this process cannot use is refused with one line before the agent is asked for anything."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import client
from client.errors import BadRequestError


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the refusal cannot happen")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda", 1)])
def test_a_cuda_device_without_cuda_is_one_clear_line(device: object, tmp_path: Path) -> None:
    socket = str(tmp_path / "no-agent.sock")  # nothing listens: asking the agent would fail otherwise
    for call in (client.open_tensors, client.iter_tensors):
        with pytest.raises(BadRequestError) as info:
            call("s3://bucket/model", device=device, socket=socket)  # type: ignore[arg-type]
        message = str(info.value)
        assert "\n" not in message and "no CUDA device" in message and 'device="cpu"' in message, message


def test_a_device_that_is_not_one_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BadRequestError, match="not a torch device"):
        client.open_tensors("s3://bucket/model", device="gpu0", socket=str(tmp_path / "x.sock"))
