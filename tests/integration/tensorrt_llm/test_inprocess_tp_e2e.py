"""In-process mode under tensor parallelism, each rank in a process of its own as TRT-LLM runs it: its
own engine and L1. Rank 0 promises hits from its own L1, so every rank's L1 must drop exactly what
rank 0's drops (:mod:`lmcache.integration.tensorrt_llm.tp_evictions`): with L1 full and evicting,
every promised load lands on every rank and every output is bit-equal to a run without a connector.
Without the followers dropping what rank 0 dropped, this run fails a promised load within a few
batches (each follower's L1 then evicts by its own recency)."""

from __future__ import annotations

import random
import threading
from typing import Any

import pytest
from support.e2e import MODEL, assert_same_output, mode_args, prompt
from support.presets import Preset

from lmcache.integration.tensorrt_llm.tensorrt_adapter import process_engine
from lmcache.testing.trtllm_replay import GenerationResult, LocalRanks, ReplayExecutor

TP = 2


@pytest.mark.parametrize(
    ("mode", "device"), [("v1", "cpu"), ("v2", "cpu"), pytest.param("v1", "cuda", marks=pytest.mark.gpu)]
)
def test_every_rank_keeps_what_rank_0_promises(
    lmcache_env: pytest.MonkeyPatch, mode: str, device: str
) -> None:
    lmcache_env.setenv("LMCACHE_MAX_LOCAL_CPU_SIZE", "0.0005")  # 32 chunks a rank: 29 prompts evict
    ranks = LocalRanks(TP, separate_processes=True)
    # One prompt per iteration: a follower's headroom (two iterations of saves) is far below L1.
    executor = ReplayExecutor(
        mode_args(Preset("lmcache"), mode, tp=TP, max_tokens=1024, max_num_tokens=256),
        MODEL,
        device=device,
        ranks=ranks,
    )
    prompts = [prompt(200, start=s) for s in range(1, 30)]
    want: dict[int, GenerationResult] = {}
    rng = random.Random(0)
    hits = 0
    for _ in range(40):
        batch = [rng.randrange(len(prompts)) for _ in range(4)]
        for i, got in zip(batch, executor.generate([prompts[i] for i in batch], 2), strict=True):
            if i not in want:
                cold = ReplayExecutor(mode_args(None, mode, tp=TP), MODEL, device=device)
                want[i] = cold.generate([prompts[i]], 2)[0]
            assert_same_output(got, want[i])
            hits += got.num_connector_matched_tokens > 0
    assert hits > 0
    with ranks.acting_as(1):
        follower = process_engine().follower
    assert follower is not None and follower.drifted == 0
    with ranks.acting_as(0):
        assert process_engine().engine.l1.evictions > 0


def test_a_follower_whose_saves_lag_loads_once_they_land(
    lmcache_env: pytest.MonkeyPatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rank 0 promises a prompt its own saver stored while rank 1's saver has not stored it yet: rank 1's
    load waits for the saves handed to it before, then loads; it neither fails nor loads less. (V2: V1
    reuses the first request's blocks itself, held until every rank's save lands.)"""
    mode = "v2"
    ranks = LocalRanks(TP, separate_processes=True)
    executor = ReplayExecutor(
        mode_args(Preset("lmcache"), mode, tp=TP, max_tokens=1024, max_num_tokens=256),
        MODEL,
        device="cpu",
        ranks=ranks,
    )
    with ranks.acting_as(0):
        leader = process_engine().engine
    with ranks.acting_as(1):
        follower = process_engine().engine
    leader_stored, follower_may_store = threading.Event(), threading.Event()
    short_loads: list[int] = []

    def leader_store(*args: object, **kwargs: object) -> int:
        stored = leader_store.original(*args, **kwargs)
        leader_stored.set()
        return stored

    def follower_store(*args: object, **kwargs: object) -> int:
        follower_may_store.wait(timeout=30)  # until rank 1's load found the chunk missing
        return follower_store.original(*args, **kwargs)

    def follower_retrieve(
        space: object, rank: int, pool: object, transfer: Any, *a: object, **kw: object
    ) -> int:
        loaded = follower_retrieve.original(space, rank, pool, transfer, *a, **kw)
        if loaded < transfer.end - transfer.start:
            short_loads.append(loaded)
            follower_may_store.set()
        return loaded

    for engine, name, wrapper in (
        (leader, "store", leader_store),
        (follower, "store", follower_store),
        (follower, "retrieve", follower_retrieve),
    ):
        wrapper.original = getattr(engine, name)
        monkeypatch.setattr(engine, name, wrapper)

    def hold_until_rank_0_stored(ex: ReplayExecutor) -> None:
        if ex.stats.iterations > 1:  # the first prompt's save was handed over: rank 0's lands first
            assert leader_stored.wait(timeout=30)

    executor.on_iteration = hold_until_rank_0_stored
    first, other = prompt(200, start=1), prompt(200, start=2)
    got = executor.generate([first, other, first], 2)
    assert short_loads, "rank 1's saver did not lag: the case was not exercised"
    assert got[2].num_connector_matched_tokens > 0
    want = ReplayExecutor(mode_args(None, mode, tp=TP), MODEL, device="cpu").generate([first], 2)[0]
    assert_same_output(got[2], want)
