"""Layer-wise loads on the worker: the forward's layer ``i`` waits for layer ``i`` of this iteration's
loads in TRT-LLM's ``wait_for_layer_load(i, stream)`` hook, not for the whole load before its first
layer (:mod:`lmcache.layered_load`).

TRT-LLM calls the per-layer hooks only on eager forwards (never when it replays a CUDA graph), and
a load whose forward skipped a hook would be read before it landed. So loads go layer-wise only once
a forward has called the hook for every layer of the pool (until then, and when off, the whole load
comes first); a forward with layer-wise loads that misses a hook after that fails loudly in
``wait_for_save`` and turns layer-wise loads off.
"""

from __future__ import annotations

from typing import Any

from lmcache import dma_batch
from lmcache.integration.tensorrt_llm.plan import LoadPlan
from lmcache.integration.tensorrt_llm.planner import PromisedLoadError
from lmcache.layered_load import LayerReady
from lmcache.logging import init_logger

logger = init_logger(__name__)


class LayerwiseLoads:
    """One worker's layer-wise loads of the current forward, and what its hooks have shown."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.num_layers: int | None = None
        """Layers of the one pool loads can go layer-wise into (None: none can)."""
        self.armed = False
        """A forward has called ``wait_for_layer_load`` for every layer."""
        self._seen: set[int] = set()
        self._loads: list[LayerReady] = []

    def set_pool_layers(self, num_layers: int | None, cuda: bool) -> None:
        """What the back-end can load by layer (None: nothing; a single-layer pool gains nothing), into
        a CUDA pool or not (2-D copies need the CUDA runtime's entry point)."""
        self.num_layers = num_layers if num_layers is not None and num_layers > 1 else None
        if self.num_layers and self.enabled and cuda and not dma_batch.available_2d():
            logger.warning("LMCache: cudaMemcpy2DAsync not found in this process; loads stay whole")
            self.num_layers = None

    def begin_forward(self) -> None:
        """A new forward (``start_load_kv``): no hook seen, no load in flight."""
        self._seen.clear()
        self._loads.clear()

    def layers_for(self, plan: LoadPlan) -> LayerReady | None:
        """Where ``plan``'s load tells its layers' progress if it goes layer-wise, else None (the whole
        load then comes before the forward): synchronous loads only, once the hooks are proven, with
        one transfer per layer group (several retrieves would each set the layers' events)."""
        if not (self.enabled and self.armed and self.num_layers) or plan.is_async:
            return None
        if plan.reservation_id is not None:
            return None
        groups = [transfer.group for transfer in plan.transfers]
        if len(groups) != len(set(groups)):
            return None
        ready = LayerReady(self.num_layers)
        self._loads.append(ready)
        return ready

    def wait(self, layer: int, stream: Any) -> None:
        """``wait_for_layer_load``: order ``stream`` after layer ``layer`` of every load in flight."""
        self._seen.add(layer)
        for ready in self._loads:
            ready.wait(layer, stream)

    def end_forward(self, stream: Any) -> None:
        """``wait_for_save``: order ``stream`` after every load; arm after a forward that hooked every
        layer. Raises :class:`PromisedLoadError` if a layer-wise load's forward skipped a hook."""
        loads, self._loads = self._loads, []
        for ready in loads:
            ready.wait_all(stream)
        if self.num_layers is None:
            return
        missing = sorted(set(range(self.num_layers)) - self._seen)
        if not missing and not self.armed and self.enabled:
            self.armed = True
            logger.info("LMCache: layer hooks seen for all %d layers; loads go layer-wise", self.num_layers)
        if missing and any(ready.went_layerwise for ready in loads):
            self.armed = self.enabled = False
            raise PromisedLoadError(
                f"LMCache loaded KV layer by layer, but TRT-LLM's forward did not call wait_for_layer_load "
                f"for layers {missing[:8]}{'...' if len(missing) > 8 else ''} (a CUDA-graph replay?), so "
                "it may have read blocks before they were loaded; failing the batch. Layer-wise loads are "
                "now off in this process; set use_layerwise: false (LMCACHE_USE_LAYERWISE=false) to keep "
                "them off"
            )
