"""What both adapters' workers share: one KV pool, no per-layer work, completion reporting."""

from __future__ import annotations

from typing import Any

from lmcache.integration.tensorrt_llm._trtllm import KvCacheConnectorWorker
from lmcache.integration.tensorrt_llm.inflight import InflightTransfers


class PoolWorker(KvCacheConnectorWorker):
    """A worker over TRT-LLM's single primary pool; transfers are tracked per request.

    Subclasses implement ``register_kv_caches``, ``start_load_kv`` and ``wait_for_save`` and
    record their transfers in ``self._saves`` / ``self._loads``. The per-layer hooks do nothing:
    they do not fire under CUDA-graph replay, so all work happens once per iteration.
    """

    def __init__(self, llm_args: Any) -> None:
        super().__init__(llm_args)
        self._saves = InflightTransfers()
        self._loads = InflightTransfers()

    def register_kv_cache_layout(self, layout: Any) -> None:
        pool = layout.as_single_pool_tensor()
        if pool is None:
            raise NotImplementedError(
                "LMCache supports one KV pool with one layer group (no VSWA / hybrid models); "
                "this model's KV cache layout has several"
            )
        self.register_kv_caches(pool)

    def wait_for_layer_load(self, layer_idx: int, stream: Any) -> None:
        return None

    def save_kv_layer(self, layer_idx: int, stream: Any) -> None:
        return None

    def get_finished(
        self, finished_gen_req_ids: list[int], started_loading_req_ids: list[int]
    ) -> tuple[list[int], list[int]]:
        self._saves.ask(finished_gen_req_ids)
        self._loads.ask(started_loading_req_ids)
        return self._saves.poll(), self._loads.poll()
