"""Which per-request states a lookup made for a request that has no pages yet, and when to forget them.

TRT-LLM asks about requests before it gives them pages: under KVCacheManagerV2, ``reserve_prefix`` in
every scheduling pass while a request waits for pages (the reservation is released in that pass when
the request is not admitted), and, in the speculative designs, ``get_num_new_matched_tokens`` ahead of
the batch. A request cancelled while it waits never got pages, so it may get no later callback at all
(no ``request_finished``, no ``request_reset``): nothing tells the planner it ended. The planner keeps
such a state (its prompt's chunk hashes: a request asked again is not hashed again) while the request
is asked, and forgets it after ``max_passes`` scheduling passes (``build_connector_meta`` calls)
without an ask, or, oldest ask first, once more than ``max_requests`` such states are kept.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

MAX_IDLE_PASSES = 8
"""A waiting request is asked in every scheduling pass; one not asked for this many has ended (or waits
far back in the queue: it is hashed again when asked)."""

MAX_WAITING_REQUESTS = 1024
"""The most states of requests without pages kept at once (passes may stop while requests are asked:
nothing scheduled while loads or saves hold every page)."""


class WaitingRequests:
    """Request ids whose state no allocation claimed yet, by the scheduling pass of their last ask."""

    def __init__(self, max_passes: int = MAX_IDLE_PASSES, max_requests: int = MAX_WAITING_REQUESTS) -> None:
        if max_passes < 1 or max_requests < 1:
            raise ValueError(f"max_passes ({max_passes}) and max_requests ({max_requests}) must be >= 1")
        self.max_passes = max_passes
        self.max_requests = max_requests
        self._last_ask: OrderedDict[int, int] = OrderedDict()
        """Request id -> pass of its last ask, oldest ask first."""
        self._pass = 0

    def asked(self, request_id: int) -> None:
        """TRT-LLM asked about this request (or reset it) while it has no pages."""
        self._last_ask[request_id] = self._pass
        self._last_ask.move_to_end(request_id)

    def claimed(self, request_id: int) -> None:
        """The request got pages (or its state is gone): TRT-LLM ends it with a callback now."""
        self._last_ask.pop(request_id, None)

    def end_pass(self) -> None:
        self._pass += 1

    def take_stale(self, holds_promise: Callable[[int], bool]) -> list[int]:
        """Ids to forget now, oldest ask first, no longer tracked: unasked for more than ``max_passes``
        passes, or beyond ``max_requests``. Those ``holds_promise`` names stay: TRT-LLM was promised a
        load for them and ends the promise itself (``cancel_load``, ``release_prefix_reservation``)."""
        over = len(self._last_ask) - self.max_requests
        stale = []
        for request_id, asked in list(self._last_ask.items()):
            if over <= 0 and self._pass - asked <= self.max_passes:
                break  # every later entry was asked at this pass or after
            if holds_promise(request_id):
                continue
            del self._last_ask[request_id]
            stale.append(request_id)
            over -= 1
        return stale
