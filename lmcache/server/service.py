"""The cache server's service: everything that is not transport.

:class:`CacheService` turns decoded protocol requests into engine calls. Its handlers take a
request and the :class:`~lmcache.server.calls.Call` it arrived in (the authenticated :class:`Peer`,
and where work that may wait until after the reply goes) and return the reply's value, or raise
:class:`~lmcache.server.failures.ServiceFailure` carrying the error code. Handlers are looked up in
:attr:`CacheService.handlers` by message type: a new group of messages plugs in with
:meth:`CacheService.add_handlers`, and per-instance state of such a group rides on
:attr:`Instance.extensions <lmcache.server.instances.Instance.extensions>` (closed with the
instance) or a retire hook (:attr:`InstanceRegistry.on_retire`).

The service owns the instance registry, the pin table, the reaper's work (:meth:`reap`; the
thread that calls it lives in the server assembly) and the stats (:meth:`stats`). All cache logic
stays in :class:`lmcache.engine.CacheEngine`. No sockets, no threads: testable by calling it.

``store`` and ``retrieve``, the copies between L1 and a pool the server opened itself, are
:class:`~lmcache.server.export_transfers.ExportTransfers`; the shared-L1 ops plug in apart
(:mod:`lmcache.server.shared_l1_handlers`).
"""

from __future__ import annotations

import functools
import secrets
import time
from typing import TYPE_CHECKING, Any, NoReturn

from lmcache import gc_pauses
from lmcache.chunk_copy import CopyBatcher, CopyStreams
from lmcache.engine import CacheEngine, KeySpace
from lmcache.layout import PoolLayout
from lmcache.logging import init_logger
from lmcache.server import protocol as P
from lmcache.server.calls import Call, Handler
from lmcache.server.export_transfers import ExportTransfers
from lmcache.server.failures import ServerCounters, ServiceFailure
from lmcache.server.instances import Instance, InstanceRegistry, client_key
from lmcache.server.peer_process import PeerProcess
from lmcache.server.pins import CLIENT_PIN_SHARE, LookupPins, PinKey, PinRecord
from lmcache.server.pool_sharing import open_pool
from lmcache.server.security import Peer, PeerPolicy
from lmcache.server.settings import ServerConfig

if TYPE_CHECKING:
    from lmcache.server.shared_l1 import SharedL1Service

logger = init_logger(__name__)

__all__ = ["CacheService"]


@functools.lru_cache(maxsize=1)
def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("lmcache-trtllm")
    except Exception:
        return "dev"


class CacheService:
    """One engine's service to many clients: instances, pins, handlers, reaping, stats."""

    def __init__(
        self,
        engine: CacheEngine,
        config: ServerConfig,
        counters: ServerCounters | None = None,
        presence: P.RegionInfo | None = None,
    ) -> None:
        """``presence``: the region counting L1's chunks (:mod:`lmcache.server.presence`), announced to
        every registering client."""
        self.engine = engine
        self.presence = presence
        self.config = config
        self.counters = counters or ServerCounters()
        self.server_id = secrets.token_hex(8)
        self.started = time.monotonic()
        self.instances = InstanceRegistry(config, self.counters, self.server_id)
        self.shared_l1: SharedL1Service | None = None
        """The shared-L1 ops' service, once plugged in (:mod:`lmcache.server.shared_l1_handlers`)."""
        self.pins = LookupPins(engine)
        self.instances.on_retire.append(lambda inst: self.pins.release_owner(inst.instance_id))
        self.handlers: dict[type, Handler] = {}
        self.exports = ExportTransfers(self)
        self.add_handlers(
            {
                P.Ping: lambda req, call: self.ping(),
                P.Heartbeat: lambda req, call: self.heartbeat(req),
                P.Stats: lambda req, call: self.stats(),
                P.Register: self.register,
                P.Unregister: self.unregister,
                P.Lookup: self.lookup,
                P.LookupHashes: self.lookup,
                P.Release: self.release,
                P.Store: self.exports.store,
                P.Retrieve: self.exports.retrieve,
                P.Clear: lambda req, call: self.engine.clear(),
                P.L1Slabs: lambda req, call: self.l1_slabs(),
            }
        )

    def add_handlers(self, table: dict[type, Handler]) -> None:
        """Serve more message types; a type already served is an error (two groups claiming it)."""
        taken = set(table) & set(self.handlers)
        if taken:
            raise ValueError(f"message types already handled: {sorted(t.__name__ for t in taken)}")
        self.handlers.update(table)

    def handle(self, req: Any, call: Call) -> Any:
        """The reply value of ``req``; raises :class:`ServiceFailure` (or ValueError for bad values)."""
        handler = self.handlers.get(type(req))
        if handler is None:
            _unserved(self.instances, req, self.config.pool_sharing)
        return handler(req, call)

    def touch(self, req: Any, now: float) -> None:
        """Note the liveness of the instances a request names with their capabilities."""
        if isinstance(req, P.Heartbeat):
            self.instances.touch(iter(zip(req.instance_ids, req.caps, strict=False)), now)
        else:
            self.instances.touch(iter([(getattr(req, "instance_id", None), getattr(req, "cap", None))]), now)

    # ---- liveness and stats ---------------------------------------------------------------------

    def l1_slabs(self) -> P.SlabList:
        """The L1 slabs a worker may map before it registers (none unless L1 is in shared memory)."""
        shared = self.shared_l1
        return P.SlabList(
            server_id=self.server_id,
            pool_sharing=self.config.pool_sharing,
            slabs=shared.announced.every_slab() if shared is not None else [],
            more=shared is not None and self.engine.l1.arena.prepinning,
        )

    def ping(self) -> P.PingInfo:
        return P.PingInfo(
            server_id=self.server_id,
            protocol_version=P.PROTOCOL_VERSION,
            chunk_size=self.engine.config.chunk_size,
            uptime_s=time.monotonic() - self.started,
            version=_package_version(),
            pool_sharing=self.config.pool_sharing,
        )

    def heartbeat(self, req: P.Heartbeat) -> P.HeartbeatInfo:
        caps = req.caps + [b""] * (len(req.instance_ids) - len(req.caps))
        unknown = self.instances.unknown(req.instance_ids, caps)
        if req.missed_lookups and len(unknown) < len(req.instance_ids):  # from a registered client only
            self.engine.count_misses(req.missed_lookups, req.missed_tokens)
        return P.HeartbeatInfo(server_id=self.server_id, unknown=unknown)

    def reap(self, now: float | None = None) -> None:
        """Retire instances silent for ``client_timeout_s`` (their chunks stay cached; a shared-L1
        worker whose process is seen running is kept) and release pins no request came back for within
        ``pin_ttl_s``."""
        now = time.monotonic() if now is None else now
        timeout = self.config.client_timeout_s
        dead = self.instances.pop_silent(now, timeout) if timeout > 0 else []
        for inst in dead:
            self.counters.reaped += 1
            self.instances.retire(
                inst, f"no request or heartbeat for {now - inst.last_seen:.1f} s (client gone?)"
            )
        ttl = self.config.pin_ttl_s
        if ttl > 0:
            for key in self.pins.release_stale(now, ttl):
                logger.warning("released pins of lookup %r: no retrieve or release within %g s", key, ttl)

    def stats(self) -> P.StatsInfo:
        """The server's and engine's state in one message (``stats`` op, ``lmcache stats``, /metrics)."""
        now = time.monotonic()
        instances = [
            P.InstanceStats(
                instance_id=i.instance_id,
                rank=i.rank,
                world_size=i.world_size,
                model_name=i.request.model_name,
                pool_kind=i.pool.kind,
                pool_shape=list(i.request.pool.shape),
                dtype=i.request.pool.dtype,
                pid=i.request.pool.pid,
                idle_s=round(now - i.last_seen, 3),
                sharing=P.sharing_mode(i.request.pool),
                leased_slots=self.shared_l1.leased(i.registration) if self.shared_l1 is not None else 0,
                forward_waits=len(i.pool.awaited),
            )
            for i in self.instances.snapshot()
        ]
        counters = self.counters
        return P.StatsInfo(
            server_id=self.server_id,
            protocol_version=P.PROTOCOL_VERSION,
            uptime_s=now - self.started,
            engine=self.engine.snapshot(),
            pinned_lookups=len(self.pins),
            refusals=dict(counters.refusals),
            requests=counters.requests,
            errors=counters.errors,
            reaped_instances=counters.reaped,
            instances=instances,
            pool_sharing=self.config.pool_sharing,
            l1_memory=self.engine.l1.arena.source.memory,
            gc=gc_pauses.snapshot(),
        )

    def close(self) -> None:
        """Retire every instance (the server is shutting down)."""
        for inst in self.instances.pop_all():
            self.instances.retire(inst, "server shutting down")

    # ---- registration ---------------------------------------------------------------------------

    def register(self, req: P.Register, call: Call) -> P.RegisterInfo:
        if req.rank >= req.world_size:
            raise ServiceFailure(
                P.ErrorCode.INVALID, f"rank {req.rank} is not below world_size {req.world_size}"
            )
        client = client_key(call.peer)
        old, refreshed = self.instances.claim(req, client, time.monotonic())
        if old is not None and refreshed:
            return self._register_info(old, refreshed=True)
        if old is not None:
            self.instances.retire(old, "registered again with another pool")
        shared = self.shared_l1 is not None
        _check_sharing(req.pool, call.peer, self.config.pool_sharing, shared, self.counters)
        pool = open_pool(req.pool, call.peer)
        try:
            try:
                layout = PoolLayout.of_pool(pool.tensor, req.tokens_per_block)
                space = KeySpace(req.model_name, layout, req.world_size)
                self.engine.hasher(space)  # checks chunk_size against tokens_per_block
            except ValueError as e:
                raise ServiceFailure(P.ErrorCode.BAD_POOL, f"pool rejected: {e}") from None
            streams = CopyStreams.for_pool(pool.tensor)
            rows_per_chunk = self.engine.config.chunk_size // req.tokens_per_block
            try:  # the first save and load then pay no set-up
                CopyBatcher.warm_up(pool.tensor, streams.load if streams else None, rows_per_chunk)
            except RuntimeError as e:
                raise ServiceFailure(P.ErrorCode.BAD_POOL, f"pool rejected: cannot read it ({e})") from None
        except BaseException:
            pool.close()
            raise
        inst = Instance(req, pool, space, streams, time.monotonic(), secrets.token_bytes(32), client)
        if P.sharing_mode(req.pool) == "shared-l1":  # it copies into L1 slots itself, even after a pause
            inst.process = PeerProcess.of(call.peer)
        try:
            self.instances.add(inst)
        except ServiceFailure:
            inst.close_mapping()
            raise
        logger.info(
            "registered instance %d: rank %d/%d of %s, %s pool %s %s (%d tokens/block) of pid %d",
            req.instance_id,
            req.rank,
            req.world_size,
            req.model_name,
            P.sharing_mode(req.pool),
            list(pool.tensor.shape),
            req.pool.dtype,
            req.tokens_per_block,
            req.pool.pid,
        )
        return self._register_info(inst, refreshed=False)

    def _register_info(self, inst: Instance, refreshed: bool) -> P.RegisterInfo:
        config = self.engine.config
        hashing = None
        if not config.save_unfull_chunk:
            hashing = P.ChunkHashing(
                algorithm=config.pre_caching_hash_algorithm, layout_signature=inst.space.layout.signature()
            )
        return P.RegisterInfo(
            instance_id=inst.instance_id,
            chunk_size=config.chunk_size,
            num_blocks=inst.space.layout.num_blocks,
            server_id=self.server_id,
            refreshed=refreshed,
            hashing=hashing,
            cap=inst.cap,
            sharing=P.sharing_mode(inst.request.pool),
            pool_sharing=self.config.pool_sharing,
            presence=self.presence,
            slabs_ahead=(
                self.shared_l1.announced.ahead(inst.registration)
                if self.shared_l1 is not None and P.sharing_mode(inst.request.pool) == "shared-l1"
                else []
            ),
            reap_after_s=0.0 if inst.process is not None else self.config.client_timeout_s,
            forward_events=len(inst.pool.forward_events),
        )

    def unregister(self, req: P.Unregister, call: Call) -> bool:
        inst = self.instances.remove(req.instance_id, req.cap)
        if inst is None:
            return False
        self.instances.retire(inst, "unregistered by the client")
        return True

    # ---- lookups and pins -----------------------------------------------------------------------

    def lookup(self, req: P.Lookup | P.LookupHashes, call: Call) -> int | P.LookupSlots:
        """The hit; asked for ``slots``, with the slots of the chunks pinned for the instance's rank
        when it is in the shared-L1 mode (see :class:`P.LookupSlots`)."""
        with self.instances.use(req.instance_id, req.cap) as inst:
            key = (req.instance_id, req.pin_id) if req.pin_id is not None else None
            ranks = range(inst.world_size)
            if isinstance(req, P.LookupHashes):
                size = self.engine.hasher(inst.space).digest_size
                if len(req.chunk_hashes) % size:
                    raise ValueError(
                        f"chunk_hashes: {len(req.chunk_hashes)} bytes is not a whole number of "
                        f"{size}-byte digests ({self.engine.config.pre_caching_hash_algorithm})"
                    )
                hashes = [req.chunk_hashes[i : i + size] for i in range(0, len(req.chunk_hashes), size)]
                hit = self.engine.lookup_hashes(inst.space, hashes, req.num_tokens, ranks=ranks, pin_id=key)
            else:
                tokens = P.ids_from_wire(req.tokens, "tokens")
                hit = self.engine.lookup(inst.space, tokens, req.cache_salt, ranks=ranks, pin_id=key)
            if key is not None:
                claimed = isinstance(req, P.LookupHashes) and bool(req.claims)
                self._record_pins(inst, key, hit, req.claimed_at if claimed else None)
                if hit and call.expiring():  # its client gave up: no load will name these pins
                    self.pins.release(key)
                    raise ServiceFailure(
                        P.ErrorCode.EXPIRED,
                        "lookup finished after its client gave up (timed out, disconnected); its pins were "
                        "released; the server is slow: raise the client's lookup_timeout_ms or the server's "
                        "--max-workers",
                    )
            if not req.slots:
                return hit
            shared = self.shared_l1 if P.sharing_mode(inst.request.pool) == "shared-l1" else None
            slots = shared.pinned_slots(key, inst.rank) if shared is not None and key and hit else []
            return P.LookupSlots(hit=hit, slots=slots)

    def _record_pins(self, inst: Instance, key: PinKey, hit: int, claimed_at: float | None) -> None:
        """Note the pins a lookup took; drop them and refuse if the instance's pins would hold more
        than ``pin_share`` of L1. A claimed lookup's pins of ranks that loaded since ``claimed_at``
        (before it arrived) go at once (:class:`PinTable`)."""
        chunk_size = self.engine.config.chunk_size
        chunk_bytes = inst.chunk_bytes(chunk_size)
        nbytes = -(-hit // chunk_size) * chunk_bytes * inst.world_size
        capacity = self.engine.l1.arena.capacity_bytes
        share = int(self.config.pin_share * capacity)
        client_share = int(max(self.config.pin_share, CLIENT_PIN_SHARE) * capacity)
        record = PinRecord(inst.world_size, time.monotonic(), nbytes, client=inst.client) if hit > 0 else None
        held, over = self.pins.record(key, record, share, claimed_at, client_share=client_share)
        if not over:
            return
        self.counters.refuse("pinned_bytes")
        if held + nbytes > share:
            raise ServiceFailure(
                P.ErrorCode.LIMIT,
                f"this lookup would pin {nbytes} bytes on top of the {held} the instance's lookups hold, "
                f"more than its share of L1 ({share} bytes, --pin-share {self.config.pin_share:g}); "
                "retrieve or release earlier lookups first",
            )
        raise ServiceFailure(
            P.ErrorCode.LIMIT,
            f"this lookup would pin {nbytes} bytes on top of the {self.pins.table.client_held(inst.client)} "
            f"the lookups of this client's instances hold, more than a client's share of L1 ({client_share} "
            "bytes: half of it, or --pin-share if larger); retrieve or release earlier lookups first",
        )

    def pin_key(self, inst: Instance, pin_owner: int | None, pin_id: int | str) -> PinKey:
        """The pins a request of ``inst`` may act on: its own lookup's, or those of ``pin_owner``, an
        instance of the same client, model and world at another rank (the scheduler's rank of a TP
        world). Instances of one rank never share pins: separate engines, or attention-DP ranks, each
        a world of one rank, whose pins are their own requests'."""
        if pin_owner is None or pin_owner == inst.instance_id:
            return (inst.instance_id, pin_id)
        owner = self.instances.get(pin_owner)
        if (
            owner is None
            or (owner.client, owner.request.model_name, owner.world_size)
            != (inst.client, inst.request.model_name, inst.world_size)
            or owner.rank == inst.rank
        ):
            self.counters.refuse("capability")
            raise ServiceFailure(
                P.ErrorCode.UNAUTHORIZED,
                f"pin_owner {pin_owner} is not another rank of this client's world (same client, model "
                "and world size, another rank)",
            )
        return (pin_owner, pin_id)

    def release(self, req: P.Release, call: Call) -> bool:
        with self.instances.use(req.instance_id, req.cap) as inst:
            key = self.pin_key(inst, req.pin_owner, req.pin_id)
        return self.pins.release(key)


def _check_sharing(
    desc: P.PoolDescriptor, peer: Peer, policy: str, l1_shared: bool, counters: ServerCounters
) -> None:
    """Refuse a pool registered in a mode this server does not take (``--pool-sharing``), and a
    shared-l1 pool from a Unix peer of another uid than the server's or root: the server publishes
    the slots such a worker reports copied on its word, and a slot keeps the bytes of the chunk
    evicted from it (published under its own keys, another tenant's KV would be read back)."""
    mode = P.sharing_mode(desc)
    if mode == "shared-l1" and not PeerPolicy.is_operator(peer):
        counters.refuse("unauthorized")
        raise ServiceFailure(
            P.ErrorCode.UNAUTHORIZED,
            f"uid {peer.uid} may not register a shared-l1 pool: only the server's own user and root "
            "copy into its L1 themselves; set LMCACHE_POOL_SHARING=export on this client, or run it "
            "as the server's user",
        )
    if policy != "auto" and (mode == "shared-l1") != (policy == "shared-l1"):
        counters.refuse("pool_sharing")
        raise ServiceFailure(
            P.ErrorCode.BAD_POOL,
            f"this server takes only {policy} pools (--pool-sharing {policy}) and this pool came as "
            f"{mode}; set LMCACHE_POOL_SHARING=auto (it follows the server) or {policy} on the client, "
            "or restart the server with --pool-sharing auto",
        )
    if mode == "shared-l1" and not l1_shared:
        raise ServiceFailure(
            P.ErrorCode.BAD_POOL,
            "this server's L1 is not in shared memory, so it cannot take a shared-l1 pool; register "
            "with LMCACHE_POOL_SHARING=export (the server's engine must come from server_engine())",
        )


def _unserved(instances: InstanceRegistry, req: Any, pool_sharing: str) -> NoReturn:
    """Refuse an op this server does not serve (the shared-L1 ops when its L1 is not shared): an
    instance it does not know is ``unknown_instance`` (the client registers again, and learns why its
    pool is refused), else ``invalid``."""
    with instances.use(getattr(req, "instance_id", -1), getattr(req, "cap", None)):
        raise ServiceFailure(
            P.ErrorCode.INVALID,
            f"this server does not serve {type(req).__name__} requests (--pool-sharing {pool_sharing}); "
            "register the pool again",
        )
