"""Sliding-window pages V2 frees while the request runs, reused by the next forward before a late
save read them: the save must be fenced, or wrong KV is stored and served (both presets)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
from support.e2e import CHUNK, MODEL, SLIDING, TPB, assert_same_output, mode_args, prompt
from support.late_saves import LateSaves, late_saves
from support.presets import Preset

from lmcache.testing.trtllm_replay import ReplayExecutor, TorchLlmArgs

WINDOW = 64


@pytest.fixture
def late(monkeypatch: pytest.MonkeyPatch) -> Iterator[LateSaves]:
    """Saves run two iterations after their forward (unless waited for)."""
    yield from late_saves(monkeypatch, lag=2)


def args(preset: Preset | None, mode: str) -> TorchLlmArgs:
    # One 128-token prompt per iteration (no chunked prefill): the second request's pages are
    # allocated in the iteration after the first one's prefill.
    return mode_args(preset, mode, max_num_tokens=160)


def executor(
    preset: Preset | None, mode: str, overlap: bool, late: LateSaves | None = None, device: str = "cpu"
) -> ReplayExecutor:
    ex = ReplayExecutor(
        args(preset, mode), SLIDING, overlap_scheduler=overlap, free_passed_pages=True, device=device
    )
    if late is not None:
        ex.on_iteration = lambda _: late.tick()
    return ex


def late_save_of_a_reused_page(
    preset: Preset, late: LateSaves, mode: str, overlap: bool, device: str
) -> None:
    """A's 128-token prefill passes its first 64 tokens' pages (window 64): V2 gives them back before
    the next forward, where B's prefill takes and writes them. A's save of chunk [0, 64) still waits
    on the saver thread. Unfenced, it stores B's KV under A's key, and C (A's first 64 tokens, then
    its own) loads it. Fenced, the forward that reuses the pages waits for the save."""
    a, b = prompt(128, start=21), prompt(128, start=22)
    c = a[:WINDOW] + prompt(40, start=23)
    ex = executor(preset, mode, overlap, late, device)
    first, second = ex.generate([a, b], 4)
    freed = {page for _, page in ex.stats.requests[first.request_id].freed_pages}
    assert len(freed) >= WINDOW // TPB  # the window passed A's first chunk before B's forward
    served = ex.generate([c], 4)[0]
    assert served.num_connector_matched_tokens == WINDOW  # C's first chunk came from A's save
    reference = executor(None, mode, overlap, device=device)
    for got, p in ((first, a), (second, b), (served, c)):
        assert_same_output(got, reference.generate([p], 4)[0])
    assert late.on_demand > 0  # the fence ran A's save before it was due
    assert preset.pinned() == 0


@pytest.mark.parametrize(("mode", "overlap"), [("v2", False), ("v2-res", True)], ids=["v2", "v2-res-overlap"])
def test_a_late_save_of_a_passed_page_is_fenced_before_the_page_is_reused(
    preset: Preset, late: LateSaves, mode: str, overlap: bool
) -> None:
    late_save_of_a_reused_page(preset, late, mode, overlap, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_on_cuda_the_next_forward_waits_for_the_fenced_copies(
    preset: Preset, late: LateSaves, overlap: bool
) -> None:
    """The CUDA branch: TRT-LLM's stream waits on the save's event (its copies run on the saver's side
    stream), so the next forward, on the execution stream, follows them."""
    late_save_of_a_reused_page(preset, late, "v2", overlap, "cuda")


@pytest.mark.parametrize("mode", ["v2", "v2-res"])
def test_freeing_passed_pages_changes_no_output(mode: str) -> None:
    """Without a connector, a run that gives passed pages back (and reuses them) computes what one
    that keeps them does: the model never reads a page its window passed."""
    a, b = prompt(150, start=24), prompt(128, start=25)
    kept = ReplayExecutor(args(None, mode), SLIDING).generate([a, b], 20)
    freed_ex = executor(None, mode, overlap=False)
    freed = freed_ex.generate([a, b], 20)
    assert freed_ex.stats.requests[freed[0].request_id].freed_pages
    for got, want in zip(freed, kept, strict=True):
        assert_same_output(got, want)


def test_under_the_overlap_scheduler_a_save_never_reads_a_page_the_window_just_passed(lmcache_env) -> None:
    """The overlap scheduler reports a decode step one token behind V2, which frees a sliding
    window's page one token earlier than the report says, and hands it to another request in the
    same pass. With a window of ``chunk - tokens_per_block + 1`` tokens, the chunk a decode step
    completes begins in that page: its save must leave the page out, or C (A's first 128 tokens)
    loads B's KV."""
    model = dataclasses.replace(MODEL, layer_windows=(CHUNK - TPB + 1, None))
    a, b = prompt(120, start=3), prompt(600, start=4)
    ex = ReplayExecutor(
        mode_args(Preset("lmcache"), "v2", chunk=33), model, overlap_scheduler=True, free_passed_pages=True
    )
    first, _ = ex.generate([a, b], [12, 1])
    assert ex.stats.requests[first.request_id].freed_pages
    c = (a + first.tokens)[:128]
    served = ReplayExecutor(mode_args(Preset("lmcache"), "v2", chunk=33), model).generate([c], 4)[0]
    assert served.num_connector_matched_tokens > 0
    assert_same_output(served, ReplayExecutor(mode_args(None, "v2", chunk=33), model).generate([c], 4)[0])
