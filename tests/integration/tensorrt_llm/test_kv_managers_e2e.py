"""Both presets end to end under TRT-LLM's V1 and V2 KV cache managers (legacy query and prefix
reservations), full-attention and sliding-window models: outputs bit-equal to a run without a
connector, hits from the connector, and no pin left behind."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
from support.e2e import MODEL, SLIDING, TPB, VSWA, assert_same_output, mode_args, prompt
from support.presets import Preset

from lmcache.integration.tensorrt_llm.inflight import Done
from lmcache.integration.tensorrt_llm.plan import LoadPlan
from lmcache.testing.trtllm_replay import (
    KV_MANAGER_MODES,
    GenerationResult,
    ModelConfig,
    ReplayExecutor,
)

SINKS = dataclasses.replace(VSWA, sink_tokens=TPB)
MODES = list(KV_MANAGER_MODES)


def reference(prompts: list[list[int]], new_tokens: int, model: ModelConfig = MODEL, **kw: object) -> list:
    """Each prompt through a cold executor with no connector."""
    return [ReplayExecutor(mode_args(None, "v1", **kw), model).generate([p], new_tokens)[0] for p in prompts]


def finish(preset: Preset, executor: ReplayExecutor) -> None:
    """Nothing pinned or reserved is left once every request is done."""
    assert executor.scheduler.planner.reservation_ids() == []
    assert executor.scheduler.planner.pending_requests() == []
    assert preset.pinned() == 0


def reservations(executor: ReplayExecutor, result: GenerationResult) -> list[int]:
    return executor.stats.requests[result.request_id].reservation_ids


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tp", [1, 2])
def test_seed_scenario(preset: Preset, mode: str, tp: int) -> None:
    """A, then B evicting A from the small device pool, then A again: the connector supplies A."""
    a, b = prompt(200, start=1), prompt(200, start=2)
    # The device pool holds one 200-token request and its generated tokens, not two: B evicts A.
    executor = ReplayExecutor(mode_args(preset, mode, tp=tp, max_tokens=256), MODEL)
    first = executor.generate([a], 8)[0]
    executor.generate([b], 8)
    third = executor.generate([a], 8)[0]
    assert third.num_connector_matched_tokens > 0
    assert third.num_device_matched_tokens + third.num_connector_matched_tokens == 192
    want = reference([a], 8, tp=tp)[0]
    assert_same_output(first, want)
    assert_same_output(third, want)
    if mode == "v2-res":
        assert reservations(executor, third)
    finish(preset, executor)


@pytest.mark.parametrize("mode", MODES)
def test_multi_turn_and_chunked_prefill(preset: Preset, mode: str) -> None:
    """Chunked prefill saves every step; the next turn hits past the first turn's prompt."""
    turn1 = prompt(150, start=3)
    first = ReplayExecutor(mode_args(preset, mode, chunk=64), MODEL).generate([turn1], 60)[0]
    turn2 = turn1 + first.tokens + prompt(30, start=4)
    executor = ReplayExecutor(mode_args(preset, mode, chunk=64), MODEL)
    second = executor.generate([turn2], 6)[0]
    assert second.num_connector_matched_tokens > len(turn1)  # the answer came from the cache too
    assert_same_output(first, reference([turn1], 60)[0])
    assert_same_output(second, reference([turn2], 6)[0])
    finish(preset, executor)


@pytest.mark.parametrize("mode", ["v2", "v2-res"])
@pytest.mark.parametrize(
    "model",
    [VSWA, SLIDING, SINKS, dataclasses.replace(SLIDING, sink_tokens=TPB)],
    ids=["vswa", "sliding", "vswa-sinks", "sliding-sinks"],
)
def test_sliding_window_models(preset: Preset, mode: str, model: ModelConfig) -> None:
    """Layer groups keyed apart; the sliding group's passed pages are -1 and never touched, its
    sink pages before them are loaded like the window's."""
    p = prompt(200, start=5)
    cold = ReplayExecutor(mode_args(preset, mode), model).generate([p], 6)[0]
    executor = ReplayExecutor(mode_args(preset, mode), model)
    warm = executor.generate([p], 6)[0]
    assert warm.num_connector_matched_tokens == 192
    want = ReplayExecutor(mode_args(None, mode), model).generate([p], 6)[0]
    assert_same_output(cold, want)
    assert_same_output(warm, want)
    finish(preset, executor)


def test_overlapping_and_retried_reservations(preset: Preset) -> None:
    """Two requests reserving one prefix, and reservations rejected by a small token budget and
    retried under fresh ids: every output right, every pin released."""
    a, b = prompt(96, start=6), prompt(96, start=7)
    ReplayExecutor(mode_args(preset, "v2-res"), MODEL).generate([a, b], 2)
    executor = ReplayExecutor(mode_args(preset, "v2-res"), MODEL)
    same = executor.generate([a, a], 2)
    assert all(r.num_connector_matched_tokens == 64 for r in same)
    assert reservations(executor, same[0]) != reservations(executor, same[1])
    budget = ReplayExecutor(mode_args(preset, "v2-res", chunk=32), MODEL)  # room for one request's rest
    got = budget.generate([a, b], 2)
    assert len(reservations(budget, got[1])) >= 2  # rejected at least once, retried under a new id
    want = reference([a, b], 2)
    for result, expected in zip(same + got, [want[0], want[0], *want], strict=True):
        assert_same_output(result, expected)
    finish(preset, executor)
    finish(preset, budget)


@pytest.mark.parametrize("mode", ["v1", "v2", "v2-res"])
def test_cancel_during_an_async_load(preset: Preset, mode: str) -> None:
    """A request cancelled while its async load is in flight ends once the load lands; the cache
    and the next request are unharmed."""
    preset_env = pytest.MonkeyPatch()
    preset_env.setenv("LMCACHE_ENABLE_ASYNC_LOADING", "True")
    try:
        p = prompt(200, start=8)
        ReplayExecutor(mode_args(preset, mode), MODEL).generate([p], 4)
        executor = ReplayExecutor(mode_args(preset, mode), MODEL)
        victim = executor.next_request_id
        executor.on_iteration = lambda ex: ex.cancel(victim) if ex.stats.iterations == 2 else None
        cancelled = executor.generate([p], 4)[0]
        assert cancelled.cancelled and cancelled.num_connector_matched_tokens == 192
        again = executor.generate([p], 4)[0]
    finally:
        preset_env.undo()
    assert_same_output(again, reference([p], 4)[0])
    finish(preset, executor)


class LateLoads:
    """A worker's back-end whose async loads land only when :meth:`land` is called: until then their
    completion check is False and nothing is written, as for CUDA copies still queued."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.held: list[Callable[[], None]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)

    def load(self, plan: LoadPlan, context: Any, stream: Any, layers: Any = None) -> Done:
        if not plan.is_async:
            return self.backend.load(plan, context, stream, layers)
        landed: list[Done] = []
        self.held.append(lambda: landed.append(self.backend.load(plan, context, stream, layers)))
        return lambda: bool(landed) and landed[0]()

    def land(self) -> None:
        held, self.held = self.held, []
        for run in held:
            run()


@pytest.mark.parametrize("mode", ["v1", "v2"])
def test_a_request_cancelled_mid_load_keeps_its_pages_until_the_load_lands(preset: Preset, mode: str) -> None:
    """TRT-LLM 1.2 ends a request cancelled while its async load is in flight at once: its pages
    must stay its own until the load has landed, or the load writes into the next request's KV."""
    preset_env = pytest.MonkeyPatch()
    preset_env.setenv("LMCACHE_ENABLE_ASYNC_LOADING", "True")
    try:
        p, q = prompt(200, start=13), prompt(200, start=14)
        ReplayExecutor(mode_args(preset, mode), MODEL).generate([p], 4)
        # The device pool holds one 200-token request: q runs in the victim's pages once they are free.
        executor = ReplayExecutor(
            mode_args(preset, mode, max_tokens=256), MODEL, cancel_waits_for_loads=False
        )
        late = [LateLoads(worker.backend) for worker in executor.workers]
        for worker, backend in zip(executor.workers, late, strict=True):
            worker.backend = backend
        victim = executor.next_request_id
        cancelled_at: list[int] = []

        def step(ex: ReplayExecutor) -> None:
            if not cancelled_at and any(backend.held for backend in late):
                ex.cancel(victim)
                cancelled_at.append(ex.stats.iterations)
            elif cancelled_at and ex.stats.iterations == cancelled_at[0] + 3:  # q ran meanwhile, if it could
                for backend in late:
                    backend.land()

        executor.on_iteration = step
        cancelled, other = executor.generate([p, q], 8)
    finally:
        preset_env.undo()
    assert cancelled.cancelled and cancelled.num_connector_matched_tokens == 192
    assert_same_output(other, reference([q], 8)[0])
    finish(preset, executor)


@pytest.mark.parametrize("cached", [False, True], ids=["miss", "hit"])
def test_a_request_cancelled_while_waiting_for_pages_leaves_nothing_behind(
    preset: Preset, cached: bool
) -> None:
    """reserve_prefix asks about a request in every pass while it waits for pages (a hit is released
    in that pass); one cancelled before admission gets no other connector callback, and the planner
    forgets it once it is no longer asked about."""
    executor = ReplayExecutor(mode_args(preset, "v2-res", max_tokens=256), MODEL)
    waiting = prompt(200, start=11)
    if cached:
        executor.generate([waiting], 8)  # into the connector's cache; the next request evicts it
    planner = executor.scheduler.planner
    answers = []
    reserve = planner.reserve
    planner.reserve = lambda *a: answers.append(reserve(*a)) or answers[-1]
    victim = executor.next_request_id + 1  # the pool holds one 200-token request: the second waits
    cancel_at = executor.stats.iterations + 3
    executor.on_iteration = lambda ex: ex.cancel(victim) if ex.stats.iterations == cancel_at else None
    first, second = executor.generate([prompt(200, start=10), waiting], 8)
    asked = executor.stats.requests[victim].reservation_ids
    assert second.cancelled and len(asked) > 1  # asked in each pass while waiting
    assert (answers[-1][0] > 0) == cached
    executor.on_iteration = None
    executor.generate([prompt(64, start=12)], 8)  # passes that no longer ask about it
    assert_same_output(first, reference([prompt(200, start=10)], 8)[0])
    finish(preset, executor)


@pytest.mark.parametrize("mode", ["v2", "v2-res"])
def test_rollback_forgets_the_pages_and_replays(preset: Preset, mode: str) -> None:
    p = prompt(200, start=9)
    ReplayExecutor(mode_args(preset, mode), MODEL).generate([p], 4)
    executor = ReplayExecutor(mode_args(preset, mode), MODEL)
    executor.rollback_after_alloc(executor.next_request_id)
    result = executor.generate([p], 4)[0]
    assert executor.stats.requests[result.request_id].resets == 1
    assert result.num_connector_matched_tokens == 192
    if mode == "v2-res":
        assert len(reservations(executor, result)) == 2
    assert_same_output(result, reference([p], 4)[0])
    finish(preset, executor)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model", [MODEL, VSWA], ids=["full", "vswa"])
def test_cuda_pools(preset: Preset, mode: str, model: ModelConfig) -> None:
    if mode == "v1" and model is VSWA:
        pytest.skip("sliding windows need V2")
    p = prompt(300, start=10)
    cold = ReplayExecutor(mode_args(preset, mode), model, device="cuda").generate([p], 6)[0]
    executor = ReplayExecutor(mode_args(preset, mode), model, device="cuda")
    warm = executor.generate([p, p], 6)
    want = ReplayExecutor(mode_args(None, mode), model, device="cuda").generate([p], 6)[0]
    assert all(r.num_connector_matched_tokens == 256 for r in warm)
    for result in (cold, *warm):
        assert_same_output(result, want)
    finish(preset, executor)


@pytest.mark.parametrize("mode", ["v2", "v2-res"])
@pytest.mark.parametrize("model", [MODEL, VSWA], ids=["full", "vswa"])
@pytest.mark.parametrize("when", ["prefill", "decode", "decode-overlap"])
def test_a_preempted_request_recomputes_with_its_own_kv(
    preset: Preset, mode: str, model: ModelConfig, when: str
) -> None:
    """V2 preemption (reference §5.3, T-EXE2): ``request_finished``, the victim parked until its save
    lands, its pages freed (handed straight to the next allocation) and the request recomputed with
    its generated tokens in its prompt. The recompute's report is a new request with a longer
    prompt: same output as an uninterrupted run, and nothing pinned."""
    p = prompt(200, start=13)
    executor = ReplayExecutor(
        mode_args(preset, mode, chunk=64 if when == "prefill" else None),
        model,
        overlap_scheduler=when.endswith("overlap"),
    )
    victim = executor.next_request_id
    at = 3 if when == "prefill" else 6
    executor.on_iteration = lambda ex: ex.preempt(victim) if ex.stats.iterations == at else None
    got = executor.generate([p], 8)[0]
    assert executor.stats.requests[victim].preemptions == 1
    if model is VSWA:  # no device reuse with a sliding group: the cache served the recompute
        assert got.num_connector_matched_tokens >= (128 if when == "prefill" else 192)
    assert_same_output(got, ReplayExecutor(mode_args(None, mode), model).generate([p], 8)[0])
    finish(preset, executor)


@pytest.fixture
def unfull_chunks(lmcache_env: pytest.MonkeyPatch) -> None:
    """``save_unfull_chunk`` on, for the engine and for a server started after this."""
    lmcache_env.setenv("LMCACHE_SAVE_UNFULL_CHUNK", "True")


@pytest.mark.parametrize("mode", ["v1", "v2"])
def test_a_partial_last_chunk_is_saved_and_loaded_with_the_rest(
    unfull_chunks: None, preset: Preset, mode: str
) -> None:
    """A 230-token prompt: three full chunks and the whole blocks of the fourth (to 224) are saved;
    asked again, all 224 tokens load (the last slot holds two rows, not a chunk's four) and the
    output is the same."""
    p = prompt(230, start=31)
    first = ReplayExecutor(mode_args(preset, mode), MODEL)
    first.generate([p], 4)
    again = ReplayExecutor(mode_args(preset, mode), MODEL)
    served = again.generate([p], 4)[0]
    assert served.num_connector_matched_tokens == 224
    assert_same_output(served, reference([p], 4)[0])
    finish(preset, again)
