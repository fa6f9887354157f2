"""Replay behaviours where it used to be kinder than TRT-LLM: V2 hands a freed page to the next
allocation, and V2 preempts (reference ``trtllm-kv-cache-manager-v2.md`` §5.3, T-EXE2)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lmcache.testing.trtllm_replay import (
    KvCacheConfig,
    ModelConfig,
    RecordingConnector,
    ReplayExecutor,
    TorchLlmArgs,
)

TPB = 32
MODEL = ModelConfig(vocab_size=256, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8)


def args(*, v2: bool = True, chunk: int | None = None) -> TorchLlmArgs:
    return TorchLlmArgs(
        kv_cache_config=KvCacheConfig(tokens_per_block=TPB, use_kv_cache_manager_v2=v2),
        enable_chunked_prefill=chunk is not None,
        max_num_tokens=chunk or 8192,
    )


def prompt(n: int, start: int = 1) -> list[int]:
    return [(start + 7 * i) % 256 for i in range(n)]


def alloc_pages(rec: RecordingConnector, v2: bool) -> list[list[int]]:
    """Group 0's pages of every alloc callback, in order."""
    if v2:
        return [c.args[1][0] for c in rec.calls_of("update_state_after_alloc_by_layer_group")]
    return [c.args[1] for c in rec.calls_of("update_state_after_alloc")]


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_a_freed_page_goes_to_the_next_allocation_under_v2_only(v2: bool) -> None:
    """V2's slot allocator prefers recycled slots to never-used ones; V1's eviction policy queues a
    released block behind every free one. A's last page holds a partial block (never published)."""
    rec = RecordingConnector()
    ex = ReplayExecutor(args(v2=v2), MODEL, connector=rec.factories())
    ex.generate([prompt(80)], 2)
    ex.generate([prompt(80, start=2)], 2)
    first, second = alloc_pages(rec, v2)
    assert (second[0] == first[-1]) == v2
    assert not set(second) & set(first[:-1])  # A's full blocks stay published for reuse


def preempting(ex: ReplayExecutor, rid: int, at: int) -> None:
    ex.on_iteration = lambda e: e.preempt(rid) if e.stats.iterations == at else None


def reports(rec: RecordingConnector, rid: int) -> list[tuple[str, Any]]:
    out = []
    for o in rec.scheduler_outputs:
        out += [("new", d) for d in o.new_requests if d.request_id == rid]
        out += [("cached", d) for d in o.cached_requests if d.request_id == rid]
    return out


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("saving", [False, True])
def test_preemption_finishes_the_victim_then_recomputes_it_as_a_new_request(
    overlap: bool, saving: bool
) -> None:
    """``request_finished_by_layer_group`` (no ``request_reset``); a saving victim is parked, not
    scheduled, until ``get_finished`` reports it; then it is asked again with its generated tokens
    folded into its prompt and reported in ``new_requests`` again: output as without preemption."""
    p = prompt(80)
    want = ReplayExecutor(args(), MODEL, overlap_scheduler=overlap).generate([p], 6)[0]
    rec = RecordingConnector(async_save=saving, echo=True, finished_delay=2)
    ex = ReplayExecutor(args(), MODEL, connector=rec.factories(), overlap_scheduler=overlap)
    preempting(ex, 1, at=4)
    got = ex.generate([p], 6)[0]
    assert got.tokens == want.tokens and torch.equal(got.logits, want.logits)
    assert ex.stats.requests[1].preemptions == 1
    assert rec.count("request_reset") == 0
    victim, final = rec.calls_of("request_finished_by_layer_group")
    _, asked = rec.calls_of("get_num_new_matched_tokens")
    assert asked.args[0].prompt_len == len(victim.args[0].tokens) > len(p)  # generated tokens folded in
    assert [kind for kind, _ in reports(rec, 1)].count("new") == 2
    again = [d for kind, d in reports(rec, 1) if kind == "new"][1]
    assert list(again.new_tokens) == list(victim.args[0].tokens)
    if saving:  # nothing reported for the victim between its finish and its save's completion
        start = rec.calls.index(victim)
        landed = next(
            i for i, c in enumerate(rec.calls) if i > start and c.method == "get_finished" and 1 in c.args[0]
        )
        between = rec.calls[start:landed]
        assert all(
            1 not in [d.request_id for d in c.args[0].new_requests + c.args[0].cached_requests]
            for c in between
            if c.method == "build_connector_meta"
        )
    assert final.args[0].prompt_len == asked.args[0].prompt_len


def test_a_parked_victim_cancelled_ends_when_its_save_lands_without_a_second_finish() -> None:
    rec = RecordingConnector(async_save=True, echo=True, finished_delay=3)
    ex = ReplayExecutor(args(), MODEL, connector=rec.factories())

    def hooks(e: ReplayExecutor) -> None:
        if e.stats.iterations == 4:
            e.preempt(1)
        if e.stats.iterations == 5:
            e.cancel(1)

    ex.on_iteration = hooks
    result = ex.generate([prompt(80)], 8)[0]
    assert result.cancelled
    assert rec.count("request_finished_by_layer_group") == 1
    assert rec.count("get_num_new_matched_tokens") == 1


def test_preemption_mid_prefill_and_v1_refusal() -> None:
    """A victim between two chunks recomputes its whole prompt; V1 (GUARANTEED_NO_EVICT) never
    preempts."""
    p = prompt(160)
    want = ReplayExecutor(args(chunk=64), MODEL).generate([p], 3)[0]
    rec = RecordingConnector()
    ex = ReplayExecutor(args(chunk=64), MODEL, connector=rec.factories())
    preempting(ex, 1, at=2)
    got = ex.generate([p], 3)[0]
    assert got.tokens == want.tokens and torch.equal(got.logits, want.logits)
    assert [kind for kind, _ in reports(rec, 1)][:2] == ["new", "new"]
    with pytest.raises(ValueError, match="V2"):
        ReplayExecutor(args(v2=False), MODEL).preempt(1)
