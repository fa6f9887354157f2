"""``skip_idle_polls``: a 2026 TRT-LLM revision's ``get_finished`` calls no worker while the manager
tracks no async save or load (``test_connector_manager_get_finished_skips_empty_poll``)."""

from __future__ import annotations

import pytest

from lmcache.testing.trtllm_replay import (
    KvCacheConfig,
    ModelConfig,
    RecordingConnector,
    ReplayExecutor,
    TorchLlmArgs,
)

MODEL = ModelConfig(vocab_size=256, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
overlap_modes = pytest.mark.parametrize("overlap", [False, True], ids=["no_overlap", "overlap"])


def prompt(n: int, start: int = 1) -> list[int]:
    return [(start * 31 + 7 * i) % MODEL.vocab_size for i in range(n)]


def make(rec: RecordingConnector, overlap: bool = False, *, tp: int = 1, v2: bool = False) -> ReplayExecutor:
    args = TorchLlmArgs(
        model="replay-idle-polls",
        tensor_parallel_size=tp,
        kv_cache_config=KvCacheConfig(tokens_per_block=16, use_kv_cache_manager_v2=v2),
    )
    return ReplayExecutor(
        args, MODEL, overlap_scheduler=overlap, connector=rec.factories(), skip_idle_polls=True
    )


@overlap_modes
def test_nothing_tracked_polls_no_worker(overlap: bool) -> None:
    rec = RecordingConnector()
    ex = make(rec, overlap)
    ex.generate([prompt(40)], 6)
    assert rec.count("wait_for_save") == 6 + int(overlap)
    assert rec.count("get_finished") == 0
    assert ex.manager.skipped_polls == ex.stats.iterations


def test_default_polls_every_iteration() -> None:
    rec = RecordingConnector()
    args = TorchLlmArgs(kv_cache_config=KvCacheConfig(tokens_per_block=16))
    ex = ReplayExecutor(args, MODEL, connector=rec.factories())
    ex.generate([prompt(40)], 4)
    assert rec.count("get_finished") == ex.stats.iterations == 4
    assert ex.manager.skipped_polls == 0


@overlap_modes
def test_an_async_save_is_polled_until_reported_then_never_again(overlap: bool) -> None:
    rec = RecordingConnector(async_save=True, finished_delay=2)
    ex = make(rec, overlap)
    (result,) = ex.generate([prompt(40)], 4)
    polls = rec.calls_of("get_finished")
    # From the iteration of request_finished: the id once, then until it is echoed (2 polls later).
    assert [p.args for p in polls] == [([result.request_id], []), ([], []), ([], [])]
    assert not ex.block_manager.has_sequence(result.request_id)  # unpinned once saved
    rec.async_save = False
    ex.generate([prompt(40, start=2)], 4)
    assert len(rec.calls_of("get_finished")) == 3  # reported by every rank: no further poll


@overlap_modes
def test_an_async_load_is_polled_while_in_flight(overlap: bool) -> None:
    rec = RecordingConnector(match=(16, True), finished_delay=1)
    ex = make(rec, overlap)
    (result,) = ex.generate([prompt(40)], 4)
    assert result.num_connector_matched_tokens == 16
    assert [p.args for p in rec.calls_of("get_finished")] == [([], [result.request_id]), ([], [])]


def test_an_id_one_rank_reported_keeps_every_rank_polled() -> None:
    """Tracked until all ranks returned it: rank 0, done at once, is still called."""
    rec = RecordingConnector(async_save=True, finished_delay={0: 0, 1: 3})
    ex = make(rec, tp=2)
    (result,) = ex.generate([prompt(40)], 3)
    for rank in (0, 1):
        polls = rec.calls_of("get_finished", rank=rank)
        assert [p.args[0] for p in polls] == [[result.request_id], [], [], []]


def test_prefix_loads_are_still_polled_every_iteration() -> None:
    """V2 reservations: ``get_finished_prefix_loads`` is not part of the skipped call."""
    rec = RecordingConnector(reserve=(32, True), prefix_load_delay=2)
    ex = make(rec, v2=True)
    (result,) = ex.generate([prompt(40)], 3)
    assert result.num_connector_matched_tokens == 32
    assert rec.count("get_finished") == 0
    assert rec.count("get_finished_prefix_loads") == ex.stats.iterations
