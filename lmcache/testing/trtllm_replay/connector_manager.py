"""The executor's side of the connector contract (TRT-LLM's ``KvCacheConnectorManager``, R-old).

It owns the rank-0 scheduler and every rank's worker and does what TRT-LLM's manager does between
them: the rank-0 calls and their broadcasts (pickled, so unpicklable answers fail here as they
would under MPI), the ``SchedulerOutput`` deltas, the async load/save bookkeeping, and the
all-rank intersection of ``get_finished``. Ranks are simulated (``Ranks.acting_as``); with
``ProcessGroupRanks`` this process drives only its own rank's worker (and the scheduler on rank 0),
and the broadcasts and gathers cross processes. Under attention DP (``AttentionDPOwner``, TRT-LLM
R-new) it drives one rank's own scheduler and worker, with no collective, sets
``SchedulerOutput.attention_dp_rank`` and refuses a connector whose classes do not declare
``supports_attention_dp``.

Under V2 (``num_layer_groups`` given) it always uses the grouped forms
(``update_state_after_alloc_by_layer_group``, ``request_finished_by_layer_group``), fills
``new_block_ids_by_layer_group`` on every report, leaves ``block_hashes`` empty and
``priorities`` None, and with ``prefix_reservations`` drives the reservation protocol
(``reservations.py``). Page lists are passed in complete, per group, ``-1`` in place.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from lmcache.integration.tensorrt_llm._trtllm import (
    KvCacheConnectorScheduler,
    RequestData,
    SchedulerOutput,
)

from .block_pool import hash_chain
from .ranks import LocalRanks, Ranks
from .request import CppRequestView, LlmRequest, LlmRequestState
from .reservations import PrefixReservations, Reservation, overrides

PageLists = Callable[[LlmRequest], list[list[int]]]  # complete page list per layer group


def _request_data_fields() -> set[str] | None:
    if dataclasses.is_dataclass(RequestData):
        return {f.name for f in dataclasses.fields(RequestData)}
    return None


class KvCacheConnectorManager:
    """Drives the scheduler (rank 0) and one worker per local TP rank."""

    def __init__(
        self,
        scheduler: Any,
        workers: list[Any],
        *,
        tokens_per_block: int,
        num_layer_groups: int | None = None,
        prefix_reservations: bool = False,
        ranks: Ranks | None = None,
        skip_idle_polls: bool = False,
    ) -> None:
        """``workers``: one per rank of ``ranks.local`` (default: all ranks in this process);
        ``scheduler``: present exactly where rank 0 lives. ``num_layer_groups`` None = V1 (flat
        forms); ``prefix_reservations`` needs V2. ``skip_idle_polls``: ``get_finished`` calls no
        worker (and gathers nothing) while :attr:`tracks_async_requests` is False."""
        self.ranks = ranks if ranks is not None else LocalRanks(len(workers))
        if (scheduler is not None) != self.ranks.hosts_root or len(workers) != len(self.ranks.local):
            raise ValueError("a connector needs a scheduler on rank 0 and a worker on every rank")
        if prefix_reservations and num_layer_groups is None:
            raise ValueError("prefix reservations require the V2 KV cache manager")
        if self.ranks.attention_dp_rank is not None:
            for half in (scheduler, *workers):
                if getattr(type(half), "supports_attention_dp", False) is not True:
                    raise NotImplementedError(
                        f"{type(half).__name__} does not declare supports_attention_dp=True; a connector "
                        "runs under attention DP only when both its classes are owner-local"
                    )
        for name in ("update_state_after_alloc_by_layer_group", "request_finished_by_layer_group"):
            if (num_layer_groups or 0) > 1 and not overrides(scheduler, KvCacheConnectorScheduler, name):
                raise NotImplementedError(f"{num_layer_groups} layer groups need the scheduler's {name}")
        self.scheduler = scheduler
        self.workers = workers
        self.tokens_per_block = tokens_per_block
        self.num_layer_groups = num_layer_groups
        self.reservations = (
            PrefixReservations(scheduler, workers, tokens_per_block, self.ranks)
            if prefix_reservations
            else None
        )
        self.external_loads: dict[int, int] = {}
        self._reported: dict[int, tuple[int, list[int]]] = {}  # id -> (tokens, blocks per group) reported
        self._new_loading: dict[int, LlmRequest] = {}  # async hit, not yet pulled from the batch
        self.loading: dict[int, LlmRequest] = {}  # async loads in flight
        self.saving: dict[int, LlmRequest] = {}  # async saves in flight
        self._started_loading_ids: list[int] = []  # passed once to the next get_finished
        self._finished_gen_ids: list[int] = []
        self._load_done: set[int] = set()
        self._saved_by_rank: list[set[int]] = [set() for _ in range(self.ranks.size)]
        self._loaded_by_rank: list[set[int]] = [set() for _ in range(self.ranks.size)]
        self._request_fields = _request_data_fields()
        self.forward_pass_callables: list[tuple[int, Callable[[], Any]]] = []  # (rank, callable)
        self.skip_idle_polls = skip_idle_polls
        self.skipped_polls = 0
        """``get_finished`` calls that polled no worker (``skip_idle_polls``)."""

    @property
    def tp_size(self) -> int:
        return self.ranks.size

    @property
    def v2(self) -> bool:
        return self.num_layer_groups is not None

    def _each_worker(self, method: str, *args: Any) -> None:
        for rank, worker in zip(self.ranks.local, self.workers, strict=True):
            with self.ranks.acting_as(rank):
                getattr(worker, method)(*args)

    def _on_root(self, call: Callable[[Any], Any]) -> Any:
        """``call(scheduler)`` on rank 0 (None in a process without it)."""
        if self.scheduler is None:
            return None
        with self.ranks.acting_as(0):
            return call(self.scheduler)

    # --- allocation (inside KVCacheManager.add_sequence) -------------------------------------
    def should_add_sequence(self, req: LlmRequest) -> bool:
        """False once an async load finished: the blocks are already allocated."""
        return req.request_id not in self._load_done

    def get_num_new_matched_tokens(self, req: LlmRequest, num_computed_tokens: int) -> tuple[int, bool]:
        """Query and commit what was offered (V1; V2 with nothing cutting the offer short)."""
        num_tokens, load_async = self.query_num_new_matched_tokens(req, num_computed_tokens)
        self.commit_new_matched_tokens(req, num_tokens, load_async)
        return num_tokens, load_async

    def query_num_new_matched_tokens(self, req: LlmRequest, num_computed_tokens: int) -> tuple[int, bool]:
        """Ask rank 0's scheduler and broadcast the answer (after the device match). Under V2 the
        hit is clamped so the last prompt token stays local; the async flag passes through even
        when the clamp leaves 0 (the connector has started that load, as in TRT-LLM)."""
        if req.is_generation_only_request:
            raise RuntimeError("KV cache connector does not support generation-only requests")
        answer = self._on_root(
            lambda s: tuple(s.get_num_new_matched_tokens(CppRequestView(req), num_computed_tokens))
        )
        num_tokens, load_async = self.ranks.broadcast(answer)
        num_tokens, load_async = int(num_tokens), bool(load_async)
        if num_tokens < 0:
            raise RuntimeError(f"get_num_new_matched_tokens returned a negative count {num_tokens}")
        if num_tokens == 0 and load_async:
            raise RuntimeError("get_num_new_matched_tokens returned (0, True): async load of no tokens")
        if self.v2:
            num_tokens = max(0, min(num_tokens, req.prompt_len - 1 - num_computed_tokens))
        return num_tokens, load_async

    def commit_new_matched_tokens(self, req: LlmRequest, honoured: int, load_async: bool) -> None:
        """Record the honoured part of the hit (it may be less than offered under V2); an async
        flag parks the request until ``get_finished`` reports it, whatever was honoured."""
        if load_async:
            self._new_loading[req.request_id] = req
        self.external_loads[req.request_id] = honoured
        req.py_num_connector_matched_tokens = honoured
        req.num_connector_matched_tokens = honoured

    def update_state_after_alloc(self, req: LlmRequest, pages: list[list[int]]) -> None:
        """Once per allocation, rank 0 only, not broadcast; the grouped form under V2."""
        if self.v2:
            self._on_root(lambda s: s.update_state_after_alloc_by_layer_group(req, [list(p) for p in pages]))
        else:
            self._on_root(lambda s: s.update_state_after_alloc(req, list(pages[0])))

    def reset_request_state(self, req: LlmRequest) -> None:
        """The allocation was freed and the request replays (V2 rollback): forget what was reported,
        release an unstarted reservation, then the scheduler's ``request_reset``."""
        self.forget_request(req)
        self._on_root(lambda s: s.request_reset(req))

    def forget_request(self, req: LlmRequest) -> None:
        """The allocation was freed (rollback, or a preemption, which has called ``request_finished``
        and calls no ``request_reset``): drop the delta record, so the request's next report is in
        ``new_requests`` again, its ``external_loads`` and an unstarted reservation."""
        rid = req.request_id
        if rid in self.loading:
            raise RuntimeError(f"request {rid} has a load in flight that owns the allocation")
        self._new_loading.pop(rid, None)  # an async hit not started yet
        if self.reservations is not None and rid in self.reservations.by_request:
            self.reservations.drop(self.reservations.by_request[rid])
        self._reported.pop(rid, None)
        self.external_loads.pop(rid, None)
        self._load_done.discard(rid)

    def accept_prefix_load(self, res: Reservation, pages: list[list[int]]) -> None:
        """Release the clipped tail and queue the load, its length recorded on the request as a
        commit does; a sync load's range is excluded from the request's first ``computed_position``
        (``external_loads``)."""
        assert self.reservations is not None
        load = self.reservations.accept(res, pages)
        if load is None:
            return
        res.request.py_num_connector_matched_tokens = res.request.num_connector_matched_tokens = (
            load.end - load.start
        )
        if not load.is_async:
            self.external_loads[load.request_id] = load.end - load.start

    def is_loading(self, req: LlmRequest) -> bool:
        """A load (legacy async, or an accepted prefix load not retired yet) owns the request."""
        rid = req.request_id
        reserved = self.reservations is not None and self.reservations.has_pending_load(rid)
        return rid in self.loading or rid in self._new_loading or reserved

    # --- per iteration ------------------------------------------------------------------
    def _request_data(self, req: LlmRequest, pages: list[list[int]], computed: int, scheduled: int) -> Any:
        tokens = req.get_tokens(0)
        sent_tokens, sent_blocks = self._reported.get(req.request_id, (0, [0] * len(pages)))
        self._reported[req.request_id] = (len(tokens), [len(p) for p in pages])
        deltas = [p[n:] for p, n in zip(pages, sent_blocks, strict=True)]
        values: dict[str, Any] = {
            "request_id": req.request_id,
            "new_tokens": tokens[sent_tokens:],
            "new_block_ids": deltas[0] if len(deltas) == 1 else [],
            "computed_position": computed,
            "num_scheduled_tokens": scheduled,
            "priorities": None,
            "block_hashes": []
            if self.v2
            else hash_chain(tokens[: computed + scheduled], self.tokens_per_block, req.cache_salt_id),
            "cache_salt": req.cache_salt,
            "cache_salt_id": req.cache_salt_id,
            "new_block_ids_by_layer_group": deltas if self.v2 else [],
        }
        if self._request_fields is not None:
            values = {k: v for k, v in values.items() if k in self._request_fields}
        return RequestData(**values)

    def build_scheduler_output(
        self,
        context_requests: list[LlmRequest],
        generation_requests: list[LlmRequest],
        pages: PageLists,
    ) -> Any:
        """Deltas since each request's last report; context first, async-loading ones skipped;
        with reservations, every accepted load not dispatched yet goes to ``prefix_loads``."""
        output = SchedulerOutput()
        for req in context_requests:
            if self._async_pending(req):
                continue
            first = req.request_id not in self._reported
            computed = req.context_current_position
            if first:
                computed -= self.external_loads.get(req.request_id, 0)
            scheduled = min(req.context_remaining_length, req.context_chunk_size)
            data = self._request_data(req, pages(req), computed, scheduled)
            (output.new_requests if first else output.cached_requests).append(data)
        for req in generation_requests:
            computed = len(req.get_tokens(0)) - 1
            output.cached_requests.append(self._request_data(req, pages(req), computed, 1))
        self.external_loads.clear()
        if self.reservations is not None:
            output.prefix_loads = self.reservations.take_prefix_loads()
        if self.ranks.attention_dp_rank is not None:
            output.attention_dp_rank = self.ranks.attention_dp_rank
        return output

    def _async_pending(self, req: LlmRequest) -> bool:
        rid = req.request_id
        if rid in self._new_loading or rid in self.loading:
            return True
        res = self.reservations.by_request.get(rid) if self.reservations is not None else None
        return res is not None and res.accepted and res.is_async

    def take_scheduled_requests_pending_load(self, context_requests: list[LlmRequest]) -> list[LlmRequest]:
        """Pull requests with a new async hit (or async prefix load) out of the batch and park them;
        legacy IDs go to ``get_finished``, prefix loads complete through their reservation id."""
        kept = []
        for req in context_requests:
            if self._async_pending(req) and req.request_id not in self._new_loading:
                req.state = LlmRequestState.DISAGG_GENERATION_TRANS_IN_PROGRESS
            elif req.request_id in self._new_loading:
                del self._new_loading[req.request_id]
                req.state = LlmRequestState.DISAGG_GENERATION_TRANS_IN_PROGRESS
                self.loading[req.request_id] = req
                self._started_loading_ids.append(req.request_id)
            else:
                kept.append(req)
        return kept

    def handle_metadata(self, scheduler_output: Any) -> None:
        """``build_connector_meta`` on rank 0, broadcast, ``bind_connector_meta`` on every rank."""
        metadata = self._on_root(lambda s: s.build_connector_meta(scheduler_output))
        copies = self.ranks.broadcast_copies(metadata)
        for rank, worker in zip(self.ranks.local, self.workers, strict=True):
            with self.ranks.acting_as(rank):
                worker.bind_connector_meta(copies[rank])

    def start_load_kv(self, stream: Any) -> None:
        self._each_worker("start_load_kv", stream)

    def layer_pre_hook(self, layer_idx: int, stream: Any) -> None:
        self._each_worker("wait_for_layer_load", layer_idx, stream)

    def layer_post_hook(self, layer_idx: int, stream: Any) -> None:
        self._each_worker("save_kv_layer", layer_idx, stream)

    def run_forward_pass_callables(self) -> None:
        for rank, fn in self.forward_pass_callables:
            with self.ranks.acting_as(rank):
                fn()

    def wait_for_save(self, stream: Any) -> None:
        self._each_worker("wait_for_save", stream)

    # --- completion ---------------------------------------------------------------------
    def request_finished(self, req: LlmRequest, pages: list[list[int]]) -> bool:
        """Rank 0 decides (grouped form under V2), broadcast; True keeps the blocks until every
        rank reports the save."""
        if self.v2:
            answer = self._on_root(lambda s: s.request_finished_by_layer_group(req, [list(p) for p in pages]))
        else:
            answer = self._on_root(lambda s: s.request_finished(req, list(pages[0])))
        saving = bool(self.ranks.broadcast(answer))
        if saving:
            req.state = LlmRequestState.DISAGG_CONTEXT_TRANS_IN_PROGRESS
            self.saving[req.request_id] = req
            self._finished_gen_ids.append(req.request_id)
        if self.ranks.attention_dp_rank is not None:  # R-new drops the request's deltas here under ADP
            self._reported.pop(req.request_id, None)
            self.external_loads.pop(req.request_id, None)
        return saving

    def get_finished(self) -> tuple[list[LlmRequest], list[LlmRequest]]:
        """Poll every rank with the IDs new since the last poll (and ``get_finished_prefix_loads``
        with reservations); return the transfers that every rank has reported done: (saved
        requests, loaded requests). Prefix loads retire later, through ``retire_prefix_loads``.
        With ``skip_idle_polls`` and no async request tracked, no worker is called."""
        if self.reservations is not None:
            self.reservations.poll()
        if self.skip_idle_polls and not self.tracks_async_requests:
            self.skipped_polls += 1
            return [], []
        finished_gen, started_loading = self._finished_gen_ids, self._started_loading_ids
        self._finished_gen_ids, self._started_loading_ids = [], []
        local = {}
        for rank, worker in zip(self.ranks.local, self.workers, strict=True):
            with self.ranks.acting_as(rank):
                local[rank] = worker.get_finished(list(finished_gen), list(started_loading))
        for rank, (saved, loaded) in enumerate(self.ranks.gather(local)):
            for rid in saved:
                if rid not in self.saving:
                    raise RuntimeError(
                        f"rank {rank} get_finished reported save of {rid}, which is not saving"
                    )
            for rid in loaded:
                if rid not in self.loading:
                    raise RuntimeError(
                        f"rank {rank} get_finished reported load of {rid}, which is not loading"
                    )
            self._saved_by_rank[rank].update(saved)
            self._loaded_by_rank[rank].update(loaded)
        saved_done = [rid for rid in self.saving if all(rid in s for s in self._saved_by_rank)]
        loaded_done = [rid for rid in self.loading if all(rid in s for s in self._loaded_by_rank)]
        for rid in saved_done:
            for reported in self._saved_by_rank:
                reported.discard(rid)
        for rid in loaded_done:
            for reported in self._loaded_by_rank:
                reported.discard(rid)
            self._load_done.add(rid)
            self.loading[rid].state = LlmRequestState.CONTEXT_INIT
        return [self.saving.pop(rid) for rid in saved_done], [self.loading.pop(rid) for rid in loaded_done]

    def retire_prefix_loads(self) -> list[LlmRequest]:
        """Release every prefix load all ranks reported; a parked async request returns to
        ``CONTEXT_INIT`` (no new allocation or query). Returns the requests whose load retired."""
        if self.reservations is None:
            return []
        retired = self.reservations.retire()
        for res in retired:
            if res.request.state == LlmRequestState.DISAGG_GENERATION_TRANS_IN_PROGRESS:
                res.request.state = LlmRequestState.CONTEXT_INIT
        return [res.request for res in retired]

    @property
    def tracks_async_requests(self) -> bool:
        """TRT-LLM's skip condition (a 2026 revision, ``test_connector_manager_get_finished_skips_
        empty_poll``): an async save (``request_finished`` returned True) or legacy async load (an
        async hit, parked or not) that not every rank has reported done, ids already passed to
        ``get_finished`` included. Prefix loads are not among them: their poll is separate."""
        return bool(self.saving or self.loading or self._new_loading)

    @property
    def has_pending_transfers(self) -> bool:
        reserved = self.reservations is not None and self.reservations.pending
        return bool(self.saving or self.loading or self._new_loading or reserved)
