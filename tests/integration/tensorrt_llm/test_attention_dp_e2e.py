"""Attention DP (TRT-LLM R-new): every rank runs its own connector scheduler and worker for its own
requests and holds their whole KV. Chunks are keyed alike on every rank, so one rank's saves are found
by every other rank through a cache server, and by an engine without attention DP of the same shape;
in-process each rank is its own process with its own L1. Outputs bit-equal to a run without a
connector, nothing left pinned."""

from __future__ import annotations

import dataclasses

import pytest
from support.e2e import MODEL, assert_same_output, mode_args, prompt
from support.presets import Preset

from lmcache.config import LMCacheEngineConfig
from lmcache.integration.tensorrt_llm import _trtllm
from lmcache.integration.tensorrt_llm.settings import ConnectorSettings
from lmcache.integration.tensorrt_llm.tensorrt_adapter import (
    LMCacheKvConnectorScheduler,
    LMCacheKvConnectorWorker,
)
from lmcache.testing.trtllm_replay import (
    KV_MANAGER_MODES,
    AttentionDPOwner,
    ReplayExecutor,
    TorchLlmArgs,
)

OWNERS = 2


def adp_args(preset: Preset | None, mode: str, **kw: object) -> TorchLlmArgs:
    return dataclasses.replace(mode_args(preset, mode, tp=OWNERS, **kw), enable_attention_dp=True)


def owners(preset: Preset, mode: str) -> list[ReplayExecutor]:
    """One executor per attention-DP rank; each device pool holds one 200-token request, not two."""
    return [
        ReplayExecutor(adp_args(preset, mode, max_tokens=256), MODEL, ranks=AttentionDPOwner(rank, OWNERS))
        for rank in range(OWNERS)
    ]


def reference(tokens: list[int], new_tokens: int) -> object:
    """A rank under attention DP computes with every head, as one rank without TP does."""
    return ReplayExecutor(mode_args(None, "v1"), MODEL).generate([tokens], new_tokens)[0]


def finish(preset: Preset, executor: ReplayExecutor) -> None:
    """Nothing pinned or reserved is left. Asked through the rank's own connection, after its saves'
    one-way reports: the server has read them when it answers, so another process's lookup finds
    their chunks (before that it may miss them: a recompute, never wrong KV; see server.presence)."""
    assert executor.scheduler.planner.reservation_ids() == []
    assert executor.scheduler.planner.pending_requests() == []
    with executor.ranks.acting_as(0):  # the rank's own process: its engine, its server connection
        assert preset.pinned() == 0


@pytest.mark.parametrize("mode", list(KV_MANAGER_MODES))
def test_ranks_share_chunks_through_the_server(preset: Preset, mode: str) -> None:
    """Rank 0 computes A; rank 1 then gets A from the cache server (in-process: from nothing, its own
    process's L1 is empty); rank 0 gets A back from the connector once B evicted it on its device."""
    a, b = prompt(200, start=1), prompt(200, start=2)
    rank0, rank1 = owners(preset, mode)
    first = rank0.generate([a], 8)[0]
    finish(preset, rank0)
    other = rank1.generate([a], 8)[0]
    rank0.generate([b], 8)
    again = rank0.generate([a], 8)[0]
    want = reference(a, 8)
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
