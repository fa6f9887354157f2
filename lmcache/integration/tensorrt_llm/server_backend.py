"""The cache-server back-end (preset ``lmcache-mp``): the cache lives in a separate server process.

Every rank's worker registers each of its pools with the server (one server instance per pool
target, so each layer group's pool of a V2 manager registers through the same path) in the mode
``pool_sharing`` / ``LMCACHE_POOL_SHARING`` picks (docs/multi-process.md): exported (CUDA IPC, or
shared memory for CPU pools), the server copying blocks; or shared-L1, the worker copying between
its pool and the server's L1 in shared memory (pools that cannot be exported, e.g. V2's VMM memory).
The scheduler's lookups go to the server, which answers for every rank of the world. The server
outlives TRT-LLM crashes; while it is down the connector serves without cache (lookups 0, saves dropped) and
re-registers when it is back.

What is synchronized on CUDA: a shared-L1 load is ordered on the device (its copies after the
stream's earlier kernels, the stream's later work after its copies), so the forward is launched while
it copies; before an exported pool's load the worker synchronizes its stream (the server writes the
blocks from another process); an asynchronous load's thread waits for the stream's earlier work before
it loads; saves wait for the forward's event in a background thread, so the forward path never blocks
on a save.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Hashable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from lmcache import cudart
from lmcache.config import LMCacheEngineConfig
from lmcache.integration.tensorrt_llm._trtllm import process_key
from lmcache.integration.tensorrt_llm.backend import check_loaded, transfers_by_group
from lmcache.integration.tensorrt_llm.inflight import Done
from lmcache.integration.tensorrt_llm.miss_probe import MissProbe
from lmcache.integration.tensorrt_llm.plan import Found, LoadPlan, PinKey, Prompt, TargetId, Transfer
from lmcache.integration.tensorrt_llm.planner import PromisedLoadError
from lmcache.integration.tensorrt_llm.save_fence import SaveFence
from lmcache.integration.tensorrt_llm.settings import ConnectorSettings
from lmcache.integration.tensorrt_llm.targets import PoolTarget
from lmcache.integration.tensorrt_llm.window_fence import SaveCopies
from lmcache.layered_load import LayerReady
from lmcache.logging import init_logger
from lmcache.rate_limit import RateLimitedLog
from lmcache.server.client import (
    DEFAULT_SERVER_URL,
    BadPool,
    CacheServerClient,
    LimitExceeded,
    PromptHashes,
    RegistrationRefused,
    ServerError,
    ServerUnavailable,
    SettingsMismatch,
    VersionMismatch,
    new_instance_id,
)
from lmcache.shm_slabs import ShmSlabError
from lmcache.transfer import BlockTransfer

logger = init_logger(__name__)

REGISTER_RETRY_S = 2.0
L1_AHEAD_POLL_S = 0.25
"""How often a worker not registered yet asks a server still creating its L1 for the new slabs."""
L1_AHEAD_MAX_S = 120.0
"""How long it asks at most (a server creates its L1 within seconds of its start)."""
REGISTER_MAPPED_WAIT_S = 5.0
"""How long registration waits at most for the server's slabs announced so far to be mapped (the
mapping goes on in the background past that)."""
_NOTHING = BlockTransfer([], None, [], 0, 0)
"""An empty load: it moves no KV and releases the rank's pins."""
MISFIT = (SettingsMismatch, BadPool, VersionMismatch, RegistrationRefused)
"""What a server whose settings do not fit this engine answers (another chunk size, a pool-sharing mode
the pools cannot use, another protocol version, a restarted server refusing a pool): the engine serves
without cache, saying why."""


def server_url(llm_args: Any) -> str:
    """``kv_connector_config.server_url``, else ``LMCACHE_SERVER_URL``, else the local ipc socket."""
    url = getattr(getattr(llm_args, "kv_connector_config", None), "server_url", None)
    return url or os.environ.get("LMCACHE_SERVER_URL") or DEFAULT_SERVER_URL


class ProcessConnection:
    """One client per server URL per process, shared by the scheduler and the local workers."""

    def __init__(self, url: str, config: LMCacheEngineConfig) -> None:
        self.client = CacheServerClient(url, timeout_s=config.blocking_timeout_secs)
        self.pool_sharing = config.pool_sharing
        """The pool-sharing policy the workers register their pools with."""
        # One warning per minute per server and topic, not one per request.
        self.warn = RateLimitedLog(logger, interval_s=60)
        self.instances: dict[int, dict[TargetId, int]] = {}
        """Per local rank, the server instance of each pool target it registered."""
        self.windows: dict[TargetId, int | None] = {}

    def refused(self, exc: ServerError) -> None:
        """Say (an ERROR, once a minute per kind and server start) that the server does not fit this
        engine's settings and what to do; the engine serves without cache meanwhile."""
        server = self.client.server_id  # the last one heard of: a restart is said again
        if isinstance(exc, SettingsMismatch):
            self.warn.error(
                f"chunk-size {server}",
                "LMCache MP: the cache server at %s uses chunk size %d (its --chunk-size) but this engine "
                "has LMCACHE_CHUNK_SIZE=%d; serving without cache (lookups miss, saves are dropped) until "
                "they match: restart the server with --chunk-size %d (the engine re-registers by itself), "
                "or set LMCACHE_CHUNK_SIZE=%d and restart the engine",
                self.client.url,
                exc.server_chunk_size,
                exc.chunk_size,
                exc.chunk_size,
                exc.server_chunk_size,
            )
            return
        self.warn.error(
            f"refused {server}",
            "LMCache MP: the cache server at %s does not take this engine's KV pools (%s); serving without "
            "cache until a server that does is up (the engine re-registers by itself)",
            self.client.url,
            exc,
        )

    def owners(self) -> dict[TargetId, int]:
        """Per target, the instance whose pins the scheduler's lookups take: the lowest local rank's."""
        if not self.instances:
            return {}
        return dict(self.instances[min(self.instances)])


_connections: dict[tuple[Hashable | None, str], ProcessConnection] = {}
"""Per TRT-LLM process (:func:`process_key`: None in production) and server URL."""
_connections_lock = threading.Lock()


def process_connection(url: str, config: LMCacheEngineConfig) -> ProcessConnection:
    key = (process_key(), url)
    with _connections_lock:
        if key not in _connections:
            _connections[key] = ProcessConnection(url, config)
        return _connections[key]


def reset_process_connections() -> None:
    """Close every client (tests start each scenario from scratch)."""
    with _connections_lock:
        for connection in _connections.values():
            connection.client.close(unregister=True)
        _connections.clear()


def _pin_id(pin: PinKey) -> str:
    return f"{pin.kind}{pin.id}"


class ServerIndex:
    """Scheduler-side lookups through the server; a down server is a miss, never an error."""

    def __init__(self, connection: ProcessConnection, config: LMCacheEngineConfig) -> None:
        self._connection = connection
        self._timeout_s = config.lookup_timeout_ms / 1000
        self._probe = MissProbe()

    def hash_prompt(self, tokens: list[int], salt: Any) -> dict[TargetId, PromptHashes] | None:
        """Hashed once per prompt: the lookup, then every rank's load and the prompt's saves send these
        instead of the tokens (a 16k-token prompt: 2 KiB instead of 128 KiB, and no hashing again)."""
        owners = self._connection.owners()
        if not owners:
            return None
        client = self._connection.client
        hashes = {target: client.chunk_hashes(tokens, salt, instance_id=i) for target, i in owners.items()}
        return None if any(h is None for h in hashes.values()) else hashes

    def lookup(self, prompt: Prompt, pin: PinKey) -> Found:
        """The hit, pinned; a prompt not hashed yet is hashed here, after a probe of its first chunk
        when recent lookups mostly missed (see :mod:`.miss_probe`): a miss it finds leaves it
        unhashed, and the prompt's saves send its tokens."""
        owners = self._connection.owners()
        if not owners:
            self._connection.warn.warning(
                "no-pool", "LMCache MP: lookup before any worker registered its pool; a miss"
            )
            return Found(0)
        hit, pinned, hashes = len(prompt.tokens), False, prompt.hashes
        try:
            if hashes is None:
                if self._first_chunk_missing(prompt, owners):
                    self._probe.record(False)
                    return Found(0)
                registrations = self._connection.client.registrations
                if not all(registrations.can_claim(owner) for owner in owners.values()):
                    self._connection.client.wake()  # the server wakes while the prompt is hashed
                hashes = self.hash_prompt(prompt.tokens, prompt.salt)
            for target, owner in owners.items():
                found = self._connection.client.lookup(
                    prompt.tokens,
                    prompt.salt,
                    _pin_id(pin),
                    chunk_hashes=hashes.get(target) if hashes else None,
                    instance_id=owner,
                    timeout_s=self._timeout_s,
                    report_later=True,  # reported with the pass's metadata (see ``metadata_context``)
                )
                hit, pinned = min(hit, found), pinned or found > 0
                if hit == 0:
                    break
            self._probe.record(hit > 0)
        except MISFIT as exc:
            self._connection.refused(exc)
            hit = 0
        except LimitExceeded as exc:  # this lookup alone: the server serves on
            self._connection.warn.warning(
                "lookup limit",
                "LMCache MP: cache server %s refused a lookup (%s); that request computes its prefill",
                self._connection.client.url,
                exc,
            )
            hit = 0
        except (ServerUnavailable, ServerError) as exc:
            self._connection.warn.warning(
                "lookup",
                "LMCache MP: cache server %s not answering lookups (%s); serving without cache",
                self._connection.client.url,
                exc,
            )
            hit = 0
        if hit == 0 and pinned:
            self.release(pin)  # another target's hit was pinned: a miss leaves no pins behind
        return Found(hit, hashes if prompt.hashes is None else None)

    def _first_chunk_missing(self, prompt: Prompt, owners: dict[TargetId, int]) -> bool:
        """Whether the prompt's first chunk is surely missing for the first target, asked only while
        recent lookups mostly missed: from the server's presence counts when this client could map them
        (no round trip), else from a probe when one is wanted (one chunk hashed, nothing pinned; a server
        error propagates as for the lookup)."""
        client = self._connection.client
        owner = next(iter(owners.values()))
        chunk_size = client.registrations.chunk_size(owner)
        if chunk_size is None or self._probe.mostly_hit():
            return False  # not registered (again) yet, or a hit likely: the full lookup answers
        first = prompt.tokens[:chunk_size]
        presence = client.registrations.presence(owner)
        if presence is not None:
            hashes = client.chunk_hashes(first, prompt.salt, instance_id=owner)
            if hashes is not None:  # no full chunk: nothing to find (hashing servers match full chunks)
                missing = not hashes.digests or not presence.may_hold(hashes.digests)
                if missing:
                    client.registrations.count_miss(len(prompt.tokens))  # for the server's hit rate
                return missing
        if not self._probe.wanted(len(prompt.tokens) // chunk_size):
            return False
        found = client.lookup(
            first,
            prompt.salt,
            chunk_hashes=client.chunk_hashes(first, prompt.salt, instance_id=owner),
            instance_id=owner,
            timeout_s=self._timeout_s,
        )
        return found == 0

    def release(self, pin: PinKey) -> None:
        # If the server cannot be told, it drops pins that nobody retrieves after its pin TTL.
        for owner in self._connection.owners().values():
            with contextlib.suppress(ServerUnavailable, ServerError):
                self._connection.client.release(_pin_id(pin), instance_id=owner, timeout_s=self._timeout_s)

    def metadata_context(self) -> dict[TargetId, int]:
        """The pin owners: each rank's loads release the pins rank 0's lookup took. The pass's lookups
        claimed in shared memory are reported to the server first, once for the pass: before any rank
        gets the metadata that names their loads."""
        self._connection.client.claimed.report()
        return self._connection.owners()

    def windows(self) -> list[int | None]:
        windows = {target.group: window for target, window in self._connection.windows.items()}
        return [windows.get(group) for group in range(max(windows, default=-1) + 1)]


class ServerTransfers:
    """A worker's loads and saves, carried out by the cache server on this rank's shared pools."""

    def __init__(self, connection: ProcessConnection, settings: ConnectorSettings, rank: int) -> None:
        """``rank``: this process's TRT-LLM rank (``mpi_rank()``), which its threads and log lines
        name; its pools register as ``settings.shard_rank(rank)`` (0 for every attention-DP rank)."""
        self._connection = connection
        self._client = connection.client
        self._settings = settings
        self._rank = settings.shard_rank(rank)
        self._mpi_rank = rank
        self._targets: list[PoolTarget] = []
        self._instances: dict[TargetId, int] = {}
        self._registered = False
        self._next_attempt = 0.0
        self._saver: ThreadPoolExecutor | None = None
        self._loader: ThreadPoolExecutor | None = None
        self._registering = threading.Event()
        """Set once the pools register: their replies announce the server's slabs from then on."""
        self._map_l1_ahead()

    # -- before registration ------------------------------------------------------------------

    def _map_l1_ahead(self) -> None:
        """Where this rank's pools will be shared in the shared-L1 mode, start mapping and page-locking
        the server's L1 now: TRT-LLM builds the worker before the model's warm-up and registers its
        pools only after it, so the first saves find L1 page-locked. Certain here: the client forces the
        mode, KVCacheManagerV2's pools (CUDA IPC cannot export them), CPU pools (no CUDA); the server
        says whether it forces it. In the background: construction never waits for the server."""
        policy = self._connection.pool_sharing
        if policy == "export":
            return
        cuda = torch.cuda.is_available()
        certain = policy == "shared-l1" or not cuda or self._settings.kv_manager_v2
        device = cudart.current_device() if cuda else None
        threading.Thread(
            target=self._request_l1_ahead, args=(cuda, certain, device), name="lmcache-l1-ahead", daemon=True
        ).start()

    def _request_l1_ahead(self, pin: bool, certain: bool, device: int | None) -> None:
        """Ask for the server's slabs until it has created its whole L1 (it does so from its start, and
        may have started just now) or this rank registers (replies announce slabs from then on)."""
        if device is not None:
            torch.cuda.set_device(device)  # the map-ahead thread page-locks on the caller's device
        deadline = time.monotonic() + L1_AHEAD_MAX_S
        while True:
            try:
                found = self._client.shared_l1.map_l1_ahead(
                    pin=pin, certain=certain, timeout_s=REGISTER_RETRY_S
                )
            except (ServerUnavailable, ServerError) as e:  # registration tries again, and says why
                logger.debug("LMCache MP: the cache server's L1 not mapped ahead of registration: %s", e)
                return
            if found is None:
                return
            if not found.more or time.monotonic() > deadline or self._registering.wait(L1_AHEAD_POLL_S):
                break
        logger.info(
            "LMCache MP rank %d: mapping the cache server's L1 (%d slabs) ahead of registration",
            self._mpi_rank,
            len(found.slabs),
        )

    # -- registration -------------------------------------------------------------------------

    def register(self, targets: list[PoolTarget]) -> None:
        self._registering.set()
        for target in targets:
            exportable = self._connection.pool_sharing != "shared-l1"  # auto follows a server forcing export
            if exportable and not target.tensor.is_cuda and not target.tensor.is_shared():
                target.tensor.share_memory_()  # exported CPU pools reach the server through shared memory
        self._targets = targets
        self._instances = {target.target: new_instance_id() for target in targets}
        if targets and self._saver is None:  # started now: no transfer pays for it
            device = targets[0].tensor.device
            cuda_device = device.index if device.type == "cuda" else None
            self._saver = cudart.background_thread(f"lmcache-mp-save-r{self._mpi_rank}", cuda_device)
            self._loader = cudart.background_thread(f"lmcache-mp-load-r{self._mpi_rank}", cuda_device)
        self._registered = False
        self._next_attempt = 0.0
        if self._ensure_registered(bring_up=True):
            self._wait_l1_mapped()

    def _wait_l1_mapped(self) -> None:
        """Wait (at most :data:`REGISTER_MAPPED_WAIT_S`) until the server's L1 slabs announced so far
        (before registration and in its replies) are mapped: a shared-L1 copy into a slab not mapped
        yet maps it first, and with the server still making L1 an import waits behind the driver's
        makings, so the first saves would. Mostly done already where TRT-LLM's warm-up ran since the
        worker's construction; an exported pool maps nothing and waits for nothing (RESULTS D105)."""
        started = time.monotonic()
        mapped = self._client.registrations.wait_slabs_mapped(REGISTER_MAPPED_WAIT_S)
        waited_ms = (time.monotonic() - started) * 1e3
        if not mapped:
            logger.info(
                "LMCache MP rank %d: the cache server's L1 is still being mapped after %.0f ms at "
                "registration; it goes on in the background, and the first saves may wait for it",
                self._mpi_rank,
                waited_ms,
            )
        elif waited_ms >= 1.0:
            logger.debug(
                "LMCache MP rank %d: registration waited %.1f ms for the cache server's L1 to be mapped",
                self._mpi_rank,
                waited_ms,
            )

    def _ensure_registered(self, bring_up: bool = False) -> bool:
        """Register the pools if not yet done; while the server is down or refuses them, retry every few
        seconds. At bring-up (``register_kv_caches``, the server up) a server that refuses them or has
        another chunk size raises; later it never does: the engine serves without cache (an ERROR
        says why) until the server is restarted with fitting settings (the client re-registers)."""
        if self._registered or not self._targets:
            return self._registered
        now = time.monotonic()
        if now < self._next_attempt:
            return False
        self._next_attempt = now + REGISTER_RETRY_S
        chunk_size = self._settings.chunk_size
        try:
            infos = [
                self._client.register(
                    target.tensor,
                    self._rank,
                    self._settings.world_size,
                    self._settings.model_name + target.key_suffix,
                    self._settings.tokens_per_block,
                    instance_id=self._instances[target.target],
                    pool_sharing=self._connection.pool_sharing,
                    chunk_size=chunk_size,
                )
                for target in self._targets
            ]
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
        except ServerError as exc:
            if bring_up:
                self._unregister()
                raise  # the server's refusal names the flag to change
            self._connection.refused(exc)
            return False
        server_chunk_size = next((i.chunk_size for i in infos if i.chunk_size != chunk_size), None)
        if server_chunk_size is not None:
            if bring_up:
                self._unregister()
                raise ValueError(
                    f"the cache server at {self._client.url} uses chunk size {server_chunk_size} (its "
                    f"--chunk-size) but this process has LMCACHE_CHUNK_SIZE={chunk_size}; restart the server "
                    f"with --chunk-size {chunk_size} or set LMCACHE_CHUNK_SIZE={server_chunk_size}"
                )
            # The pools stay registered but unused (the client refuses their calls) until a server that
            # fits registers them again (its heartbeat does, after a restart).
            self._connection.refused(SettingsMismatch("register", server_chunk_size, chunk_size))
        self._connection.instances[self._rank] = dict(self._instances)
        self._connection.windows.update({target.target: target.window for target in self._targets})
        self._registered = True
        return True

    def _unregister(self) -> None:
        """Take back what a failed bring-up registered (the engine stops)."""
        for instance_id in self._instances.values():
            with contextlib.suppress(ServerUnavailable, ServerError):
                self._client.unregister(instance_id)

    def _is_cuda(self) -> bool:
        return bool(self._targets) and self._targets[0].tensor.is_cuda

    # -- loads --------------------------------------------------------------------------------

    def begin_iteration(self, context: Any) -> None:
        """Nothing: the server keeps one L1 for every rank."""
        return None

    def layerwise_layers(self) -> int | None:
        """One pool with a layer axis (an exported pool's loads are done when they return: its events
        stay unset, and waiting on them costs nothing)."""
        if len(self._targets) != 1:
            return None
        return int(self._targets[0].tensor.shape[1])

    def load(self, plan: LoadPlan, context: Any, stream: Any, layers: LayerReady | None = None) -> Done:
        self._ensure_registered()
        if self._is_cuda() and stream is None:
            stream = torch.cuda.current_stream(self._targets[0].tensor.device)
        owners = context if isinstance(context, dict) else {}
        if not plan.is_async:
            # Ordered against ``stream`` by the client: on the device for shared-L1 pools (the copies
            # may still run when this returns, ``stream`` waits for them); an exported pool's server
            # copies once an event recorded on it completed, and this returns once they landed.
            self._load(plan, owners, stream, layers)
            return lambda: True
        after = None
        if stream is not None:
            # Loaded on another thread, reported done once complete: earlier kernels must be done with
            # the blocks before anyone writes them. That thread waits for them, not TRT-LLM's executor.
            after = torch.cuda.Event()
            after.record(stream)
        assert self._loader is not None, "a load plan exists only once the pools registered"
        future = self._loader.submit(self._load_after, after, plan, owners)
        return lambda: future.done() and future.result() is None

    def _load_after(self, after: Any, plan: LoadPlan, owners: dict[TargetId, int]) -> None:
        """An asynchronous load, on the loading thread: once the work ``after`` follows is done."""
        if after is not None:
            after.synchronize()
        self._load(plan, owners, None)

    def _load(
        self, plan: LoadPlan, owners: dict[TargetId, int], stream: Any, layers: LayerReady | None = None
    ) -> None:
        by_group = transfers_by_group(plan)
        pin_id = _pin_id(plan.pin)
        for target in self._targets:
            # A target with nothing to load still retrieves an empty range: it releases this rank's pins.
            transfers: list[Transfer | None] = list(by_group.get(target.target.group, [])) or [None]
            for i, transfer in enumerate(transfers):
                block_transfer = transfer.for_target(target.target) if transfer is not None else _NOTHING
                last = i == len(transfers) - 1  # the pins go with the target's last retrieve
                try:
                    loaded = self._client.retrieve(
                        block_transfer,
                        pin_id if last else None,
                        pin_owner=owners.get(target.target) if last else None,
                        instance_id=self._instances[target.target],
                        stream=stream,
                        layers=layers,
                    )
                except (ServerUnavailable, ServerError, ShmSlabError) as exc:
                    if transfer is None:
                        continue  # nothing was promised from this target; its pins expire on the server
                    raise PromisedLoadError(
                        f"LMCache MP promised {transfer.end - transfer.start} tokens of KV for request "
                        f"{plan.request_id} but the cache server failed to load them ({exc}); refusing to "
                        "use unloaded KV blocks"
                    ) from exc
                if transfer is not None:
                    check_loaded(plan, transfer, loaded)

    # -- saves --------------------------------------------------------------------------------

    def save(self, saves: list[Transfer], fence: SaveFence) -> list[SaveCopies]:
        """Each save's future resolves to None once the server holds its chunks (or dropped them): its
        copies are done by then."""
        if not self._ensure_registered():
            return [[] for _ in saves]  # no server: the saves are dropped, the requests finish at once
        assert self._saver is not None, "registered pools have a saver"
        return [[self._saver.submit(self._save, transfer, fence)] for transfer in saves]

    def _save(self, transfer: Transfer, fence: SaveFence) -> None:
        """In the saver thread: each pool's store reads the blocks after ``fence`` (the forward, then
        sampling), waited for on the device where this worker copies, else before the server is asked."""
        for target in self._targets:
            if target.target.group != transfer.group:
                continue
            try:
                self._client.store(
                    transfer.for_target(target.target),
                    instance_id=self._instances[target.target],
                    after=fence,
                )
            except MISFIT as exc:  # a server restarted with settings that do not fit: nothing is stored
                self._connection.refused(exc)
            except (ServerUnavailable, ServerError, ShmSlabError) as exc:
                # ShmSlabError: this worker cannot map the server's L1 regions (another user, /dev/shm
                # not shared with the server's container); the save is dropped, never half-published.
                self._connection.warn.warning(
                    "save", "LMCache MP: cache server %s dropped a save (%s)", self._client.url, exc
                )
            except Exception as exc:  # noqa: BLE001 - a lost save is a miss, never an error in TRT-LLM's loop
                # Nothing reads this thread's future but its completion: say why the save was lost.
                self._connection.warn.warning(
                    "save-failed",
                    "LMCache MP: a save failed and was dropped (%s: %s)",
                    type(exc).__name__,
                    exc,
                )
