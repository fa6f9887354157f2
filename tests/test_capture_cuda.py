"""L1 page-locked in the background while another thread captures CUDA graphs, as TRT-LLM's warm-up
captures its graphs (PyTorch's default global capture mode) right after the connector is set up."""

from __future__ import annotations

import pytest
import torch

from lmcache.memory import HostArena

pytestmark = pytest.mark.gpu


def test_background_page_locking_leaves_a_global_capture_in_another_thread_intact() -> None:
    x = torch.randn(1024, 1024, device="cuda")
    want = x @ x @ x
    arena = HostArena(4 << 30, pinned=True, slab_bytes=64 << 20)  # 64 page-locking calls
    arena.prepin()
    captures = overlapped = 0
    while arena.prepinning or captures < 3:
        overlapped += arena.prepinning
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # capture_error_mode="global", as TRT-LLM's runners capture
            got = x @ x @ x
        graph.replay()
        torch.cuda.synchronize()
        assert torch.allclose(got, want, rtol=1e-3, atol=1e-2)  # the graph ran (cuBLAS may differ bitwise)
        captures += 1
    assert arena.wait_prepinned(60)
    assert arena.spare_bytes == 4 << 30  # every slab page-locked: none refused during a capture
    assert overlapped >= 1  # captured while L1 was being page-locked
