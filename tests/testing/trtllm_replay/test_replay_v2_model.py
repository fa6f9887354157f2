"""V2 numerics: the model reads each layer group's own pages and honours sliding windows, so a
wrong, missing or misplaced page changes the logits; and a real V2 connector (layout, grouped
forms, prefix reservations) reproduces recompute bit for bit."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch

from lmcache.integration.tensorrt_llm._trtllm import (
    KvCacheConnectorScheduler,
    KvCacheConnectorWorker,
    mpi_rank,
)
from lmcache.testing.trtllm_replay import (
    KvCacheConfig,
    ModelConfig,
    ReplayExecutor,
    TorchLlmArgs,
    hash_chain,
)
from lmcache.testing.trtllm_replay.model import ForwardItem

TPB = 16
FULL = ModelConfig(vocab_size=512, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16)
VSWA = replace(FULL, layer_windows=(48, None, 48))


def args(*, v2: bool = True, chunk: int | None = None, tp: int = 1) -> TorchLlmArgs:
    return TorchLlmArgs(
        tensor_parallel_size=tp,
        kv_cache_config=KvCacheConfig(tokens_per_block=TPB, use_kv_cache_manager_v2=v2),
        enable_chunked_prefill=chunk is not None,
        max_num_tokens=chunk or 8192,
    )


def prompt(n: int, start: int = 1) -> list[int]:
    return [(start * 31 + 17 * i) % 512 for i in range(n)]


def assert_same(a: Any, b: Any) -> None:
    assert a.tokens == b.tokens
    assert torch.equal(a.logits, b.logits)


def test_v2_without_connector_equals_v1_for_full_attention() -> None:
    prompts = [prompt(100), prompt(45, start=3)]
    v1 = ReplayExecutor(args(v2=False), FULL).generate(prompts, 5)
    for kw in ({}, {"chunk": 32}):
        v2 = ReplayExecutor(args(**kw), FULL).generate(prompts, 5)
        for a, b in zip(v1, v2, strict=True):
            assert_same(a, b)
    overlap = ReplayExecutor(args(chunk=32), FULL, overlap_scheduler=True).generate(prompts, 5)
    for a, b in zip(v1, overlap, strict=True):
        assert_same(a, b)


def test_v2_reuse_with_one_full_group_matches_cold_run() -> None:
    a = prompt(70)
    ex = ReplayExecutor(args(), FULL)
    first = ex.generate([a], 4)[0]
    again = ex.generate([a], 4)[0]
    assert again.num_device_matched_tokens == 64
    assert_same(first, again)


def test_chunked_prefill_under_vswa_equals_unchunked() -> None:
    prompts = [prompt(120), prompt(61, start=4)]
    plain = ReplayExecutor(args(), VSWA).generate(prompts, 6)
    for chunk in (16, 48):
        chunked = ReplayExecutor(args(chunk=chunk), VSWA).generate(prompts, 6)
        for a, b in zip(plain, chunked, strict=True):
            assert_same(a, b)


def test_sliding_window_masks_old_keys() -> None:
    p = prompt(120)
    full = ReplayExecutor(args(), FULL).generate([p], 4)[0]
    sliding = ReplayExecutor(args(), VSWA).generate([p], 4)[0]
    assert not torch.equal(full.logits, sliding.logits)
    # A window no shorter than the longest sequence is full attention: bit-identical.
    wide = replace(FULL, layer_windows=(4096, None, 4096))
    assert ReplayExecutor(args(), wide).layer_groups[0].window is None
    assert_same(ReplayExecutor(args(), wide).generate([p], 4)[0], full)
    # Short prompts never leave the window: same as full attention.
    short = prompt(40)
    assert_same(
        ReplayExecutor(args(), VSWA).generate([short], 3)[0],
        ReplayExecutor(args(), FULL).generate([short], 3)[0],
    )


def swap_pages(ex: ReplayExecutor, group: int, ordinals: tuple[int, int]) -> None:
    req = ex.request(1)
    assert req is not None
    pages = ex.pages(req)[group]
    a, b = pages[ordinals[0]], pages[ordinals[1]]
    for pool in ex.pools.pools[group].tensors:
        pool[[a, b]] = pool[[b, a]]


@pytest.mark.parametrize(
    "group,ordinals,changes",
    [
        (1, (0, 1), True),  # full attention reads every page
        (0, (5, 6), True),  # pages inside the window
        (0, (0, 1), False),  # pages the window has passed (listed -1): never read
    ],
)
def test_swapping_two_pages_changes_logits_only_where_read(
    group: int, ordinals: tuple[int, int], changes: bool
) -> None:
    p = prompt(112)  # 7 blocks; at history >= 112 the window of 48 starts at ordinal 4
    clean = ReplayExecutor(args(), VSWA).generate([p], 6)[0]
    ex = ReplayExecutor(args(), VSWA)
    done: list[bool] = []

    def hook(e: ReplayExecutor) -> None:
        req = e.request(1)
        if not done and req is not None and req.num_generated >= 1:
            swap_pages(e, group, ordinals)
            done.append(True)

    ex.on_iteration = hook
    swapped = ex.generate([p], 6)[0]
    assert done
    assert swapped.tokens[:1] == clean.tokens[:1]
    assert (not torch.equal(swapped.logits, clean.logits)) is changes


def test_model_refuses_to_read_a_minus_one_page_the_window_needs() -> None:
    ex = ReplayExecutor(args(), VSWA)
    sliding = [-1, 3, 4, 5]  # ordinal 0 is needed by a query at position 50 with window 48 (keys 3..50)
    full = [6, 7, 8, 9]
    item = ForwardItem([1], 50, [sliding, full], True)
    with pytest.raises(RuntimeError, match="which is -1"):
        ex.model.forward([item], ex.pools)
    item = ForwardItem([1], 63, [sliding, full], True)  # keys 16..63: ordinal 0 unused
    assert ex.model.forward([item], ex.pools)[0] is not None


def test_sink_pages_stay_listed_and_are_read() -> None:
    """``sink_tokens``: sliding layers keep seeing the first tokens, whose pages are never masked;
    only the blocks between the sinks and the window read -1."""
    sinks = replace(VSWA, sink_tokens=TPB)
    p = prompt(112)
    ex = ReplayExecutor(args(), sinks)
    listed: list[list[int]] = []

    def hook(e: ReplayExecutor) -> None:
        req = e.request(1)
        if not listed and req is not None and req.num_generated >= 1:
            listed.append(e.pages(req)[0])

    ex.on_iteration = hook
    with_sinks = ex.generate([p], 6)[0]
    assert listed[0][0] >= 0 and listed[0][1:4] == [-1, -1, -1] and min(listed[0][4:]) >= 0
    assert not torch.equal(with_sinks.logits, ReplayExecutor(args(), VSWA).generate([p], 6)[0].logits)
    item = ForwardItem([1], 100, [[-1, -1, -1, 3, 4, 5, 6], [6, 7, 8, 9, 10, 11, 12]], True)
    with pytest.raises(RuntimeError, match="ordinal 0 .* which is -1"):
        ex.model.forward([item], ex.pools)


# --- a minimal real V2 connector -----------------------------------------------------------------


class _Store:
    def __init__(self) -> None:
        self.rows: dict[tuple[int, int, int], torch.Tensor] = {}  # (rank, group, block hash) -> page


class ReservingScheduler(KvCacheConnectorScheduler):
    """Serves the longest stored block prefix by reservation (sync) and saves every block once."""

    def __init__(self, llm_args: Any, store: _Store, num_groups: int) -> None:
        super().__init__(llm_args)
        self.store, self.num_groups = store, num_groups
        self.tpb = llm_args.kv_cache_config.tokens_per_block
        self.reqs: dict[int, dict[str, Any]] = {}
        self.released: list[tuple[int, int, int]] = []

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        raise AssertionError("reservation mode never asks the legacy query")

    def update_state_after_alloc(self, request: Any, block_ids: list[int]) -> None:
        raise AssertionError("V2 uses the grouped form")

    def update_state_after_alloc_by_layer_group(
        self, request: Any, block_ids_by_layer_group: list[list[int]]
    ) -> None:
        pass

    def reserve_prefix(self, request: Any, num_computed_tokens: int, reservation_id: int) -> tuple[int, bool]:
        if num_computed_tokens % self.tpb:
            return 0, False
        keys = hash_chain(request.get_tokens(0), self.tpb)
        hit = num_computed_tokens // self.tpb
        while hit < len(keys) and all((0, g, keys[hit]) in self.store.rows for g in range(self.num_groups)):
            hit += 1
        return hit * self.tpb - num_computed_tokens, False

    def release_prefix_reservation(self, request: Any, reservation_id: int, start: int, end: int) -> None:
        self.released.append((reservation_id, start, end))

    def build_connector_meta(self, scheduler_output: Any) -> object:
        loads = []
        for load in scheduler_output.prefix_loads:
            keys = hash_chain(load.tokens, self.tpb)
            for g, pages in enumerate(load.block_ids_by_layer_group):
                for i in range(load.start // self.tpb, load.end // self.tpb):
                    if pages[i] >= 0:
                        loads.append((g, pages[i], keys[i]))
        saves = []
        for data in scheduler_output.new_requests + scheduler_output.cached_requests:
            state = self.reqs.setdefault(data.request_id, {"tokens": [], "pages": None, "saved": 0})
            state["tokens"] += data.new_tokens
            deltas = data.new_block_ids_by_layer_group
            state["pages"] = [
                a + b for a, b in zip(state["pages"] or [[]] * len(deltas), deltas, strict=True)
            ]
            upto = min(data.computed_position + data.num_scheduled_tokens, len(state["tokens"]))
            keys = hash_chain(state["tokens"][:upto], self.tpb)
            for b in range(state["saved"], len(keys)):
                saves += [(g, pages[b], keys[b]) for g, pages in enumerate(state["pages"]) if pages[b] >= 0]
            state["saved"] = len(keys)
        return {
            "loads": loads,
            "saves": saves,
            "ids": [x.reservation_id for x in scheduler_output.prefix_loads],
        }

    def request_finished(self, request: Any, cache_block_ids: list[int]) -> bool:
        raise AssertionError("V2 uses the grouped form")

    def request_finished_by_layer_group(
        self, request: Any, cache_block_ids_by_layer_group: list[list[int]]
    ) -> bool:
        return False


class ReservingWorker(KvCacheConnectorWorker):
    def __init__(self, llm_args: Any, store: _Store) -> None:
        super().__init__(llm_args)
        self.store, self.rank = store, mpi_rank()
        self.regions: dict[int, Any] = {}
        self.done: list[int] = []

    def register_kv_caches(self, kv_cache_tensor: torch.Tensor) -> None:
        raise AssertionError("V2 registers a layout")

    def register_kv_cache_layout(self, layout: Any) -> None:
        self.regions = {g.layer_group_id: g.regions[0] for g in layout.groups}

    def start_load_kv(self, stream: Any) -> None:
        for g, slot, key in self._metadata["loads"]:
            self.regions[g].slot_tensor(slot).copy_(self.store.rows[(self.rank, g, key)])
        self.done += self._metadata["ids"]

    def wait_for_layer_load(self, layer_idx: int, stream: Any) -> None:
        pass

    def save_kv_layer(self, layer_idx: int, stream: Any) -> None:
        pass

    def wait_for_save(self, stream: Any) -> None:
        for g, slot, key in self._metadata["saves"]:
            self.store.rows.setdefault((self.rank, g, key), self.regions[g].slot_tensor(slot).clone())

    def get_finished(self, finished_gen_req_ids: list[int], started_loading_req_ids: list[int]):
        return list(finished_gen_req_ids), list(started_loading_req_ids)

    def get_finished_prefix_loads(self) -> list[int]:
        done, self.done = self.done, []
        return done


def reserving_executor(store: _Store, model: ModelConfig, tp: int) -> ReplayExecutor:
    groups = len(model.layer_groups())
    factories = (lambda a: ReservingScheduler(a, store, groups), lambda a: ReservingWorker(a, store))
    return ReplayExecutor(args(tp=tp), model, connector=factories)


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("model", [FULL, VSWA], ids=["full", "vswa"])
def test_reservation_loads_are_bitwise_identical_to_recompute(model: ModelConfig, tp: int) -> None:
    store = _Store()
    p = prompt(150)
    cold = reserving_executor(store, model, tp).generate([p], 5)[0]
    assert cold.num_connector_matched_tokens == 0
    ex = reserving_executor(store, model, tp)
    loaded = ex.generate([p], 5)[0]
    assert loaded.num_device_matched_tokens == 0 and loaded.num_connector_matched_tokens == 144
    assert ex.scheduler.released == [(1, 0, 144)]
    assert_same(loaded, cold)
    for key in store.rows:  # a wrong load is visible
        store.rows[key] = store.rows[key].view(model.dtype).add(1.0).view(torch.uint8)
    broken = reserving_executor(store, model, tp).generate([p], 5)[0]
    assert not torch.equal(broken.logits, cold.logits)
