"""The scheduler side both adapters share: TRT-LLM's callbacks handed to the planner."""

from __future__ import annotations

from typing import Any

from lmcache.integration.tensorrt_llm._trtllm import KvCacheConnectorScheduler
from lmcache.integration.tensorrt_llm.planner import ConnectorMetadata, Planner


class PlannedScheduler(KvCacheConnectorScheduler):
    """Rank 0's connector half; subclasses build ``self._planner`` with their cache index."""

    _planner: Planner

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        return self._planner.match(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Any, block_ids: list[int]) -> None:
        self._planner.after_alloc(request, block_ids)

    def update_state_after_alloc_by_layer_group(
        self, request: Any, block_ids_by_layer_group: list[list[int]]
    ) -> None:
        self._planner.after_alloc(request, _single_group(block_ids_by_layer_group))

    def build_connector_meta(self, scheduler_output: Any) -> ConnectorMetadata:
        return self._planner.build(scheduler_output)

    def request_finished(self, request: Any, cache_block_ids: list[int]) -> bool:
        return self._planner.finished(request)

    def request_finished_by_layer_group(
        self, request: Any, cache_block_ids_by_layer_group: list[list[int]]
    ) -> bool:
        _single_group(cache_block_ids_by_layer_group)
        return self._planner.finished(request)


def _single_group(block_ids_by_layer_group: list[list[int]]) -> list[int]:
    if len(block_ids_by_layer_group) != 1:
        raise NotImplementedError(
            f"LMCache supports a KV cache with one layer group; got {len(block_ids_by_layer_group)} "
            "(VSWA / hybrid models are not supported)"
        )
    return block_ids_by_layer_group[0]
