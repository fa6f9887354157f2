"""The executor's side of the connector contract (TRT-LLM's ``KvCacheConnectorManager``, R-old).

It owns the rank-0 scheduler and every rank's worker and does what TRT-LLM's manager does between
them: the rank-0 calls and their broadcasts (pickled, so unpicklable answers fail here as they
would under MPI), the ``SchedulerOutput`` deltas, the async load/save bookkeeping, and the
all-rank intersection of ``get_finished``. Ranks are simulated with ``simulated_rank``.
"""

from __future__ import annotations

import dataclasses
import pickle
from collections.abc import Callable
from typing import Any

from lmcache.integration.tensorrt_llm._trtllm import RequestData, SchedulerOutput, simulated_rank

from .block_pool import hash_chain
from .request import CppRequestView, LlmRequest, LlmRequestState


def _broadcast(value: Any) -> Any:
    """What ``mpi_broadcast`` from rank 0 does to a value: a pickle round trip."""
    return pickle.loads(pickle.dumps(value))


def _request_data_fields() -> set[str] | None:
    if dataclasses.is_dataclass(RequestData):
        return {f.name for f in dataclasses.fields(RequestData)}
    return None


class KvCacheConnectorManager:
    """Drives one scheduler (rank 0) and ``len(workers)`` workers (one per TP rank)."""

    def __init__(self, scheduler: Any, workers: list[Any], *, tokens_per_block: int) -> None:
        if scheduler is None or not workers:
            raise ValueError("a connector needs a scheduler on rank 0 and a worker on every rank")
        self.scheduler = scheduler
        self.workers = workers
        self.tokens_per_block = tokens_per_block
        self.external_loads: dict[int, int] = {}
        self._reported: dict[int, tuple[int, int]] = {}  # id -> (tokens, blocks) reported so far
        self._new_loading: dict[int, LlmRequest] = {}  # async hit, not yet pulled from the batch
        self.loading: dict[int, LlmRequest] = {}  # async loads in flight
        self.saving: dict[int, LlmRequest] = {}  # async saves in flight
        self._started_loading_ids: list[int] = []  # passed once to the next get_finished
        self._finished_gen_ids: list[int] = []
        self._load_done: set[int] = set()
        self._saved_by_rank: list[set[int]] = [set() for _ in workers]
        self._loaded_by_rank: list[set[int]] = [set() for _ in workers]
        self._request_fields = _request_data_fields()
        self.forward_pass_callables: list[tuple[int, Callable[[], Any]]] = []  # (rank, callable)

    @property
    def tp_size(self) -> int:
        return len(self.workers)

    def _each_worker(self, method: str, *args: Any) -> list[Any]:
        results = []
        for rank, worker in enumerate(self.workers):
            with simulated_rank(rank):
                results.append(getattr(worker, method)(*args))
        return results

    # --- allocation (inside KVCacheManager.add_sequence) -------------------------------------
    def should_add_sequence(self, req: LlmRequest) -> bool:
        """False once an async load finished: the blocks are already allocated."""
        return req.request_id not in self._load_done

    def get_num_new_matched_tokens(self, req: LlmRequest, num_computed_tokens: int) -> tuple[int, bool]:
        """Ask rank 0's scheduler, broadcast, and record the hit (after the device match)."""
        if req.is_generation_only_request:
            raise RuntimeError("KV cache connector does not support generation-only requests")
        with simulated_rank(0):
            answer = self.scheduler.get_num_new_matched_tokens(CppRequestView(req), num_computed_tokens)
        num_tokens, load_async = _broadcast(tuple(answer))
        num_tokens, load_async = int(num_tokens), bool(load_async)
        if num_tokens < 0:
            raise RuntimeError(f"get_num_new_matched_tokens returned a negative count {num_tokens}")
        if num_tokens == 0 and load_async:
            raise RuntimeError("get_num_new_matched_tokens returned (0, True): async load of no tokens")
        if load_async:
            self._new_loading[req.request_id] = req
        self.external_loads[req.request_id] = num_tokens
        req.py_num_connector_matched_tokens = num_tokens
        req.num_connector_matched_tokens = num_tokens
        return num_tokens, load_async

    def update_state_after_alloc(self, req: LlmRequest, block_ids: list[int]) -> None:
        """Rank 0 only, not broadcast."""
        with simulated_rank(0):
            self.scheduler.update_state_after_alloc(req, list(block_ids))

    # --- per iteration ------------------------------------------------------------------
    def _request_data(self, req: LlmRequest, block_ids: list[int], computed: int, scheduled: int) -> Any:
        tokens = req.get_tokens(0)
        sent_tokens, sent_blocks = self._reported.get(req.request_id, (0, 0))
        self._reported[req.request_id] = (len(tokens), len(block_ids))
        values: dict[str, Any] = {
            "request_id": req.request_id,
            "new_tokens": tokens[sent_tokens:],
            "new_block_ids": block_ids[sent_blocks:],
            "computed_position": computed,
            "num_scheduled_tokens": scheduled,
            "priorities": None,
            "block_hashes": hash_chain(
                tokens[: computed + scheduled], self.tokens_per_block, req.cache_salt_id
            ),
            "cache_salt": req.cache_salt,
            "cache_salt_id": req.cache_salt_id,
        }
        if self._request_fields is not None:
            values = {k: v for k, v in values.items() if k in self._request_fields}
        return RequestData(**values)

    def build_scheduler_output(
        self,
        context_requests: list[LlmRequest],
        generation_requests: list[LlmRequest],
        cache_indices: Callable[[LlmRequest], list[int]],
    ) -> Any:
        """Deltas since each request's last report; context first, async-loading ones skipped."""
        output = SchedulerOutput()
        for req in context_requests:
            if req.request_id in self._new_loading or req.request_id in self.loading:
                continue
            first = req.request_id not in self._reported
            computed = req.context_current_position
            if first:
                computed -= self.external_loads.get(req.request_id, 0)
            scheduled = min(req.context_remaining_length, req.context_chunk_size)
            data = self._request_data(req, cache_indices(req), computed, scheduled)
            (output.new_requests if first else output.cached_requests).append(data)
        for req in generation_requests:
            computed = len(req.get_tokens(0)) - 1
            output.cached_requests.append(self._request_data(req, cache_indices(req), computed, 1))
        self.external_loads.clear()
        return output

    def take_scheduled_requests_pending_load(self, context_requests: list[LlmRequest]) -> list[LlmRequest]:
        """Pull requests with a new async hit out of the batch; their IDs go to ``get_finished``."""
        kept = []
        for req in context_requests:
            if req.request_id in self._new_loading:
                del self._new_loading[req.request_id]
                req.state = LlmRequestState.DISAGG_GENERATION_TRANS_IN_PROGRESS
                self.loading[req.request_id] = req
                self._started_loading_ids.append(req.request_id)
            else:
                kept.append(req)
        return kept

    def handle_metadata(self, scheduler_output: Any) -> None:
        """``build_connector_meta`` on rank 0, broadcast, ``bind_connector_meta`` on every rank."""
        with simulated_rank(0):
            metadata = self.scheduler.build_connector_meta(scheduler_output)
        blob = pickle.dumps(metadata)
        for rank, worker in enumerate(self.workers):
            with simulated_rank(rank):
                worker.bind_connector_meta(metadata if rank == 0 else pickle.loads(blob))

    def start_load_kv(self, stream: Any) -> None:
        self._each_worker("start_load_kv", stream)

    def layer_pre_hook(self, layer_idx: int, stream: Any) -> None:
        self._each_worker("wait_for_layer_load", layer_idx, stream)

    def layer_post_hook(self, layer_idx: int, stream: Any) -> None:
        self._each_worker("save_kv_layer", layer_idx, stream)

    def run_forward_pass_callables(self) -> None:
        for rank, fn in self.forward_pass_callables:
            with simulated_rank(rank):
                fn()

    def wait_for_save(self, stream: Any) -> None:
        self._each_worker("wait_for_save", stream)

    # --- completion ---------------------------------------------------------------------
    def request_finished(self, req: LlmRequest, block_ids: list[int]) -> bool:
        """Rank 0 decides, broadcast; True keeps the blocks until every rank reports the save."""
        with simulated_rank(0):
            answer = self.scheduler.request_finished(req, list(block_ids))
        saving = bool(_broadcast(answer))
        if saving:
            req.state = LlmRequestState.DISAGG_CONTEXT_TRANS_IN_PROGRESS
            self.saving[req.request_id] = req
            self._finished_gen_ids.append(req.request_id)
        return saving

    def get_finished(self) -> tuple[list[LlmRequest], list[LlmRequest]]:
        """Poll every rank with the IDs new since the last poll; return the transfers that every
        rank has reported done: (saved requests, loaded requests)."""
        finished_gen, started_loading = self._finished_gen_ids, self._started_loading_ids
        self._finished_gen_ids, self._started_loading_ids = [], []
        for rank, worker in enumerate(self.workers):
            with simulated_rank(rank):
                saved, loaded = worker.get_finished(list(finished_gen), list(started_loading))
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

    @property
    def has_pending_transfers(self) -> bool:
        return bool(self.saving or self.loading or self._new_loading)
