"""The in-process connector over the executor replay with an L1 too small for the working set:
hits served from the disk tier, then from Redis, outputs equal to a run with no connector."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.e2e import MODEL, assert_same_output, baseline, llm_args, prompt

from lmcache.integration.tensorrt_llm.tensorrt_adapter import process_engine, reset_process_engine
from lmcache.testing.trtllm_replay import ReplayExecutor

CHUNK_BYTES = 32 * 1024  # 4 blocks x 2 layers x K/V x (2 heads x 16 tokens x 16 dims) x fp32


def small_l1(env: pytest.MonkeyPatch, chunks: int) -> None:
    env.setenv("LMCACHE_MAX_LOCAL_CPU_SIZE", str(chunks * CHUNK_BYTES / 2**30))
    # The write-behind queue defaults to a quarter of L1: too little for one 8-chunk prompt here.
    env.setenv("LMCACHE_EXTRA_CONFIG", f'{{"tier_write_queue_bytes": {chunks * CHUNK_BYTES}}}')


def generate_and_flush(executor: ReplayExecutor, p: list[int], new_tokens: int):  # noqa: ANN201
    out = executor.generate([p], new_tokens)[0]
    tiers = process_engine().engine.tiers
    assert tiers is not None and tiers.flush()
    return out


def run_seed_and_multi_turn() -> None:
    engine = process_engine().engine
    a, b = prompt(520, start=1), prompt(520, start=2)
    executor = ReplayExecutor(llm_args(max_tokens=640), MODEL)
    generate_and_flush(executor, a, 8)
    generate_and_flush(executor, b, 8)  # evicts A from the GPU pool and most of A from L1
    third = generate_and_flush(executor, a, 8)
    assert third.num_connector_matched_tokens > 0
    assert third.num_device_matched_tokens + third.num_connector_matched_tokens == 512
    assert_same_output(third, baseline([a], 8, max_tokens=640)[0])

    turn1 = prompt(100, start=3)
    first = generate_and_flush(ReplayExecutor(llm_args(), MODEL), turn1, 60)
    for i in range(4):  # push turn 1 out of the small L1
        generate_and_flush(ReplayExecutor(llm_args(), MODEL), prompt(260, start=40 + i), 2)
    turn2 = turn1 + first.tokens + prompt(30, start=4)
    second = ReplayExecutor(llm_args(), MODEL).generate([turn2], 5)[0]
    assert second.num_connector_matched_tokens == 128
    assert_same_output(second, baseline([turn2], 5)[0])
    assert engine.l1.evictions > 0


def test_seed_and_multi_turn_served_from_disk(lmcache_env, tmp_path: Path) -> None:
    small_l1(lmcache_env, 10)
    lmcache_env.setenv("LMCACHE_LOCAL_DISK", f"file://{tmp_path}/l2")
    lmcache_env.setenv("LMCACHE_MAX_LOCAL_DISK_SIZE", "0.1")
    reset_process_engine()
    run_seed_and_multi_turn()
    assert process_engine().engine.snapshot().tier("disk").hits > 0


def test_seed_and_multi_turn_served_from_redis(lmcache_env, redis_server) -> None:
    small_l1(lmcache_env, 10)
    lmcache_env.setenv("LMCACHE_REMOTE_URL", redis_server.url)
    reset_process_engine()
    run_seed_and_multi_turn()
    assert process_engine().engine.snapshot().tier("remote").hits > 0


def test_redis_killed_mid_run_output_unchanged_and_hits_return(lmcache_env, own_redis) -> None:
    server = own_redis()
    small_l1(lmcache_env, 10)
    lmcache_env.setenv("LMCACHE_REMOTE_URL", server.url)
    reset_process_engine()
    p = prompt(300, start=9)
    generate_and_flush(ReplayExecutor(llm_args(), MODEL), p, 3)
    server.kill()
    others = [prompt(300, start=50 + i) for i in range(3)]
    for q, want in zip(others, baseline(others, 3), strict=True):
        assert_same_output(ReplayExecutor(llm_args(), MODEL).generate([q], 3)[0], want)
    server.start()
    process_engine().engine.l1.clear()
    q = prompt(300, start=60)
    for _ in range(50):  # the tier comes back after its backoff; store until a write lands
        generate_and_flush(ReplayExecutor(llm_args(), MODEL), q, 3)
        process_engine().engine.l1.clear()
        again = ReplayExecutor(llm_args(), MODEL).generate([q], 3)[0]
        if again.num_connector_matched_tokens:
            break
    assert again.num_connector_matched_tokens == 256
    assert_same_output(again, baseline([q], 3)[0])
