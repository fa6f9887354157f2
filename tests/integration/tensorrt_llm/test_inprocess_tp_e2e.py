"""In-process mode under tensor parallelism, each rank in a process of its own as TRT-LLM runs it: its
own engine and L1. Once L1 evicts, the ranks' L1s drift apart and a rank can lack a chunk rank 0
promised (docs/in-process.md): that load must fail loudly, and every request that completes must be
bit-equal to a run without a connector."""

from __future__ import annotations

import logging
import random

import pytest
from support.e2e import MODEL, assert_same_output, mode_args, prompt
from support.presets import Preset

from lmcache.integration.tensorrt_llm.planner import PromisedLoadError
from lmcache.testing.trtllm_replay import GenerationResult, LocalRanks, ReplayExecutor

TP = 2


def test_ranks_with_their_own_l1_fail_loudly_never_with_wrong_kv(
    lmcache_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    lmcache_env.setenv("LMCACHE_MAX_LOCAL_CPU_SIZE", "0.0005")  # 32 chunks a rank: 29 prompts evict
    with caplog.at_level(logging.WARNING, logger="lmcache"):
        executor = ReplayExecutor(
            mode_args(Preset("lmcache"), "v1", tp=TP, max_tokens=1024),
            MODEL,
            ranks=LocalRanks(TP, separate_processes=True),
        )
    assert "in-process mode with tensor_parallel_size=2" in caplog.text
    prompts = [prompt(200, start=s) for s in range(1, 30)]
    want: dict[int, GenerationResult] = {}
    rng = random.Random(0)
    hits = 0
    for _ in range(40):
        batch = [rng.randrange(len(prompts)) for _ in range(4)]
        try:
            results = executor.generate([prompts[i] for i in batch], 2)
        except PromisedLoadError as exc:
            assert "refusing to use unloaded KV blocks" in str(exc)
            break
        for i, got in zip(batch, results, strict=True):
            if i not in want:
                want[i] = ReplayExecutor(mode_args(None, "v1", tp=TP), MODEL).generate([prompts[i]], 2)[0]
            assert_same_output(got, want[i])
            hits += got.num_connector_matched_tokens > 0
    assert hits > 0
