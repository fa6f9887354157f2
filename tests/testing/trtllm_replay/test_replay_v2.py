"""The V2 KV cache manager replay as a connector sees it (reference §5, §8 T-RES / T-V2R / T-V2S),
recorded with ``RecordingConnector``."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from lmcache.integration.tensorrt_llm._trtllm import KvCacheConnectorScheduler
from lmcache.testing.trtllm_replay import (
    KvCacheConfig,
    ModelConfig,
    RecordingConnector,
    ReplayExecutor,
    SchedulerConfig,
    TorchLlmArgs,
)
from lmcache.testing.trtllm_replay import recording as recording_module
from lmcache.testing.trtllm_replay.reservations import validate_answer

TPB = 32
MODEL = ModelConfig(vocab_size=256, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8)
VSWA = dataclasses.replace(MODEL, layer_windows=(64, None, 64))
SLIDING = dataclasses.replace(MODEL, num_layers=2, layer_windows=(64, 64))


def args(
    *,
    chunk: int | None = None,
    max_tokens: int | None = None,
    tp: int = 1,
    prefix_aware: bool = True,
    v2: bool = True,
    max_num_tokens: int = 8192,
) -> TorchLlmArgs:
    return TorchLlmArgs(
        tensor_parallel_size=tp,
        kv_cache_config=KvCacheConfig(
            tokens_per_block=TPB, max_tokens=max_tokens, use_kv_cache_manager_v2=v2
        ),
        scheduler_config=SchedulerConfig(enable_prefix_aware_scheduling=prefix_aware),
        enable_chunked_prefill=chunk is not None,
        max_num_tokens=chunk or max_num_tokens,
    )


def make(rec: RecordingConnector, model: ModelConfig = MODEL, **kw: Any) -> ReplayExecutor:
    overlap = kw.pop("overlap", False)
    return ReplayExecutor(args(**kw), model, connector=rec.factories(), overlap_scheduler=overlap)


def prompt(n: int, start: int = 1) -> list[int]:
    return [(start + 7 * i) % 256 for i in range(n)]


def methods(rec: RecordingConnector, *names: str) -> list[str]:
    return [c.method for c in rec.calls if c.method in names]


def releases(rec: RecordingConnector) -> list[tuple[int, int, int]]:
    return [c.args[1:] for c in rec.calls_of("release_prefix_reservation")]


def reports(rec: RecordingConnector, rid: int) -> list[Any]:
    out = rec.scheduler_outputs
    return [d for o in out for d in o.new_requests + o.cached_requests if d.request_id == rid]


# --- registration and data ------------------------------------------------------------------


def test_v2_registers_a_layout_instead_of_the_pool() -> None:
    rec = RecordingConnector()
    ex = make(rec, VSWA, tp=2)
    assert rec.count("register_kv_caches") == 0
    (summary0, summary1) = [c.args[0] for c in rec.calls_of("register_kv_cache_layout")]
    assert summary0 == summary1
    assert [(g[0], g[1], g[2]) for g in summary0.groups] == [(0, (0, 2), 64), (1, (1,), None)]
    layout = ex.layouts[1]
    assert layout.as_single_pool_tensor() is None
    assert layout.group_of_layer(1).layer_group_id == 1 and layout.group(0).layer_ids == (0, 2)
    with pytest.raises(KeyError):
        layout.group(2)
    with pytest.raises(KeyError):
        layout.group_of_layer(3)
    (region,) = layout.group(0).regions
    buffers = [(b.layer_id, b.role) for b in region.buffers]
    assert buffers == [(0, "key"), (0, "value"), (2, "key"), (2, "value")]
    heads = MODEL.num_kv_heads // 2
    assert region.size == region.stride == 2 * 2 * heads * TPB * 8 * 4 == layout.group(0).bytes_per_page
    assert region.address_of(3) - region.address_of(0) == 3 * region.stride
    with pytest.raises(IndexError):
        region.slot_tensor(region.num_slots)
    with pytest.raises(IndexError):
        region.address_of(-1)
    # Regions are views of the real pools: a write through them reaches the model's pool.
    region.slot_tensor(5, torch.float32).fill_(2.5)
    assert torch.all(ex.pools.pools[0].tensors[1][5] == 2.5)
    assert region.as_tensor(torch.float32).shape == (region.num_slots, region.size // 4)


def test_single_group_layout_folds_to_the_v1_pool() -> None:
    rec = RecordingConnector()
    ex = make(rec)
    tensor = ex.layouts[0].as_single_pool_tensor()
    assert tensor.shape == ex.kv_caches[0].shape and tensor.data_ptr() == ex.kv_caches[0].data_ptr()
    tensor[3, 1, 0, 7] = 9.0
    assert ex.kv_caches[0][3, 1, 0, 7] == 9.0


def test_sliding_windows_require_v2_and_connectors_require_reuse() -> None:
    with pytest.raises(ValueError, match="use_kv_cache_manager_v2"):
        ReplayExecutor(args(v2=False), VSWA)
    bad = TorchLlmArgs(kv_cache_config=KvCacheConfig(use_kv_cache_manager_v2=True, enable_block_reuse=False))
    with pytest.raises(ValueError, match="enable_block_reuse"):
        ReplayExecutor(bad, MODEL, connector=RecordingConnector().factories())


def test_flat_only_scheduler_is_refused_with_several_groups() -> None:
    class FlatOnly(recording_module.RecordingScheduler):
        update_state_after_alloc_by_layer_group = (
            KvCacheConnectorScheduler.update_state_after_alloc_by_layer_group
        )

    rec = RecordingConnector()
    factories = (lambda a: FlatOnly(a, recorder=rec), rec.factories()[1])
    with pytest.raises(NotImplementedError, match="update_state_after_alloc_by_layer_group"):
        ReplayExecutor(args(), VSWA, connector=factories)
    ReplayExecutor(args(), MODEL, connector=factories)  # one group: the ABC default folds it


@pytest.mark.parametrize("overlap", [False, True], ids=["no_overlap", "overlap"])
def test_v2_legacy_query_uses_grouped_forms(overlap: bool) -> None:
    rec = RecordingConnector(match=(32, False))
    ex = make(rec, overlap=overlap)
    (result,) = ex.generate([prompt(96)], 4, cache_salts=["tenant"])
    # Asked once on the final batch, then exactly one grouped alloc callback with grown pages.
    assert methods(rec, "get_num_new_matched_tokens", "update_state_after_alloc_by_layer_group") == [
        "get_num_new_matched_tokens",
        "update_state_after_alloc_by_layer_group",
    ]
    assert rec.count("update_state_after_alloc") == rec.count("request_finished") == 0
    assert rec.calls_of("get_num_new_matched_tokens")[0].args[1] == 0
    (alloc,) = rec.calls_of("update_state_after_alloc_by_layer_group")
    assert alloc.args[0].context_current_position == 32 and len(alloc.args[1][0]) == 3
    assert result.num_connector_matched_tokens == 32
    first, *rest = reports(rec, result.request_id)
    assert (first.computed_position, first.num_scheduled_tokens) == (0, 64)  # the sync hit excluded
    assert (
        first.new_block_ids_by_layer_group == [alloc.args[1][0]] and first.new_block_ids == alloc.args[1][0]
    )
    for data in [first, *rest]:
        assert data.block_hashes == [] and data.priorities is None
        assert data.new_block_ids == data.new_block_ids_by_layer_group[0]
    (finished,) = rec.calls_of("request_finished_by_layer_group")
    assert len(finished.args[1]) == 1 and len(finished.args[1][0]) == 4  # 96 + 4 tokens


def test_v2_chunked_prefill_allocates_per_chunk() -> None:
    rec = RecordingConnector()
    ex = make(rec, chunk=32)
    (result,) = ex.generate([prompt(96)], 2)
    (alloc,) = rec.calls_of("update_state_after_alloc_by_layer_group")
    assert len(alloc.args[1][0]) == 1  # the first chunk only
    data = reports(rec, result.request_id)
    assert [len(d.new_block_ids_by_layer_group[0]) for d in data[:3]] == [1, 1, 1]
    assert [(d.computed_position, d.num_scheduled_tokens) for d in data[:3]] == [(0, 32), (32, 32), (64, 32)]


def test_v2_chunk_and_offer_beyond_it_grow_the_first_allocation() -> None:
    rec = RecordingConnector(match=(64, False))
    ex = make(rec, chunk=32)
    (result,) = ex.generate([prompt(96)], 2)
    (alloc,) = rec.calls_of("update_state_after_alloc_by_layer_group")
    assert alloc.args[0].context_current_position == 64 and len(alloc.args[1][0]) == 3
    assert result.num_connector_matched_tokens == 64


def test_v2_dropped_before_the_batch_is_never_asked() -> None:
    rec = RecordingConnector(match=(32, False))
    ex = make(rec)
    ex.on_iteration = lambda e: rec.record("executor", "iteration")
    ex.drop_from_batch(ex.next_request_id, iterations=2)
    ex.generate([prompt(96)], 2)
    order = methods(rec, "iteration", "get_num_new_matched_tokens")
    assert order[:4] == ["iteration", "iteration", "iteration", "get_num_new_matched_tokens"]
    assert rec.count("get_num_new_matched_tokens") == 1


def test_v2_legacy_rollback_asks_again_and_allocates_again() -> None:
    rec = RecordingConnector(match=(32, False))
    ex = make(rec)
    ex.rollback_after_alloc(ex.next_request_id)
    (result,) = ex.generate([prompt(96)], 2)
    assert methods(
        rec, "get_num_new_matched_tokens", "update_state_after_alloc_by_layer_group", "request_reset"
    ) == ["get_num_new_matched_tokens", "update_state_after_alloc_by_layer_group", "request_reset"] * 1 + [
        "get_num_new_matched_tokens",
        "update_state_after_alloc_by_layer_group",
    ]
    assert ex.stats.requests[result.request_id].resets == 1
    (new,) = [d for o in rec.scheduler_outputs for d in o.new_requests]  # reported as new once
    assert new.computed_position == 0 and len(result.tokens) == 2


# --- reservations: enabling and validation -----------------------------------------------------


class _OnlyReserve(recording_module.RecordingScheduler):
    def reserve_prefix(self, request: Any, num_computed_tokens: int, reservation_id: int) -> Any:
        return 0, False


class _OnlyRelease(recording_module.RecordingScheduler):
    def release_prefix_reservation(self, request: Any, reservation_id: int, start: int, end: int) -> None:
        return None


class _PrefixWorker(recording_module.RecordingWorker):
    def get_finished_prefix_loads(self) -> list[int]:
        return []


@pytest.mark.parametrize(
    "scheduler_cls,worker_cls",
    [
        (_OnlyReserve, recording_module.RecordingWorker),
        (_OnlyRelease, _PrefixWorker),
        (recording_module.RecordingScheduler, _PrefixWorker),
    ],
)
def test_partial_trio_is_refused(scheduler_cls: type, worker_cls: type) -> None:
    rec = RecordingConnector()
    factories = (lambda a: scheduler_cls(a, recorder=rec), lambda a: worker_cls(a, recorder=rec))
    with pytest.raises(ValueError, match="prefix reservations require"):
        ReplayExecutor(args(), MODEL, connector=factories)


def test_no_trio_or_prefix_aware_off_keeps_the_legacy_query() -> None:
    plain = RecordingConnector(match=(32, False))
    make(plain).generate([prompt(96)], 1)
    assert plain.count("get_num_new_matched_tokens") == 1 and plain.count("reserve_prefix") == 0
    trio = RecordingConnector(match=(32, False), reserve=(32, False))
    make(trio, prefix_aware=False).generate([prompt(96)], 1)
    assert trio.count("get_num_new_matched_tokens") == 1 and trio.count("reserve_prefix") == 0
    assert trio.count("get_finished_prefix_loads") == 0


@pytest.mark.parametrize("answer", [(-1, False), (True, False), (0, True), (32, 1)])
def test_malformed_reservation_answers_raise(answer: Any) -> None:
    rec = RecordingConnector(reserve=answer)
    ex = make(rec)
    with pytest.raises(ValueError, match="reserve_prefix returned"):
        ex.generate([prompt(96)], 1)
    assert (
        rec.count("release_prefix_reservation") == 0
        and rec.count("update_state_after_alloc_by_layer_group") == 0
    )


def test_answer_validation() -> None:
    assert validate_answer((0, False)) == (0, False) and validate_answer([32, True]) == (32, True)
    with pytest.raises(ValueError, match=r"\(True, False\)"):
        validate_answer((True, False))


# --- reservations: the protocol -----------------------------------------------------------------


@pytest.mark.parametrize("overlap", [False, True], ids=["no_overlap", "overlap"])
def test_offer_clipped_to_block_before_last_token(overlap: bool) -> None:
    rec = RecordingConnector(reserve=(96, False))
    ex = make(rec, overlap=overlap)
    (result,) = ex.generate([prompt(96)], 3, cache_salts=["tenant"])
    rid = result.request_id
    assert rec.count("get_num_new_matched_tokens") == 0
    (reserve,) = rec.calls_of("reserve_prefix")
    assert reserve.args[1:] == (0, 1)
    order = methods(
        rec,
        "reserve_prefix",
        "update_state_after_alloc_by_layer_group",
        "release_prefix_reservation",
        "build_connector_meta",
        "start_load_kv",
        "get_finished_prefix_loads",
    )
    assert order[:7] == [
        "reserve_prefix",
        "update_state_after_alloc_by_layer_group",
        "release_prefix_reservation",  # the clipped tail, before any transfer
        "build_connector_meta",
        "start_load_kv",
        "get_finished_prefix_loads",  # reports the id ...
        "release_prefix_reservation",  # ... which retires at the next iteration
    ]
    assert releases(rec) == [(1, 64, 96), (1, 0, 64)]
    (alloc,) = rec.calls_of("update_state_after_alloc_by_layer_group")
    pages = alloc.args[1]
    assert len(pages[0]) == 3 and all(p >= 0 for p in pages[0])
    first_output = rec.scheduler_outputs[0]
    (load,) = first_output.prefix_loads
    assert (load.reservation_id, load.request_id, load.start, load.end, load.is_async) == (
        1,
        rid,
        0,
        64,
        False,
    )
    assert load.block_ids_by_layer_group == pages and load.cache_salt == "tenant"
    assert load.tokens == prompt(96)
    (new,) = first_output.new_requests  # sync: computed in this batch, the loaded range excluded
    assert (new.computed_position, new.num_scheduled_tokens) == (0, 32)
    assert sum(len(o.prefix_loads) for o in rec.scheduler_outputs) == 1
    stats = ex.stats.requests[rid]
    assert stats.reservation_ids == [1] and [(d.start, d.end) for d in stats.prefix_loads] == [(0, 64)]
    assert result.num_connector_matched_tokens == 64


@pytest.mark.parametrize("overlap", [False, True], ids=["no_overlap", "overlap"])
def test_async_prefix_load_parks_then_reenters(overlap: bool) -> None:
    rec = RecordingConnector(reserve=(64, True), prefix_load_delay=2)
    ex = make(rec, overlap=overlap)
    (result,) = ex.generate([prompt(96)], 2)
    outputs = rec.scheduler_outputs
    (load,) = outputs[0].prefix_loads
    assert load.is_async and (load.start, load.end) == (0, 64)
    assert outputs[0].new_requests == [] and outputs[0].cached_requests == []  # parked
    assert sum(len(o.prefix_loads) for o in outputs) == 1  # dispatched exactly once
    polls = [c.args[0] for c in rec.calls_of("get_finished_prefix_loads")]
    assert polls[:3] == [[], [], [1]]
    # Retired at the next iteration: release, then the request re-enters as new, no new query/alloc.
    assert releases(rec) == [(1, 0, 64)]
    assert rec.count("reserve_prefix") == 1 and rec.count("update_state_after_alloc_by_layer_group") == 1
    (new,) = [d for o in outputs for d in o.new_requests]
    assert (new.computed_position, new.num_scheduled_tokens, len(new.new_tokens)) == (64, 32, 96)
    assert methods(rec, "release_prefix_reservation", "build_connector_meta")[:3] == [
        "build_connector_meta",  # the load, with no compute batch
        "release_prefix_reservation",
        "build_connector_meta",  # the re-entry
    ]
    assert ex.stats.requests[result.request_id].connector_load_async and len(result.tokens) == 2


def test_budget_rejection_releases_whole_and_retries_with_fresh_id() -> None:
    rec = RecordingConnector(reserve=(32, False))
    ex = make(rec, chunk=64)  # a 64-token budget: A's 64 tokens after its prefix use all of it
    a, b = ex.generate([prompt(96), prompt(96, start=3)], 2)
    ids_b = ex.stats.requests[b.request_id].reservation_ids
    assert ex.stats.requests[a.request_id].reservation_ids == [1]
    assert len(ids_b) >= 2 and ids_b == sorted(ids_b) and len(set(ids_b)) == len(ids_b)
    rejected = [(i, 0, 32) for i in ids_b[:-1]]
    assert [r for r in releases(rec) if r[0] in ids_b[:-1]] == rejected
    assert [d.reservation_id for d in ex.stats.requests[b.request_id].prefix_loads] == [ids_b[-1]]
    # A rejected attempt was never allocated: one alloc callback per request.
    assert rec.count("update_state_after_alloc_by_layer_group") == 2


def test_kv_pressure_releases_the_reservation() -> None:
    rec = RecordingConnector(reserve=(64, False))
    ex = make(rec, max_tokens=4 * TPB)  # room for one 96 + 2 request at a time
    a, b = ex.generate([prompt(96), prompt(96, start=3)], 2)
    ids_b = ex.stats.requests[b.request_id].reservation_ids
    assert len(ids_b) >= 2
    assert releases(rec)[0] == (ids_b[0], 0, 64)  # rejected for pages, released whole
    assert len(a.tokens) == len(b.tokens) == 2


def test_two_requests_with_the_same_prompt_hold_independent_reservations() -> None:
    rec = RecordingConnector(reserve=(64, False), prefix_load_delay={0: 0, 1: 2})
    ex = make(rec, tp=2)
    a, b = ex.generate([prompt(96), prompt(96)], 2)
    loads = [load for o in rec.scheduler_outputs for load in o.prefix_loads]
    assert [(x.reservation_id, x.request_id, x.start, x.end) for x in loads] == [
        (1, a.request_id, 0, 64),
        (2, b.request_id, 0, 64),
    ]
    assert loads[0].block_ids_by_layer_group != loads[1].block_ids_by_layer_group
    assert sorted(releases(rec)) == [(1, 0, 64), (2, 0, 64)]


def test_sync_load_keeps_its_reservation_until_every_rank_reports() -> None:
    rec = RecordingConnector(reserve=(64, False), prefix_load_delay={0: 0, 1: 3})
    ex = make(rec, tp=2)
    ex.on_iteration = lambda e: rec.record("executor", "iteration")
    (result,) = ex.generate([prompt(96)], 1)
    seen = methods(rec, "iteration", "release_prefix_reservation")
    # The load is reported by rank 0 at once, by rank 1 three polls later; released after that.
    assert seen.index("release_prefix_reservation") == 5
    assert [c.args[0] for c in rec.calls_of("get_finished_prefix_loads", rank=1)][:4] == [[], [], [], [1]]
    assert not ex.kv.has_allocation(result.request_id)  # freed once the load retired


def test_stalled_load_keeps_pages_and_times_out() -> None:
    rec = RecordingConnector(reserve=(64, True), echo=False)
    ex = ReplayExecutor(args(), MODEL, connector=rec.factories(), idle_timeout_s=0.2)
    with pytest.raises(RuntimeError, match="no progress"):
        ex.generate([prompt(96)], 1)
    assert ex.kv.has_allocation(ex.next_request_id - 1) and releases(rec) == []


def test_stale_and_unknown_ids_are_ignored() -> None:
    class StaleWorker(recording_module.RecordingWorker):
        def get_finished_prefix_loads(self) -> list[int]:
            ids = recording_module.worker_get_finished_prefix_loads(self)
            return [*ids, 1, 1, 10000]  # id 1 is the rolled-back attempt

    rec = RecordingConnector(reserve=(64, True), prefix_load_delay=3)
    factories = (rec.factories()[0], lambda a: StaleWorker(a, recorder=rec))
    ex = ReplayExecutor(args(), MODEL, connector=factories)
    ex.rollback_after_alloc(ex.next_request_id)
    (result,) = ex.generate([prompt(96)], 1)
    assert ex.stats.requests[result.request_id].reservation_ids == [1, 2]
    # Id 2 completes only when its own report arrives (3 polls after dispatch), not on "1".
    order = methods(rec, "get_finished_prefix_loads", "release_prefix_reservation")
    assert order[:7] == ["release_prefix_reservation"] + ["get_finished_prefix_loads"] * 5 + [
        "release_prefix_reservation"
    ]
    assert [c.args[0] for c in rec.calls_of("get_finished_prefix_loads")][:5] == [[], [], [], [], [2]]
    assert releases(rec) == [(1, 0, 64), (2, 0, 64)]


# --- reservations: rollback, cancellation, VSWA ---------------------------------------------------


def test_replay_after_free_gets_a_new_id_and_a_second_alloc_callback() -> None:
    rec = RecordingConnector(reserve=(64, False))
    ex = make(rec)
    ex.rollback_after_alloc(ex.next_request_id)
    (result,) = ex.generate([prompt(96)], 2)
    assert [c.args[2] for c in rec.calls_of("reserve_prefix")] == [1, 2]
    assert methods(
        rec,
        "reserve_prefix",
        "update_state_after_alloc_by_layer_group",
        "request_reset",
        "release_prefix_reservation",
    )[:5] == [
        "reserve_prefix",
        "update_state_after_alloc_by_layer_group",
        "release_prefix_reservation",  # the unstarted attempt, whole
        "request_reset",
        "reserve_prefix",
    ]
    assert releases(rec) == [(1, 0, 64), (2, 0, 64)]
    assert rec.count("update_state_after_alloc_by_layer_group") == 2
    assert [d.reservation_id for d in ex.stats.requests[result.request_id].prefix_loads] == [2]


def test_cancel_during_async_load_is_deferred_until_it_completes() -> None:
    rec = RecordingConnector(reserve=(64, True), prefix_load_delay=3)
    ex = make(rec)
    rid = ex.next_request_id

    def cancel_once_dispatched(e: ReplayExecutor) -> None:
        rec.record("executor", "iteration")
        if e.stats.requests[rid].prefix_loads and not e.stats.requests[rid].cancelled:
            e.cancel(rid)

    ex.on_iteration = cancel_once_dispatched
    (result,) = ex.generate([prompt(96)], 4)
    assert result.cancelled and result.tokens == [] and ex.stats.requests[rid].cancelled
    order = methods(
        rec, "get_finished_prefix_loads", "release_prefix_reservation", "request_finished_by_layer_group"
    )
    assert order[-4:-1] == [
        "get_finished_prefix_loads",
        "release_prefix_reservation",
        "request_finished_by_layer_group",
    ]
    assert [c.args[0] for c in rec.calls_of("get_finished_prefix_loads")][-2] == [1]
    assert rec.count("wait_for_layer_load") == 0  # never computed
    assert not ex.kv.has_allocation(rid)


def test_vswa_reservation_has_minus_one_in_place() -> None:
    rec = RecordingConnector(reserve=(128, False))
    ex = make(rec, VSWA)
    (result,) = ex.generate([prompt(160)], 2)
    (alloc,) = rec.calls_of("update_state_after_alloc_by_layer_group")
    sliding, full = alloc.args[1]
    assert len(sliding) == len(full) == 5
    assert sliding[:2] == [-1, -1] and all(p >= 0 for p in sliding[2:]) and all(p >= 0 for p in full)
    assert set(sliding[2:]).isdisjoint(full) or sliding[2:] != full[2:]
    (load,) = rec.scheduler_outputs[0].prefix_loads
    assert (load.start, load.end) == (0, 128) and load.block_ids_by_layer_group == [sliding, full]
    for data in reports(rec, result.request_id):
        assert data.new_block_ids == [] and len(data.new_block_ids_by_layer_group) == 2
    (finished,) = rec.calls_of("request_finished_by_layer_group")
    assert finished.args[1][0][:3] == [-1, -1, -1] and -1 not in finished.args[1][1]


def test_vswa_window_passes_blocks_during_decode() -> None:
    rec = RecordingConnector()
    ex = make(rec, VSWA, chunk=32)
    (result,) = ex.generate([prompt(96)], 40)
    data = reports(rec, result.request_id)
    # Deltas never restate an entry; a page first reported live is later -1 in the complete list.
    seen = [d.new_block_ids_by_layer_group[0] for d in data]
    assert -1 not in sum(seen, [])
    (finished,) = rec.calls_of("request_finished_by_layer_group")
    history = 96 + 40 - 1
    masked = (history + 1 - 64) // TPB
    assert finished.args[1][0][:masked] == [-1] * masked and -1 not in finished.args[1][0][masked:]


def test_single_sliding_window_keeps_minus_one_in_the_flat_list() -> None:
    rec = RecordingConnector(match=(128, False))
    ex = make(rec, SLIDING)
    (result,) = ex.generate([prompt(160)], 2)
    (first, *_) = reports(rec, result.request_id)
    assert (
        first.new_block_ids[:2] == [-1, -1] and first.new_block_ids == first.new_block_ids_by_layer_group[0]
    )
    (summary,) = [c.args[0] for c in rec.calls_of("register_kv_cache_layout")]
    assert len(summary.groups) == 1 and summary.groups[0][2] == 64


def test_freed_request_reports_empty_lists_per_group() -> None:
    rec = RecordingConnector(reserve=(64, False))
    ex = make(rec, VSWA)
    rid = ex.next_request_id
    ex.rollback_after_alloc(rid)

    def cancel_after_reset(e: ReplayExecutor) -> None:
        if rec.count("request_reset") and not e.stats.requests[rid].cancelled:
            e.cancel(rid)

    ex.on_iteration = cancel_after_reset
    (result,) = ex.generate([prompt(160)], 2)
    assert result.cancelled
    (finished,) = rec.calls_of("request_finished_by_layer_group")
    assert finished.args[1] == [[], []]


def test_request_left_out_of_the_batch_releases_its_reservation() -> None:
    rec = RecordingConnector(reserve=(64, False))
    ex = make(rec)
    ex.drop_from_batch(ex.next_request_id)
    (result,) = ex.generate([prompt(96)], 1)
    assert releases(rec) == [(1, 0, 64), (2, 0, 64)]
    assert methods(
        rec, "reserve_prefix", "release_prefix_reservation", "update_state_after_alloc_by_layer_group"
    )[:4] == [
        "reserve_prefix",
        "release_prefix_reservation",
        "reserve_prefix",
        "update_state_after_alloc_by_layer_group",
    ]
    assert ex.stats.requests[result.request_id].reservation_ids == [1, 2]


def test_cancel_with_sync_load_pending_waits_for_every_rank() -> None:
    rec = RecordingConnector(reserve=(64, False), prefix_load_delay={0: 0, 1: 3})
    ex = make(rec, tp=2)
    rid = ex.next_request_id

    def cancel_after_first_batch(e: ReplayExecutor) -> None:
        rec.record("executor", "iteration")
        if e.stats.iterations == 2:
            e.cancel(rid)

    ex.on_iteration = cancel_after_first_batch
    (result,) = ex.generate([prompt(96)], 10)
    assert result.cancelled and len(result.tokens) == 1  # no more batches after the cancel
    seen = methods(rec, "iteration", "release_prefix_reservation", "request_finished_by_layer_group")
    assert seen[:7] == ["iteration"] * 5 + ["release_prefix_reservation", "request_finished_by_layer_group"]
    assert rec.count("build_connector_meta") == 1
