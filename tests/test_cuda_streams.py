"""Our CUDA streams are streams of their own, never one of PyTorch's pool (benchmarks/RESULTS.md, D64).

``torch.cuda.Stream()`` hands out 32 streams per device in turn; had our load stream been the 33rd
stream after one that waits for a forward, the load would have waited for that forward.
"""

import pytest
import torch

from lmcache import c_ops, cudart
from lmcache.chunk_copy import CopyStreams
from lmcache.integration.tensorrt_llm.save_queue import SaveQueue

pytestmark = pytest.mark.gpu

COPY_BYTES = 4 << 20


def our_streams(pool: torch.Tensor) -> dict[str, torch.cuda.Stream]:
    """Every stream the connector copies on, for ``pool``'s device."""
    copy_streams = CopyStreams.for_pool(pool)
    assert copy_streams is not None
    return {
        "store": copy_streams.store,
        "load": copy_streams.load,
        "save queue": SaveQueue(pool.device, "lmcache-test-save").stream,
        "lane": c_ops.lane_stream(pool.device),
        "gather": c_ops.side_stream(pool.device, "gather"),
        "scatter": c_ops.side_stream(pool.device, "scatter"),
    }


def test_our_streams_are_none_of_torchs_pool_nor_each_other() -> None:
    pool = torch.empty(1, device="cuda")
    ours = our_streams(pool)
    handles = {name: stream.cuda_stream for name, stream in ours.items()}
    assert len(set(handles.values())) == len(handles), handles
    torchs = {torch.cuda.Stream().cuda_stream for _ in range(64)}  # the whole pool, twice round
    assert not torchs & set(handles.values())


def forward_products(ms: float) -> tuple[torch.Tensor, int]:
    """A matrix and how many products of it keep the device busy about ``ms``."""
    a = torch.randn(2048, 2048, device="cuda")
    torch.mm(a, a)
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(10):
        torch.mm(a, a)
    end.record()
    end.synchronize()
    return a, max(1, round(ms / (begin.elapsed_time(end) / 10)))


@pytest.mark.parametrize("taken_before", range(40))
def test_a_load_never_waits_for_a_forward_whatever_streams_were_taken_before(taken_before: int) -> None:
    """With ``taken_before`` pool streams taken first (TRT-LLM's, earlier tests'), a forward on a pool
    stream, the save-side streams waiting for it, and loads on the load-side streams: every load ends
    before the forward does."""
    a, products = forward_products(30.0)
    for _ in range(taken_before):
        torch.cuda.Stream()
    pool = torch.empty(COPY_BYTES, dtype=torch.uint8, device="cuda")
    host = torch.empty(COPY_BYTES, dtype=torch.uint8, pin_memory=True)
    ours = our_streams(pool)
    forward = torch.cuda.Stream()
    with torch.cuda.stream(forward):
        for _ in range(products):
            torch.mm(a, a)
        forward_done = torch.cuda.Event(enable_timing=True)
        forward_done.record()
    for name in ("store", "save queue", "lane", "gather"):
        ours[name].wait_event(forward_done)
        with torch.cuda.stream(ours[name]):
            host.copy_(pool, non_blocking=True)
    loaded = {}
    for name in ("load", "scatter"):
        with torch.cuda.stream(ours[name]):
            pool.copy_(host, non_blocking=True)
            loaded[name] = torch.cuda.Event(enable_timing=True)
            loaded[name].record()
    torch.cuda.synchronize()
    late = [name for name, event in loaded.items() if forward_done.elapsed_time(event) > 0]
    assert not late, f"loads on {late} ended after a forward they do not depend on"


def test_a_stream_handed_back_goes_to_the_next_caller_and_stays_usable() -> None:
    """A stream of ours handed back is never destroyed: pinned memory copied on it can still be freed
    (the allocator records an event on it then), and the next stream asked for is that one."""
    device = torch.empty(COPY_BYTES, dtype=torch.uint8, device="cuda").fill_(3)
    host = torch.zeros(COPY_BYTES, dtype=torch.uint8, pin_memory=True)
    stream = cudart.new_stream(device.device)
    with torch.cuda.stream(stream):
        host.copy_(device, non_blocking=True)
    handle = stream.cuda_stream
    cudart.release_stream(stream)
    cudart.release_stream(stream)  # twice: still handed out once
    del stream, host  # the pinned block's free records an event on the stream it was copied on
    torch.cuda.synchronize()
    again, other = cudart.new_stream(device.device), cudart.new_stream(device.device)
    assert again.cuda_stream == handle != other.cuda_stream
    with torch.cuda.stream(again):
        device.fill_(5)
    again.synchronize()
    assert int(device.max()) == 5
