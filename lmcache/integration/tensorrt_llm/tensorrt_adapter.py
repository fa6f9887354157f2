"""In-process TRT-LLM connector (preset ``lmcache``): the cache engine lives inside the TRT-LLM process.

TRT-LLM resolves ``KvCacheConnectorConfig(connector="lmcache")`` to this module's
``LMCacheKvConnectorScheduler`` (rank 0) and ``LMCacheKvConnectorWorker`` (every rank). Both share
one ``CacheEngine`` per process, configured from ``LMCACHE_CONFIG_FILE`` and ``LMCACHE_*``.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable
from typing import Any

import torch

from lmcache.config import load_engine_config
from lmcache.engine import CacheEngine, KeySpace
from lmcache.integration.tensorrt_llm._trtllm import (
    mpi_rank,
)
from lmcache.integration.tensorrt_llm.inflight import event_done, future_done
from lmcache.integration.tensorrt_llm.planner import ConnectorMetadata, LoadSpec, Planner
from lmcache.integration.tensorrt_llm.save_queue import SaveQueue
from lmcache.integration.tensorrt_llm.scheduler import PlannedScheduler
from lmcache.integration.tensorrt_llm.settings import ConnectorSettings
from lmcache.integration.tensorrt_llm.worker import PoolWorker
from lmcache.layout import PoolLayout
from lmcache.logging import init_logger
from lmcache.rate_limit import RateLimitedLog

logger = init_logger(__name__)

SCHEDULER_LOG_PREFIX = "LMCache TRT-LLM scheduler"


class ProcessEngine:
    """The process's one engine, and the key space each local rank registered."""

    def __init__(self, engine: CacheEngine) -> None:
        self.engine = engine
        self.spaces: dict[int, KeySpace] = {}

    def register(self, rank: int, space: KeySpace) -> None:
        self.spaces[rank] = space


_process_engine: ProcessEngine | None = None
_process_engine_lock = threading.Lock()


def process_engine() -> ProcessEngine:
    """Create the engine on first use, from the config TRT-LLM's environment provides.

    With ``metrics_port`` set, the process also serves ``/metrics`` and ``/health`` (started once per
    process; a non-zero port is offset by the MPI rank so each rank's process gets its own).
    """
    global _process_engine
    with _process_engine_lock:
        if _process_engine is None:
            config = load_engine_config()
            _process_engine = ProcessEngine(CacheEngine(config))
            if config.metrics_port is not None:
                from lmcache.http_endpoint import start_process_endpoint

                def current_engine() -> CacheEngine | None:
                    shared = _process_engine
                    return None if shared is None else shared.engine

                port = config.metrics_port + mpi_rank() if config.metrics_port else 0
                start_process_endpoint(current_engine, port, config.metrics_host)
        return _process_engine


def reset_process_engine() -> None:
    """Forget the engine (tests and the replay start each scenario from an empty cache)."""
    global _process_engine
    with _process_engine_lock:
        _process_engine = None


class _EngineIndex:
    """Scheduler-side lookups against the engine, for every rank registered in this process."""

    def __init__(self, shared: ProcessEngine) -> None:
        self._shared = shared
        self._warn = RateLimitedLog(logger, interval_s=300)

    def prompt_hashes(self, tokens: list[int], salt: str | int | None) -> None:
        return None  # the engine is in this process: loads and saves hand it the tokens

    def lookup(self, tokens: list[int], salt: str | int | None, pin_id: Hashable, chunk_hashes: None) -> int:
        spaces = self._shared.spaces
        if not spaces:
            self._warn.warning(
                "no-pool", "LMCache: lookup before any KV pool was registered; reporting a miss"
            )
            return 0
        ranks = sorted(spaces)
        return self._shared.engine.lookup(spaces[ranks[0]], tokens, salt, ranks=ranks, pin_id=pin_id)

    def release(self, pin_id: Hashable) -> None:
        self._shared.engine.release(pin_id)


class LMCacheKvConnectorScheduler(PlannedScheduler):
    """Rank 0: looks up prompts in the process's engine and plans loads and saves."""

    def __init__(self, llm_args: Any) -> None:
        super().__init__(llm_args)
        shared = process_engine()
        config = shared.engine.config
        settings = ConnectorSettings.from_llm_args(llm_args, config)
        self._planner = Planner(settings, config, _EngineIndex(shared), SCHEDULER_LOG_PREFIX)


class LMCacheKvConnectorWorker(PoolWorker):
    """Every rank: loads before the forward, saves after it on a side stream."""

    def __init__(self, llm_args: Any) -> None:
        super().__init__(llm_args)
        self._shared = process_engine()
        self._engine = self._shared.engine
        self._settings = ConnectorSettings.from_llm_args(llm_args, self._engine.config)
        self._rank = mpi_rank()
        self._pool: torch.Tensor | None = None
        self._space: KeySpace | None = None
        self._save_queue: SaveQueue | None = None
        self._load_stream: Any = None

    def register_kv_caches(self, kv_cache_tensor: torch.Tensor) -> None:
        layout = PoolLayout.of_pool(kv_cache_tensor, self._settings.tokens_per_block)
        layout.blocks_per_chunk(self._settings.chunk_size)
        self._pool = kv_cache_tensor
        self._space = KeySpace(self._settings.model_name, layout, self._settings.world_size)
        self._shared.register(self._rank, self._space)
        self._save_queue = SaveQueue(self._engine, kv_cache_tensor, f"lmcache-save-r{self._rank}")
        if kv_cache_tensor.is_cuda:
            self._load_stream = torch.cuda.Stream(device=kv_cache_tensor.device)
        logger.info(
            "LMCache worker rank %d/%d registered KV pool %s %s (%d tokens/block, %.1f KiB/token)",
            self._rank,
            self._settings.world_size,
            tuple(kv_cache_tensor.shape),
            kv_cache_tensor.dtype,
            layout.tokens_per_block,
            layout.bytes_per_token / 1024,
        )

    def _registered(self) -> tuple[torch.Tensor, KeySpace]:
        if self._pool is None or self._space is None:
            raise RuntimeError("LMCache worker used before register_kv_caches()")
        return self._pool, self._space

    def _meta(self) -> ConnectorMetadata:
        meta = self.get_connector_meta()
        return meta if isinstance(meta, ConnectorMetadata) else ConnectorMetadata()

    # -- loads --------------------------------------------------------------------------------

    def start_load_kv(self, stream: Any) -> None:
        for load in self._meta().loads:
            self._load(load, stream)

    def _load(self, load: LoadSpec, stream: Any) -> None:
        pool, space = self._registered()
        target = self._load_target(pool, stream, load.is_async)
        loaded = self._engine.retrieve(
            space,
            self._rank,
            load.tokens,
            load.salt,
            pool,
            load.block_ids,
            load.start,
            load.end,
            target,
            pin_id=load.request_id,
        )
        logger.debug("Retrieved %d out of %d required tokens", loaded, load.required)
        if loaded < load.end - load.start:
            raise RuntimeError(
                f"LMCache promised {load.end - load.start} tokens of KV for request {load.request_id} "
                f"(tokens {load.start}..{load.end}) but could load only {loaded}; refusing to use "
                f"unloaded KV blocks"
            )
        if load.is_async:
            self._loads.add(load.request_id, event_done(_record(pool, target)))

    def _load_target(self, pool: torch.Tensor, stream: Any, is_async: bool) -> Any:
        if not pool.is_cuda:
            return None
        current = stream if stream is not None else torch.cuda.current_stream(pool.device)
        if not is_async:
            return current  # the forward waits on this stream
        self._load_stream.wait_stream(current)  # blocks may still be read by earlier kernels
        return self._load_stream

    # -- saves --------------------------------------------------------------------------------

    def wait_for_save(self, stream: Any) -> None:
        """Hand this iteration's saves to the save queue (its side stream waits for the forward).

        A request whose saves are in flight keeps its blocks until ``get_finished`` reports it.
        """
        saves = self._meta().saves
        if not saves:
            return
        _, space = self._registered()
        assert self._save_queue is not None
        for save in saves:
            future = self._save_queue.submit(
                space, self._rank, save.tokens, save.salt, save.block_ids, save.start, save.end, stream
            )
            self._saves.add(save.request_id, future_done(future))


def _record(pool: torch.Tensor, stream: Any) -> Any:
    if not pool.is_cuda:
        return None
    event = torch.cuda.Event()
    event.record(stream)
    return event
