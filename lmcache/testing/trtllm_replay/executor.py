"""``ReplayExecutor``: TRT-LLM's PyTorch executor loop as a KV cache connector sees it.

One ``_iteration`` is one pass of ``PyExecutor._executor_loop`` (or ``_executor_loop_overlap``):
admission (GUARANTEED_NO_EVICT), scheduling with the token budget and chunked prefill,
``prepare_resources`` (device prefix match, then the connector match, then the alloc callback),
the connector batch start (SchedulerOutput, pending-load removal, metadata, ``start_load_kv``), the
forward with per-layer hooks, ``wait_for_save``, the request update, ``request_finished``,
termination/reuse, and ``get_finished`` every iteration. All TP ranks live in this process.
"""

from __future__ import annotations

import contextlib
import importlib
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from lmcache.integration.tensorrt_llm._trtllm import simulated_rank

from .block_pool import BlockManager, KvPool
from .connector_manager import KvCacheConnectorManager
from .llm_args import KvCacheConnectorConfig, TorchLlmArgs
from .model import ForwardItem, ModelConfig, TinyDecoder
from .request import LlmRequest, LlmRequestState

ConnectorFactory = Callable[[Any], Any]


@dataclass
class GenerationResult:
    """Generated tokens of one prompt and the float32 logits that produced each of them."""

    tokens: list[int]
    logits: torch.Tensor  # [len(tokens), vocab_size], float32, on CPU
    request_id: int = -1
    prompt_len: int = 0
    num_device_matched_tokens: int = 0
    num_connector_matched_tokens: int = 0


@dataclass
class RequestStats:
    prompt_len: int
    device_matched_tokens: int = 0
    connector_matched_tokens: int = 0
    connector_load_async: bool = False


@dataclass
class ExecutorStats:
    """What the executor did, per request id and in total."""

    requests: dict[int, RequestStats] = field(default_factory=dict)
    iterations: int = 0
    forwards: int = 0

    @property
    def device_matched_tokens(self) -> dict[int, int]:
        return {rid: s.device_matched_tokens for rid, s in self.requests.items()}

    @property
    def connector_matched_tokens(self) -> dict[int, int]:
        return {rid: s.connector_matched_tokens for rid, s in self.requests.items()}


@dataclass
class _Batch:
    context: list[LlmRequest]
    generation: list[LlmRequest]
    sampled: dict[int, tuple[int, torch.Tensor]] = field(default_factory=dict)


class _Streams:
    """The executor thread's "current" stream and the execution stream (None on CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.current = torch.cuda.Stream(device) if self.cuda else None
        self.execution = torch.cuda.Stream(device) if self.cuda else None

    @contextlib.contextmanager
    def on_current(self) -> Iterator[None]:
        if not self.cuda:
            yield
            return
        with torch.cuda.stream(self.current):
            yield

    @contextlib.contextmanager
    def forward(self) -> Iterator[None]:
        """Execution stream waits on current before, current waits on execution after."""
        if not self.cuda:
            yield
            return
        self.execution.wait_stream(self.current)
        with torch.cuda.stream(self.execution):
            yield
        self.current.wait_stream(self.execution)

    def hook_stream(self) -> Any:
        return torch.cuda.current_stream() if self.cuda else None


def _factories_from_config(
    config: KvCacheConnectorConfig | None,
) -> tuple[ConnectorFactory, ConnectorFactory] | None:
    if config is None:
        return None
    module = importlib.import_module(config.connector_module)
    return getattr(module, config.connector_scheduler_class), getattr(module, config.connector_worker_class)


def _construct_connector(
    factories: tuple[ConnectorFactory, ConnectorFactory], llm_args: TorchLlmArgs, tp_size: int
) -> tuple[Any, list[Any]]:
    """Scheduler on rank 0, a worker on every rank, built concurrently so they may rendezvous."""
    scheduler_factory, worker_factory = factories

    def build(factory: ConnectorFactory, rank: int) -> Any:
        with simulated_rank(rank):
            return factory(llm_args)

    with ThreadPoolExecutor(max_workers=tp_size + 1, thread_name_prefix="replay-connector") as pool:
        scheduler_future = pool.submit(build, scheduler_factory, 0)
        worker_futures = [pool.submit(build, worker_factory, rank) for rank in range(tp_size)]
        return scheduler_future.result(), [f.result() for f in worker_futures]


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
    ) -> None:
        self.llm_args = llm_args
        self.model_config = model_config or ModelConfig()
        self.device = torch.device(device)
        self.overlap_scheduler = overlap_scheduler
        self.cuda_graphs = cuda_graphs
        self.idle_timeout_s = idle_timeout_s
        self.tp_size = llm_args.tensor_parallel_size
        kv = llm_args.kv_cache_config
        self.tokens_per_block = kv.tokens_per_block
        if llm_args.pipeline_parallel_size != 1:
            raise ValueError("the replay (like TRT-LLM with a KV connector) does not support PP > 1")
        factories = (
            connector if connector is not None else _factories_from_config(llm_args.kv_connector_config)
        )
        if factories is not None and (kv.host_cache_size or 0) > 0:
            raise ValueError("a KV connector requires host_cache_size == 0 (block ids must be pool rows)")
        mc = self.model_config
        self.model = TinyDecoder(mc, seed=seed, device=self.device, tp_size=self.tp_size)
        self.block_manager = BlockManager(kv.num_blocks, kv.tokens_per_block, kv.enable_block_reuse)
        self.pool = KvPool(
            num_blocks=kv.num_blocks,
            num_layers=mc.num_layers,
            num_kv_heads=mc.num_kv_heads,
            head_dim=mc.head_dim,
            tokens_per_block=kv.tokens_per_block,
            tp_size=self.tp_size,
            dtype=mc.dtype,
            device=self.device,
        )
        self._streams = _Streams(self.device)
        self.stats = ExecutorStats()
        self._next_request_id = 1
        self._waiting: deque[LlmRequest] = deque()
        self._active: list[LlmRequest] = []
        self._previous: _Batch | None = None
        self.scheduler: Any = None
        self.workers: list[Any] = []
        self.manager: KvCacheConnectorManager | None = None
        callables: list[tuple[int, Callable[[], Any]]] = []
        if factories is not None:
            self.scheduler, self.workers = _construct_connector(factories, llm_args, self.tp_size)
            for rank, worker in enumerate(self.workers):
                with simulated_rank(rank):
                    fn = worker.register_forward_pass_callable()
                if fn is not None:
                    callables.append((rank, fn))
        self._warmup()
        if factories is not None:
            self.manager = KvCacheConnectorManager(
                self.scheduler, self.workers, tokens_per_block=kv.tokens_per_block
            )
            self.manager.forward_pass_callables = callables
            for rank, worker in enumerate(self.workers):
                with simulated_rank(rank):
                    worker.register_kv_caches(self.pool.tensors[rank])
            with simulated_rank(0):
                wait = getattr(self.scheduler, "wait_for_initialization", None)
                if wait is not None:
                    wait()

    # --- public -------------------------------------------------------------------------
    @property
    def kv_caches(self) -> list[torch.Tensor]:
        """Each rank's primary pool tensor (what ``register_kv_caches`` received)."""
        return self.pool.tensors

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
        self._waiting.extend(requests)
        self._run_until_idle()
        return [self._result(req) for req in requests]

    # --- construction helpers -----------------------------------------------------------
    def _make_request(self, prompt: list[int], max_new_tokens: int, salt: str | None) -> LlmRequest:
        mc, args = self.model_config, self.llm_args
        if any(not 0 <= t < mc.vocab_size for t in prompt):
            raise ValueError(f"prompt tokens must be in [0, {mc.vocab_size})")
        if len(prompt) + max_new_tokens > mc.max_position_embeddings:
            raise ValueError("prompt + max_new_tokens exceeds max_position_embeddings")
        if not args.enable_chunked_prefill and len(prompt) > args.max_num_tokens:
            raise ValueError(f"prompt of {len(prompt)} tokens > max_num_tokens without chunked prefill")
        needed = self.block_manager.blocks_for(len(prompt) + max_new_tokens)
        if needed > self.block_manager.num_blocks:
            raise ValueError(f"request needs {needed} blocks; the pool has {self.block_manager.num_blocks}")
        req = LlmRequest(self._next_request_id, prompt, max_new_tokens, cache_salt=salt)
        self._next_request_id += 1
        return req

    def _warmup(self) -> None:
        """One throw-away forward through the pool before the connector sees the KV cache."""
        bm = self.block_manager
        if not bm.try_reserve(-1, 1):
            raise RuntimeError("no block free for warmup")
        blocks, _ = bm.add_sequence(-1, [0])
        with self._streams.on_current(), self._streams.forward():
            self.model.forward([ForwardItem([0], 0, blocks, False)], self.pool)
        bm.remove_sequence(-1)
        if self._streams.cuda:
            torch.cuda.synchronize(self.device)

    def _result(self, req: LlmRequest) -> GenerationResult:
        s = self.stats.requests[req.request_id]
        return GenerationResult(
            tokens=req.get_tokens(0)[req.prompt_len :],
            logits=torch.stack(req.logits) if req.logits else torch.empty(0, self.model_config.vocab_size),
            request_id=req.request_id,
            prompt_len=req.prompt_len,
            num_device_matched_tokens=s.device_matched_tokens,
            num_connector_matched_tokens=s.connector_matched_tokens,
        )

    # --- the loop -----------------------------------------------------------------------
    def _busy(self) -> bool:
        pending = self.manager is not None and self.manager.has_pending_transfers
        return bool(self._waiting or self._active or pending)

    def _run_until_idle(self) -> None:
        last_progress = time.monotonic()
        with self._streams.on_current():
            while self._busy():
                if self._iteration():
                    last_progress = time.monotonic()
                    continue
                if not self._active and not (self.manager and self.manager.has_pending_transfers):
                    raise RuntimeError(f"{len(self._waiting)} request(s) can never be admitted")
                if time.monotonic() - last_progress > self.idle_timeout_s:
                    pending = self.manager and (sorted(self.manager.saving), sorted(self.manager.loading))
                    raise RuntimeError(
                        f"no progress for {self.idle_timeout_s}s; (saving, loading) = {pending}"
                    )
                time.sleep(0.001)  # let a connector's background threads run
        self._previous = None  # under overlap: the extra forward of requests that already finished

    def _iteration(self) -> bool:
        """One executor loop pass; True if anything progressed."""
        self.stats.iterations += 1
        self._admit()
        context, generation = self._schedule()
        batch: _Batch | None = None
        if context or generation:
            self._prepare_resources(context, generation)
            if self.manager is not None:
                output = self.manager.build_scheduler_output(context, generation, self._cache_indices)
                context = self.manager.take_scheduled_requests_pending_load(context)
                self.manager.handle_metadata(output)
                self.manager.start_load_kv(self._streams.current)
            if context or generation:
                batch = _Batch(context, generation)
                self._forward(batch)
        progressed = batch is not None
        if self.overlap_scheduler:
            previous, self._previous = self._previous, batch
            if previous is not None:
                self._finish_batch(previous)
                progressed = True
        elif batch is not None:
            self._finish_batch(batch)
        if self.manager is not None:
            saved, loaded = self.manager.get_finished()
            for req in saved:
                req.state = LlmRequestState.GENERATION_COMPLETE
                self.block_manager.remove_sequence(req.request_id, req._device_tokens, req._num_kv)
            progressed = progressed or bool(saved or loaded)
        return progressed

    def _admit(self) -> None:
        """GUARANTEED_NO_EVICT, in arrival order: admit only when every block the request may
        ever need (prompt + max_new_tokens) can be allocated."""
        while self._waiting:
            req = self._waiting[0]
            needed = self.block_manager.blocks_for(req.prompt_len + req.max_new_tokens)
            if not self.block_manager.try_reserve(req.request_id, needed, req.cache_salt_id):
                return
            self._active.append(self._waiting.popleft())
            self.stats.requests[req.request_id] = RequestStats(prompt_len=req.prompt_len)

    def _schedule(self) -> tuple[list[LlmRequest], list[LlmRequest]]:
        """Generation requests first (1 token each), then context chunks within ``max_num_tokens``."""
        generation = [r for r in self._active if r.state == LlmRequestState.GENERATION_IN_PROGRESS]
        budget = self.llm_args.max_num_tokens - len(generation)
        context = []
        for req in self._active:
            if req.state != LlmRequestState.CONTEXT_INIT:
                continue
            remaining = req.context_remaining_length
            if self.llm_args.enable_chunked_prefill:
                chunk = min(remaining, budget)
                if chunk < remaining:
                    chunk = chunk // self.tokens_per_block * self.tokens_per_block
            else:
                chunk = remaining if remaining <= budget else 0
            if chunk <= 0:
                continue
            req.context_chunk_size = chunk
            budget -= chunk
            context.append(req)
        return context, generation

    def _cache_indices(self, req: LlmRequest) -> list[int]:
        return self.block_manager.get_cache_indices(req.request_id)

    def _prepare_resources(self, context: list[LlmRequest], generation: list[LlmRequest]) -> None:
        for req in context:
            if not req._allocated and (self.manager is None or self.manager.should_add_sequence(req)):
                self._add_sequence(req)
        for req in generation:
            self.block_manager.add_token(req.request_id, req._num_kv)

    def _add_sequence(self, req: LlmRequest) -> None:
        """Device match + whole-prompt allocation, then the connector match, then the alloc callback."""
        _, device_matched = self.block_manager.add_sequence(req.request_id, req.get_tokens(0))
        connector_matched, load_async = 0, False
        if self.manager is not None and self.block_manager.enable_reuse:
            connector_matched, load_async = self.manager.get_num_new_matched_tokens(req, device_matched)
        req.set_prepopulated_prompt_len(device_matched + connector_matched, self.tokens_per_block)
        req._allocated = True
        stats = self.stats.requests[req.request_id]
        stats.device_matched_tokens = device_matched
        stats.connector_matched_tokens = connector_matched
        stats.connector_load_async = load_async
        if self.manager is not None:
            self.manager.update_state_after_alloc(req, self._cache_indices(req))

    def _forward(self, batch: _Batch) -> None:
        """Forward (hooks only in eager mode), forward-pass callables, ``wait_for_save``, sampling."""
        items = []
        for req in batch.context:
            pos, chunk = (
                req.context_current_position,
                min(req.context_remaining_length, req.context_chunk_size),
            )
            last = pos + chunk == req.prompt_len
            items.append(
                ForwardItem(req._device_tokens[pos : pos + chunk], pos, self._cache_indices(req), last)
            )
        for req in batch.generation:
            items.append(ForwardItem([req._device_tokens[-1]], req._num_kv, self._cache_indices(req), True))
        manager = self.manager
        eager = not (self.cuda_graphs and not batch.context)
        hooks = manager is not None and eager
        with self._streams.forward():
            stream = self._streams.hook_stream()
            logits = self.model.forward(
                items,
                self.pool,
                pre_layer=(lambda i: manager.layer_pre_hook(i, stream)) if hooks else None,
                post_layer=(lambda i: manager.layer_post_hook(i, stream)) if hooks else None,
            )
            if manager is not None:
                manager.run_forward_pass_callables()
        if manager is not None:
            manager.wait_for_save(self._streams.current)
        self.stats.forwards += 1
        # State update right after the forward (TRT-LLM does this before the host sees tokens).
        for req in batch.context:
            req.context_current_position += min(req.context_remaining_length, req.context_chunk_size)
            req._num_kv = req.context_current_position
            if req.context_remaining_length == 0:
                req.state = LlmRequestState.GENERATION_IN_PROGRESS
        for req in batch.generation:
            req._num_kv += 1
        for req, row in zip(batch.context + batch.generation, logits, strict=True):
            if row is not None:
                token = int(row.argmax().item())
                req._device_tokens.append(token)
                batch.sampled[req.request_id] = (token, row.cpu())

    def _finish_batch(self, batch: _Batch) -> None:
        """Host update of a forwarded batch: tokens, ``request_finished``, termination, reuse."""
        finished = []
        for req in batch.context + batch.generation:
            if req.num_generated >= req.max_new_tokens or req.request_id not in batch.sampled:
                continue  # under overlap: the extra forward of a request the host already finished
            token, row = batch.sampled[req.request_id]
            req._tokens.append(token)
            req.logits.append(row)
            if req.num_generated >= req.max_new_tokens:
                req.state = LlmRequestState.GENERATION_COMPLETE
                finished.append(req)
        saving = set()
        for req in finished:  # _send_kv_async: before the request is freed
            if self.manager is not None and self.manager.request_finished(req, self._cache_indices(req)):
                saving.add(req.request_id)
                self.block_manager.store_blocks_for_reuse(req.request_id, req._device_tokens, req._num_kv)
        for req in finished:  # _handle_responses: terminate (saving requests keep their blocks pinned)
            self._active.remove(req)
            if req.request_id not in saving:
                self.block_manager.remove_sequence(req.request_id, req._device_tokens, req._num_kv)
        for req in batch.context + batch.generation:  # update_resources: publish filled blocks
            if self.block_manager.has_sequence(req.request_id):
                self.block_manager.store_blocks_for_reuse(req.request_id, req._device_tokens, req._num_kv)
