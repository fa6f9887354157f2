"""The bookkeeping of :func:`lmcache.cudart.new_stream` on a fake CUDA runtime (the streams themselves
are tested on the GPU: tests/test_cuda_streams.py): a stream handed back goes to the next caller on its
device, once, and streams are never destroyed."""

import contextlib
import ctypes
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from lmcache import cudart


@dataclass
class FakeStream:
    cuda_stream: int
    device: torch.device


class FakeRuntime:
    """Creates stream handles 1, 2, 3, ...; counts destructions (there must be none)."""

    def __init__(self, status: int = 0) -> None:
        self.status = status
        self.created = 0
        self.destroyed = 0

    def cudaStreamCreateWithFlags(self, handle: Any, flags: int) -> int:  # noqa: N802 - CUDA's name
        assert flags == cudart.STREAM_NON_BLOCKING
        if self.status:
            return self.status
        self.created += 1
        ctypes.cast(handle, ctypes.POINTER(ctypes.c_void_p))[0] = self.created  # byref(c_void_p)
        return 0

    def cudaStreamDestroy(self, handle: Any) -> int:  # noqa: N802
        self.destroyed += 1
        return 0


@pytest.fixture
def runtime(monkeypatch: pytest.MonkeyPatch) -> FakeRuntime:
    fake = FakeRuntime()
    monkeypatch.setattr(cudart, "runtime", lambda: fake)
    monkeypatch.setattr(cudart, "_spare_streams", {})
    monkeypatch.setattr(torch.cuda, "device", lambda index: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(
        torch.cuda, "ExternalStream", lambda handle, device: FakeStream(handle, torch.device("cuda", device))
    )
    return fake


def test_streams_handed_back_go_to_the_next_caller_of_their_device_once(runtime: FakeRuntime) -> None:
    first, second = cudart.new_stream(torch.device("cuda", 0)), cudart.new_stream(0)
    other_device = cudart.new_stream(torch.device("cuda", 1))
    assert [first.cuda_stream, second.cuda_stream, other_device.cuda_stream] == [1, 2, 3]
    cudart.release_stream(first)
    cudart.release_stream(first)  # twice: still one spare
    cudart.release_stream(other_device)
    again = cudart.new_stream(torch.device("cuda"))  # no index: the current device, 0
    assert (again.cuda_stream, again.device.index) == (1, 0)
    assert cudart.new_stream(0).cuda_stream == 4  # no spare left on device 0: a new one
    assert cudart.new_stream(1).cuda_stream == 3
    assert runtime.destroyed == 0


def test_a_stream_the_runtime_refuses_raises_naming_the_device(runtime: FakeRuntime) -> None:
    runtime.status = 2  # cudaErrorMemoryAllocation
    with pytest.raises(RuntimeError, match=r"cuda:0 failed: CUDA error 2"):
        cudart.new_stream(0)


def test_no_runtime_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cudart, "runtime", lambda: None)
    with pytest.raises(RuntimeError, match="no CUDA runtime"):
        cudart.new_stream(0)
