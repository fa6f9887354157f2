"""``RecordingConnector(wrap=...)``: each real preset driven by the replay, every call counted on the
way, under V1, V2's legacy query and V2's prefix reservations (the call orders and counts of
TRT-LLM's own connector tests, reference ``trtllm-kv-cache-manager-v2.md`` section 8)."""

from __future__ import annotations

from collections import Counter

import pytest
from support.presets import Preset

from lmcache.testing.trtllm_replay import (
    KvCacheConnectorConfig,
    ModelConfig,
    RecordingConnector,
    ReplayExecutor,
    TorchLlmArgs,
    llm_args_for,
)
from lmcache.testing.trtllm_replay.executor import factories_from_config

MODEL = ModelConfig(vocab_size=256, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
PROMPT = [(5 + 7 * i) % 256 for i in range(150)]


def preset_args(preset: Preset, mode: str, tp: int = 1) -> TorchLlmArgs:
    connector = KvCacheConnectorConfig(connector=preset.name, server_url=preset.server_url)
    return llm_args_for(mode, connector, tensor_parallel_size=tp)


def recorded_run(preset: Preset, mode: str, tp: int = 1, rollback: bool = False) -> tuple:
    """Fill the cache, then record a second engine's run of the same prompt."""
    args = preset_args(preset, mode, tp)
    first = ReplayExecutor(args, MODEL).generate([PROMPT], 3)[0]
    rec = RecordingConnector(wrap=factories_from_config(args.kv_connector_config))
    executor = ReplayExecutor(args, MODEL, connector=rec.factories())
    if rollback:
        executor.rollback_after_alloc(executor.next_request_id)
    again = executor.generate([PROMPT], 3)[0]
    assert again.num_connector_matched_tokens == 128 and again.tokens == first.tokens
    assert preset.pinned() == 0
    return rec, executor, Counter(c.method for c in rec.calls)


@pytest.mark.parametrize("mode", ["v1", "v2"])
def test_legacy_query_path(preset: Preset, mode: str) -> None:
    rec, executor, counts = recorded_run(preset, mode)
    alloc = "update_state_after_alloc_by_layer_group" if mode == "v2" else "update_state_after_alloc"
    finished = "request_finished_by_layer_group" if mode == "v2" else "request_finished"
    register = "register_kv_cache_layout" if mode == "v2" else "register_kv_caches"
    # Asked once per allocation, one alloc callback, one finish, one registration per rank.
    assert counts["get_num_new_matched_tokens"] == counts[alloc] == counts[finished] == counts[register] == 1
    assert counts["build_connector_meta"] == counts["get_finished"] == executor.stats.iterations
    assert counts["reserve_prefix"] == counts["cancel_load"] == counts["request_reset"] == 0
    assert type(rec.scheduler.inner).__name__ in (
        "LMCacheKvConnectorScheduler",
        "LMCacheMPKvConnectorScheduler",
    )


@pytest.mark.parametrize("tp", [1, 2])
def test_reservation_path(preset: Preset, tp: int) -> None:
    rec, executor, counts = recorded_run(preset, "v2-res", tp)
    (reserved,) = rec.calls_of("reserve_prefix")
    request, computed, reservation_id = reserved.args
    assert computed == 0 and counts["get_num_new_matched_tokens"] == 0  # reservations replace the query
    # One prefix load, dispatched once, for the accepted range; then exactly that range released.
    loads = [load for output in rec.scheduler_outputs for load in output.prefix_loads]
    assert [(x.reservation_id, x.start, x.end) for x in loads] == [(reservation_id, 0, 128)]
    releases = [c.args[1:] for c in rec.calls_of("release_prefix_reservation")]
    assert releases == [(reservation_id, 0, 128)]
    # Retired (released) only once every rank reported it; one alloc callback per allocation.
    assert counts["get_finished_prefix_loads"] == tp * executor.stats.iterations
    assert counts["update_state_after_alloc_by_layer_group"] == 1
    assert counts["register_kv_cache_layout"] == tp


def test_rollback_replays_under_a_fresh_reservation(preset: Preset) -> None:
    rec, executor, counts = recorded_run(preset, "v2-res", rollback=True)
    ids = [c.args[2] for c in rec.calls_of("reserve_prefix")]
    assert len(ids) == 2 and ids[1] > ids[0]  # a new id, after the reset
    assert counts["request_reset"] == 1
    assert counts["update_state_after_alloc_by_layer_group"] == 2
    loads = [load.reservation_id for output in rec.scheduler_outputs for load in output.prefix_loads]
    assert loads == [ids[1]]  # the rolled-back reservation never loads
