"""Multi-process TRT-LLM connector (preset ``lmcache-mp``): the cache lives in a separate server.

TRT-LLM resolves ``KvCacheConnectorConfig(connector="lmcache-mp", server_url=...)`` to this
module. Every rank's worker shares its KV pool with the server (CUDA IPC, or shared memory for
CPU pools) and asks the server to copy blocks; the scheduler's lookups go to the server, which
answers for every rank of the world. The server outlives TRT-LLM crashes; while it is down the
connector serves without cache (lookups 0, saves dropped) and re-registers when it is back.

What is synchronized on CUDA (first version; see docs/multi-process.md): before a load the
worker synchronizes its stream (the blocks may still be read by earlier kernels); saves wait for
the forward's event in a background thread, so the forward path never blocks on a save.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from lmcache.config import LMCacheEngineConfig, load_engine_config
from lmcache.integration.tensorrt_llm._trtllm import (
    mpi_rank,
)
from lmcache.integration.tensorrt_llm.planner import ConnectorMetadata, LoadSpec, Planner, SaveSpec
from lmcache.integration.tensorrt_llm.scheduler import PlannedScheduler
from lmcache.integration.tensorrt_llm.settings import ConnectorSettings
from lmcache.integration.tensorrt_llm.worker import PoolWorker
from lmcache.logging import init_logger
from lmcache.rate_limit import RateLimitedLog
from lmcache.server.client import (
    DEFAULT_SERVER_URL,
    CacheServerClient,
    PromptHashes,
    ServerError,
    ServerUnavailable,
    new_instance_id,
)

logger = init_logger(__name__)

SCHEDULER_LOG_PREFIX = "LMCache MP scheduler"
REGISTER_RETRY_S = 2.0


def server_url(llm_args: Any) -> str:
    """``kv_connector_config.server_url``, else ``LMCACHE_SERVER_URL``, else the local ipc socket."""
    url = getattr(getattr(llm_args, "kv_connector_config", None), "server_url", None)
    return url or os.environ.get("LMCACHE_SERVER_URL") or DEFAULT_SERVER_URL


@dataclass
class _Registration:
    rank: int
    instance_id: int


class ProcessConnection:
    """One client per server URL per process, shared by the scheduler and the local workers."""

    def __init__(self, url: str, config: LMCacheEngineConfig) -> None:
        self.client = CacheServerClient(url, timeout_s=config.blocking_timeout_secs)
        # One warning per minute per server and topic, not one per request.
        self.warn = RateLimitedLog(logger, interval_s=60)
        self.registrations: dict[int, _Registration] = {}

    def owner(self) -> int | None:
        """The instance whose pins the scheduler's lookups take: the lowest local rank's."""
        if not self.registrations:
            return None
        return self.registrations[min(self.registrations)].instance_id


_connections: dict[str, ProcessConnection] = {}
_connections_lock = threading.Lock()


def process_connection(url: str, config: LMCacheEngineConfig) -> ProcessConnection:
    with _connections_lock:
        if url not in _connections:
            _connections[url] = ProcessConnection(url, config)
        return _connections[url]


def reset_process_connections() -> None:
    """Close every client (tests start each scenario from scratch)."""
    with _connections_lock:
        for connection in _connections.values():
            connection.client.close(unregister=True)
        _connections.clear()


class _ServerIndex:
    """Scheduler-side lookups through the server; a down server is a miss, never an error."""

    def __init__(self, connection: ProcessConnection, config: LMCacheEngineConfig) -> None:
        self._connection = connection
        self._timeout_s = config.lookup_timeout_ms / 1000

    def prompt_hashes(self, tokens: list[int], salt: str | int | None) -> PromptHashes | None:
        """Hashed once per prompt: the lookup, then every rank's load and the prompt's saves send these
        instead of the tokens (a 16k-token prompt: 2 KiB instead of 128 KiB, and no hashing again)."""
        owner = self._connection.owner()
        return (
            None if owner is None else self._connection.client.chunk_hashes(tokens, salt, instance_id=owner)
        )

    def lookup(
        self, tokens: list[int], salt: str | int | None, pin_id: Hashable, chunk_hashes: PromptHashes | None
    ) -> int:
        owner = self._connection.owner()
        if owner is None:
            self._connection.warn.warning(
                "no-pool", "LMCache MP: lookup before any worker registered its pool; a miss"
            )
            return 0
        try:
            return self._connection.client.lookup(
                tokens, salt, pin_id, chunk_hashes=chunk_hashes, instance_id=owner, timeout_s=self._timeout_s
            )
        except (ServerUnavailable, ServerError) as exc:
            self._connection.warn.warning(
                "lookup",
                "LMCache MP: cache server %s not answering lookups (%s); serving without cache",
                self._connection.client.url,
                exc,
            )
            return 0

    def release(self, pin_id: Hashable) -> None:
        owner = self._connection.owner()
        if owner is None:
            return
        # If the server cannot be told, it drops pins that nobody retrieves after its pin TTL.
        with contextlib.suppress(ServerUnavailable, ServerError):
            self._connection.client.release(pin_id, instance_id=owner, timeout_s=self._timeout_s)


@dataclass
class MPConnectorMetadata(ConnectorMetadata):
    """The plan plus the instance that owns this iteration's pins."""

    pin_owner: int | None = None


class LMCacheMPKvConnectorScheduler(PlannedScheduler):
    """Rank 0: plans loads and saves; lookups are answered by the cache server for all ranks."""

    def __init__(self, llm_args: Any) -> None:
        super().__init__(llm_args)
        config = load_engine_config()
        settings = ConnectorSettings.from_llm_args(llm_args, config)
        self._connection = process_connection(server_url(llm_args), config)
        self._planner = Planner(
            settings, config, _ServerIndex(self._connection, config), SCHEDULER_LOG_PREFIX
        )

    def build_connector_meta(self, scheduler_output: Any) -> MPConnectorMetadata:
        plan = self._planner.build(scheduler_output)
        return MPConnectorMetadata(plan.loads, plan.saves, self._connection.owner())


class LMCacheMPKvConnectorWorker(PoolWorker):
    """Every rank: registers its pool with the server, asks it to load before and save after the forward."""

    def __init__(self, llm_args: Any) -> None:
        super().__init__(llm_args)
        self._config = load_engine_config()
        self._settings = ConnectorSettings.from_llm_args(llm_args, self._config)
        self._connection = process_connection(server_url(llm_args), self._config)
        self._client = self._connection.client
        self._rank = mpi_rank()
        self._pool: torch.Tensor | None = None
        self._instance_id = 0
        self._registered = False
        self._next_attempt = 0.0
        self._saver = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"lmcache-mp-save-r{self._rank}")
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"lmcache-mp-load-r{self._rank}")
        self._load_futures: dict[int, Future[int]] = {}

    # -- registration -------------------------------------------------------------------------

    def register_kv_caches(self, kv_cache_tensor: torch.Tensor) -> None:
        if not kv_cache_tensor.is_cuda and not kv_cache_tensor.is_shared():
            kv_cache_tensor.share_memory_()  # CPU pools reach the server through shared memory
        self._pool = kv_cache_tensor
        self._instance_id = new_instance_id()
        self._registered = False
        self._next_attempt = 0.0
        self._ensure_registered()

    def _ensure_registered(self) -> bool:
        """Register the pool if not yet done; while the server is down, retry every few seconds."""
        if self._registered or self._pool is None:
            return self._registered
        now = time.monotonic()
        if now < self._next_attempt:
            return False
        self._next_attempt = now + REGISTER_RETRY_S
        try:
            info = self._client.register(
                self._pool,
                self._rank,
                self._settings.world_size,
                self._settings.model_name,
                self._settings.tokens_per_block,
                instance_id=self._instance_id,
            )
        except ServerUnavailable as exc:
            self._connection.warn.warning(
                "register",
                "LMCache MP: cannot reach the cache server at %s to register the KV pool (%s); serving "
                "without cache until it is up. Start it with `python -m lmcache.v1.multiprocess.server` or "
                "set kv_connector_config.server_url / LMCACHE_SERVER_URL.",
                self._client.url,
                exc,
            )
            return False
        if info.chunk_size != self._settings.chunk_size:
            raise ValueError(
                f"the cache server at {self._client.url} uses chunk size {info.chunk_size} but this "
                f"process has LMCACHE_CHUNK_SIZE={self._settings.chunk_size}; set them equal"
            )
        self._connection.registrations[self._rank] = _Registration(self._rank, self._instance_id)
        self._registered = True
        return True

    def _meta(self) -> MPConnectorMetadata:
        meta = self.get_connector_meta()
        return meta if isinstance(meta, MPConnectorMetadata) else MPConnectorMetadata()

    # -- loads --------------------------------------------------------------------------------

    def start_load_kv(self, stream: Any) -> None:
        meta = self._meta()
        self._ensure_registered()
        if not meta.loads:
            return
        if self._pool is not None and self._pool.is_cuda:
            # The server writes the blocks from another process: earlier kernels must be done with them.
            (stream if stream is not None else torch.cuda.current_stream(self._pool.device)).synchronize()
        for load in meta.loads:
            if load.is_async:
                self._load_futures[load.request_id] = future = self._loader.submit(
                    self._load, load, meta.pin_owner
                )
                self._loads.add(load.request_id, future.done)
            else:
                self._load(load, meta.pin_owner)

    def _load(self, load: LoadSpec, pin_owner: int | None) -> int:
        expected = load.end - load.start
        try:
            loaded = self._client.retrieve(
                load.tokens,
                load.block_ids,
                load.start,
                load.end,
                load.salt,
                pin_id=load.request_id,
                pin_owner=pin_owner,
                chunk_hashes=load.chunk_hashes,
                instance_id=self._instance_id,
            )
        except (ServerUnavailable, ServerError) as exc:
            raise RuntimeError(
                f"LMCache MP promised {expected} tokens of KV for request {load.request_id} but the cache "
                f"server failed to load them ({exc}); refusing to use unloaded KV blocks"
            ) from exc
        logger.debug("Retrieved %d out of %d required tokens", loaded, load.required)
        if loaded < expected:
            raise RuntimeError(
                f"LMCache MP promised {expected} tokens of KV for request {load.request_id} "
                f"(tokens {load.start}..{load.end}) but the server loaded only {loaded}; refusing to use "
                f"unloaded KV blocks"
            )
        return loaded

    # -- saves --------------------------------------------------------------------------------

    def wait_for_save(self, stream: Any) -> None:
        saves = self._meta().saves
        if not saves or not self._ensure_registered():
            return  # no server: the saves are dropped, the requests finish at once
        forward_done = None
        if self._pool.is_cuda:
            forward_done = torch.cuda.Event()
            forward_done.record(
                stream if stream is not None else torch.cuda.current_stream(self._pool.device)
            )
        for save in saves:
            future = self._saver.submit(self._save, save, forward_done)
            self._saves.add(save.request_id, future.done)

    def _save(self, save: SaveSpec, forward_done: Any) -> None:
        if forward_done is not None:
            forward_done.synchronize()  # in the saver thread: the server reads the blocks after the forward
        try:
            self._client.store(
                save.tokens,
                save.block_ids,
                save.start,
                save.end,
                save.salt,
                chunk_hashes=save.chunk_hashes,
                instance_id=self._instance_id,
            )
        except (ServerUnavailable, ServerError) as exc:
            self._connection.warn.warning(
                "save", "LMCache MP: cache server %s dropped a save (%s)", self._client.url, exc
            )

    # -- completion ---------------------------------------------------------------------------

    def get_finished(
        self, finished_gen_req_ids: list[int], started_loading_req_ids: list[int]
    ) -> tuple[list[int], list[int]]:
        saved, loaded = super().get_finished(finished_gen_req_ids, started_loading_req_ids)
        for request_id in loaded:
            self._load_futures.pop(request_id).result()  # a failed async load fails loudly here
        return saved, loaded
