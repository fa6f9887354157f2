"""The replay's pools come from the allocator it is given (GPU tests pass KVCacheManagerV2-like memory)."""

from __future__ import annotations

import dataclasses

import torch
from support.e2e import MODEL, TPB, assert_same_output, prompt

from lmcache.testing.trtllm_replay import ReplayExecutor, llm_args_for, zeros_pool

SLIDING_AND_FULL = dataclasses.replace(MODEL, layer_windows=(64, None))


def test_every_layer_group_pool_comes_from_the_allocator() -> None:
    made: list[tuple[tuple[int, ...], torch.dtype, torch.Tensor]] = []

    def allocate(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        tensor = zeros_pool(shape, dtype, device)
        made.append((shape, dtype, tensor))
        return tensor

    args = llm_args_for("v2", tokens_per_block=TPB, max_tokens=512)
    executor = ReplayExecutor(args, SLIDING_AND_FULL, pool_allocator=allocate)
    pools = [group_pool.tensors[0] for group_pool in executor.pools.pools]
    assert len(pools) == 2
    assert len(made) == 2 and all(a is b for (_, _, a), b in zip(made, pools, strict=True))
    assert all(shape == tuple(t.shape) and dtype == SLIDING_AND_FULL.dtype for shape, dtype, t in made)
    p = prompt(100, start=3)
    got = executor.generate([p], 3)[0]
    want = ReplayExecutor(args, SLIDING_AND_FULL).generate([p], 3)[0]
    assert_same_output(got, want)
