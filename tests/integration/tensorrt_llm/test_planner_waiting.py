"""Requests TRT-LLM asks about before they have pages: V2's ``reserve_prefix`` in every scheduling pass
while a request waits (released in that pass when it is not admitted), a speculative legacy query.
Each call order TRT-LLM may take for one that is cancelled while it waits leaves no state and no pin,
and one that merely waits is not hashed again."""

import pytest
from test_planner import FakeRequest, planner
from test_planner_v2 import prefix_load

from lmcache.integration.tensorrt_llm._trtllm import SchedulerOutput
from lmcache.integration.tensorrt_llm.plan import PinKey
from lmcache.integration.tensorrt_llm.planner import Planner
from lmcache.integration.tensorrt_llm.waiting import MAX_IDLE_PASSES, WaitingRequests

PROMPT = list(range(200))


def passes(p: Planner, n: int) -> None:
    """``n`` scheduling passes that ask nothing about the request under test."""
    for _ in range(n):
        p.build(SchedulerOutput())


def waiting_pass(p: Planner, req: FakeRequest, reservation_id: int) -> int:
    """One pass of a request the pages cannot take: asked, its reservation released whole (§5.2 step
    2 or 3 of trtllm-kv-cache-manager-v2.md), then ``build_connector_meta``."""
    new, _ = p.reserve(req, 0, reservation_id)
    if new:
        p.release_reservation(reservation_id, 0, new)
    p.build(SchedulerOutput())
    return new


@pytest.mark.parametrize("hit", [128, 0], ids=["hit", "miss"])
def test_a_waiting_request_is_hashed_once_and_forgotten_once_no_longer_asked(hit: int) -> None:
    """reserve -> release, every pass; then cancelled while waiting: no callback at all."""
    p, index = planner(hit=hit)
    index.hashing = True
    req = FakeRequest(1, PROMPT)
    for reservation_id in range(1, 3 * MAX_IDLE_PASSES):
        assert waiting_pass(p, req, reservation_id) == hit
    assert index.hashed == 1 and index.pinned == set() and p.reservation_ids() == []
    passes(p, MAX_IDLE_PASSES - 1)
    assert p.pending_requests() == [1]
    passes(p, 1)
    assert p.pending_requests() == [] and index.pinned == set()
    assert waiting_pass(p, req, 100) == hit  # asked again after all: a fresh state, hashed again
    assert index.hashed == 2


def test_a_waiting_request_ended_by_request_finished_is_forgotten_at_once() -> None:
    """reserve -> release -> request_finished_by_layer_group(req, [[]]) (the replay's cancel of a
    request that has no pages yet after a rollback)."""
    p, index = planner(hit=128)
    req = FakeRequest(1, PROMPT)
    waiting_pass(p, req, 1)
    assert p.finished(req) is False
    assert p.pending_requests() == [] and index.pinned == set()


def test_request_reset_keeps_only_the_prompts_hashes_and_is_forgotten_once_no_longer_asked() -> None:
    """reserve -> alloc -> (rollback: unstarted reservation released) request_reset -> reserve again;
    and request_reset on a failed admission (free_resources, DOC) -> no further call."""
    p, index = planner(hit=128)
    index.hashing = True
    req = FakeRequest(1, PROMPT)
    assert p.reserve(req, 0, 1) == (128, False)
    p.after_alloc(req, [list(range(13))])
    p.release_reservation(1, 0, 128)
    p.reset(req)
    assert index.pinned == set() and p.build(SchedulerOutput()).loads == []
    assert p.reserve(req, 0, 2) == (128, False)  # the replay
    assert index.hashed == 1
    p.release_reservation(2, 0, 128)
    p.reset(req)  # its admission failed: still waiting, asked again next pass
    assert waiting_pass(p, req, 3) == 128 and index.hashed == 1
    p.reset(req)  # cancelled now: nothing more
    passes(p, 1 + MAX_IDLE_PASSES)  # this pass, then as many as a waiting request goes unasked
    assert p.pending_requests() == [] and index.pinned == set()


def test_a_speculative_legacy_offer_is_kept_until_cancel_load_then_forgotten() -> None:
    """get_num_new_matched_tokens ahead of the batch (T-PH, DOC-AGG): the offer is kept (pins
    included) however long the request waits; cancel_load(whole offer) when it is cancelled
    before it reaches a batch, then no further call."""
    p, index = planner(hit=128)
    req = FakeRequest(1, PROMPT)
    assert p.match(req, 0) == (128, False)
    passes(p, 2 * MAX_IDLE_PASSES)
    assert p.pending_requests() == [1] and index.pinned == {PinKey("req", 1)}
    p.cancel_load(req, 0, 128)
    assert index.pinned == set()
    passes(p, MAX_IDLE_PASSES)
    assert p.pending_requests() == []
    # Not cancelled but given pages at last: the offer loads.
    q, index = planner(hit=128)
    assert q.match(req, 0) == (128, False)
    passes(q, 2 * MAX_IDLE_PASSES)
    q.after_alloc(req, [list(range(13))])
    (load,) = q.build(SchedulerOutput()).loads
    assert (load.start, load.end) == (0, 128)


def test_a_speculative_miss_cancelled_before_a_batch_is_forgotten() -> None:
    """get_num_new_matched_tokens -> (0, False), no offer so no cancel_load -> no further call."""
    p, index = planner(hit=0)
    p.match(FakeRequest(1, PROMPT), 0)
    passes(p, 1 + MAX_IDLE_PASSES)
    assert p.pending_requests() == [] and index.pinned == set()


def test_a_request_with_pages_or_an_open_reservation_is_never_forgotten_for_silence() -> None:
    """A parked async load, a long decode with nothing reported, or a reservation TRT-LLM has not
    released yet: each ends through TRT-LLM's own callback, never through passes without an ask."""
    p, index = planner(hit=128, enable_async_loading=True)
    parked, reserved = FakeRequest(1, PROMPT), FakeRequest(2, PROMPT)
    assert p.reserve(parked, 0, 1) == (128, True)
    p.after_alloc(parked, [list(range(13))])
    p.build(SchedulerOutput(prefix_loads=[prefix_load(1, parked, 0, 128, [list(range(13))], True)]))
    assert p.reserve(reserved, 0, 2) == (128, True)
    passes(p, 3 * MAX_IDLE_PASSES)
    assert p.pending_requests() == [1, 2] and index.pinned == {PinKey("res", 1), PinKey("res", 2)}
    p.release_reservation(2, 0, 128)
    passes(p, MAX_IDLE_PASSES + 1)
    assert p.pending_requests() == [1]


def test_no_more_waiting_states_than_the_cap_oldest_ask_forgotten_first() -> None:
    p, index = planner(hit=128)
    q = Planner(p.settings, p.config, index, "test", WaitingRequests(max_requests=2))
    for rid in range(1, 5):  # passes stop (nothing scheduled) while requests are asked
        assert q.reserve(FakeRequest(rid, PROMPT), 0, rid) == (128, False)
        q.release_reservation(rid, 0, 128)
    assert q.pending_requests() == [3, 4] and index.pinned == set()


def test_waiting_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="max_passes"):
        WaitingRequests(max_passes=0)
