"""The steps of an executor iteration that KVCacheManagerV2 changes (reference §5.1 and §5.2).

Scheduling pass: generation first (1 token each); then context requests, admitted ones before
waiting ones, in arrival order. A waiting request is admitted here (GUARANTEED_NO_EVICT: every
page it may ever need, prompt + ``max_new_tokens``, in every group) and takes its device prefix
then. In reservation mode a first-chunk request without an allocation gets
``reserve_prefix(request, local_end, fresh_id)`` first; the token budget charges only tokens after
local + accepted prefix, and a reservation that the budget or the pages cannot take is released
whole (a fresh id next time).

Allocation (``prepare_resources``, final batch only): pages per chunk. The first allocation covers
the first chunk plus a served connector prefix and is followed by exactly one
``update_state_after_alloc_by_layer_group``; in the legacy path the connector is asked
``get_num_new_matched_tokens`` inside that first allocation (so at most once per allocation);
in reservation mode the accepted load is then queued (clipped tail released first).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .request import LlmRequest, LlmRequestState
from .reservations import Reservation

if TYPE_CHECKING:
    from .executor import ReplayExecutor


class V2Steps:
    """V2 scheduling and allocation for one ``ReplayExecutor``."""

    def __init__(
        self, ex: ReplayExecutor, free_passed_pages: bool = False, serve_grow_pages: int | None = None
    ) -> None:
        """``serve_grow_pages``: see ``ReplayExecutor``; None = a grow for a served prefix never fails."""
        self.ex = ex
        self.free_passed = free_passed_pages
        self.serve_grow_pages = serve_grow_pages
        self.manager = ex.manager
        self.reservations = ex.manager.reservations if ex.manager is not None else None

    # --- scheduling pass --------------------------------------------------------------------
    def schedule(self) -> tuple[list[LlmRequest], list[LlmRequest]]:
        ex = self.ex
        if self.free_passed:
            self.free_passed_pages()
        active = ex.schedulable()
        generation = [r for r in active if r.state == LlmRequestState.GENERATION_IN_PROGRESS]
        budget = ex.llm_args.max_num_tokens - len(generation)
        context = []
        admitted = [r for r in active if r.state == LlmRequestState.CONTEXT_INIT]
        for req in admitted + list(ex.waiting):
            waiting = req not in ex.active
            res = self._reserve(req, waiting)
            if waiting and not self._admit(req):
                if res is not None:
                    self.reservations.drop(res)  # KV pages cannot take it
                break  # arrival order: nobody behind it is admitted
            start = res.accepted_end if res is not None else req.context_current_position
            chunk = ex.chunk_size(req.prompt_len - start, budget)
            if chunk <= 0:
                if res is not None:
                    self.reservations.drop(res)  # the token budget cannot take it
                continue
            if res is not None:  # the cursor moves to the accepted end (rewound if dropped)
                req.context_current_position = req.num_kv = start
            req.context_chunk_size = chunk
            budget -= chunk
            context.append(req)
        return context, generation

    def _reserve(self, req: LlmRequest, waiting: bool) -> Reservation | None:
        if self.reservations is None or req.allocated:
            return None
        local = req.context_current_position
        if waiting:
            local = self.ex.kv.primary.local_match(req.get_tokens(0), req.cache_salt_id)
        res = self.reservations.reserve(req, local)
        self.ex.stats.requests[req.request_id].reservation_ids.append(res.reservation_id)
        return res

    def _admit(self, req: LlmRequest) -> bool:
        """Reserve every page the request may need; take its device prefix."""
        ex = self.ex
        needed = ex.kv.blocks_for(req.prompt_len + req.max_new_tokens)
        if not ex.kv.try_reserve(req.request_id, needed, req.cache_salt_id):
            return False
        ex.waiting.remove(req)
        ex.active.append(req)
        self._take_local_prefix(req)
        return True

    def _take_local_prefix(self, req: LlmRequest) -> None:
        matched = self.ex.kv.match_prefix(req.request_id, req.get_tokens(0))
        req.context_current_position = req.num_kv = matched
        req.context_chunk_size = req.prompt_len - matched
        self.ex.stats.requests[req.request_id].device_matched_tokens = matched

    def release_unused_reservations(self, context: list[LlmRequest]) -> None:
        """Reservations of requests left out of the final batch are released; cursors rewound."""
        if self.reservations is None:
            return
        in_batch = {req.request_id for req in context}
        for rid, res in list(self.reservations.by_request.items()):
            if rid not in in_batch and not res.accepted:
                self.reservations.drop(res)
                res.request.context_current_position = res.request.num_kv = res.start

    def drop_reservation(self, req: LlmRequest) -> None:
        """An ending request's reservation that was never accepted is released."""
        if self.reservations is None:
            return
        res = self.reservations.by_request.get(req.request_id)
        if res is not None and not res.accepted:
            self.reservations.drop(res)

    def free_passed_pages(self) -> None:
        """With ``ReplayExecutor(free_passed_pages=True)``, V2's resize of every running request at
        the start of the scheduling pass: the sliding-window pages no later token can see go back
        to the pool, so this iteration's allocations take them (first) and its forward writes them.
        Default: they stay allocated until the request ends, reported ``-1``."""
        ex = self.ex
        for req in ex.active:
            freed = ex.kv.free_passed(req.request_id, req.num_kv)
            ex.stats.requests[req.request_id].freed_pages.extend(
                (group, page) for group, pages in enumerate(freed) for page in pages
            )

    # --- allocation -------------------------------------------------------------------------
    def prepare_resources(self, context: list[LlmRequest], generation: list[LlmRequest]) -> list[LlmRequest]:
        """Allocate pages (per chunk); returns the context requests still in the batch."""
        ex, kept = self.ex, []
        for req in context:
            end = req.context_current_position + req.context_chunk_size
            if req.allocated:
                ex.kv.grow(req.request_id, min(end, req.prompt_len))
                kept.append(req)
            elif self._first_allocation(req):
                kept.append(req)
        for req in generation:
            ex.kv.grow(req.request_id, req.num_kv + 1)
        return kept

    def _first_allocation(self, req: LlmRequest) -> bool:
        """Legacy query + serve, pages, alloc callback, rollback hook, accepted load; False if the
        request was rolled back."""
        ex, stats = self.ex, self.ex.stats.requests[req.request_id]
        if self.manager is not None and self.reservations is None:
            pos = req.context_current_position
            n, load_async = self.manager.query_num_new_matched_tokens(req, pos)
            honoured = self._honoured_end(req, pos + n) - pos
            self.manager.commit_new_matched_tokens(req, honoured, load_async)
            self._serve(req, pos + honoured)
            stats.connector_matched_tokens, stats.connector_load_async = honoured, load_async
        res = self.reservations.by_request.get(req.request_id) if self.reservations is not None else None
        if res is not None and not res.accepted:
            self._clip_reservation(req, res)
        ex.kv.grow(req.request_id, min(req.context_current_position + req.context_chunk_size, req.prompt_len))
        req.allocated = True
        if self.manager is not None:
            self.manager.update_state_after_alloc(req, ex.pages(req))
        if ex.take_rollback(req.request_id):
            self._rollback(req)
            return False
        if res is not None and not res.accepted:
            assert self.manager is not None
            self.manager.accept_prefix_load(res, ex.pages(req))
            stats.connector_matched_tokens = res.accepted_end - res.start
            stats.connector_load_async = res.is_async and res.accepted
        return True

    def _honoured_end(self, req: LlmRequest, served_end: int) -> int:
        """How far a legacy prefix served up to ``served_end`` is honoured (reference §5.1): inside
        the chunk it needs no page; beyond it the allocation grows to the served end plus the
        chunk, and if that grow fails, see ``_after_failed_grow``."""
        pos, end = req.context_current_position, req.context_current_position + req.context_chunk_size
        if served_end < end or not self._grow_fails(end, served_end + req.context_chunk_size, req):
            return served_end
        return self._after_failed_grow(pos, end)

    def _clip_reservation(self, req: LlmRequest, res: Reservation) -> None:
        """The reservation path's allocation grows to the accepted end plus the chunk; if that grow
        fails the accepted range is clipped by the legacy rule (``_after_failed_grow``): the
        cursor goes back to the honoured end, the chunk end is the one its own pages allow, and
        ``accept`` releases the tail (all of it if nothing is honoured) before any dispatch."""
        own_end = min(res.start + req.context_chunk_size, req.prompt_len)
        if not self._grow_fails(own_end, res.accepted_end + req.context_chunk_size, req):
            return
        res.accepted_end = min(res.accepted_end, self._after_failed_grow(res.start, own_end))
        req.context_current_position = req.num_kv = res.accepted_end
        req.context_chunk_size = own_end - res.accepted_end

    def _grow_fails(self, own_end: int, grown_end: int, req: LlmRequest) -> bool:
        """Growing pages for tokens ``[0, own_end)`` to ``grown_end`` (capped at the prompt) needs
        more than ``serve_grow_pages`` pages (never, when that is None)."""
        if self.serve_grow_pages is None:
            return False
        grown = self.ex.kv.blocks_for(min(grown_end, req.prompt_len)) - self.ex.kv.blocks_for(own_end)
        return grown > self.serve_grow_pages

    def _after_failed_grow(self, pos: int, own_end: int) -> int:
        """The largest whole block inside the pages of ``[0, own_end)`` that still leaves a chunk
        (at least one token to compute), else ``pos`` (honour 0)."""
        tpb = self.ex.tokens_per_block
        return max(pos, (own_end - 1) // tpb * tpb)

    def _serve(self, req: LlmRequest, served_end: int) -> None:
        """Move the context window past a served prefix: inside the chunk the chunk end is kept;
        beyond it the window shifts (a non-final chunk end stays block-aligned)."""
        pos, chunk = req.context_current_position, req.context_chunk_size
        if served_end <= pos:
            return
        end = pos + chunk
        if served_end >= end:
            end = served_end + chunk
            if end < req.prompt_len:
                end = end // self.ex.tokens_per_block * self.ex.tokens_per_block
            end = min(end, req.prompt_len)
        req.context_current_position = req.num_kv = served_end
        req.context_chunk_size = end - served_end

    def _rollback(self, req: LlmRequest) -> None:
        """``free_resources`` + ``reset_request_state`` (+ ``request_reset``): the request keeps its
        admission but replays from scratch (new query or reservation, new alloc callback)."""
        ex, rid = self.ex, req.request_id
        ex.kv.remove_sequence(rid)
        if self.manager is not None:
            self.manager.reset_request_state(req)
        req.allocated = False
        req.num_connector_matched_tokens = req.py_num_connector_matched_tokens = 0
        ex.stats.requests[rid].resets += 1
        if not ex.kv.try_reserve(
            rid, ex.kv.blocks_for(req.prompt_len + req.max_new_tokens), req.cache_salt_id
        ):
            raise RuntimeError("pages freed by a rollback cannot be reserved again")
        self._take_local_prefix(req)
