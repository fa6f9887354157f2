"""``ReplayExecutor``: TRT-LLM's PyTorch executor loop as a KV cache connector sees it.

One ``_iteration`` is one pass of ``PyExecutor._executor_loop`` (or ``_executor_loop_overlap``):
admission (GUARANTEED_NO_EVICT), scheduling with the token budget and chunked prefill,
``prepare_resources`` (device prefix match, then the connector match, then the alloc callback),
the connector batch start (SchedulerOutput, pending-load removal, metadata, ``start_load_kv``), the
forward with per-layer hooks, ``wait_for_save``, the request update, ``request_finished``,
termination/reuse, and ``get_finished`` every iteration. All TP ranks live in this process, unless
``ranks=ProcessGroupRanks()``: then each process runs this same loop for its own rank (its pool,
its worker, the scheduler on rank 0), the scheduler's answers and metadata are broadcast from
rank 0 and ``get_finished`` is gathered, as in TRT-LLM.

With ``kv_cache_config.use_kv_cache_manager_v2`` the V2 steps of ``v2_steps.py`` replace admission,
scheduling and allocation (layer groups, per-chunk pages, the V2 legacy query or prefix
reservations). Test hooks: ``cancel``, ``preempt``, ``rollback_after_alloc``, ``drop_from_batch``,
``on_iteration``.
"""

from __future__ import annotations

import importlib
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from .block_pool import BlockManager, KvPool, PoolAllocator, zeros_pool
from .connector_manager import KvCacheConnectorManager
from .endings import RequestEndings
from .forward_pass import Batch, ForwardPass, Streams
from .kv_manager import GroupedBlockManager
from .layer_groups import GroupedKvPool
from .layout import KvCacheLayout, build_layout
from .llm_args import KvCacheConnectorConfig, TorchLlmArgs
from .model import ModelConfig, TinyDecoder
from .ranks import AttentionDPOwner, LocalRanks, Ranks
from .request import LlmRequest, LlmRequestState
from .reservations import wants_prefix_reservations
from .stats import ExecutorStats, GenerationResult, RequestStats
from .v1_steps import V1Steps
from .v2_steps import V2Steps

ConnectorFactory = Callable[[Any], Any]


def factories_from_config(
    config: KvCacheConnectorConfig | None,
) -> tuple[ConnectorFactory, ConnectorFactory] | None:
    """The (scheduler, worker) classes a connector config names (a preset included), or None."""
    if config is None:
        return None
    module = importlib.import_module(config.connector_module)
    return getattr(module, config.connector_scheduler_class), getattr(module, config.connector_worker_class)


def _construct_connector(
    factories: tuple[ConnectorFactory, ConnectorFactory], llm_args: TorchLlmArgs, ranks: Ranks
) -> tuple[Any, list[Any]]:
    """Scheduler on rank 0 (None where rank 0 is not hosted), a worker on every local rank, built
    concurrently so they may rendezvous."""
    scheduler_factory, worker_factory = factories

    def build(factory: ConnectorFactory, rank: int) -> Any:
        with ranks.acting_as(rank):
            return factory(llm_args)

    with ThreadPoolExecutor(max_workers=len(ranks.local) + 1, thread_name_prefix="replay-connector") as pool:
        scheduler_future = pool.submit(build, scheduler_factory, 0) if ranks.hosts_root else None
        worker_futures = [pool.submit(build, worker_factory, rank) for rank in ranks.local]
        scheduler = scheduler_future.result() if scheduler_future is not None else None
        return scheduler, [f.result() for f in worker_futures]


class ReplayExecutor:
    """Runs prompts through TRT-LLM's executor loop against a real paged pool and tiny model."""

    def __init__(
        self,
        llm_args: TorchLlmArgs,
        model_config: ModelConfig | None = None,
        *,
        device: str | torch.device = "cpu",
        overlap_scheduler: bool = False,
        cuda_graphs: bool = False,
        seed: int = 0,
        connector: tuple[ConnectorFactory, ConnectorFactory] | None = None,
        idle_timeout_s: float = 120.0,
        ranks: Ranks | None = None,
        pool_allocator: PoolAllocator = zeros_pool,
        free_passed_pages: bool = False,
        serve_grow_pages: int | None = None,
        skip_idle_polls: bool = False,
        cancel_waits_for_loads: bool = True,
    ) -> None:
        """``ranks``: where the TP ranks live (default: all in this process, run in turn); with
        ``llm_args.enable_attention_dp``, ``AttentionDPOwner(rank, tensor_parallel_size)``: this
        executor is that one attention-DP rank, serving its own requests;
        ``pool_allocator``: how each local pool tensor is made (see :data:`PoolAllocator`);
        ``free_passed_pages``: V2 frees passed sliding-window pages (see ``V2Steps.free_passed_pages``);
        ``serve_grow_pages``: V2 only, pages run short: growing a first allocation past its chunk's
        own pages for a served connector prefix fails when it needs more than this many pages (per
        group), and the prefix is honoured only partly (reference §5.1); None = never fails;
        ``skip_idle_polls``: the worker's ``get_finished`` is called only while the manager tracks an
        async save or load, as a 2026 TRT-LLM revision does (see ``KvCacheConnectorManager``);
        ``cancel_waits_for_loads``: False ends a request cancelled while its load is in flight at once,
        as TRT-LLM 1.2's executor does with no cache transceiver: ``request_finished`` now, its pages
        freed unless that returns True (see ``endings.py``)."""
        self.llm_args = llm_args
        self.cancel_waits_for_loads = cancel_waits_for_loads
        self.model_config = model_config or ModelConfig()
        self.device = torch.device(device)
        self.overlap_scheduler = overlap_scheduler
        self.cuda_graphs = cuda_graphs
        self.idle_timeout_s = idle_timeout_s
        if llm_args.enable_attention_dp:
            # Attention is not split: each rank runs its own requests with every KV head.
            owners = llm_args.tensor_parallel_size
            if not isinstance(ranks, AttentionDPOwner) or ranks.owners != owners:
                raise ValueError(
                    f"enable_attention_dp: run one executor per rank, ranks=AttentionDPOwner(rank, {owners})"
                )
            self.tp_size = 1
        else:
            if isinstance(ranks, AttentionDPOwner):
                raise ValueError("ranks=AttentionDPOwner(...) needs llm_args.enable_attention_dp=True")
            self.tp_size = llm_args.tensor_parallel_size
        self.ranks = ranks if ranks is not None else LocalRanks(self.tp_size)
        if self.ranks.size != self.tp_size:
            raise ValueError(f"{self.ranks.size} ranks for tensor_parallel_size={self.tp_size}")
        kv = llm_args.kv_cache_config
        self.tokens_per_block = kv.tokens_per_block
        self.v2 = kv.use_kv_cache_manager_v2
        if llm_args.pipeline_parallel_size != 1:
            raise ValueError("the replay (like TRT-LLM with a KV connector) does not support PP > 1")
        factories = (
            connector if connector is not None else factories_from_config(llm_args.kv_connector_config)
        )
        if factories is not None and (kv.host_cache_size or 0) > 0:
            raise ValueError("a KV connector requires host_cache_size == 0 (block ids must be pool rows)")
        if factories is not None and self.v2 and not kv.enable_block_reuse:
            raise ValueError("a KV connector on the V2 KV cache manager requires enable_block_reuse")
        mc = self.model_config
        self.layer_groups = mc.layer_groups()
        if not self.v2 and any(g.window is not None for g in self.layer_groups):
            raise ValueError("sliding-window layers require kv_cache_config.use_kv_cache_manager_v2")
        self.model = TinyDecoder(mc, seed=seed, device=self.device, tp_size=self.tp_size, ranks=self.ranks)
        self.kv = GroupedBlockManager(
            self.layer_groups,
            kv.num_blocks,
            kv.tokens_per_block,
            kv.enable_block_reuse,
            mc.sink_tokens,
            recycle_first=self.v2,
        )
        self.pools = GroupedKvPool(
            self.layer_groups,
            num_blocks=kv.num_blocks,
            num_kv_heads=mc.num_kv_heads,
            head_dim=mc.head_dim,
            tokens_per_block=kv.tokens_per_block,
            tp_size=self.tp_size,
            dtype=mc.dtype,
            device=self.device,
            local_ranks=self.ranks.local,
            allocate=pool_allocator,
        )
        self._streams = Streams(self.device)
        self._forward = ForwardPass(self.model, self.pools, self._streams, cuda_graphs)
        self.stats = ExecutorStats()
        self._next_request_id = 1
        self.waiting: deque[LlmRequest] = deque()
        """Requests not admitted yet, in arrival order (the scheduling steps admit them)."""
        self.active: list[LlmRequest] = []
        """Admitted requests that have not ended."""
        self.in_flight: Batch | None = None
        """Under the overlap scheduler: the batch whose sampled tokens the host has not seen yet."""
        self.scheduler: Any = None
        self.workers: list[Any] = []
        self.manager: KvCacheConnectorManager | None = None
        self.layouts: list[KvCacheLayout] = []
        self.on_iteration: Callable[[ReplayExecutor], None] | None = None
        self._endings = RequestEndings(self)
        self._rollbacks: set[int] = set()
        self._drops: dict[int, int] = {}
        callables: list[tuple[int, Callable[[], Any]]] = []
        if factories is not None:
            self.scheduler, self.workers = _construct_connector(factories, llm_args, self.ranks)
            for rank, worker in zip(self.ranks.local, self.workers, strict=True):
                with self.ranks.acting_as(rank):
                    fn = worker.register_forward_pass_callable()
                if fn is not None:
                    callables.append((rank, fn))
        self._warmup()
        if factories is not None:
            reservations = (
                self.v2
                and llm_args.scheduler_config.enable_prefix_aware_scheduling
                and self.ranks.broadcast(
                    wants_prefix_reservations(self.scheduler, self.workers) if self.ranks.hosts_root else None
                )
            )
            self.manager = KvCacheConnectorManager(
                self.scheduler,
                self.workers,
                tokens_per_block=kv.tokens_per_block,
                num_layer_groups=len(self.layer_groups) if self.v2 else None,
                prefix_reservations=reservations,
                ranks=self.ranks,
                skip_idle_polls=skip_idle_polls,
            )
            self.manager.forward_pass_callables = callables
            self._register_kv_caches()
            with self.ranks.acting_as(0):
                wait = getattr(self.scheduler, "wait_for_initialization", None)  # None off rank 0
                if wait is not None:
                    wait()
        if serve_grow_pages is not None and (not self.v2 or serve_grow_pages < 0):
            raise ValueError(
                f"serve_grow_pages={serve_grow_pages!r} needs KvCacheConfig(use_kv_cache_manager_v2=True) "
                "and a count >= 0; leave it None for a grow that never fails"
            )
        self.v2_steps = V2Steps(self, free_passed_pages, serve_grow_pages) if self.v2 else None
        self._steps: V1Steps | V2Steps = self.v2_steps if self.v2_steps is not None else V1Steps(self)

    def _register_kv_caches(self) -> None:
        """V1: ``register_kv_caches(pool)``; V2: ``register_kv_cache_layout(layout)`` instead
        (``layouts`` holds one per local rank)."""
        for rank, worker in zip(self.ranks.local, self.workers, strict=True):
            with self.ranks.acting_as(rank):
                if not self.v2:
                    worker.register_kv_caches(self.pool.tensors[rank])
                    continue
                layout = build_layout(
                    self.tokens_per_block,
                    [
                        (g.group_id, g.layer_ids, g.window, self.pools.pools[g.group_id].tensors[rank])
                        for g in self.layer_groups
                    ],
                )
                self.layouts.append(layout)
                worker.register_kv_cache_layout(layout)

    # --- public -------------------------------------------------------------------------
    @property
    def block_manager(self) -> BlockManager:
        """Layer group 0's block manager (the only one under V1); it holds the reuse table."""
        return self.kv.primary

    @property
    def pool(self) -> KvPool:
        """Layer group 0's pool (the only one under V1)."""
        return self.pools.pools[0]

    @property
    def kv_caches(self) -> list[torch.Tensor]:
        """Each rank's pool tensor of layer group 0 (under V1, what ``register_kv_caches`` received);
        an empty ``meta`` tensor for a rank hosted by another process."""
        return self.pool.tensors

    @property
    def next_request_id(self) -> int:
        """The id the next prompt will get (ids are assigned in prompt order)."""
        return self._next_request_id

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int | Sequence[int],
        cache_salts: Sequence[str | None] | None = None,
    ) -> list[GenerationResult]:
        """Greedy-decode every prompt; returns once they finished and all async transfers drained."""
        counts = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        salts = list(cache_salts) if cache_salts is not None else [None] * len(prompts)
        if len(counts) != len(prompts) or len(salts) != len(prompts):
            raise ValueError("max_new_tokens / cache_salts must match the number of prompts")
        requests = [self._make_request(list(p), n, s) for p, n, s in zip(prompts, counts, salts, strict=True)]
        self.waiting.extend(requests)
        self._run_until_idle()
        return [self.stats.result(req, self.model_config.vocab_size) for req in requests]

    # --- test hooks -----------------------------------------------------------------------
    def cancel(self, request_id: int) -> None:
        """Cancel a request at the start of the next iteration: a waiting one is dropped silently;
        one whose load is in flight ends once the load completes; else ``request_finished`` now."""
        self._endings.cancel(request_id)

    def preempt(self, request_id: int) -> None:
        """(V2) Preempt a request with pages at the start of the next iteration (once a load in
        flight completes): ``request_finished``, its save awaited if it returns True, then its
        pages freed and the request recomputed from scratch (see ``endings.py``)."""
        if not self.v2:
            raise ValueError("preemption is a V2 KV cache manager path (V1 requires GUARANTEED_NO_EVICT)")
        self._endings.preempt(request_id)

    def rollback_after_alloc(self, request_id: int) -> None:
        """(V2) Right after that request's next allocation and its alloc callback: free the pages,
        ``request_reset``, and replay the request from scratch (one-shot)."""
        if not self.v2:
            raise ValueError("rollback (free_resources + request_reset) is a V2 KV cache manager path")
        self._rollbacks.add(request_id)

    def take_rollback(self, request_id: int) -> bool:
        """Whether a rollback was asked for that request (consumed: it happens once)."""
        if request_id not in self._rollbacks:
            return False
        self._rollbacks.discard(request_id)
        return True

    def drop_from_batch(self, request_id: int, iterations: int = 1) -> None:
        """Remove the request from the final batch of its next ``iterations`` scheduled iterations
        (after the scheduling pass, before ``prepare_resources``)."""
        self._drops[request_id] = iterations

    # --- construction helpers -----------------------------------------------------------
    def _make_request(self, prompt: list[int], max_new_tokens: int, salt: str | None) -> LlmRequest:
        mc, args = self.model_config, self.llm_args
        if any(not 0 <= t < mc.vocab_size for t in prompt):
            raise ValueError(f"prompt tokens must be in [0, {mc.vocab_size})")
        if len(prompt) + max_new_tokens > mc.max_position_embeddings:
            raise ValueError("prompt + max_new_tokens exceeds max_position_embeddings")
        if not args.enable_chunked_prefill and len(prompt) > args.max_num_tokens:
            raise ValueError(f"prompt of {len(prompt)} tokens > max_num_tokens without chunked prefill")
        needed = self.kv.blocks_for(len(prompt) + max_new_tokens)
        if needed > self.block_manager.num_blocks:
            raise ValueError(f"request needs {needed} blocks; the pool has {self.block_manager.num_blocks}")
        req = LlmRequest(self._next_request_id, prompt, max_new_tokens, cache_salt=salt)
        self._next_request_id += 1
        self.stats.requests[req.request_id] = RequestStats(prompt_len=req.prompt_len)
        return req

    def _warmup(self) -> None:
        """One throw-away forward through the pools before the connector sees the KV cache."""
        if not self.kv.try_reserve(-1, 1):
            raise RuntimeError("no block free for warmup")
        self.kv.grow(-1, 1)
        self._forward.warmup(self.kv.pages(-1, 0))
        self.kv.remove_sequence(-1)
        if self._streams.cuda:
            torch.cuda.synchronize(self.device)

    def pages(self, req: LlmRequest) -> list[list[int]]:
        """Complete page list per layer group of a request, ``-1`` where a window has passed."""
        return self.kv.pages(req.request_id, req.num_kv)

    # --- the loop -----------------------------------------------------------------------
    def _busy(self) -> bool:
        pending = self.manager is not None and self.manager.has_pending_transfers
        return bool(self.waiting or self.active or pending)

    def _run_until_idle(self) -> None:
        last_progress = time.monotonic()
        with self._streams.on_current():
            while self._busy():
                if self._iteration():
                    last_progress = time.monotonic()
                    continue
                if not self.active and not (self.manager and self.manager.has_pending_transfers):
                    raise RuntimeError(f"{len(self.waiting)} request(s) can never be admitted")
                if self.ranks.broadcast(time.monotonic() - last_progress > self.idle_timeout_s):
                    pending = self.manager and (sorted(self.manager.saving), sorted(self.manager.loading))
                    raise RuntimeError(
                        f"no progress for {self.idle_timeout_s}s; (saving, loading) = {pending}"
                    )
                time.sleep(0.001)  # let a connector's background threads run
        self.in_flight = None  # under overlap: the extra forward of requests that already finished

    def _iteration(self) -> bool:
        """One executor loop pass; True if anything progressed."""
        self.stats.iterations += 1
        if self.on_iteration is not None:
            self.on_iteration(self)
        progressed = self._endings.apply()
        if self.manager is not None:
            retired = self.manager.retire_prefix_loads()
            self._endings.after_loads(retired)
            progressed = progressed or bool(retired)
        context, generation = self._steps.schedule()
        context = self._apply_drops(context)
        if self.v2_steps is not None:
            self.v2_steps.release_unused_reservations(context)
        batch: Batch | None = None
        if context or generation:
            context = self._steps.prepare_resources(context, generation)
            if self.manager is not None:
                output = self.manager.build_scheduler_output(context, generation, self.pages)
                context = self.manager.take_scheduled_requests_pending_load(context)
                self.manager.handle_metadata(output)
                self.manager.start_load_kv(self._streams.current)
                self.stats.record_dispatched(output)
            if context or generation:
                batch = Batch(context, generation)
                self._forward.run(batch, self.manager, self.pages)
                self.stats.forwards += 1
        progressed = progressed or batch is not None
        if self.overlap_scheduler:
            previous, self.in_flight = self.in_flight, batch
            if previous is not None:
                self._finish_batch(previous)
                progressed = True
        elif batch is not None:
            self._finish_batch(batch)
        if self.manager is not None:
            saved, loaded = self.manager.get_finished()
            self._endings.after_saves(saved)
            self._endings.after_loads(loaded)
            progressed = progressed or bool(saved or loaded)
        return progressed

    def request(self, request_id: int) -> LlmRequest | None:
        """A waiting or active request by id (None once it ended), e.g. for ``on_iteration``."""
        for req in (*self.waiting, *self.active):
            if req.request_id == request_id:
                return req
        return None

    # --- hooks ---------------------------------------------------------------------------

    def _apply_drops(self, context: list[LlmRequest]) -> list[LlmRequest]:
        kept = []
        for req in context:
            left = self._drops.get(req.request_id, 0)
            if left <= 0:
                kept.append(req)
                continue
            self._drops[req.request_id] = left - 1
        return kept

    def schedulable(self) -> list[LlmRequest]:
        """Admitted requests, less those whose cancellation waits for a load."""
        return self._endings.schedulable()

    def chunk_size(self, remaining: int, budget: int) -> int:
        """Tokens of a context request to schedule: chunked prefill splits at block boundaries
        (non-final chunks), else the whole rest or nothing."""
        if self.llm_args.enable_chunked_prefill:
            chunk = min(remaining, budget)
            if chunk < remaining:
                chunk = chunk // self.tokens_per_block * self.tokens_per_block
            return chunk
        return remaining if remaining <= budget else 0

    # --- completion -----------------------------------------------------------------------
    def _finish_batch(self, batch: Batch) -> None:
        """Host update of a forwarded batch: tokens, ``request_finished``, termination, reuse."""
        finished = []
        for req in batch.context + batch.generation:
            if req.request_id in self._endings.ended:
                continue  # cancelled while this batch was in flight (overlap)
            if req.num_generated >= req.max_new_tokens or req.request_id not in batch.sampled:
                continue  # under overlap: the extra forward of a request the host already finished
            token, row = batch.sampled[req.request_id]
            req.append_token(token)
            req.logits.append(row)
            if req.num_generated >= req.max_new_tokens:
                req.state = LlmRequestState.GENERATION_COMPLETE
                finished.append(req)
        saving = set()
        for req in finished:  # _send_kv_async: before the request is freed
            if self.manager is not None and self.manager.request_finished(req, self.pages(req)):
                saving.add(req.request_id)
                self.kv.store_blocks_for_reuse(req.request_id, req.device_tokens, req.num_kv)
        for req in finished:  # _handle_responses: terminate (saving requests keep their blocks pinned)
            self.active.remove(req)
            if req.request_id not in saving:
                self._endings.release_pages(req)
        for req in batch.context + batch.generation:  # update_resources: publish filled blocks
            if self.kv.has_allocation(req.request_id):
                self.kv.store_blocks_for_reuse(req.request_id, req.device_tokens, req.num_kv)
