"""The replay's model really computes from the paged pool: determinism, reuse, TP, corruption,
and a minimal real connector whose loads must be bitwise identical to recompute."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lmcache.integration.tensorrt_llm._trtllm import (
    KvCacheConnectorScheduler,
    KvCacheConnectorWorker,
    mpi_rank,
)
from lmcache.testing.trtllm_replay import KvCacheConfig, ModelConfig, ReplayExecutor, TorchLlmArgs, hash_chain

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
MODEL = ModelConfig(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
TPB = 16


def args(tp: int = 1, *, max_tokens: int | None = None, chunk: int | None = None) -> TorchLlmArgs:
    return TorchLlmArgs(
        model="replay-model-tests",
        tensor_parallel_size=tp,
        kv_cache_config=KvCacheConfig(tokens_per_block=TPB, max_tokens=max_tokens),
        enable_chunked_prefill=chunk is not None,
        max_num_tokens=chunk or 8192,
    )


def prompt(n: int, start: int = 1) -> list[int]:
    return [(start * 31 + 17 * i) % MODEL.vocab_size for i in range(n)]


def assert_same(a, b) -> None:
    assert a.tokens == b.tokens
    assert torch.equal(a.logits, b.logits)


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_deterministic_across_runs(device: str) -> None:
    prompts = [prompt(37), prompt(20, start=2)]
    first = ReplayExecutor(args(), MODEL, device=device).generate(prompts, 6)
    second = ReplayExecutor(args(), MODEL, device=device).generate(prompts, 6)
    for a, b in zip(first, second, strict=True):
        assert_same(a, b)
    other_seed = ReplayExecutor(args(), MODEL, device=device, seed=1).generate(prompts, 6)
    assert other_seed[0].tokens != first[0].tokens


@pytest.mark.parametrize("device", DEVICES)
def test_device_prefix_reuse_identical_to_cold_run(device: str) -> None:
    a = prompt(70)
    b = a[:64] + prompt(13, start=5)
    warm = ReplayExecutor(args(), MODEL, device=device)
    first_a = warm.generate([a], 6)[0]
    warm_b = warm.generate([b], 6)[0]
    again_a = warm.generate([a], 6)[0]
    assert warm_b.num_device_matched_tokens == 64
    assert again_a.num_device_matched_tokens == 64  # (70 - 1) // 16 blocks; the last token is recomputed
    cold_b = ReplayExecutor(args(), MODEL, device=device).generate([b], 6)[0]
    assert cold_b.num_device_matched_tokens == 0
    assert_same(warm_b, cold_b)
    assert_same(again_a, first_a)


def test_generated_blocks_are_reusable() -> None:
    ex = ReplayExecutor(args(), MODEL)
    a = prompt(20)
    out = ex.generate([a], 30)[0]
    follow_up = a + out.tokens + prompt(5, start=7)
    nxt = ex.generate([follow_up], 3)[0]
    assert nxt.num_device_matched_tokens == 48  # decode blocks were published too (49 tokens have K/V)
    cold = ReplayExecutor(args(), MODEL).generate([follow_up], 3)[0]
    assert_same(nxt, cold)


def test_chunked_prefill_and_overlap_match_plain_run() -> None:
    prompts = [prompt(100), prompt(45, start=3)]
    plain = ReplayExecutor(args(), MODEL).generate(prompts, 5)
    chunked = ReplayExecutor(args(chunk=32), MODEL).generate(prompts, 5)
    overlap = ReplayExecutor(args(), MODEL, overlap_scheduler=True).generate(prompts, 5)
    for a, b, c in zip(plain, chunked, overlap, strict=True):
        assert_same(a, b)
        assert_same(a, c)


def test_tp2_matches_tp1_and_uses_each_ranks_pool() -> None:
    prompts = [prompt(40), prompt(33, start=4)]
    tp1 = ReplayExecutor(args(), MODEL).generate(prompts, 6)
    ex2 = ReplayExecutor(args(tp=2), MODEL)
    tp2 = ex2.generate(prompts, 6)
    for a, b in zip(tp1, tp2, strict=True):
        assert a.tokens == b.tokens
        torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)
    pools = ex2.kv_caches
    assert len(pools) == 2
    assert pools[0].shape == pools[1].shape == (ex2.block_manager.num_blocks, 2, 2, 1 * TPB * 16)
    (block,) = ex2.block_manager.lookup(prompts[0][:16])
    assert pools[0][block].abs().sum() > 0 and pools[1][block].abs().sum() > 0
    assert not torch.equal(pools[0][block], pools[1][block])  # different heads


@pytest.mark.parametrize("rank", [0, 1])
def test_corrupting_a_ranks_pool_block_changes_output(rank: int) -> None:
    ex = ReplayExecutor(args(tp=2), MODEL)
    a = prompt(40)
    first = ex.generate([a], 4)[0]
    blocks = ex.block_manager.lookup(a)
    assert len(blocks) == 2
    slab = ex.kv_caches[rank][blocks[1], MODEL.num_layers - 1, 1]  # last layer, V of the 2nd block
    slab.add_(torch.randn(slab.shape, generator=torch.Generator().manual_seed(0)))
    again = ex.generate([a], 4)[0]
    assert again.num_device_matched_tokens == 32
    assert not torch.equal(first.logits, again.logits)


def test_lru_eviction_of_reusable_blocks() -> None:
    ex = ReplayExecutor(args(max_tokens=8 * TPB), MODEL)  # 8 blocks
    a = prompt(40)
    ex.generate([a], 2)
    root, leaf = ex.block_manager.lookup(a)
    for i in range(3):  # 3 blocks each; never-published free blocks go first, then the LRU
        ex.generate([prompt(40, start=10 + i)], 2)
    assert ex.block_manager.lookup(a) == [root]  # the leaf was released first, so evicted first
    ex.generate([prompt(40, start=20)], 2)
    assert ex.block_manager.lookup(a) == []
    assert ex.generate([a], 2)[0].num_device_matched_tokens == 0


# --- a minimal real connector: proves the replay detects whether loads are right -------------


class _Store:
    def __init__(self) -> None:
        self.rows: dict[tuple[int, int], torch.Tensor] = {}
        self.load_async = False


class MemScheduler(KvCacheConnectorScheduler):
    """Saves every full computed block (prompt and generated) keyed by the block hash chain."""

    def __init__(self, llm_args: Any, store: _Store) -> None:
        super().__init__(llm_args)
        self.store = store
        self.tpb = llm_args.kv_cache_config.tokens_per_block
        self.reqs: dict[int, dict[str, Any]] = {}
        self.matches: dict[int, tuple[int, int, list[int]]] = {}
        self.loads: list[tuple[int, int]] = []

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        tokens = request.get_tokens(0)
        keys = hash_chain(tokens, self.tpb)[: (len(tokens) - 1) // self.tpb]
        hit = 0
        while hit < len(keys) and (0, keys[hit]) in self.store.rows:
            hit += 1
        extra = max(0, hit * self.tpb - num_computed_tokens)
        self.matches[request.request_id] = (num_computed_tokens, num_computed_tokens + extra, keys)
        return extra, self.store.load_async and extra > 0

    def update_state_after_alloc(self, request: Any, block_ids: list[int]) -> None:
        start, end, keys = self.matches.pop(request.request_id)
        self.loads += [(block_ids[b], keys[b]) for b in range(start // self.tpb, end // self.tpb)]

    def build_connector_meta(self, scheduler_output: Any) -> object:
        saves = []
        for data in scheduler_output.new_requests + scheduler_output.cached_requests:
            state = self.reqs.setdefault(data.request_id, {"tokens": [], "blocks": [], "saved": 0})
            state["tokens"] += data.new_tokens
            state["blocks"] += data.new_block_ids
            upto = min(data.computed_position + data.num_scheduled_tokens, len(state["tokens"]))
            keys = hash_chain(state["tokens"][:upto], self.tpb)
            saves += [(state["blocks"][b], keys[b]) for b in range(state["saved"], len(keys))]
            state["saved"] = len(keys)
        meta, self.loads = {"loads": self.loads, "saves": saves}, []
        return meta

    def request_finished(self, request: Any, cache_block_ids: list[int]) -> bool:
        return False


class MemWorker(KvCacheConnectorWorker):
    def __init__(self, llm_args: Any, store: _Store) -> None:
        super().__init__(llm_args)
        self.store = store
        self.rank = mpi_rank()
        self.kv: torch.Tensor | None = None

    def register_kv_caches(self, kv_cache_tensor: torch.Tensor) -> None:
        self.kv = kv_cache_tensor

    def start_load_kv(self, stream: Any) -> None:
        for block, key in self._metadata["loads"]:
            self.kv[block].copy_(self.store.rows[(self.rank, key)])

    def wait_for_layer_load(self, layer_idx: int, stream: Any) -> None:
        pass

    def save_kv_layer(self, layer_idx: int, stream: Any) -> None:
        pass

    def wait_for_save(self, stream: Any) -> None:
        for block, key in self._metadata["saves"]:
            self.store.rows.setdefault((self.rank, key), self.kv[block].clone())

    def get_finished(self, finished_gen_req_ids: list[int], started_loading_req_ids: list[int]):
        return list(finished_gen_req_ids), list(started_loading_req_ids)


def mem_executor(store: _Store, tp: int, device: str, overlap: bool = False) -> ReplayExecutor:
    factories = (lambda a: MemScheduler(a, store), lambda a: MemWorker(a, store))
    return ReplayExecutor(args(tp=tp), MODEL, device=device, connector=factories, overlap_scheduler=overlap)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("load_async", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("tp", [1, 2])
def test_connector_load_bitwise_identical_to_recompute(device: str, load_async: bool, tp: int) -> None:
    store = _Store()
    store.load_async = load_async
    a = prompt(70)
    cold = mem_executor(store, tp, device).generate([a], 6)[0]
    assert cold.num_connector_matched_tokens == 0
    loaded = mem_executor(store, tp, device, overlap=True).generate([a], 6)[0]  # empty device cache
    assert loaded.num_device_matched_tokens == 0 and loaded.num_connector_matched_tokens == 64
    assert_same(loaded, cold)
    # Generated tokens were saved too: a follow-up turn loads past the first prompt.
    follow = a + cold.tokens + prompt(9, start=8)
    turn2 = mem_executor(store, tp, device).generate([follow], 3)[0]
    assert turn2.num_connector_matched_tokens == 64  # 75 tokens have K/V saved -> 4 full blocks
    plain = ReplayExecutor(args(tp=tp), MODEL, device=device).generate([follow], 3)[0]
    assert_same(turn2, plain)
    # A wrong load is visible: corrupt the stored rows and load again.
    for key in store.rows:
        store.rows[key] = store.rows[key] + 1.0
    broken = mem_executor(store, tp, device).generate([a], 6)[0]
    assert broken.num_connector_matched_tokens == 64
    assert not torch.equal(broken.logits, cold.logits)
