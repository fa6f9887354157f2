"""Both presets under a TRT-LLM whose ``get_finished`` calls no worker while nothing async is tracked
(``ReplayExecutor(skip_idle_polls=True)``, a 2026 revision): whatever the connector does there, a
running request's saves still land and serve the next request, loads and preemptions still work,
outputs stay bit-equal to a run without a connector, and nothing is left pinned or tracked."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from support.e2e import MODEL, SLIDING, VSWA, assert_same_output, mode_args, prompt
from support.late_saves import LateSaves, late_saves
from support.presets import Preset

from lmcache.testing.trtllm_replay import (
    KV_MANAGER_MODES,
    ModelConfig,
    ReplayExecutor,
)

overlap_modes = pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])


@pytest.fixture
def late(monkeypatch: pytest.MonkeyPatch) -> Iterator[LateSaves]:
    """Saves run two iterations after their forward (unless waited for): where they land is known."""
    yield from late_saves(monkeypatch, lag=2)


def executor(
    preset: Preset,
    mode: str,
    model: ModelConfig = MODEL,
    *,
    tp: int = 1,
    max_tokens: int = 2048,
    chunk: int | None = None,
    max_num_tokens: int | None = None,
    overlap: bool = False,
    free_passed_pages: bool = False,
) -> ReplayExecutor:
    """An executor whose ``get_finished`` polls no worker while nothing async is tracked."""
    return ReplayExecutor(
        mode_args(preset, mode, tp=tp, max_tokens=max_tokens, chunk=chunk, max_num_tokens=max_num_tokens),
        model,
        overlap_scheduler=overlap,
        free_passed_pages=free_passed_pages,
        skip_idle_polls=True,
    )


def reference(p: list[int], new_tokens: int, mode: str = "v1", model: ModelConfig = MODEL) -> object:
    return ReplayExecutor(mode_args(None, mode), model).generate([p], new_tokens)[0]


def finish(preset: Preset, ex: ReplayExecutor, caplog: pytest.LogCaptureFixture | None = None) -> None:
    """Nothing pinned, reserved or tracked once every request is done; no save waited for a release."""
    assert ex.scheduler.planner.reservation_ids() == []
    assert ex.scheduler.planner.pending_requests() == []
    assert preset.pinned() == 0
    assert [worker.transfers_in_flight() for worker in ex.workers] == [0] * len(ex.workers)
    assert ex.manager.skipped_polls > 0
    if caplog is not None:
        assert not [r for r in caplog.records if r.name.endswith("save_fence")]


@pytest.mark.parametrize("mode", ["v2", "v2-res"])
@pytest.mark.parametrize("model", [VSWA, SLIDING], ids=["vswa", "sliding"])
@overlap_modes
def test_a_running_requests_saves_serve_the_next_request_without_a_poll(
    preset: Preset, late: LateSaves, caplog: pytest.LogCaptureFixture, mode: str, model, overlap: bool
) -> None:
    """A runs (decoding) while B, the same prompt, waits out three iterations: A's prefill saves land
    meanwhile (two iterations after its forward) and B's lookup finds them, with no ``get_finished``
    call to any worker since A started (no async request is tracked before A finishes). A sliding
    group means no device reuse: B's prefix can only come from the connector."""
    caplog.set_level(logging.WARNING, logger="lmcache")
    p = prompt(200, start=31)
    ex = executor(preset, mode, model, overlap=overlap)
    b = ex.next_request_id + 1
    ex.drop_from_batch(b, iterations=3)
    polled_before_b: list[int] = []

    def on_iteration(executor: ReplayExecutor) -> None:
        late.tick()
        if executor.stats.iterations == 5:  # B was looked up and computed in iteration 4
            polled_before_b.append(4 - executor.manager.skipped_polls)

    ex.on_iteration = on_iteration
    first, second = ex.generate([p, p], [16, 4])
    assert polled_before_b == [0]
    assert second.num_connector_matched_tokens == 192
    assert_same_output(first, reference(p, 16, mode, model))
    assert_same_output(second, reference(p, 4, mode, model))
    finish(preset, ex, caplog)


@pytest.mark.parametrize("mode", KV_MANAGER_MODES)
@pytest.mark.parametrize(("tp", "overlap"), [(1, True), (2, False)], ids=["tp1-overlap", "tp2-sync"])
def test_seed_scenario_and_chunked_multi_turn(
    preset: Preset, caplog: pytest.LogCaptureFixture, mode: str, tp: int, overlap: bool
) -> None:
    """A, then B evicting A from the device pool, then A again (the connector supplies A); then a
    second turn after chunked prefill (saves every step) hits past the first turn's prompt."""
    caplog.set_level(logging.WARNING, logger="lmcache")
    a, b = prompt(200, start=32), prompt(200, start=33)
    ex = executor(preset, mode, tp=tp, max_tokens=256, overlap=overlap)
    first = ex.generate([a], 8)[0]
    ex.generate([b], 8)
    third = ex.generate([a], 8)[0]
    assert third.num_connector_matched_tokens > 0
    assert third.num_device_matched_tokens + third.num_connector_matched_tokens == 192
    assert_same_output(first, reference(a, 8))
    assert_same_output(third, reference(a, 8))
    finish(preset, ex, caplog)

    turn1 = prompt(150, start=34)
    chunked = executor(preset, mode, tp=tp, chunk=64, overlap=overlap)
    answer = chunked.generate([turn1], 60)[0]
    turn2 = turn1 + answer.tokens + prompt(30, start=35)
    fresh = executor(preset, mode, tp=tp, chunk=64, overlap=overlap)
    second = fresh.generate([turn2], 6)[0]
    assert second.num_connector_matched_tokens > len(turn1)
    assert_same_output(answer, reference(turn1, 60))
    assert_same_output(second, reference(turn2, 6))
    finish(preset, chunked, caplog)
    finish(preset, fresh, caplog)


@pytest.mark.parametrize("mode", KV_MANAGER_MODES)
@overlap_modes
def test_async_loads(preset: Preset, mode: str, overlap: bool) -> None:
    """An async load is tracked (legacy) or retired through its reservation id (prefix load, not
    tracked by ``get_finished``): both complete, and the next request is served too."""
    preset_env = pytest.MonkeyPatch()
    preset_env.setenv("LMCACHE_ENABLE_ASYNC_LOADING", "True")
    try:
        p = prompt(200, start=36)
        executor(preset, mode, overlap=overlap).generate([p], 4)
        ex = executor(preset, mode, overlap=overlap)
        warm = ex.generate([p], 4)[0]
        again = ex.generate([p + prompt(70, start=37)], 4)[0]
    finally:
        preset_env.undo()
    assert warm.num_connector_matched_tokens == 192
    assert again.num_device_matched_tokens + again.num_connector_matched_tokens >= 192
    assert_same_output(warm, reference(p, 4))
    assert_same_output(again, reference(p + prompt(70, start=37), 4))
    finish(preset, ex)


@pytest.mark.parametrize("mode", ["v2", "v2-res"])
@pytest.mark.parametrize("model", [MODEL, VSWA], ids=["full", "vswa"])
@pytest.mark.parametrize("when", ["prefill", "decode-overlap"])
def test_preemption(preset: Preset, mode: str, model: ModelConfig, when: str) -> None:
    """The victim's save is tracked until it lands (it parks the victim), then nothing is: the
    recompute is served from the cache and computes what an uninterrupted run does."""
    p = prompt(200, start=38)
    ex = executor(
        preset, mode, model, chunk=64 if when == "prefill" else None, overlap=when.endswith("overlap")
    )
    victim = ex.next_request_id
    at = 3 if when == "prefill" else 6
    ex.on_iteration = lambda e: e.preempt(victim) if e.stats.iterations == at else None
    got = ex.generate([p], 8)[0]
    assert ex.stats.requests[victim].preemptions == 1
    if model is VSWA:
        assert got.num_connector_matched_tokens >= (128 if when == "prefill" else 192)
    assert_same_output(got, reference(p, 8, mode, model))
    finish(preset, ex)


@pytest.mark.parametrize("mode", ["v2", "v2-res"])
@overlap_modes
def test_passed_pages_freed_while_saves_run_late(
    preset: Preset, late: LateSaves, mode: str, overlap: bool
) -> None:
    """V2 gives A's passed sliding-window pages to B's prefill in the next forward while A's save of
    them still waits on the saver thread: the window fence (in ``wait_for_save``, not
    ``get_finished``) keeps the stored KV A's, so C (A's first 64 tokens) is served A's KV."""
    a, b = prompt(128, start=39), prompt(128, start=40)
    c = a[:64] + prompt(40, start=41)
    # One 128-token prefill per iteration: B's pages are allocated in the iteration after A's prefill.
    ex = executor(preset, mode, SLIDING, max_num_tokens=160, overlap=overlap, free_passed_pages=True)
    ex.on_iteration = lambda _: late.tick()
    first, second = ex.generate([a, b], 4)
    assert ex.stats.requests[first.request_id].freed_pages
    served = ex.generate([c], 4)[0]
    assert served.num_connector_matched_tokens == 64
    for got, p in ((first, a), (second, b), (served, c)):
        assert_same_output(got, reference(p, 4, mode, SLIDING))
    finish(preset, ex)
