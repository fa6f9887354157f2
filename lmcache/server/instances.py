"""The server's registry of instances (one registered pool each: one rank of one TRT-LLM process).

An :class:`Instance` holds the pool mapping, key space, CUDA streams, capability and owner of a
registration, plus ``extensions``: per-mode state that another group of handlers attaches (closed
when the instance is retired). :class:`InstanceRegistry` is the table: capability checks
(:meth:`InstanceRegistry.use`), per-client and total registration caps, liveness, and retiring
(retire hooks run, e.g. the pin table drops the instance's pins; the mapping is closed once no
request uses it). No sockets, no threads.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from lmcache.chunk_copy import CopyStreams
from lmcache.engine import KeySpace
from lmcache.logging import init_logger
from lmcache.server import protocol as P
from lmcache.server.failures import ServerCounters, ServiceFailure
from lmcache.server.peer_process import PeerProcess
from lmcache.server.pool_sharing import MappedPool
from lmcache.server.security import Peer, secret_matches
from lmcache.server.settings import ServerConfig

logger = init_logger(__name__)

_REGISTRATIONS = itertools.count(1)

__all__ = ["ClientKey", "Instance", "InstanceExtension", "InstanceRegistry", "client_key"]

ClientKey = tuple[str, int | str]
"""Who registered an instance: ("uid", a Unix peer's uid) or ("tcp", a TCP peer's address)."""


def client_key(peer: Peer) -> ClientKey:
    return ("uid", peer.uid) if peer.uid is not None else ("tcp", peer.address)


class InstanceExtension(Protocol):
    """Per-mode state of one instance (e.g. the tickets of a shared-memory L1 mode)."""

    def close(self) -> None:
        """Release what the state holds; called once, when the instance is retired."""


@dataclass(eq=False)
class Instance:
    """One registered pool (one rank of one TRT-LLM process)."""

    request: P.Register
    pool: MappedPool
    space: KeySpace
    streams: CopyStreams | None
    """The CUDA streams its saves and loads run on (None for a CPU pool)."""
    last_seen: float
    cap: bytes
    """The capability every request naming this instance must carry."""
    client: ClientKey
    """Who registered it: per-client caps and pin sharing."""
    active: int = 0
    """Requests using it now (the mapping is closed only when none does)."""
    retired: bool = False
    extensions: dict[str, InstanceExtension] = field(default_factory=dict)
    """Per-mode state other handler groups attach by name; closed when the instance is retired."""
    process: PeerProcess | None = None
    """The registering process where the server can watch it (a shared-L1 worker on a Unix socket):
    not reaped while it runs, however long it is silent."""
    kept_silent: bool = False
    """Silent past the client timeout and kept (its process runs): told once per silence."""
    registration: int = field(default_factory=lambda: next(_REGISTRATIONS))
    """Unique to this registration, unlike the instance id a later registration may take again: state
    kept per registration cannot be reached by a request of an earlier one still running."""

    @property
    def instance_id(self) -> int:
        return self.request.instance_id

    @property
    def rank(self) -> int:
        return self.request.rank

    @property
    def world_size(self) -> int:
        return self.request.world_size

    def chunk_bytes(self, chunk_size: int) -> int:
        """Bytes one chunk of ``chunk_size`` tokens of this instance's pool holds (one rank's)."""
        layout = self.space.layout
        return layout.row_bytes * layout.blocks_per_chunk(chunk_size)

    def same_registration(self, req: P.Register) -> bool:
        a, b = self.request, req
        return (a.rank, a.world_size, a.model_name, a.tokens_per_block, a.pool) == (
            b.rank,
            b.world_size,
            b.model_name,
            b.tokens_per_block,
            b.pool,
        )

    def close_mapping(self) -> None:
        """Wait for the instance's copies, close its extensions, unmap its pool and hand its streams back
        (logs failures)."""
        for name, ext in self.extensions.items():
            try:
                ext.close()
            except Exception:
                logger.exception("closing the %s state of instance %d", name, self.instance_id)
        try:
            if self.streams is not None:
                self.streams.synchronize()
            self.pool.close()
            if self.streams is not None:
                self.streams.release()
        except Exception:
            logger.exception("closing the pool mapping of instance %d", self.instance_id)
        if self.process is not None:
            self.process.close()


class InstanceRegistry:
    """The registered instances, by id; thread-safe."""

    def __init__(self, config: ServerConfig, counters: ServerCounters, server_id: str) -> None:
        self.config = config
        self.counters = counters
        self.server_id = server_id
        self.on_retire: list[Callable[[Instance], None]] = []
        """Called with each retired instance (its pins, per-mode state of other tables...)."""
        self._table: dict[int, Instance] = {}
        self._lock = threading.Lock()

    def get(self, instance_id: int) -> Instance | None:
        with self._lock:
            return self._table.get(instance_id)

    def __contains__(self, instance_id: object) -> bool:
        with self._lock:
            return instance_id in self._table

    def __len__(self) -> int:
        with self._lock:
            return len(self._table)

    def snapshot(self) -> list[Instance]:
        with self._lock:
            return list(self._table.values())

    @contextlib.contextmanager
    def use(self, instance_id: int, cap: bytes | None) -> Iterator[Instance]:
        """The instance, held against unmapping; ``unknown_instance`` unless ``cap`` is its capability."""
        with self._lock:
            inst = self._table.get(instance_id)
            if inst is not None and not secret_matches(inst.cap, cap):
                self.counters.refuse("capability")
                inst = None  # the same answer as for an unknown id: nothing to learn from it
            if inst is None:
                raise ServiceFailure(
                    P.ErrorCode.UNKNOWN_INSTANCE,
                    f"instance {instance_id} is not registered with this server (server {self.server_id}); "
                    "it restarted or reaped the client after "
                    f"{self.config.client_timeout_s:g} s without heartbeats: register the pool again",
                )
            inst.active += 1
        try:
            yield inst
        finally:
            with self._lock:
                inst.active -= 1
                close_now = inst.retired and inst.active == 0
            if close_now:
                inst.close_mapping()

    def touch(self, named: Iterator[tuple[int | None, bytes | None]], now: float) -> None:
        """Note the liveness of the instances named with their capabilities."""
        with self._lock:
            for iid, cap in named:
                inst = self._table.get(iid) if iid is not None else None
                if inst is not None and secret_matches(inst.cap, cap):
                    inst.last_seen = now

    def unknown(self, instance_ids: list[int], caps: list[bytes]) -> list[int]:
        """The ids not registered with these capabilities."""
        with self._lock:
            return [
                i
                for i, cap in zip(instance_ids, caps, strict=False)
                if (inst := self._table.get(i)) is None or not secret_matches(inst.cap, cap)
            ]

    def claim(self, req: P.Register, client: ClientKey, now: float) -> tuple[Instance | None, bool]:
        """Start a registration: (the instance it refreshes, True) if the same pool is registered
        again with its capability; else (the instance it replaces, removed from the table, or None,
        False). Raises ``unauthorized`` for another's id and ``limit`` beyond a cap."""
        with self._lock:
            old = self._table.get(req.instance_id)
            if old is not None and not secret_matches(old.cap, req.cap):
                self.counters.refuse("capability")
                raise ServiceFailure(
                    P.ErrorCode.UNAUTHORIZED,
                    f"instance id {req.instance_id} is registered by someone else; pick another id",
                )
            if old is not None and old.same_registration(req):
                old.last_seen = now
                return old, True
            self._check_room(client, old)
            if old is not None:
                del self._table[req.instance_id]
        return old, False

    def add(self, inst: Instance) -> None:
        """Enter a new instance; ``unauthorized`` if its id was just taken, ``limit`` beyond a cap (the
        caller then closes its mapping)."""
        with self._lock:
            if inst.instance_id in self._table:
                raise ServiceFailure(
                    P.ErrorCode.UNAUTHORIZED, f"instance id {inst.instance_id} was just taken"
                )
            self._check_room(inst.client, None)
            self._table[inst.instance_id] = inst

    def _check_room(self, client: ClientKey, replacing: Instance | None) -> None:
        """Raise ``limit`` if one more registration of ``client`` exceeds a cap. Caller holds the lock."""
        total = len(self._table) - (replacing is not None)
        mine = sum(1 for i in self._table.values() if i.client == client and i is not replacing)
        if total >= self.config.max_registrations:
            self.counters.refuse("registrations")
            raise ServiceFailure(
                P.ErrorCode.LIMIT,
                f"the server holds its maximum of {self.config.max_registrations} registrations "
                "(--max-registrations); unregister unused pools",
            )
        if mine >= self.config.max_registrations_per_client:
            self.counters.refuse("registrations_per_client")
            raise ServiceFailure(
                P.ErrorCode.LIMIT,
                f"this client holds its maximum of {self.config.max_registrations_per_client} registrations "
                "(--max-registrations-per-client); unregister unused pools",
            )

    def remove(self, instance_id: int, cap: bytes | None) -> Instance | None:
        """Take the instance out of the table if ``cap`` is its capability (the caller retires it)."""
        with self._lock:
            inst = self._table.get(instance_id)
            if inst is None or not secret_matches(inst.cap, cap):
                return None
            del self._table[instance_id]
            return inst

    def retire_now(self, inst: Instance, why: str) -> None:
        """Remove ``inst`` from the table (if still there) and retire it."""
        with self._lock:
            if self._table.get(inst.instance_id) is not inst:
                return
            del self._table[inst.instance_id]
        self.retire(inst, why)

    def pop_silent(self, now: float, timeout: float) -> list[Instance]:
        """Take out the instances silent for more than ``timeout`` seconds (the caller retires them),
        except those whose process is seen running (:attr:`Instance.process`; a warning, once per
        silence)."""
        with self._lock:
            dead, kept = [], []
            for iid, inst in self._table.items():
                if now - inst.last_seen <= timeout:
                    inst.kept_silent = False
                elif inst.process is not None and inst.process.alive():
                    if not inst.kept_silent:
                        inst.kept_silent = True
                        kept.append((inst, inst.process.pid, now - inst.last_seen))
                else:
                    dead.append(iid)
            popped = [self._table.pop(iid) for iid in dead]
        for inst, pid, silent in kept:
            logger.warning(
                "instance %d (pid %d) silent for %.1f s, but its process runs (stopped?): kept registered "
                "with the L1 slots it may still copy into, until it speaks again or exits",
                inst.instance_id,
                pid,
                silent,
            )
        return popped

    def pop_all(self) -> list[Instance]:
        with self._lock:
            instances = list(self._table.values())
            self._table.clear()
        return instances

    def retire(self, inst: Instance, why: str) -> None:
        """Forget an instance (already out of the table): run the retire hooks, unmap its pool once no
        request is using it."""
        with self._lock:
            inst.retired = True
            close_now = inst.active == 0
        for hook in self.on_retire:
            hook(inst)
        logger.info(
            "instance %d (rank %d/%d, %s, pid %d) removed: %s",
            inst.instance_id,
            inst.rank,
            inst.world_size,
            inst.request.model_name,
            inst.request.pool.pid,
            why,
        )
        if close_now:
            inst.close_mapping()
