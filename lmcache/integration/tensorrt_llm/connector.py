"""One TRT-LLM connector over two back-ends: the scheduler and worker halves both presets share.

The scheduler (rank 0; under attention DP, every rank for its own requests) implements the flat
and the per-layer-group forms, V2's prefix-reservation trio, ``cancel_load`` and ``request_reset``,
all through one :class:`Planner`. The worker (every rank) registers a V1 pool or a V2 layout and
hands loads and saves to its back-end, once per iteration (``start_load_kv``, ``wait_for_save``,
``get_finished``). ``wait_for_layer_load`` lets each layer of the forward wait for its own KV only,
once TRT-LLM has shown it calls the hook for every layer
(:mod:`lmcache.integration.tensorrt_llm.layerwise`); ``save_kv_layer`` does nothing.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from lmcache.forward_gate import FORWARD
from lmcache.integration.tensorrt_llm._trtllm import KvCacheConnectorScheduler, KvCacheConnectorWorker
from lmcache.integration.tensorrt_llm.backend import TransferBackend
from lmcache.integration.tensorrt_llm.inflight import Done, InflightTransfers
from lmcache.integration.tensorrt_llm.layerwise import LayerwiseLoads
from lmcache.integration.tensorrt_llm.plan import ConnectorMetadata
from lmcache.integration.tensorrt_llm.planner import Planner
from lmcache.integration.tensorrt_llm.save_fence import SaveFence
from lmcache.integration.tensorrt_llm.settings import ConnectorSettings
from lmcache.integration.tensorrt_llm.targets import PoolTarget, targets_of_layout, targets_of_pool
from lmcache.integration.tensorrt_llm.window_fence import WindowSaves, copies_done
from lmcache.layout import PoolLayout
from lmcache.logging import init_logger

logger = init_logger(__name__)

OVERLAP_MIN_TOKENS = 4096
"""Whole loads of at least this many tokens in one iteration let saves go on while they are enqueued
(see ``start_load_kv``). Shorter ones, whose forward would wait for the host more than for their
copies, keep saves off the GIL from the start (D60 measured 16k-token loads)."""


class LMCacheScheduler(KvCacheConnectorScheduler):
    """Rank 0's half (every rank's, for its own requests, under attention DP): TRT-LLM's scheduler
    callbacks, answered by the planner."""

    supports_attention_dp = True
    """Owner-local under attention DP: each rank's scheduler plans only its requests for its own
    worker, and their chunks are keyed for every rank alike (``ConnectorSettings.attention_dp``)."""

    def __init__(self, llm_args: Any, planner: Planner) -> None:
        super().__init__(llm_args)
        self.planner = planner

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        return self.planner.match(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Any, block_ids: list[int]) -> None:
        self.planner.after_alloc(request, [list(block_ids)])

    def update_state_after_alloc_by_layer_group(
        self, request: Any, block_ids_by_layer_group: list[list[int]]
    ) -> None:
        # V2 may honour a legacy offer partly: its commit, before this call, records on the request
        # how many tokens it took (a reservation's load brings its own range and is not clipped here).
        # Without that member the allocation alone bounds the load. The flat form (V1 honours the whole
        # offer, and its query may see another object than this one) never reads it.
        honoured = getattr(request, "py_num_connector_matched_tokens", None)
        self.planner.after_alloc(
            request,
            [list(group) for group in block_ids_by_layer_group],
            None if honoured is None else int(honoured),
        )

    def build_connector_meta(self, scheduler_output: Any) -> ConnectorMetadata:
        return self.planner.build(scheduler_output)

    def request_finished(self, request: Any, cache_block_ids: list[int]) -> bool:
        return self.planner.finished(request)

    def request_finished_by_layer_group(
        self, request: Any, cache_block_ids_by_layer_group: list[list[int]]
    ) -> bool:
        return self.planner.finished(request)

    def reserve_prefix(self, request: Any, num_computed_tokens: int, reservation_id: int) -> tuple[int, bool]:
        return self.planner.reserve(request, num_computed_tokens, reservation_id)

    def release_prefix_reservation(self, request: Any, reservation_id: int, start: int, end: int) -> None:
        self.planner.release_reservation(reservation_id, start, end)

    def cancel_load(self, request: Any, start: int, end: int) -> None:
        self.planner.cancel_load(request, start, end)

    def request_reset(self, request: Any) -> None:
        self.planner.reset(request)


class LMCacheWorker(KvCacheConnectorWorker):
    """Every rank's half: registers its pools, runs the plan's loads and saves through the back-end."""

    supports_attention_dp = True
    """Under attention DP a worker runs its own scheduler's plan, and reports completions of its own
    requests only (TRT-LLM gathers nothing across ranks then)."""

    def __init__(self, llm_args: Any, settings: ConnectorSettings, backend: TransferBackend) -> None:
        super().__init__(llm_args)
        self.settings = settings
        self.backend = backend
        self._saves = InflightTransfers()
        self._loads = InflightTransfers()
        self._prefix_loads: dict[int, Done] = {}
        self._layerwise = LayerwiseLoads(settings.layerwise)
        self._device = torch.device("cpu")
        """Where the registered pools are."""
        self._fence: SaveFence | None = None
        """The last iteration's saves' start, until released (see ``save_fence``)."""
        self._window_saves = WindowSaves()

    # -- registration -------------------------------------------------------------------------

    def register_kv_caches(self, kv_cache_tensor: Any) -> None:
        self._register(targets_of_pool(kv_cache_tensor, self.settings.window))

    def register_kv_cache_layout(self, layout: Any) -> None:
        """V2: every layer group's regions (instead of ``register_kv_caches``)."""
        self._register(targets_of_layout(layout))

    def _register(self, targets: list[PoolTarget]) -> None:
        for target in targets:
            layout = PoolLayout.of_pool(target.tensor, self.settings.tokens_per_block)
            layout.blocks_per_chunk(self.settings.chunk_size)
            logger.info(
                "LMCache worker registered KV pool of layer group %d region %d: %s %s (%d tokens/block, "
                "%.1f KiB/token%s)",
                target.target.group,
                target.target.region,
                tuple(target.tensor.shape),
                target.tensor.dtype,
                layout.tokens_per_block,
                layout.bytes_per_token / 1024,
                f", window {target.window}" if target.window else "",
            )
        self.backend.register(targets)
        self._device = targets[0].tensor.device
        self._window_saves.windowed_groups = {t.target.group for t in targets if t.window is not None}
        self._layerwise.set_pool_layers(self.backend.layerwise_layers(), targets[0].tensor.is_cuda)

    def _meta(self) -> ConnectorMetadata:
        meta = self.get_connector_meta()
        return meta if isinstance(meta, ConnectorMetadata) else ConnectorMetadata()

    # -- loads and saves ----------------------------------------------------------------------

    def start_load_kv(self, stream: Any) -> None:
        """Run the plan's loads; the forward's launch follows, until ``wait_for_save``: saves in
        flight keep off the GIL meanwhile (:mod:`lmcache.forward_gate`). While long whole loads are
        enqueued they go on: the forward waits for those loads' copies anyway, which outlast their
        enqueueing, and a save's copies then overlap them (benchmarks/RESULTS.md, D60). A short
        load's forward, or a layer-wise one's (it starts after the first layers), is guarded from
        the start."""
        self._release_saves(stream)
        meta = self._meta()
        self.backend.begin_iteration(meta.backend_context)
        self._layerwise.begin_forward()
        plans = [(plan, self._layerwise.layers_for(plan)) for plan in meta.loads]
        whole_tokens = sum(plan.end - plan.start for plan, layers in plans if layers is None)
        if whole_tokens < OVERLAP_MIN_TOKENS or any(layers is not None for _, layers in plans):
            FORWARD.close()
        failure: Exception | None = None
        for plan, layers in plans:
            try:
                done = self.backend.load(plan, meta.backend_context, stream, layers)
            except Exception as e:  # the other requests' loads still run: each releases its own pins
                failure = failure or e
                continue
            if plan.reservation_id is not None:
                self._prefix_loads[plan.reservation_id] = done
            elif plan.is_async:
                self._loads.add(plan.request_id, done)
        FORWARD.close()
        if failure is not None:
            raise failure

    def wait_for_save(self, stream: Any) -> None:
        """Hand this iteration's saves to the back-end, their copies to start once released after
        sampling (``get_finished`` or the next ``start_load_kv``); a request whose saves are in
        flight keeps its blocks until ``get_finished`` reports it. ``stream`` is ordered after every
        load first; a layer-wise load whose forward skipped a layer's hook fails here. Last, it waits
        for the copies of the saves the plan fences: their sliding-window pages may go to another
        request before the next forward (:mod:`.window_fence`)."""
        FORWARD.open()
        self._release_saves(None)  # an earlier iteration's saves follow that forward only
        self._layerwise.end_forward(stream)
        meta = self._meta()
        if meta.saves:
            self._fence = SaveFence(stream, self._device)
            saved = self.backend.save(meta.saves, self._fence)
            for save_id, (transfer, copies) in enumerate(
                zip(meta.saves, saved, strict=True), meta.first_save_id
            ):
                for future in copies:
                    self._saves.add(transfer.request_id, functools.partial(copies_done, future))
                self._window_saves.add(save_id, transfer.group, copies)
        self._window_saves.order(meta.fence_saves, stream, self._device, self._fence)

    def wait_for_layer_load(self, layer_idx: int, stream: Any) -> None:
        """Order ``stream`` after layer ``layer_idx`` of this forward's layer-wise loads."""
        self._layerwise.wait(layer_idx, stream)

    def save_kv_layer(self, layer_idx: int, stream: Any) -> None:
        return None

    # -- completion ---------------------------------------------------------------------------

    def get_finished(
        self, finished_gen_req_ids: list[int], started_loading_req_ids: list[int]
    ) -> tuple[list[int], list[int]]:
        """Saves and legacy async loads that landed (a failed async load raises here). A finished
        request is reported saved once its legacy async load has landed too."""
        FORWARD.open()  # in case a forward failed before ``wait_for_save``
        if self._fence is not None:
            self._fence.release_after_current()  # TRT-LLM has enqueued sampling by now
            self._fence = None
        for request_id in finished_gen_req_ids:  # a request ended while loading: its blocks wait for both
            for done in self._loads.pending(request_id):
                self._saves.add(request_id, done)
        self._saves.ask(finished_gen_req_ids)
        self._loads.ask(started_loading_req_ids)
        return self._saves.poll(), self._loads.poll()

    def _release_saves(self, stream: Any) -> None:
        if self._fence is not None:
            self._fence.release(stream)
            self._fence = None

    def transfers_in_flight(self) -> int:
        """Requests whose saves or legacy loads, plus prefix loads, this worker still tracks: none
        once TRT-LLM was told of every transfer it waits for and no request runs."""
        return len(self._saves) + len(self._loads) + len(self._prefix_loads)

    def get_finished_prefix_loads(self) -> list[int]:
        """Reservation ids whose load (sync or async) is in place and visible; each reported once.
        Never waits, never talks to other ranks; a failed load raises here."""
        ready = sorted(rid for rid, done in self._prefix_loads.items() if done())
        for rid in ready:
            del self._prefix_loads[rid]
        return ready
