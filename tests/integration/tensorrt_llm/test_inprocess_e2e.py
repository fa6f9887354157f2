"""The in-process connector (preset ``lmcache``) end to end, driven by the executor replay."""

from __future__ import annotations

import logging
import re

import pytest
from support.e2e import (
    CHUNK,
    DEVICES,
    MODEL,
    TPB,
    assert_same_output,
    baseline,
    engine_stats,
    llm_args,
    prompt,
)

from lmcache.integration.tensorrt_llm.tensorrt_adapter import (
    LMCacheKvConnectorScheduler,
    LMCacheKvConnectorWorker,
    process_engine,
)
from lmcache.keys import ChunkHashes
from lmcache.testing.trtllm_replay import ReplayExecutor
from lmcache.transfer import BlockTransfer

LOOKUP_LINE = re.compile(r"LMCache TRT-LLM scheduler: req (\d+) .*lmcache_cached=(\d+) new_matched=(\d+)")
RETRIEVED_LINE = re.compile(r"Retrieved (\d+) out of (\d+) required tokens")


def seed_scenario(executor: ReplayExecutor, a: list[int], b: list[int], new_tokens: int):  # noqa: ANN201
    first = executor.generate([a], new_tokens)[0]
    executor.generate([b], new_tokens)
    third = executor.generate([a], new_tokens)[0]
    return first, third


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("tp", [1, 2])
def test_seed_verification_scenario(lmcache_env, caplog, overlap: bool, tp: int, device: str) -> None:
    """A (> 512 tokens), then B filling the small pool, then A again: LMCache must supply A."""
    caplog.set_level(logging.DEBUG, logger="lmcache")
    a, b = prompt(520, start=1), prompt(520, start=2)
    # The pool holds one 520-token request plus its generated tokens, not two: B evicts A.
    executor = ReplayExecutor(
        llm_args(tp=tp, max_tokens=640), MODEL, overlap_scheduler=overlap, device=device
    )
    first, third = seed_scenario(executor, a, b, 8)
    on_gpu, connector = third.num_device_matched_tokens, third.num_connector_matched_tokens
    assert connector > 0 and on_gpu + connector == 512  # B evicted A's tail from the GPU pool
    lookups = [tuple(map(int, m.groups())) for m in LOOKUP_LINE.finditer(caplog.text)]
    assert lookups[-1][1:] == (512, connector)  # lmcache_cached, new_matched: both non-zero
    loads = [tuple(map(int, m.groups())) for m in RETRIEVED_LINE.finditer(caplog.text)]
    assert loads[-tp:] == [(connector, 520 - on_gpu)] * tp  # one load per rank
    want = baseline([a], 8, device, tp=tp, max_tokens=640)[0]
    assert_same_output(first, want)
    assert_same_output(third, want)
    assert not [r for r in caplog.records if r.name.endswith("save_fence")]  # every save was released


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tp", [1, 2])
def test_multi_turn_hit_covers_the_answer(lmcache_env, tp: int, device: str) -> None:
    turn1 = prompt(100, start=3)
    first = ReplayExecutor(llm_args(tp=tp), MODEL, device=device).generate([turn1], 60)[0]
    turn2 = turn1 + first.tokens + prompt(30, start=4)
    # A new TRT-LLM instance (empty GPU pool), same process cache: only LMCache can supply the prefix.
    second = ReplayExecutor(llm_args(tp=tp), MODEL, device=device).generate([turn2], 5)[0]
    # KV exists for 100 prompt + 59 generated tokens: 2 full chunks beyond the prompt's first one.
    assert second.num_connector_matched_tokens == 128
    assert_same_output(second, baseline([turn2], 5, device, tp=tp)[0])


@pytest.mark.parametrize("device", DEVICES)
def test_chunked_prefill_saves_every_step_and_loads_back(lmcache_env, device: str) -> None:
    p = prompt(300, start=5)
    ReplayExecutor(llm_args(chunk=64), MODEL, device=device).generate([p], 4)
    assert engine_stats().stored_chunks >= 4
    again = ReplayExecutor(llm_args(chunk=64), MODEL, device=device).generate([p], 4)[0]
    assert again.num_connector_matched_tokens == 256
    assert_same_output(again, baseline([p], 4, device)[0])


@pytest.mark.parametrize("length", [CHUNK, 4 * CHUNK])
def test_prompt_of_exact_chunk_multiple_never_claims_last_token(lmcache_env, length: int) -> None:
    p = prompt(length, start=6)
    ReplayExecutor(llm_args(), MODEL).generate([p], 3)
    again = ReplayExecutor(llm_args(), MODEL).generate([p], 3)[0]
    assert again.num_connector_matched_tokens == length - TPB
    assert_same_output(again, baseline([p], 3)[0])


def test_device_match_longer_than_ours_loads_nothing(lmcache_env) -> None:
    p = prompt(300, start=7)
    executor = ReplayExecutor(llm_args(), MODEL)
    executor.generate([p], 3)
    engine = process_engine().engine
    keys = engine.chunk_spans(next(iter(process_engine().spaces.values())), 0, p, None)
    for span in keys[1:]:
        assert engine.l1.remove(span.key)
    loaded_before = engine.stats.retrieved_chunks
    again = executor.generate([p], 3)[0]
    assert again.num_device_matched_tokens == 288
    assert again.num_connector_matched_tokens == 0
    assert engine.stats.retrieved_chunks == loaded_before
    assert_same_output(again, baseline([p], 3)[0])


def test_cache_salt_isolates_tenants(lmcache_env) -> None:
    p = prompt(200, start=8)
    ReplayExecutor(llm_args(), MODEL).generate([p], 3, cache_salts=["tenant-a"])
    other = ReplayExecutor(llm_args(), MODEL).generate([p], 3, cache_salts=["tenant-b"])[0]
    assert other.num_connector_matched_tokens == 0
    same = ReplayExecutor(llm_args(), MODEL).generate([p], 3, cache_salts=["tenant-a"])[0]
    assert same.num_connector_matched_tokens == 192
    unsalted = ReplayExecutor(llm_args(), MODEL).generate([p], 3)[0]
    assert unsalted.num_connector_matched_tokens == 0


def test_l1_too_small_never_corrupts_output(lmcache_env) -> None:
    # Room for 3 chunks (4 blocks x 2 layers x 2 x (2 heads x 16 x 16) fp32 = 32 KiB each).
    lmcache_env.setenv("LMCACHE_MAX_LOCAL_CPU_SIZE", str(3 * 32 * 1024 / 2**30))
    from lmcache.integration.tensorrt_llm.tensorrt_adapter import reset_process_engine

    reset_process_engine()
    prompts = [prompt(200, start=s) for s in range(10, 16)]
    executor = ReplayExecutor(llm_args(max_tokens=512), MODEL)
    results = [executor.generate([p], 4)[0] for p in prompts + prompts[::-1]]
    assert engine_stats().stored_chunks > 3  # more than fit: evictions happened
    assert process_engine().engine.l1.evictions > 0
    wants = baseline(prompts, 4, max_tokens=512)
    for got, want in zip(results, wants + wants[::-1], strict=True):
        assert_same_output(got, want)


def test_async_loading_reports_through_get_finished(lmcache_env) -> None:
    lmcache_env.setenv("LMCACHE_ENABLE_ASYNC_LOADING", "true")
    p = prompt(200, start=20)
    ReplayExecutor(llm_args(), MODEL).generate([p], 4)
    again = ReplayExecutor(llm_args(), MODEL).generate([p], 4)[0]
    assert again.num_connector_matched_tokens == 192
    assert_same_output(again, baseline([p], 4)[0])


@pytest.mark.parametrize("overlap", [False, True])
def test_saves_in_flight_hold_the_request_until_reported(lmcache_env, overlap: bool) -> None:
    p = prompt(130, start=21)
    executor = ReplayExecutor(llm_args(), MODEL, overlap_scheduler=overlap)
    out = executor.generate([p], 70)[0]
    assert engine_stats().stored_chunks == 3  # 2 prompt chunks + 1 filled during decode
    turn2 = p + out.tokens
    again = ReplayExecutor(llm_args(), MODEL).generate([turn2], 2)[0]
    assert again.num_connector_matched_tokens == 192


def test_promised_load_that_fails_raises(lmcache_env, monkeypatch) -> None:
    p = prompt(200, start=22)
    ReplayExecutor(llm_args(), MODEL).generate([p], 2)
    engine = process_engine().engine
    monkeypatch.setattr(engine, "retrieve", lambda *a, **k: 64)
    with pytest.raises(RuntimeError, match="refusing to use unloaded KV blocks"):
        ReplayExecutor(llm_args(), MODEL).generate([p], 2)


@pytest.mark.parametrize("tp", [1, 2])
def test_a_save_that_fails_is_dropped_not_raised_in_get_finished(lmcache_env, caplog, tp: int) -> None:
    """A store raising in the saver thread (host memory gone, a bug) loses that save only: the
    request is still reported saved and its output is unchanged, instead of get_finished raising
    into TRT-LLM's executor loop (on one rank: the other ranks would wait in its all-gather)."""
    p = prompt(200, start=30)
    engine = process_engine().engine

    def broken_store(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("host memory gone")

    monkeypatch = lmcache_env
    monkeypatch.setattr(engine, "store", broken_store)
    executor = ReplayExecutor(llm_args(tp=tp), MODEL)
    out = executor.generate([p], 2)[0]
    assert_same_output(out, baseline([p], 2)[0])
    assert "a save failed and was dropped (RuntimeError: host memory gone)" in caplog.text
    assert executor.manager is not None and not executor.manager.has_pending_transfers


def test_hit_is_pinned_between_lookup_and_load(lmcache_env) -> None:
    """Flood the cache between the scheduler's lookup and the worker's load: the hit survives."""
    lmcache_env.setenv("LMCACHE_MAX_LOCAL_CPU_SIZE", str(4 * 32 * 1024 / 2**30))
    from lmcache.integration.tensorrt_llm.tensorrt_adapter import reset_process_engine

    reset_process_engine()
    p = prompt(200, start=23)
    ReplayExecutor(llm_args(), MODEL).generate([p], 2)
    engine = process_engine().engine
    original_lookup = engine.lookup_prompt  # what the scheduler's lookup calls

    def lookup_then_flood(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        found = original_lookup(*args, **kwargs)
        space = next(iter(process_engine().spaces.values()))
        pool = __import__("torch").zeros(16, *space.layout.row_shape)
        for i in range(6):
            engine.store(space, 0, pool, BlockTransfer(prompt(64, start=100 + i), None, [0, 1, 2, 3], 0, 64))
        return found

    engine.lookup_prompt = lookup_then_flood
    again = ReplayExecutor(llm_args(), MODEL).generate([p], 2)[0]
    assert again.num_connector_matched_tokens == 192
    assert engine.l1.evictions >= 5  # the flood churned through the one free slot, around the pins
    assert_same_output(again, baseline([p], 2)[0])


@pytest.mark.parametrize("tp", [1, 2])
def test_a_hit_is_hashed_once_and_loaded_by_its_hashes(lmcache_env, tp: int) -> None:
    """The scheduler's lookup hashes the prompt; every rank's load names the chunks by those hashes
    instead of hashing the tokens again (a load's first copy waits for no hashing)."""
    from lmcache.integration.tensorrt_llm.tensorrt_adapter import reset_process_engine

    reset_process_engine()
    p = prompt(200, start=29)
    ReplayExecutor(llm_args(tp=tp), MODEL).generate([p], 2)
    engine = process_engine().engine
    original_retrieve = engine.retrieve
    loaded_by: list[type] = []

    def recording_retrieve(space, rank, pool, transfer, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        loaded_by.append(type(transfer.prompt))
        return original_retrieve(space, rank, pool, transfer, *args, **kwargs)

    engine.retrieve = recording_retrieve
    again = ReplayExecutor(llm_args(tp=tp), MODEL).generate([p], 2)[0]
    assert again.num_connector_matched_tokens == 192
    assert loaded_by == [ChunkHashes] * tp
    assert_same_output(again, baseline([p], 2, tp=tp)[0])


def test_a_lookup_given_hashes_of_another_length_hashes_the_prompt_anew(lmcache_env) -> None:
    """Hashes that do not cover the prompt's full chunks are not this prompt's: the lookup hashes it
    again instead of failing inside TRT-LLM's scheduler."""
    from lmcache.integration.tensorrt_llm.engine_backend import EngineIndex
    from lmcache.integration.tensorrt_llm.plan import PinKey, Prompt
    from lmcache.integration.tensorrt_llm.tensorrt_adapter import reset_process_engine

    reset_process_engine()
    p = prompt(200, start=31)
    ReplayExecutor(llm_args(), MODEL).generate([p], 2)
    shared = process_engine()
    index = EngineIndex(shared)
    found = index.lookup(Prompt(p, None), PinKey("req", 1))
    assert found.hit == 192 and found.hashes is not None
    target, hashes = next(iter(found.hashes.items()))
    again = index.lookup(Prompt(p, None, found.hashes), PinKey("req", 2))
    assert again.hit == 192 and again.hashes is None  # by the hashes given: none computed
    short = ChunkHashes(hashes.hashes[:1], hashes.chunk_size)
    anew = index.lookup(Prompt(p, None, {target: short}), PinKey("req", 3))
    assert anew.hit == 192 and anew.hashes is not None and anew.hashes[target].hashes == hashes.hashes
    for request in (1, 2, 3):
        index.release(PinKey("req", request))
    assert shared.engine.l1.pinned_keys() == []


def test_bad_configs_are_refused_at_construction(lmcache_env) -> None:
    lmcache_env.setenv("LMCACHE_CHUNK_SIZE", "40")
    from lmcache.integration.tensorrt_llm.tensorrt_adapter import reset_process_engine

    reset_process_engine()
    with pytest.raises(ValueError, match="not a multiple of TRT-LLM's kv_cache_config.tokens_per_block=16"):
        LMCacheKvConnectorWorker(llm_args())
    lmcache_env.setenv("LMCACHE_CHUNK_SIZE", "64")
    reset_process_engine()
    args = llm_args()
    args.pipeline_parallel_size = 2
    with pytest.raises(ValueError, match="pipeline parallelism"):
        LMCacheKvConnectorScheduler(args)
    lmcache_env.setenv("LMCACHE_CACHE_POLICY", "MRU")
    reset_process_engine()
    with pytest.raises(ValueError, match="cache_policy"):
        LMCacheKvConnectorScheduler(llm_args())


def test_layer_group_forms_register_every_group_and_region(lmcache_env) -> None:
    import torch

    scheduler = LMCacheKvConnectorScheduler(llm_args())
    worker = LMCacheKvConnectorWorker(llm_args())

    class Region:
        def __init__(self, pool):  # noqa: ANN001
            self.pool, self.buffers = pool, ()

        def as_tensor(self, dtype):  # noqa: ANN001, ANN201
            return self.pool.view(dtype).view(self.pool.shape[0], -1)

    class Group:
        def __init__(self, gid, pool, window=None):  # noqa: ANN001
            self.layer_group_id, self.window_size, self.regions = gid, window, [Region(pool)]

    class Layout:
        def __init__(self, *groups):  # noqa: ANN002
            self.groups = groups

        def as_single_pool_tensor(self):  # noqa: ANN201
            return self.groups[0].regions[0].pool if len(self.groups) == 1 else None

    worker.register_kv_cache_layout(Layout(Group(0, torch.zeros(8, 2, 2, 4 * TPB))))
    assert process_engine().spaces[0].layout.num_blocks == 8  # one group: keyed like a V1 pool
    worker.register_kv_cache_layout(
        Layout(Group(0, torch.zeros(8, 1, 2, 4 * TPB)), Group(1, torch.zeros(6, 1, 2, 4 * TPB), window=64))
    )
    pools = process_engine().pools[0]
    assert [p.pool.target for p in pools] == [(0, 0), (1, 0)]
    assert [p.space.layout.num_blocks for p in pools] == [8, 6]
    assert pools[0].space.model_name != pools[1].space.model_name  # each group keyed apart
    assert [p.pool.window for p in pools] == [None, 64]

    class Request:
        request_id = 5
        prompt_len = 100

        def get_tokens(self, beam: int) -> list[int]:
            return prompt(100)

    scheduler.get_num_new_matched_tokens(Request(), 0)
    scheduler.update_state_after_alloc_by_layer_group(Request(), [[0, 1, -1], [2, 3, -1]])
    assert scheduler.request_finished_by_layer_group(Request(), [[0, 1], [2, 3]]) is False


def test_lookups_that_mostly_hit_stop_probing_the_first_chunk(lmcache_env) -> None:
    """While lookups mostly miss, each asks about the prompt's first chunk alone first (a miss then
    costs one chunk's hash); once they mostly hit, that question would be asked twice per hit, and the
    lookup hashes the whole prompt at once (``miss_probe``)."""
    from lmcache.integration.tensorrt_llm.engine_backend import EngineIndex
    from lmcache.integration.tensorrt_llm.plan import PinKey, Prompt
    from lmcache.integration.tensorrt_llm.tensorrt_adapter import reset_process_engine

    reset_process_engine()
    p = prompt(200, start=37)
    ReplayExecutor(llm_args(), MODEL).generate([p], 2)
    engine = process_engine().engine
    original_lookup = engine.lookup_prompt
    probed: list[bool] = []

    def recording_lookup(*args, probe_first: bool, **kwargs):  # noqa: ANN002, ANN003, ANN202
        probed.append(probe_first)
        return original_lookup(*args, probe_first=probe_first, **kwargs)

    engine.lookup_prompt = recording_lookup
    index = EngineIndex(process_engine())
    hits = [index.lookup(Prompt(p, None), PinKey("req", i)).hit for i in range(40)]
    assert hits == [192] * 40
    assert probed[0] and not probed[-1]
    misses = [
        index.lookup(Prompt(prompt(200, start=100 + i), None), PinKey("req", 100 + i)) for i in range(40)
    ]
    assert [found.hit for found in misses] == [0] * 40
    assert not probed[40] and probed[-1]  # a run of misses turns the probe back on
    assert misses[0].hashes is not None and misses[-1].hashes is None  # the probe's miss hashes no more
    for i in range(40):
        index.release(PinKey("req", i))
