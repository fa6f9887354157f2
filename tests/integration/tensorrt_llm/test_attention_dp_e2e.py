"""Attention DP (TRT-LLM R-new): every rank runs its own connector scheduler and worker for its own
requests and holds their whole KV. Chunks are keyed alike on every rank, so one rank's saves are found
by every other rank through a cache server, and by an engine without attention DP of the same shape;
in-process each rank is its own process with its own L1. Outputs bit-equal to a run without a
connector, nothing left pinned."""

from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from storage.redis_servers import RedisServer
from support.e2e import DEVICES, MODEL, VSWA, assert_same_output, mode_args, prompt
from support.presets import Preset

from lmcache.config import LMCacheEngineConfig
from lmcache.integration.tensorrt_llm import _trtllm
from lmcache.integration.tensorrt_llm.settings import ConnectorSettings
from lmcache.integration.tensorrt_llm.tensorrt_adapter import (
    LMCacheKvConnectorScheduler,
    LMCacheKvConnectorWorker,
    process_engine,
    reset_process_engine,
)
from lmcache.testing.trtllm_replay import (
    KV_MANAGER_MODES,
    AttentionDPOwner,
    ModelConfig,
    ReplayExecutor,
    TorchLlmArgs,
)

OWNERS = 2


def adp_args(preset: Preset | None, mode: str, **kw: object) -> TorchLlmArgs:
    return dataclasses.replace(mode_args(preset, mode, tp=OWNERS, **kw), enable_attention_dp=True)


def owners(preset: Preset, mode: str, device: str = "cpu") -> list[ReplayExecutor]:
    """One executor per attention-DP rank; each device pool holds one 200-token request, not two."""
    return [
        ReplayExecutor(
            adp_args(preset, mode, max_tokens=256), MODEL, device=device, ranks=AttentionDPOwner(rank, OWNERS)
        )
        for rank in range(OWNERS)
    ]


def reference(tokens: list[int], new_tokens: int, device: str = "cpu") -> object:
    """A rank under attention DP computes with every head, as one rank without TP does."""
    return ReplayExecutor(mode_args(None, "v1"), MODEL, device=device).generate([tokens], new_tokens)[0]


def finish(preset: Preset, executor: ReplayExecutor) -> None:
    """Nothing pinned or reserved is left. Asked through the rank's own connection, after its saves'
    one-way reports: the server has read them when it answers, so another process's lookup finds
    their chunks (before that it may miss them: a recompute, never wrong KV; see server.presence)."""
    assert executor.scheduler.planner.reservation_ids() == []
    assert executor.scheduler.planner.pending_requests() == []
    with executor.ranks.acting_as(0):  # the rank's own process: its engine, its server connection
        assert preset.pinned() == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", list(KV_MANAGER_MODES))
def test_ranks_share_chunks_through_the_server(preset: Preset, mode: str, device: str) -> None:
    """Rank 0 computes A; rank 1 then gets A from the cache server (in-process: from nothing, its own
    process's L1 is empty); rank 0 gets A back from the connector once B evicted it on its device."""
    a, b = prompt(200, start=1), prompt(200, start=2)
    rank0, rank1 = owners(preset, mode, device)
    first = rank0.generate([a], 8)[0]
    finish(preset, rank0)
    other = rank1.generate([a], 8)[0]
    rank0.generate([b], 8)
    again = rank0.generate([a], 8)[0]
    want = reference(a, 8, device)
    for got in (first, other, again):
        assert_same_output(got, want)
    assert again.num_connector_matched_tokens > 0
    assert again.num_device_matched_tokens + again.num_connector_matched_tokens == 192
    assert other.num_connector_matched_tokens == (192 if preset.server_url is not None else 0)
    for executor in (rank0, rank1):
        finish(preset, executor)


@pytest.mark.parametrize("mode", ["v1", "v2-res"])
def test_a_rank_finds_what_an_engine_without_attention_dp_saved(preset: Preset, mode: str) -> None:
    """Keys name no rank under attention DP: a TP=1 engine of the same shape shares them."""
    if preset.server_url is None:
        pytest.skip("in-process, an engine and a rank are separate processes: nothing shared in L1")
    a = prompt(200, start=5)
    plain = ReplayExecutor(mode_args(preset, mode), MODEL).generate([a], 8)[0]
    assert preset.pinned() == 0  # through the engine's connection: its saves' reports are read
    rank1 = owners(preset, mode)[1]
    got = rank1.generate([a], 8)[0]
    assert got.num_connector_matched_tokens == 192
    assert_same_output(got, plain)
    finish(preset, rank1)


def test_settings_key_every_rank_alike() -> None:
    config = LMCacheEngineConfig(chunk_size=64)
    adp = ConnectorSettings.from_llm_args(adp_args(None, "v1"), config)
    assert (adp.attention_dp, adp.world_size, adp.shard_rank(1)) == (True, 1, 0)
    tp = ConnectorSettings.from_llm_args(mode_args(None, "v1", tp=OWNERS), config)
    assert (tp.attention_dp, tp.world_size, tp.shard_rank(1)) == (False, OWNERS, 1)


def test_a_trtllm_without_per_rank_schedulers_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before R-new, TRT-LLM broadcast rank 0's scheduler answers to ranks holding other requests."""
    monkeypatch.setattr(_trtllm, "ATTENTION_DP_API", False)
    with pytest.raises(ValueError, match="enable_attention_dp"):
        ConnectorSettings.from_llm_args(adp_args(None, "v1"), LMCacheEngineConfig(chunk_size=64))


def test_the_replay_refuses_a_connector_that_does_not_opt_in(lmcache_env: pytest.MonkeyPatch) -> None:
    """As TRT-LLM's manager does: both classes must declare ``supports_attention_dp``."""

    class NotOwnerLocal(LMCacheKvConnectorWorker):
        supports_attention_dp = False

    with pytest.raises(NotImplementedError, match="supports_attention_dp"):
        ReplayExecutor(
            adp_args(None, "v1"),
            MODEL,
            ranks=AttentionDPOwner(0, OWNERS),
            connector=(LMCacheKvConnectorScheduler, NotOwnerLocal),
        )
    with pytest.raises(ValueError, match="AttentionDPOwner"):
        ReplayExecutor(adp_args(None, "v1"), MODEL)


# ---- more of R-new's attention DP: sliding windows, chunked prefill, overlap, ranks at once, tiers -----


def one_rank(preset: Preset, mode: str, rank: int, model: ModelConfig = MODEL, **kw: Any) -> ReplayExecutor:
    """An executor of attention-DP rank ``rank`` of ``OWNERS`` (``kw``: ``chunk``, ``max_tokens``,
    the executor's own arguments)."""
    chunk = kw.pop("chunk", None)
    args = adp_args(preset, mode, max_tokens=kw.pop("max_tokens", 2048), chunk=chunk)
    return ReplayExecutor(args, model, ranks=AttentionDPOwner(rank, OWNERS), **kw)


def finder_of(preset: Preset, mode: str, **kw: Any) -> ReplayExecutor:
    """A fresh executor (a cold device pool) that should find what rank 0 saved: rank 1 through a
    cache server; in-process, where rank 1 is another process with its own L1, another executor of
    rank 0's process."""
    return one_rank(preset, mode, 0 if preset.server_url is None else 1, **kw)


@pytest.mark.parametrize("mode", ["v2", "v2-res"])
def test_sliding_window_model_under_attention_dp(preset: Preset, mode: str) -> None:
    """VSWA (two layer groups, a window's passed pages -1) under V2: one rank's saves of every group
    serve another rank (or, in-process, the same one: a sliding group leaves no device reuse)."""
    p = prompt(200, start=21)
    rank0 = one_rank(preset, mode, 0, VSWA)
    first = rank0.generate([p], 6)[0]
    finish(preset, rank0)
    finder = finder_of(preset, mode, model=VSWA)
    got = finder.generate([p], 6)[0]
    assert got.num_connector_matched_tokens == 192
    want = ReplayExecutor(mode_args(None, mode), VSWA).generate([p], 6)[0]
    for result in (first, got):
        assert_same_output(result, want)
    finish(preset, finder)


@pytest.mark.parametrize("mode", list(KV_MANAGER_MODES))
def test_chunked_prefill_and_overlap_under_attention_dp(preset: Preset, mode: str) -> None:
    """Chunked prefill and the overlap scheduler (``request_finished`` one iteration late, after which
    R-new drops the request's deltas): every chunk and the answer are saved once, so the next turn,
    on another rank, hits past the first turn's prompt."""
    turn1 = prompt(150, start=22)
    rank0 = one_rank(preset, mode, 0, chunk=64, overlap_scheduler=True)
    first = rank0.generate([turn1], 60)[0]
    finish(preset, rank0)
    turn2 = turn1 + first.tokens + prompt(30, start=23)
    finder = finder_of(preset, mode, chunk=64, overlap_scheduler=True)
    second = finder.generate([turn2], 6)[0]
    assert second.num_connector_matched_tokens > len(turn1)
    assert_same_output(first, reference(turn1, 60))
    assert_same_output(second, reference(turn2, 6))
    finish(preset, finder)


class Lockstep:
    """Attention-DP ranks step together, as TRT-LLM's do: each rank's iteration starts once every rank
    still running reached it (a rank that is done leaves)."""

    def __init__(self, ranks: int) -> None:
        self._running = ranks
        self._arrived = 0
        self._step = 0
        self._cond = threading.Condition()

    def arrive(self, _executor: ReplayExecutor) -> None:
        with self._cond:
            step = self._step
            self._arrived += 1
            self._advance()
            if not self._cond.wait_for(lambda: self._step != step, timeout=120):
                raise RuntimeError("an attention-DP rank never reached its next iteration")

    def leave(self) -> None:
        with self._cond:
            self._running -= 1
            self._advance()

    def _advance(self) -> None:
        if self._running and self._arrived >= self._running:
            self._arrived = 0
            self._step += 1
            self._cond.notify_all()


def run_at_once(executors: list[ReplayExecutor], prompts: list[list[int]], new_tokens: int) -> list[Any]:
    """Each rank generates its prompt in a thread of its own, iterations in lockstep."""
    lockstep = Lockstep(len(executors))

    def run(executor: ReplayExecutor, p: list[int]) -> Any:
        executor.on_iteration = lockstep.arrive
        try:
            return executor.generate([p], new_tokens)[0]
        finally:
            lockstep.leave()

    with ThreadPoolExecutor(len(executors)) as pool:
        futures = [pool.submit(run, e, p) for e, p in zip(executors, prompts, strict=True)]
        return [f.result() for f in futures]


@pytest.mark.parametrize("mode", list(KV_MANAGER_MODES))
def test_ranks_computing_one_prefix_at_once(preset: Preset, mode: str) -> None:
    """Two ranks prefill prompts sharing a prefix in the same iterations, so both save the same chunks
    (keyed alike) at once; each output is right and a later engine finds the prefix whole."""
    shared = prompt(192, start=24)
    prompts = [shared + prompt(8, start=25), shared + prompt(40, start=26)]
    ranks = [one_rank(preset, mode, rank) for rank in range(OWNERS)]
    got = run_at_once(ranks, prompts, 6)
    for result, p in zip(got, prompts, strict=True):
        assert_same_output(result, reference(p, 6))
    for executor in ranks:
        finish(preset, executor)
    if preset.server_url is None:
        return  # in-process the ranks share nothing: each process's L1 holds its own saves
    for p in prompts:  # an engine of neither rank finds the prefix both ranks saved at once
        again = ReplayExecutor(mode_args(preset, mode), MODEL).generate([p], 6)[0]
        assert again.num_connector_matched_tokens == 192
        assert_same_output(again, reference(p, 6))


def test_in_process_ranks_share_chunks_through_redis(lmcache_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """In-process each rank is a process with its own L1; a Redis tier is what they share. Rank 1's
    lookup asks for the chunks rank 0 saved there: keyed as world 1 rank 0 on both (not by MPI rank)."""
    try:
        redis = RedisServer(tmp_path / "redis").start()
    except RuntimeError as exc:  # no redis-server: the Redis tier tests fail with the install hint
        pytest.fail(str(exc), pytrace=False)
    try:
        lmcache_env.setenv("LMCACHE_REMOTE_URL", redis.url)
        reset_process_engine()
        preset = Preset("lmcache")
        a, b = prompt(200, start=27), prompt(200, start=28)
        rank0, rank1 = one_rank(preset, "v1", 0), one_rank(preset, "v1", 1)
        for executor, p in ((rank0, a), (rank1, b)):
            executor.generate([p], 8)
            with executor.ranks.acting_as(0):  # its own process: its engine's write-behind queue
                tiers = process_engine().engine.tiers
                assert tiers is not None and tiers.flush()
        from_rank1, from_rank0 = rank1.generate([a], 8)[0], rank0.generate([b], 8)[0]
        for got, p in ((from_rank1, a), (from_rank0, b)):
            assert got.num_connector_matched_tokens == 192
            assert_same_output(got, reference(p, 8))
        for executor in (rank0, rank1):
            finish(preset, executor)
    finally:
        reset_process_engine()
        redis.stop()


def test_a_rank_names_its_threads_by_its_own_rank(preset: Preset) -> None:
    """Keys name no rank under attention DP, but a rank's save and load threads (and its log lines)
    name its own: every rank's process would otherwise say rank 0."""
    before = set(threading.enumerate())
    executor = one_rank(preset, "v1", 1)
    executor.generate([prompt(100, start=29)], 2)
    names = [t.name for t in set(threading.enumerate()) - before if t.name.startswith("lmcache-")]
    ours = [name for name in names if "save-r" in name or "load-r" in name]
    assert ours and all("-r1_" in name for name in ours), names
    finish(preset, executor)
