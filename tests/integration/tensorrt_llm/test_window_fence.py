"""Which saves the plan fences, and when (scheduler side); how the worker orders a stream after them;
and the replay's V2 page freeing they guard against."""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from test_planner import CHUNK, TPB, planner
from test_planner_v2 import grouped_report

from lmcache.integration.tensorrt_llm._trtllm import SchedulerOutput
from lmcache.integration.tensorrt_llm.save_fence import SaveFence
from lmcache.integration.tensorrt_llm.window_fence import WindowSaves
from lmcache.testing.trtllm_replay.kv_manager import GroupedBlockManager
from lmcache.testing.trtllm_replay.layer_groups import LayerGroup

CPU = torch.device("cpu")


def test_a_save_is_fenced_once_a_page_before_the_window_passes_its_first_page() -> None:
    """Window 128, tokens_per_block 16: V2 frees the page of tokens [0, 16) once 143 tokens are
    computed (16 <= E + 1 - 128); the save starting there is fenced a page earlier, at E = 127, once.
    The full-attention group's saves are never fenced."""
    p, index = planner()
    index.group_windows = [None, 128]
    prompt = list(range(100))
    blocks = [list(range(13)), list(range(20, 33))]
    meta = p.build(SchedulerOutput(new_requests=[grouped_report(1, prompt, blocks, 0, 100)]))
    ids = {(s.group, s.start): meta.first_save_id + i for i, s in enumerate(meta.saves)}
    assert sorted(ids) == [(0, 0), (1, 0)] and meta.fence_saves == []
    fenced_at: dict[int, int] = {}
    for position in range(100, 200):  # decode: one token per step, E = position + 1
        step = p.build(
            SchedulerOutput(cached_requests=[grouped_report(1, [position], [[], []], position, 1)])
        )
        ids.update({(s.group, s.start): step.first_save_id + i for i, s in enumerate(step.saves)})
        for save_id in step.fence_saves:
            assert save_id not in fenced_at, "fenced twice"
            fenced_at[save_id] = position + 1
    # Decode completes chunk [64, 128) at E = 128 and [128, 192) at E = 192.
    assert sorted(ids) == [(g, start) for g in (0, 1) for start in (0, 64, 128)]
    assert fenced_at == {ids[1, 0]: 127, ids[1, 64]: 191}
    assert len(set(ids.values())) == 6  # numbered across iterations without reuse


def test_a_prefill_longer_than_the_window_fences_its_own_sliding_saves() -> None:
    p, index = planner()
    index.group_windows = [None, 64]
    prompt = list(range(3 * CHUNK))
    blocks = [list(range(12)), list(range(20, 32))]
    meta = p.build(SchedulerOutput(new_requests=[grouped_report(1, prompt, blocks, 0, len(prompt))]))
    sliding = [meta.first_save_id + i for i, s in enumerate(meta.saves) if s.group == 1]
    assert sliding and meta.fence_saves == sliding


def test_a_finished_request_is_not_fenced_any_more() -> None:
    """Its pages stay until ``get_finished`` reports its saves; a later report of the same id (a
    new request) does not fence the old saves."""
    p, index = planner()
    index.group_windows = [64]
    prompt = list(range(CHUNK))
    p.build(SchedulerOutput(new_requests=[grouped_report(1, prompt, [list(range(5))], 0, CHUNK)]))

    class Finished:
        request_id = 1

    assert p.finished(Finished()) is True
    meta = p.build(
        SchedulerOutput(new_requests=[grouped_report(1, list(range(200)), [list(range(13))], 0, 1)])
    )
    assert meta.fence_saves == []


class _Event:
    def __init__(self, complete: bool) -> None:
        self.complete = complete

    def query(self) -> bool:
        return self.complete


class _Stream:
    def __init__(self) -> None:
        self.waited: list[Any] = []

    def wait_event(self, event: Any) -> None:
        self.waited.append(event)


def _landed(result: Any) -> Future[Any]:
    future: Future[Any] = Future()
    future.set_result(result)
    return future


def test_the_worker_orders_the_stream_after_a_fenced_save_still_running() -> None:
    """This iteration's save, not started (its fence is not released): released at once, waited for
    on the host until its copies are enqueued, then on the device (the CUDA branch)."""
    saves = WindowSaves()
    saves.windowed_groups = {1}
    fence = SaveFence(None, CPU)
    pending = _Event(complete=False)
    started = threading.Event()

    def store() -> _Event:
        started.set()
        fence.wait()
        return pending

    with ThreadPoolExecutor(1) as saver:
        saves.add(7, 1, [saver.submit(store)])
        started.wait()
        stream = _Stream()
        saves.order([7], stream, CPU, fence)
    assert fence.released and stream.waited == [pending]


def test_landed_unknown_and_full_attention_saves_cost_nothing() -> None:
    saves = WindowSaves()
    saves.windowed_groups = {1}
    fence = SaveFence(None, CPU)
    saves.add(1, 1, [_landed(_Event(complete=True)), _landed(None)])
    saves.add(2, 0, [_landed(_Event(complete=False))])  # full attention: never kept
    failed: Future[Any] = Future()
    failed.set_exception(RuntimeError("dropped"))
    saves.add(3, 1, [failed])  # a failed store holds no page
    stream = _Stream()
    saves.order([1, 2, 3, 99], stream, CPU, fence)
    assert stream.waited == [] and not fence.released


def test_the_replay_gives_passed_pages_back_keeping_sinks_and_reuses_them_first() -> None:
    groups = [LayerGroup(0, (0,), None), LayerGroup(1, (1,), 64)]
    kv = GroupedBlockManager(groups, 32, TPB, enable_reuse=True, sink_tokens=TPB)
    assert kv.try_reserve(1, 10) and kv.try_reserve(2, 4)
    kv.grow(1, 144)
    before = [manager.get_cache_indices(1) for manager in kv.managers]
    freed = kv.free_passed(1, 144)  # the next token (144) sees 81..143: ordinals 1..4 passed, 0 a sink
    assert freed == [[], before[1][1:5]]
    assert kv.pages(1, 144)[1] == [before[1][0], -1, -1, -1, -1, *before[1][5:]]
    assert kv.free_passed(1, 144) == [[], []]  # once
    kv.grow(2, 64)
    assert sorted(kv.pages(2, 0)[1]) == sorted(freed[1])  # taken before any never-used page
    kv.remove_sequence(1)
    kv.remove_sequence(2)
    assert kv.managers[1].num_free_blocks == 32
