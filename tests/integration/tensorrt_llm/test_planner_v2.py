"""The planner under TRT-LLM's V2 contract: block ordinals with -1, reservations, cancel, reset, groups."""

import pytest
from test_planner import CHUNK, TPB, FakeRequest, planner, report

from lmcache.integration.tensorrt_llm._trtllm import PrefixLoad, SchedulerOutput
from lmcache.integration.tensorrt_llm.connector import LMCacheScheduler
from lmcache.integration.tensorrt_llm.plan import PinKey
from lmcache.integration.tensorrt_llm.planner import PromisedLoadError


def grouped_report(rid, tokens, groups, pos, scheduled):  # noqa: ANN001, ANN201
    data = report(rid, tokens, groups[0] if len(groups) == 1 else [], pos, scheduled)
    data.new_block_ids_by_layer_group = groups
    return data


def prefix_load(rid, req, start, end, groups, is_async=False):  # noqa: ANN001, ANN201
    return PrefixLoad(rid, req.request_id, start, end, is_async, groups, list(req.tokens), req.cache_salt)


def test_no_page_entries_stay_in_place_and_never_reach_a_save() -> None:
    p, _ = planner()
    prompt = list(range(4 * CHUNK))
    blocks = list(range(16))
    blocks[5] = -1  # chunk 1 (blocks 4..7) has a block without a page
    meta = p.build(SchedulerOutput(new_requests=[report(1, prompt, blocks, 0, len(prompt))]))
    assert [(s.start, s.end) for s in meta.saves] == [(0, CHUNK), (2 * CHUNK, 4 * CHUNK)]
    for save in meta.saves:  # the ordinal list is handed over whole: entry i is still block i
        assert save.block_ids == blocks


def test_a_load_over_a_missing_page_of_a_full_attention_group_fails_before_any_copy() -> None:
    p, index = planner(hit=128)
    index.group_windows = [None]
    req = FakeRequest(1, list(range(200)))
    assert p.match(req, 0) == (128, False)
    blocks = [0, 1, 2, -1, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    p.after_alloc(req, [blocks])
    with pytest.raises(PromisedLoadError, match="layer group 0 has no page"):
        p.build(SchedulerOutput(new_requests=[report(1, req.tokens, blocks, 0, 72)]))


def test_a_sliding_group_with_sink_blocks_loads_its_sinks_and_its_window() -> None:
    """V2 keeps a sliding group's sink pages; only the blocks its window passed read -1. Each paged
    run is one transfer, and no transfer covers a -1."""
    p, index = planner(hit=128)
    index.group_windows = [None, 64]
    req = FakeRequest(3, list(range(200)))
    assert p.reserve(req, 0, 9) == (128, False)
    full = list(range(13))
    sliding = [40, -1, -1, -1, 44, 45, 46, 47, 48, 49, 50, 51, 52]  # sink block 0; window from 64
    out = SchedulerOutput(
        new_requests=[grouped_report(3, req.tokens, [full, sliding], 0, 72)],
        prefix_loads=[prefix_load(9, req, 0, 128, [full, sliding])],
    )
    (load,) = p.build(out).loads
    assert [(t.group, t.start, t.end) for t in load.transfers] == [(0, 0, 128), (1, 0, 16), (1, 64, 128)]
    for t in load.transfers:
        assert min(t.block_ids[t.start // TPB : t.end // TPB]) >= 0


def test_reservation_pins_per_id_and_releases_by_range() -> None:
    p, index = planner(hit=128)
    req = FakeRequest(1, list(range(200)))
    assert p.reserve(req, 16, 7) == (112, False)
    assert index.pinned == {PinKey("res", 7)}
    # TRT-LLM trims to [32, 64) first, then releases the rest piece by piece.
    p.release_reservation(7, 16, 32)
    p.release_reservation(7, 64, 128)
    assert index.pinned == {PinKey("res", 7)} and p.reservation_ids() == [7]
    p.release_reservation(7, 32, 64)
    assert index.pinned == set() and p.reservation_ids() == []
    p.release_reservation(7, 32, 64)  # a stale release is harmless
    assert index.released == [PinKey("res", 7)]


def test_overlapping_reservations_keep_their_own_pins() -> None:
    p, index = planner(hit=128)
    a, b = FakeRequest(1, list(range(200))), FakeRequest(2, list(range(200)))
    assert p.reserve(a, 0, 1)[0] == 128
    assert p.reserve(b, 0, 2)[0] == 128
    p.release_reservation(1, 0, 128)
    assert index.pinned == {PinKey("res", 2)}
    with pytest.raises(ValueError, match="fresh"):
        p.reserve(a, 0, 2)
    p.release_reservation(2, 0, 128)
    assert index.pinned == set()


def test_reservation_needs_a_block_aligned_start_and_a_hit() -> None:
    p, index = planner(hit=128)
    assert p.reserve(FakeRequest(1, list(range(200))), 8, 1) == (0, False)
    assert index.pinned == set()
    q, index = planner(hit=0)
    assert q.reserve(FakeRequest(1, list(range(200))), 0, 1) == (0, False)
    assert index.pinned == set() and q.reservation_ids() == []


def test_prefix_loads_are_the_only_permission_to_load() -> None:
    p, index = planner(hit=128, enable_async_loading=True)
    index.group_windows = [None, 64]
    req = FakeRequest(3, list(range(200)))
    assert p.reserve(req, 0, 9) == (128, True)
    p.after_alloc(req, [list(range(13))])
    assert p.build(SchedulerOutput()).loads == []  # a reservation alone starts nothing
    groups = [list(range(13)), [-1, -1, -1, -1, 24, 25, 26, 27, 28, 29, 30, 31, 32]]
    meta = p.build(SchedulerOutput(prefix_loads=[prefix_load(9, req, 0, 96, groups, is_async=True)]))
    (load,) = meta.loads
    assert (load.reservation_id, load.pin, load.start, load.end, load.is_async) == (
        9,
        PinKey("res", 9),
        0,
        96,
        True,
    )
    # The sliding group needs only its paged blocks: the transfer starts where its pages do.
    assert [(t.group, t.start, t.end) for t in load.transfers] == [(0, 0, 96), (1, 64, 96)]
    assert p.build(SchedulerOutput()).loads == []  # dispatched once


def test_prefix_load_of_an_unknown_or_released_reservation_is_refused() -> None:
    p, _ = planner(hit=128)
    req = FakeRequest(3, list(range(200)))
    with pytest.raises(PromisedLoadError, match="did not reserve"):
        p.build(SchedulerOutput(prefix_loads=[prefix_load(5, req, 0, 64, [list(range(13))])]))
    p.reserve(req, 0, 6)
    p.release_reservation(6, 0, 128)
    with pytest.raises(PromisedLoadError, match="did not reserve"):
        p.build(SchedulerOutput(prefix_loads=[prefix_load(6, req, 0, 64, [list(range(13))])]))


def test_sync_prefix_load_shifts_the_first_report_and_is_not_saved_again() -> None:
    p, _ = planner(hit=128)
    req = FakeRequest(3, list(range(200)))
    p.reserve(req, 0, 4)
    groups = [list(range(13))]
    out = SchedulerOutput(
        new_requests=[grouped_report(3, req.tokens, groups, 0, 72)],
        prefix_loads=[prefix_load(4, req, 0, 128, groups)],
    )
    meta = p.build(out)
    assert [(ld.start, ld.end) for ld in meta.loads] == [(0, 128)]
    assert [(s.start, s.end) for s in meta.saves] == [(128, 192)]


def test_cancel_load_trims_head_or_tail_and_refuses_a_split() -> None:
    p, index = planner(hit=192)
    req = FakeRequest(1, list(range(300)))
    assert p.match(req, 0) == (192, False)
    p.cancel_load(req, 160, 192)  # tail
    p.cancel_load(req, 0, 32)  # head
    with pytest.raises(ValueError, match="split"):
        p.cancel_load(req, 64, 96)
    p.after_alloc(req, [list(range(19))])
    meta = p.build(SchedulerOutput())
    assert [(ld.start, ld.end) for ld in meta.loads] == [(32, 160)]
    q, index = planner(hit=192)
    q.match(req, 0)
    q.cancel_load(req, 0, 192)
    assert index.pinned == set() and q.build(SchedulerOutput()).loads == []


def test_a_legacy_offer_honoured_partly_loads_only_the_allocated_blocks() -> None:
    """V2's legacy query may honour less than offered, with no cancel_load: the allocation ends
    before the offer. Only its whole blocks load; an offer left with no page drops, pins released."""
    p, index = planner(hit=256)
    req = FakeRequest(5, list(range(300)))
    assert p.match(req, 0) == (256, False)
    pages = list(range(8))  # 128 tokens: the grow to the offer's end failed; 112 honoured
    p.after_alloc(req, [pages])
    meta = p.build(SchedulerOutput(new_requests=[report(5, req.tokens, pages, 0, 16)]))
    assert [(ld.start, ld.end) for ld in meta.loads] == [(0, 128)]
    assert [(t.start, t.end) for t in meta.loads[0].transfers] == [(0, 128)]
    assert meta.saves == [] and index.pinned == {PinKey("req", 5)}  # the load releases them
    q, index = planner(hit=256)
    assert q.match(req, 64) == (192, False)
    q.after_alloc(req, [list(range(4))])  # honoured 0: the pages end at the device match
    assert index.pinned == set()
    assert q.build(SchedulerOutput(new_requests=[report(5, req.tokens, list(range(4)), 64, 64)])).loads == []


def test_a_legacy_offer_loads_only_the_tokens_trtllm_says_it_honoured() -> None:
    """V2's commit records on the request how many offered tokens it took, counted from the
    query's start (``py_num_connector_matched_tokens``): the load ends there even where the chunk's
    pages reach further (those blocks TRT-LLM computes in this very chunk). Honoured 0 drops the
    load and its pins."""
    p, index = planner(hit=256)
    req = FakeRequest(5, list(range(300)))
    assert p.match(req, 0) == (256, False)
    pages = list(range(12))  # the window [112, 192) after the serve: its pages cover 192 tokens
    LMCacheScheduler(None, p).update_state_after_alloc_by_layer_group(_Honoured(req, 112), [pages])
    meta = p.build(SchedulerOutput(new_requests=[grouped_report(5, req.tokens, [pages], 0, 80)]))
    assert [(ld.start, ld.end) for ld in meta.loads] == [(0, 112)]
    assert [(t.start, t.end) for t in meta.loads[0].transfers] == [(0, 112)]
    q, index = planner(hit=256)
    assert q.match(req, 64) == (192, False)
    q.after_alloc(req, [list(range(12))], honoured=0)
    assert index.pinned == set() and q.build(SchedulerOutput()).loads == []


def test_the_honoured_count_runs_from_the_query_start_and_may_end_inside_a_block() -> None:
    """A head already cancelled does not move where TRT-LLM counts from. An honoured end inside a
    block (the clamp to ``prompt_len - 1`` on an offer reaching it): the load's range ends there and
    its copy fills that block whole, so no token before the end is left neither loaded nor computed
    (TRT-LLM computes the block's rest after the load)."""
    p, _ = planner(hit=256)
    req = FakeRequest(6, list(range(300)))
    assert p.match(req, 0) == (256, False)
    p.cancel_load(req, 0, 32)
    p.after_alloc(req, [list(range(19))], honoured=100)
    (load,) = p.build(SchedulerOutput()).loads
    assert (load.start, load.end) == (32, 100)
    assert [(t.start, t.end) for t in load.transfers] == [(32, 112)]


def test_the_honoured_count_is_read_only_where_trtllm_sets_it() -> None:
    """Without the member (a TRT-LLM that does not set it) the allocation alone bounds the load;
    the flat form (V1 honours the whole offer, and its query sees another object) never reads it."""
    for alloc in ("update_state_after_alloc_by_layer_group", "update_state_after_alloc"):
        p, _ = planner(hit=256)
        req = FakeRequest(7, list(range(300)))
        assert p.match(req, 0) == (256, False)
        pages = list(range(19))
        request = req if alloc.endswith("group") else _Honoured(req, 0)
        getattr(LMCacheScheduler(None, p), alloc)(request, [pages] if alloc.endswith("group") else pages)
        assert [(ld.start, ld.end) for ld in p.build(SchedulerOutput()).loads] == [(0, 256)]


class _Honoured:
    """A request as V2's commit leaves it: ``py_num_connector_matched_tokens`` set."""

    def __init__(self, req: FakeRequest, honoured: int) -> None:
        self.request_id, self.tokens, self.cache_salt = req.request_id, req.tokens, req.cache_salt
        self.prompt_len = req.prompt_len
        self.py_num_connector_matched_tokens = honoured

    def get_tokens(self, beam: int) -> list:
        return self.tokens


def test_a_cancel_inside_a_block_still_loads_every_token_trtllm_counts_as_loaded() -> None:
    """TRT-LLM counts the rest of a trimmed offer as loaded, to the token: a head cut where its own cache
    committed 40 tokens (partial reuse) leaves [40, 100) to us after the tail cut at 100, so the copies
    fill blocks 2 to 6 whole ([32, 112)); and the first report's count excludes exactly the tokens
    TRT-LLM counts as loaded (the saves follow what is computed, never ahead of it)."""
    p, _ = planner(hit=192)
    req = FakeRequest(1, list(range(300)))
    assert p.match(req, 0) == (192, False)
    p.cancel_load(req, 0, 40)
    p.cancel_load(req, 100, 192)
    p.after_alloc(req, [list(range(19))])
    (load,) = p.build(SchedulerOutput()).loads
    assert (load.start, load.end) == (40, 100)
    assert [(t.start, t.end) for t in load.transfers] == [(32, 112)]
    q, _ = planner(hit=128)
    q.match(req, 0)
    q.cancel_load(req, 0, 90)
    q.after_alloc(req, [list(range(19))])
    # TRT-LLM computed 90 tokens itself and counts [90, 128) as ours: 191 are computed after this step,
    # 192 (the second chunk whole, to save) after the next.
    meta = q.build(SchedulerOutput(new_requests=[report(1, req.tokens, list(range(19)), 90, 63)]))
    (load,) = meta.loads
    assert (load.start, load.end) == (90, 128)
    assert [(t.start, t.end) for t in load.transfers] == [(80, 128)]
    assert meta.saves == []
    meta = q.build(SchedulerOutput(cached_requests=[report(1, [], [], 191, 1)]))
    assert [(s.start, s.end) for s in meta.saves] == [(128, 192)]
    r, index = planner(hit=192)
    r.match(req, 0)
    r.cancel_load(req, 0, 96)
    r.cancel_load(req, 96, 192)  # nothing is left: the pins go
    assert index.pinned == set() and r.pending_requests() == [1]
    r.after_alloc(req, [list(range(19))])
    assert r.build(SchedulerOutput()).loads == []


def test_a_load_refused_in_a_build_leaves_no_other_load_handed_over() -> None:
    """A build that raises hands no metadata to the workers: every load it planned stays the
    scheduler's, and ending the requests releases all their pins."""
    p, index = planner(hit=128)
    index.group_windows = [None]
    a, b = FakeRequest(1, list(range(200))), FakeRequest(2, list(range(200)))
    assert p.match(a, 0) == p.match(b, 0) == (128, False)
    p.after_alloc(a, [list(range(13))])
    p.after_alloc(b, [[0, 1, 2, -1] + list(range(4, 13))])  # b: a page missing in its promised range
    with pytest.raises(PromisedLoadError):
        p.build(SchedulerOutput())
    p.finished(a)
    p.finished(b)
    assert index.pinned == set()


def test_request_reset_drops_pages_and_plans_and_starts_afresh() -> None:
    p, index = planner(hit=128)
    req = FakeRequest(1, list(range(200)))
    p.match(req, 0)
    p.after_alloc(req, [list(range(13))])
    p.reset(req)
    assert index.pinned == set() and p.pending_requests() == []
    assert p.build(SchedulerOutput()).loads == []
    assert p.match(req, 0) == (128, False)  # asked again after the rollback
    p.after_alloc(req, [list(range(20, 33))])
    (load,) = p.build(SchedulerOutput()).loads
    assert load.transfers[0].block_ids == list(range(20, 33))


def test_sliding_window_blocks_are_saved_as_they_complete_never_later() -> None:
    p, index = planner()
    index.group_windows = [None, TPB]
    prompt = list(range(2 * CHUNK))
    req = FakeRequest(1, prompt)
    p.after_alloc(req, [list(range(4)), list(range(10, 14))])
    # Chunk 0 is computed in one step: both groups have every page then.
    out = SchedulerOutput(
        new_requests=[grouped_report(1, prompt, [list(range(4)), list(range(10, 14))], 0, CHUNK)]
    )
    assert [(s.group, s.start, s.end) for s in p.build(out).saves] == [(0, 0, 64), (1, 0, 64)]
    # Chunk 1 over two steps: at the second, the window has passed the sliding group's block 4, whose
    # entry no delta restates; that group skips the chunk rather than read a page no longer its own.
    step1 = [[4, 5], [14, 15]]
    p.build(SchedulerOutput(cached_requests=[grouped_report(1, [], step1, CHUNK, 2 * TPB)]))
    step2 = [[6, 7], [16, 17]]
    saves = p.build(SchedulerOutput(cached_requests=[grouped_report(1, [], step2, CHUNK + 2 * TPB, 2 * TPB)]))
    assert [(s.group, s.start, s.end) for s in saves.saves] == [(0, 64, 128)]


def test_grouped_deltas_extend_each_group() -> None:
    p, _ = planner()
    prompt = list(range(CHUNK + 16))
    p.build(
        SchedulerOutput(new_requests=[grouped_report(1, prompt, [[0, 1, 2, 3, 4], [9, 8, 7, 6, 5]], 0, 80)])
    )
    meta = p.build(
        SchedulerOutput(cached_requests=[grouped_report(1, list(range(48)), [[5, 6, 7], [1, 2, 3]], 80, 48)])
    )
    assert [(s.group, s.start, s.end, s.block_ids) for s in meta.saves] == [
        (0, 64, 128, [0, 1, 2, 3, 4, 5, 6, 7]),
        (1, 64, 128, [9, 8, 7, 6, 5, 1, 2, 3]),
    ]


def test_a_device_match_ending_on_pages_with_no_slot_loads_only_after_it() -> None:
    """TRT-LLM kept 64 tokens; the sliding group has no page for its oldest blocks, which lie inside
    that device match: the load starts at the match, every transfer covers paged blocks only."""
    p, index = planner(hit=192)
    index.group_windows = [None, 96]
    req = FakeRequest(2, list(range(200)))
    assert p.match(req, 64) == (128, False)
    full = list(range(13))
    sliding = [-1, -1, -1, -1, -1, -1, 26, 27, 28, 29, 30, 31, 32]
    p.after_alloc(req, [full, sliding])
    (load,) = p.build(SchedulerOutput()).loads
    assert [(t.group, t.start, t.end) for t in load.transfers] == [(0, 64, 192), (1, 96, 192)]
    for transfer in load.transfers:
        first, last = transfer.start // TPB, transfer.end // TPB
        assert all(b >= 0 for b in transfer.block_ids[first:last])


def test_a_hit_evicted_while_the_request_waits_for_pages_is_saved_after_its_prefill() -> None:
    """A request TRT-LLM cannot admit yet is asked again at every pass: a hit an earlier pass found
    and that L1 evicted since is computed, and must then be saved (not skipped as if cached)."""
    p, index = planner(hit=192)
    req = FakeRequest(4, list(range(200)))
    assert p.reserve(req, 0, 1) == (192, False)
    p.release_reservation(1, 0, 192)  # not admitted: TRT-LLM gives the reservation back
    index.hit = 0  # and L1 evicts the prompt meanwhile
    assert p.reserve(req, 0, 2) == (0, False)
    pages = list(range(13))
    meta = p.build(SchedulerOutput(new_requests=[grouped_report(4, req.tokens, [pages], 0, 200)]))
    assert meta.loads == [] and [(t.start, t.end) for t in meta.saves] == [(0, 192)]
