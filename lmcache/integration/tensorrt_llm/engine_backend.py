"""The in-process back-end (preset ``lmcache``): one ``CacheEngine`` per process, shared by the
scheduler and the local workers, configured from ``LMCACHE_CONFIG_FILE`` and ``LMCACHE_*``."""

from __future__ import annotations

import concurrent.futures
import functools
import threading
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import torch

from lmcache import cudart
from lmcache.chunk_copy import CopyBatcher, CopyStart
from lmcache.config import load_engine_config
from lmcache.engine import CacheEngine, KeySpace
from lmcache.forward_gate import FORWARD
from lmcache.integration.tensorrt_llm._trtllm import mpi_rank, process_key
from lmcache.integration.tensorrt_llm.backend import check_loaded, transfers_by_group
from lmcache.integration.tensorrt_llm.inflight import Done, event_done
from lmcache.integration.tensorrt_llm.miss_probe import MissProbe
from lmcache.integration.tensorrt_llm.plan import Found, LoadPlan, PinKey, Prompt, TargetId, Transfer
from lmcache.integration.tensorrt_llm.save_fence import SaveFence
from lmcache.integration.tensorrt_llm.save_queue import SaveQueue
from lmcache.integration.tensorrt_llm.settings import ConnectorSettings
from lmcache.integration.tensorrt_llm.targets import PoolTarget
from lmcache.integration.tensorrt_llm.tp_evictions import (
    Dropped,
    Follower,
    Incarnations,
    Leader,
    follower_headroom,
)
from lmcache.integration.tensorrt_llm.window_fence import SaveCopies
from lmcache.keys import ChunkHashes
from lmcache.layered_load import LayerReady
from lmcache.layout import PoolLayout
from lmcache.logging import init_logger
from lmcache.rate_limit import RateLimitedLog

logger = init_logger(__name__)


@dataclass(frozen=True)
class EnginePool:
    """A registered pool target and the key space its chunks live in."""

    pool: PoolTarget
    space: KeySpace


class ProcessEngine:
    """The process's one engine, and the pools each local rank registered. Under tensor parallelism
    with one rank per process, rank 0's L1 leads what every rank's drops (:mod:`.tp_evictions`)."""

    def __init__(self, engine: CacheEngine) -> None:
        self.engine = engine
        self.pools: dict[int, list[EnginePool]] = {}
        self.leader: Leader | None = None
        """Rank 0 of a TP world registered here: what its L1 drops."""
        self.follower: Follower | None = None
        """Another rank of a TP world registered here: it drops what rank 0's L1 dropped."""

    def register(self, rank: int, pools: list[EnginePool]) -> None:
        self.pools[rank] = pools
        if len(self.pools) > 1:  # several ranks share this L1 (the replay): nothing to lead or follow
            for observer in (self.leader, self.follower):
                if observer is not None:
                    observer.enabled = False
            return
        if not pools or pools[0].space.world_size == 1:
            return
        if rank == 0 and self.leader is None:
            self.leader = Leader(self.engine.l1)
            self.engine.l1.observe(self.leader)
        elif rank != 0 and self.follower is None:
            self.follower = Follower(self.engine.l1, rank)
            self.engine.l1.observe(self.follower)

    def leads(self) -> Leader | None:
        """Rank 0 of a TP world, this process's only rank: its L1's drops are every rank's."""
        return self.leader if list(self.pools) == [0] else None

    def follows(self) -> Follower | None:
        """Another rank of a TP world, this process's only rank: it drops what rank 0 dropped."""
        return self.follower if len(self.pools) == 1 and 0 not in self.pools else None

    def incarnations(self) -> Incarnations | None:
        """Where this process's only rank of a TP world numbers the saves that covered its chunks."""
        return self.leads() or self.follows()

    @property
    def spaces(self) -> dict[int, KeySpace]:
        """Each rank's first pool's key space (V1: its only one)."""
        return {rank: pools[0].space for rank, pools in self.pools.items() if pools}


_process_engines: dict[Hashable | None, ProcessEngine] = {}
"""The engine of each TRT-LLM process: one in production (key None); one per simulated process
where the replay hosts attention-DP owners in one OS process (:func:`process_key`)."""
_process_engine_lock = threading.Lock()


def process_engine() -> ProcessEngine:
    """Create the engine on first use, from the config TRT-LLM's environment provides.

    With ``metrics_port`` set, the process also serves ``/metrics`` and ``/health`` (started once per
    process; a non-zero port is offset by the MPI rank so each rank's process gets its own).
    """
    key = process_key()
    with _process_engine_lock:
        shared = _process_engines.get(key)
        if shared is None:
            config = load_engine_config()
            shared = _process_engines[key] = ProcessEngine(CacheEngine(config))
            if config.metrics_port is not None:
                from lmcache.http_endpoint import start_process_endpoint

                def current_engine() -> CacheEngine | None:
                    current = _process_engines.get(key)
                    return None if current is None else current.engine

                port = config.metrics_port + mpi_rank() if config.metrics_port else 0
                start_process_endpoint(current_engine, port, config.metrics_host)
        return shared


def reset_process_engine() -> None:
    """Forget the engines (tests and the replay start each scenario from an empty cache)."""
    with _process_engine_lock:
        _process_engines.clear()


def _pin_id(pin: PinKey, target: TargetId) -> Hashable:
    return (pin.kind, pin.id, target.group, target.region)


class EngineIndex:
    """Scheduler-side lookups against the engine, for every rank and pool registered in this process."""

    def __init__(self, shared: ProcessEngine) -> None:
        self._shared = shared
        self._warn = RateLimitedLog(logger, interval_s=300)
        self._probe = MissProbe()

    def hash_prompt(self, tokens: list[int], salt: Any) -> None:
        return None  # the engine is in this process: a prompt not looked up is hashed by its saves

    def lookup(self, prompt: Prompt, pin: PinKey) -> Found:
        """The hit, pinned, with the hashes the lookup computed per target (a prompt given with hashes is
        not hashed again): the prompt's loads and saves then name its chunks by them, so a load's first
        copy does not wait for the prompt to be hashed a second time."""
        pools = self._shared.pools
        if not pools:
            self._warn.warning("no-pool", "LMCache: lookup before any KV pool was registered; a miss")
            return Found(0)
        ranks = sorted(pools)
        engine = self._shared.engine
        hit, pinned = len(prompt.tokens), False
        computed: dict[TargetId, ChunkHashes] = {}
        full = len(prompt.tokens) // engine.config.chunk_size * engine.config.chunk_size
        probe_first = not self._probe.mostly_hit()  # asked in this process: worth it for any length
        for target in pools[ranks[0]]:
            pin_id = _pin_id(pin, target.pool.target)
            known = prompt.hashes.get(target.pool.target) if prompt.hashes else None
            if known is not None and len(known) == full:  # else not this prompt's: hashed anew
                found = engine.lookup_hashes(
                    target.space, known.hashes, len(prompt.tokens), ranks=ranks, pin_id=pin_id
                )
            else:
                found, hashes = engine.lookup_prompt(
                    target.space,
                    prompt.tokens,
                    prompt.salt,
                    ranks=ranks,
                    pin_id=pin_id,
                    probe_first=probe_first,
                )
                if hashes is not None:
                    computed[target.pool.target] = hashes
            hit, pinned = min(hit, found), pinned or found > 0
            if hit == 0:
                break
        self._probe.record(hit > 0)
        if hit == 0 and pinned:
            self.release(pin)  # another target's hit was pinned: a miss leaves no pins behind
        return Found(hit, {**(prompt.hashes or {}), **computed}) if computed else Found(hit)

    def release(self, pin: PinKey) -> None:
        for targets in self._shared.pools.values():
            for target in targets:
                self._shared.engine.release(_pin_id(pin, target.pool.target))

    def metadata_context(self) -> Dropped | None:
        """Under TP with one rank per process, what rank 0's L1 dropped since the last plan."""
        leader = self._shared.leads()
        if leader is None:
            return None
        dropped = leader.drain()
        return dropped if dropped.chunks else None

    def windows(self) -> list[int | None]:
        pools = self._shared.pools
        if not pools:
            return []
        windows: dict[int, int | None] = {}
        for target in pools[min(pools)]:
            windows[target.pool.target.group] = target.pool.window
        return [windows.get(group) for group in range(max(windows, default=-1) + 1)]


class EngineTransfers:
    """A worker's loads and saves against the process's engine, on side streams for CUDA pools."""

    def __init__(self, shared: ProcessEngine, settings: ConnectorSettings, rank: int) -> None:
        """``rank``: this process's TRT-LLM rank (``mpi_rank()``), which its save thread names; its
        chunks are keyed as ``settings.shard_rank(rank)`` (0 for every attention-DP rank)."""
        self._shared = shared
        self._settings = settings
        self._rank = settings.shard_rank(rank)
        self._mpi_rank = rank
        self._pools: list[EnginePool] = []
        self._save_queue: SaveQueue | None = None
        self._load_stream: Any = None
        self._saves_handed = 0
        """Saves handed over so far: every rank numbers the plans' saves alike (:mod:`.tp_evictions`)."""
        self._drain: concurrent.futures.Future[Any] | None = None
        """The saver's marker a short load last waited for (:meth:`_saves_landed`)."""

    def register(self, targets: list[PoolTarget]) -> None:
        pools = [
            EnginePool(
                target,
                KeySpace(
                    self._settings.model_name + target.key_suffix,
                    PoolLayout.of_pool(target.tensor, self._settings.tokens_per_block),
                    self._settings.world_size,
                ),
            )
            for target in targets
        ]
        for pool in pools:  # the layout checked against the config now, not at the first lookup
            self._shared.engine.hasher(pool.space)
        self._pools = pools
        self._shared.register(self._rank, pools)
        if self._shared.follows() is not None:  # room for what rank 0 dropped and it has not yet
            chunk = self._settings.chunk_size
            chunk_bytes = max(
                p.space.layout.row_bytes * p.space.layout.blocks_per_chunk(chunk) for p in pools
            )
            headroom = follower_headroom(chunk_bytes, chunk, self._settings.iteration_tokens)
            self._shared.engine.l1.arena.add_capacity(headroom)
            logger.info(
                "LMCache in-process TP rank %d: L1 drops what rank 0's drops, and may hold up to %.1f MiB "
                "more than max_local_cpu_size meanwhile",
                self._mpi_rank,
                headroom / (1 << 20),
            )
        device = targets[0].tensor.device
        self._save_queue = SaveQueue(device, f"lmcache-save-r{self._mpi_rank}")
        if device.type == "cuda":
            self._load_stream = cudart.new_stream(device)
            rows = self._settings.chunk_size // self._settings.tokens_per_block
            for target in targets:  # so the first save and load pay no set-up (RESULTS D36)
                CopyBatcher.warm_up(target.tensor, self._load_stream, rows)

    def begin_iteration(self, context: Any) -> None:
        """A rank other than 0 of a TP world drops what rank 0's L1 dropped (``context``), on its saver
        thread after the saves handed over before."""
        follower = self._shared.follows()
        if follower is None or self._save_queue is None:
            return
        if isinstance(context, Dropped):
            self._save_queue.run(functools.partial(follower.drop, context))
        elif follower.holding:
            self._save_queue.run(functools.partial(follower.drop, Dropped(())))

    def _registered(self) -> list[EnginePool]:
        if not self._pools:
            raise RuntimeError("LMCache worker used before register_kv_caches()")
        return self._pools

    def _is_cuda(self) -> bool:
        return self._registered()[0].pool.tensor.is_cuda

    def _caller_stream(self, stream: Any) -> Any:
        """The stream the forward reads the blocks on (None for CPU pools)."""
        if not self._is_cuda():
            return None
        return stream if stream is not None else torch.cuda.current_stream(self._pools[0].pool.tensor.device)

    def layerwise_layers(self) -> int | None:
        pools = self._registered()
        return pools[0].space.layout.num_layers if len(pools) == 1 else None

    def load(self, plan: LoadPlan, context: Any, stream: Any, layers: LayerReady | None = None) -> Done:
        """Copies on the worker's load stream (warmed at registration), after the caller's earlier work
        (blocks may still be read by earlier kernels); a synchronous load orders the caller's stream
        after them, unless it is layer-wise (``layers``)."""
        engine = self._shared.engine
        caller = self._caller_stream(stream)
        target_stream = self._load_stream if caller is not None else None
        if caller is not None:
            target_stream.wait_stream(caller)
        by_group = transfers_by_group(plan)
        try:
            for pool in self._registered():
                for transfer in by_group.get(pool.pool.target.group, []):
                    block_transfer = transfer.for_target(pool.pool.target)
                    retrieve = functools.partial(
                        engine.retrieve,
                        pool.space,
                        self._rank,
                        pool.pool.tensor,
                        block_transfer,
                        target_stream,
                        layers=layers,
                    )
                    loaded = retrieve()
                    if loaded < transfer.end - transfer.start and self._saves_landed():
                        loaded = retrieve()  # the rows already loaded are copied again, alike
                    check_loaded(plan, transfer, loaded)
        finally:
            for pool in self._pools:  # this rank has loaded (or failed): its pins may go
                engine.release(_pin_id(plan.pin, pool.pool.target), self._rank)
        if target_stream is None:
            return event_done(None)
        event = torch.cuda.Event()
        event.record(target_stream)
        if not plan.is_async and layers is None:
            caller.wait_event(event)  # the forward reads the loaded blocks after the copies
        return event_done(event)

    def _saves_landed(self) -> bool:
        """On a TP rank other than 0, wait until the saves handed to this rank before have stored; True
        if the load is worth trying again. Rank 0 promised from its own L1, which its saver may have
        filled before this rank's: the chunk is then on its way here, not gone (bounded by
        ``blocking_timeout_secs``; False on rank 0, where nothing lags)."""
        if self._shared.follows() is None or self._save_queue is None:
            return False
        if self._drain is not None and not self._drain.done():
            return False  # an earlier wait ran out and the saver is still behind: not one wait per load
        timeout = self._shared.engine.config.blocking_timeout_secs
        closed = not FORWARD.is_open
        FORWARD.open()  # no forward is launched while this thread waits: the saves need not give way
        try:
            self._drain = self._save_queue.run(lambda: None)
            self._drain.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            logger.warning("LMCache TP rank %d: saves still running after %.0f s", self._mpi_rank, timeout)
            return False
        except (RuntimeError, concurrent.futures.CancelledError):  # the saver is shut down
            return False
        finally:
            if closed:
                FORWARD.close()
        return True

    def save(self, saves: list[Transfer], fence: SaveFence) -> list[SaveCopies]:
        assert self._save_queue is not None
        engine, rank = self._shared.engine, self._rank
        pools = self._registered()
        incarnations = self._shared.incarnations()
        first_id = self._saves_handed
        self._saves_handed += len(saves)

        def store(transfer: Transfer, pool: EnginePool, save_id: int) -> Any:
            block_transfer = transfer.for_target(pool.pool.target)

            def run(save_stream: Any, start: CopyStart) -> None:
                engine.store(pool.space, rank, pool.pool.tensor, block_transfer, save_stream, start)
                if incarnations is not None:  # the chunks this save covered, stored or found cached
                    FORWARD.wait()  # token prompts are hashed again: not while a forward is launched
                    spans = engine.iter_chunk_spans(
                        pool.space, rank, block_transfer.prompt, block_transfer.salt, block_transfer.end
                    )
                    incarnations.saved([s.key for s in spans if s.start >= block_transfer.start], save_id)

            return run

        return [
            [
                self._save_queue.submit(store(transfer, pool, save_id), fence)
                for pool in pools
                if pool.pool.target.group == transfer.group
            ]
            for save_id, transfer in enumerate(saves, first_id)
        ]
