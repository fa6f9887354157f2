"""How requests end, or restart, outside a normal finish: cancellation, V2 preemption, and the page
frees a load or a save defers (reference ``trtllm-kv-cache-manager-v2.md`` §5.3).

* Cancellation: a waiting request is dropped without connector calls; one whose load is in flight
  ends once that load completes (unless the executor's ``cancel_waits_for_loads`` is off, as in
  TRT-LLM 1.2: it ends at once, and its pages are freed unless ``request_finished`` returns True); a
  preempted victim parked for its save ends once the save lands; any other gets
  ``request_finished[_by_layer_group]`` now (True keeps its pages until saved).
* Preemption (V2 only; ``preempt_request`` of T-EXE2): the victim gets
  ``request_finished_by_layer_group`` first; if it returns True the victim is parked (not
  finished, kept active) until every rank reports it saved; then its pages are released, the
  connector manager forgets what it reported (no ``request_reset``: a request-id-keyed connector
  sees exactly one of the two), ``py_num_connector_matched_tokens`` goes back to 0, and the request
  recomputes from scratch with its generated tokens folded into its prompt (beam width 1), ahead
  of every waiting request. Under the overlap scheduler the token its in-flight batch sampled is
  dropped (it is computed again).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .request import LlmRequest, LlmRequestState

if TYPE_CHECKING:
    from .executor import ReplayExecutor


class RequestEndings:
    """Cancellations, preemptions and deferred frees of one ``ReplayExecutor``."""

    def __init__(self, ex: ReplayExecutor) -> None:
        self.ex = ex
        self._to_cancel: list[int] = []
        self._to_preempt: list[int] = []
        self._cancel_after_load: set[int] = set()
        self._cancel_after_save: set[int] = set()
        self._free_after_load: dict[int, LlmRequest] = {}
        self._parked: set[int] = set()  # preempted victims whose save is in flight
        self.ended: set[int] = set()
        """Cancelled requests: their in-flight overlap batch is skipped."""

    def cancel(self, request_id: int) -> None:
        self._to_cancel.append(request_id)

    def preempt(self, request_id: int) -> None:
        self._to_preempt.append(request_id)

    def schedulable(self) -> list[LlmRequest]:
        """Admitted requests, less those whose cancellation waits for a load."""
        return [r for r in self.ex.active if r.request_id not in self._cancel_after_load]

    # --- at the start of an iteration -------------------------------------------------------
    def apply(self) -> bool:
        """Cancellations, then preemptions; True if any was asked for."""
        todo, self._to_cancel = self._to_cancel, []
        for rid in todo:
            self._apply_cancel(rid)
        asked, self._to_preempt = self._to_preempt, []
        for rid in asked:
            self._apply_preempt(rid)
        return bool(todo or asked)

    def _apply_cancel(self, rid: int) -> None:
        ex = self.ex
        req = ex.request(rid)
        if req is None:
            return  # finished already, or unknown
        ex.stats.requests[rid].cancelled = True
        if req in ex.waiting:
            ex.waiting.remove(req)
            req.state = LlmRequestState.GENERATION_COMPLETE
        elif rid in self._parked:
            self._cancel_after_save.add(rid)  # request_finished was called already
        elif ex.cancel_waits_for_loads and ex.manager is not None and ex.manager.is_loading(req):
            self._cancel_after_load.add(rid)  # not scheduled; ends once the load completes
            self.ended.add(rid)
        else:
            self.terminate(req)

    def _apply_preempt(self, rid: int) -> None:
        ex = self.ex
        req = ex.request(rid)
        if req is None or req not in ex.active or not req.allocated or rid in self._parked:
            return  # no pages to take back
        if ex.manager is not None and ex.manager.is_loading(req):
            self._to_preempt.append(rid)  # a load owns the pages: once it completes
            return
        if ex.in_flight is not None:
            ex.in_flight.drop(req)
        req.device_tokens = req.get_tokens(0)
        ex.stats.requests[rid].preemptions += 1
        if ex.manager is not None and ex.manager.request_finished(req, ex.pages(req)):
            self._parked.add(rid)
            ex.kv.store_blocks_for_reuse(rid, req.device_tokens, req.num_kv)
            return
        self._recompute(req)

    def _recompute(self, req: LlmRequest) -> None:
        """Release the victim's pages, forget its reports and queue it first to run again."""
        ex = self.ex
        ex.kv.remove_sequence(req.request_id, req.device_tokens, req.num_kv)
        if ex.manager is not None:
            ex.manager.forget_request(req)
        req.reset_for_recompute()
        ex.active.remove(req)
        ex.waiting.appendleft(req)

    # --- termination and frees --------------------------------------------------------------
    def terminate(self, req: LlmRequest) -> None:
        """End a cancelled active request: unstarted reservation released, ``request_finished``."""
        ex = self.ex
        ex.active.remove(req)
        self.ended.add(req.request_id)
        req.state = LlmRequestState.GENERATION_COMPLETE
        if ex.v2_steps is not None:
            ex.v2_steps.drop_reservation(req)
        if ex.manager is not None and ex.manager.request_finished(req, ex.pages(req)):
            ex.kv.store_blocks_for_reuse(req.request_id, req.device_tokens, req.num_kv)
            return  # pages stay pinned until every rank reports the save
        self.release_pages(req)

    def release_pages(self, req: LlmRequest) -> None:
        """Free a request's pages, unless a load still writes them (then when it completes; at once
        without ``cancel_waits_for_loads``)."""
        ex = self.ex
        if ex.cancel_waits_for_loads and ex.manager is not None and ex.manager.is_loading(req):
            self._free_after_load[req.request_id] = req
        elif ex.kv.has_allocation(req.request_id):
            ex.kv.remove_sequence(req.request_id, req.device_tokens, req.num_kv)

    def after_loads(self, loaded: list[LlmRequest]) -> None:
        """Completed loads: deferred cancellations end now, deferred frees happen now."""
        for req in loaded:
            if req.request_id in self._cancel_after_load:
                self._cancel_after_load.discard(req.request_id)
                self.terminate(req)
            elif req.request_id in self._free_after_load:
                self.release_pages(self._free_after_load.pop(req.request_id))

    def after_saves(self, saved: list[LlmRequest]) -> None:
        """Completed saves: a finished request's pages are freed; a parked victim recomputes (or
        ends, if it was cancelled meanwhile)."""
        for req in saved:
            rid = req.request_id
            if rid in self._parked:
                self._parked.discard(rid)
                if rid not in self._cancel_after_save:
                    self._recompute(req)
                    continue
                self._cancel_after_save.discard(rid)
                self.ex.active.remove(req)
                self.ended.add(rid)
            req.state = LlmRequestState.GENERATION_COMPLETE
            self.release_pages(req)
