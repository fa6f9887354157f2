"""The steps of an executor iteration under the V1 KV cache manager (admission, scheduling,
allocation); ``v2_steps.py`` replaces them under KVCacheManagerV2.

Admission is GUARANTEED_NO_EVICT in arrival order; scheduling takes generation requests first (1
token each), then context chunks within ``max_num_tokens``; allocation covers the whole prompt at
once: device prefix match, then the connector match, then the alloc callback.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .request import LlmRequest, LlmRequestState

if TYPE_CHECKING:
    from .executor import ReplayExecutor


class V1Steps:
    """V1 admission, scheduling and allocation for one ``ReplayExecutor``."""

    def __init__(self, ex: ReplayExecutor) -> None:
        self.ex = ex

    def schedule(self) -> tuple[list[LlmRequest], list[LlmRequest]]:
        """Admit what fits, then (context, generation) requests of this iteration."""
        ex = self.ex
        self._admit()
        generation = [r for r in ex.schedulable() if r.state == LlmRequestState.GENERATION_IN_PROGRESS]
        budget = ex.llm_args.max_num_tokens - len(generation)
        context = []
        for req in ex.schedulable():
            if req.state != LlmRequestState.CONTEXT_INIT:
                continue
            chunk = ex.chunk_size(req.context_remaining_length, budget)
            if chunk <= 0:
                continue
            req.context_chunk_size = chunk
            budget -= chunk
            context.append(req)
        return context, generation

    def prepare_resources(self, context: list[LlmRequest], generation: list[LlmRequest]) -> list[LlmRequest]:
        """Allocate blocks; returns the context requests (all stay in the batch under V1)."""
        ex = self.ex
        for req in context:
            if not req.allocated and (ex.manager is None or ex.manager.should_add_sequence(req)):
                self._add_sequence(req)
        for req in generation:
            ex.block_manager.add_token(req.request_id, req.num_kv)
        return context

    def _admit(self) -> None:
        """GUARANTEED_NO_EVICT, in arrival order: admit only when every block the request may
        ever need (prompt + max_new_tokens) can be allocated."""
        ex = self.ex
        while ex.waiting:
            req = ex.waiting[0]
            needed = ex.kv.blocks_for(req.prompt_len + req.max_new_tokens)
            if not ex.kv.try_reserve(req.request_id, needed, req.cache_salt_id):
                return
            ex.active.append(ex.waiting.popleft())

    def _add_sequence(self, req: LlmRequest) -> None:
        """Device match + whole-prompt allocation, then the connector match, then the alloc callback."""
        ex = self.ex
        _, device_matched = ex.block_manager.add_sequence(req.request_id, req.get_tokens(0))
        connector_matched, load_async = 0, False
        if ex.manager is not None and ex.block_manager.enable_reuse:
            connector_matched, load_async = ex.manager.get_num_new_matched_tokens(req, device_matched)
        req.set_prepopulated_prompt_len(device_matched + connector_matched, ex.tokens_per_block)
        req.allocated = True
        stats = ex.stats.requests[req.request_id]
        stats.device_matched_tokens = device_matched
        stats.connector_matched_tokens = connector_matched
        stats.connector_load_async = load_async
        if ex.manager is not None:
            ex.manager.update_state_after_alloc(req, ex.pages(req))
