"""KVCacheManagerV2 with pages running short (``ReplayExecutor(serve_grow_pages=n)``), as a
connector sees it: a served prefix honoured partly by TRT-LLM's failed-grow rule (reference §5.1),
the async flag passed through whatever is honoured, and on the reservation path the clipped tail
released before the load is dispatched (§5.2 step 5)."""

from __future__ import annotations

import pytest

from lmcache.testing.trtllm_replay import (
    KvCacheConfig,
    ModelConfig,
    RecordedCall,
    RecordingConnector,
    ReplayExecutor,
    SchedulerConfig,
    TorchLlmArgs,
)

TPB = 32
MODEL = ModelConfig(vocab_size=256, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)


def args(*, chunk: int | None = 64, prefix_aware: bool = False, v2: bool = True) -> TorchLlmArgs:
    return TorchLlmArgs(
        kv_cache_config=KvCacheConfig(tokens_per_block=TPB, use_kv_cache_manager_v2=v2),
        scheduler_config=SchedulerConfig(enable_prefix_aware_scheduling=prefix_aware),
        enable_chunked_prefill=chunk is not None,
        max_num_tokens=chunk or 8192,
    )


def prompt(n: int) -> list[int]:
    return [(3 + 7 * i) % 256 for i in range(n)]


def releases(rec: RecordingConnector) -> list[tuple[int, int, int]]:
    return [c.args[1:] for c in rec.calls_of("release_prefix_reservation")]


def matched(call: RecordedCall) -> int | None:
    """The request's ``py_num_connector_matched_tokens`` when the scheduler was called."""
    return call.args[0].py_num_connector_matched_tokens


def test_serve_grow_pages_needs_v2_and_a_count() -> None:
    for bad, kw in ((0, {"v2": False}), (-1, {})):
        with pytest.raises(ValueError, match="serve_grow_pages"):
            ReplayExecutor(
                args(**kw), MODEL, connector=RecordingConnector().factories(), serve_grow_pages=bad
            )


@pytest.mark.parametrize("load_async", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize(
    ("grow_pages", "chunk", "honoured", "pages", "window"),
    [(5, 64, 32, 2, (32, 64)), (6, 64, 192, 8, (192, 58)), (0, 32, 0, 1, (0, 32))],
    ids=["short", "enough", "none"],
)
def test_legacy_offer_honoured_up_to_the_last_whole_block_of_the_chunk(
    load_async: bool, grow_pages: int, chunk: int, honoured: int, pages: int, window: tuple[int, int]
) -> None:
    """192 of 250 tokens offered at position 0, chunk 64: serving them grows 2 pages to 8 (6 more).
    Short of that the chunk's pages keep ``[0, 32)`` and leave ``[32, 64)`` to compute; with a
    one-block chunk nothing is honoured. The alloc callback sees the window after the serve, and the
    async flag is committed whatever was honoured (the request parks until ``get_finished``, then
    re-enters at the honoured end with a full chunk)."""
    rec = RecordingConnector(match=(192, load_async), finished_delay=1)
    ex = ReplayExecutor(args(chunk=chunk), MODEL, connector=rec.factories(), serve_grow_pages=grow_pages)
    (result,) = ex.generate([prompt(250)], 2)
    (alloc,) = rec.calls_of("update_state_after_alloc_by_layer_group")
    assert alloc.args[0].context_current_position == honoured and len(alloc.args[1][0]) == pages
    assert alloc.args[0].py_num_connector_matched_tokens == honoured  # the commit came first
    stats = ex.stats.requests[result.request_id]
    assert (stats.connector_matched_tokens, stats.connector_load_async) == (honoured, load_async)
    started = [rid for c in rec.calls_of("get_finished") for rid in c.args[1]]
    assert started == ([result.request_id] if load_async else [])
    first = [d for o in rec.scheduler_outputs for d in o.new_requests][0]
    computed, scheduled = window
    if not load_async:  # the first chunk's report excludes the sync hit
        computed, scheduled = 0, min(pages * TPB, 250) - honoured
    assert (first.computed_position, first.num_scheduled_tokens) == (computed, scheduled)


def test_async_flag_passes_through_a_clamp_to_nothing() -> None:
    """Device reuse covers all but the last prompt token: an offer of 16 is clamped to 0, and the
    async flag still parks the request until ``get_finished`` reports it (TRT-LLM's commit)."""
    rec = RecordingConnector(match=lambda request, computed: (16, True) if computed else (0, False))
    ex = ReplayExecutor(args(chunk=None), MODEL, connector=rec.factories())
    ex.generate([prompt(33)], 2)
    (again,) = ex.generate([prompt(33)], 2)
    assert again.num_device_matched_tokens == 32 and again.num_connector_matched_tokens == 0
    assert ex.stats.requests[again.request_id].connector_load_async
    assert again.request_id in [rid for c in rec.calls_of("get_finished") for rid in c.args[1]]


@pytest.mark.parametrize("load_async", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize(
    ("grow_pages", "chunk", "accepted"),
    [(5, 64, 32), (6, 64, 192), (0, 32, 0)],
    ids=["short", "enough", "none"],
)
def test_reservation_clipped_to_what_the_pages_hold_releases_the_tail_first(
    load_async: bool, grow_pages: int, chunk: int, accepted: int
) -> None:
    """Reserved 192 of 250: the budget charges only the 58 tokens after it (a 32-token chunk: 32),
    whose pages are 2 (1); growing them to 8 pages (7) fails short of 6 more: ``[0, 32)`` (nothing)
    stays accepted, the tail is released before dispatch and only the accepted part loads; the
    request's ``py_num_connector_matched_tokens`` says so once ``accept_prefix_load`` ran."""
    rec = RecordingConnector(reserve=(192, load_async))
    ex = ReplayExecutor(
        args(chunk=chunk, prefix_aware=True), MODEL, connector=rec.factories(), serve_grow_pages=grow_pages
    )
    (result,) = ex.generate([prompt(250)], 2)
    loads = [(p.start, p.end, p.is_async) for o in rec.scheduler_outputs for p in o.prefix_loads]
    assert loads == ([(0, accepted, load_async)] if accepted else [])
    tail = [(1, accepted, 192)] if accepted < 192 else []
    retired = [(1, 0, accepted)] if accepted else []
    assert releases(rec) == tail + retired
    order = [c.method for c in rec.calls if c.method in ("release_prefix_reservation", "start_load_kv")]
    assert order[: len(tail) + 1] == ["release_prefix_reservation"] * len(tail) + ["start_load_kv"]
    stats = ex.stats.requests[result.request_id]
    assert stats.connector_matched_tokens == accepted
    # accept_prefix_load records the accepted length, after the alloc callback (which saw 0)
    (alloc,) = rec.calls_of("update_state_after_alloc_by_layer_group")
    (finished,) = rec.calls_of("request_finished_by_layer_group")
    assert (matched(alloc), matched(finished)) == (0, accepted)


def test_a_recomputed_victim_starts_with_no_connector_tokens() -> None:
    """Preemption sets ``py_num_connector_matched_tokens`` back to 0 (``reset_for_recompute``): the
    victim's next alloc callback, before its new reservation is accepted, sees 0, not the length
    of the load its first allocation took."""
    answers = iter([(64, False)])
    rec = RecordingConnector(reserve=lambda request, computed, rid: next(answers, (0, False)))
    ex = ReplayExecutor(args(chunk=None, prefix_aware=True), MODEL, connector=rec.factories())
    rid = ex.next_request_id
    ex.on_iteration = lambda e: e.preempt(rid) if e.stats.iterations == 3 else None
    ex.generate([prompt(96)], 6)
    assert ex.stats.requests[rid].preemptions == 1
    victim = rec.calls_of("request_finished_by_layer_group")[0]
    first, second = rec.calls_of("update_state_after_alloc_by_layer_group")
    assert (matched(victim), matched(first), matched(second)) == (64, 0, 0)
