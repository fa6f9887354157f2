"""The multi-process cache server: one :class:`CacheEngine` served to many TRT-LLM workers over a
the stream sockets of the seed's URLs, ``tcp://host:port`` and ``ipc://path`` (see
:mod:`lmcache.server.protocol`).

:class:`CacheServer` assembles the layers:

* :mod:`lmcache.server.service` - instances, pins, handlers, reaping, stats (no sockets);
* :mod:`lmcache.server.dispatch` - admission, per-connection ordering, the inline policy, the
  worker pool (``--max-workers`` threads), cleanups after replies;
* :mod:`lmcache.server.framing` - frames, shared with the client;
* :mod:`lmcache.server.transport` and :mod:`lmcache.server.listeners` - the sockets and the I/O
  loop, run by the caller of :meth:`CacheServer.serve_forever` (the main thread under the CLI).

The engine's L1 lives in shared memory (:func:`server_engine`), so besides pools it maps (CUDA IPC,
CPU shared memory) the server serves pools it never maps: their workers copy into L1 slots
themselves (:mod:`lmcache.server.shared_l1`, plugged in by :mod:`lmcache.server.shared_l1_handlers`).
With L1 its only tier, clients look up and pin with no round trip (:mod:`lmcache.server.claims`,
plugged in by :mod:`lmcache.server.claim_handlers`). Closing the server removes the L1's
shared-memory regions.

A **reaper thread** drops instances that stopped heartbeating for ``client_timeout_s``
(releasing their pool mapping and their pins; the chunks they stored stay cached) and pins no
request came back for within ``pin_ttl_s``.
"""

from __future__ import annotations

import ipaddress
import os
import resource
import threading

import torch

from lmcache.config import LMCacheEngineConfig
from lmcache.engine import CacheEngine
from lmcache.fd_slabs import FdSlabSource
from lmcache.logging import init_logger
from lmcache.server import protocol as P
from lmcache.server.claim_handlers import ClaimHandlers
from lmcache.server.claims import ClaimIndex
from lmcache.server.descriptor_channel import DescriptorChannel
from lmcache.server.dispatch import MAX_QUEUED_PER_CLIENT, Admission, Dispatcher
from lmcache.server.failures import ServerCounters
from lmcache.server.inline_cost import INLINE_MAX_COST
from lmcache.server.listeners import Listeners, ServerStartError
from lmcache.server.presence import PresenceCounts
from lmcache.server.security import SecretError, load_or_create_secret
from lmcache.server.service import CacheService
from lmcache.server.settings import DEFAULT_IPC_PATH, DEFAULT_L1_MEMORY, L1_MEMORY, ServerConfig
from lmcache.server.shared_l1 import SHARED_SOURCES, SharedL1Service
from lmcache.server.shared_l1_handlers import SharedL1Handlers
from lmcache.server.transport import ServerTransport
from lmcache.shm_slabs import SHM_DIR, ShmSlabSource

logger = init_logger(__name__)

__all__ = [
    "CacheServer",
    "server_engine",
    "ServerConfig",
    "ServerStartError",
    "DEFAULT_IPC_PATH",
    "INLINE_MAX_COST",
    "MAX_QUEUED_PER_CLIENT",
]


def server_engine(
    config: LMCacheEngineConfig,
    pool_sharing: str = "auto",
    *,
    pinned: bool | None = None,
    shm_dir: str = SHM_DIR,
    l1_memory: str = DEFAULT_L1_MEMORY,
) -> CacheEngine:
    """The server's engine. Unless ``pool_sharing`` is ``export`` (no worker copies into L1 then), its
    L1 is shared with the workers, as ``l1_memory`` says: with ``fd`` (the default) in slabs passed by
    descriptor (:mod:`lmcache.fd_slabs`), made by the CUDA driver where the server has a device,
    page-locked once for every worker, else memfds; with ``shm`` in shared-memory slabs (0600, this
    user's; stale ones of a crashed server removed first), page-locked only if the server itself may
    copy into CUDA pools (``pinned`` None: CUDA is available and ``pool_sharing`` allows export)."""
    from lmcache.host_slabs import pinned_memory_available
    from lmcache.memory import SlabSource

    if l1_memory not in L1_MEMORY:
        raise ValueError(f"--l1-memory must be one of {', '.join(L1_MEMORY)}, got {l1_memory!r}")
    if pinned is None:
        pinned = pool_sharing != "shared-l1" and pinned_memory_available()
    if pool_sharing == "export":
        return CacheEngine(config, slab_source=SlabSource(pinned))
    source: SlabSource
    if l1_memory == "fd":
        # On the server's current CUDA device (the first visible one): its host NUMA node holds L1.
        source = FdSlabSource(torch.cuda.current_device() if pinned_memory_available() else None)
    else:
        _warn_if_shm_is_small(config, shm_dir)
        source = ShmSlabSource(pinned, shm_dir=shm_dir)
    engine = CacheEngine(config, slab_source=source)
    if config.local_cpu and pinned_memory_available():
        # On a CUDA host every region is created in the background from start-up (as the in-process
        # L1 is pinned ahead), so saves while L1 fills do not wait for new regions, and workers map
        # and page-lock them ahead (they are announced as soon as they exist). Without CUDA, as
        # in-process, L1 grows with use.
        engine.l1.arena.prepin()
    return engine


DESCRIPTORS_PER_SLAB_SHARE = 2
"""With ``--l1-memory fd`` the server keeps one descriptor per L1 slab: they may take at most half of
its limit, the rest being for clients' connections and its own files."""


def raise_descriptor_limit() -> int:
    """Raise this process's soft limit on open descriptors to its hard limit (a server holds one per
    client connection and, with ``--l1-memory fd``, one per L1 slab); returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as e:
        logger.debug("could not raise the open-descriptor limit from %d to %d: %s", soft, target, e)
        return soft
    logger.info("open-descriptor limit raised from %d to %d (ulimit -n)", soft, target)
    return target


def warn_if_descriptors_are_short(engine: CacheEngine, limit: int) -> None:
    """Say at start, not when L1 stops growing, when an L1 passed by descriptor needs more descriptors
    than ``limit`` leaves it."""
    if not isinstance(engine.l1.arena.source, FdSlabSource) or limit == resource.RLIM_INFINITY:
        return
    slabs = -(-engine.l1.arena.capacity_bytes // engine.l1.arena.slab_bytes)
    if slabs * DESCRIPTORS_PER_SLAB_SHARE > limit:
        logger.warning(
            "--l1-memory fd keeps a descriptor per L1 slab: %d slabs of %d MiB for --l1-size-gb, but this "
            "process may open %d descriptors (ulimit -n) and needs room for its clients too; raise the "
            "limit to at least %d, or use --l1-memory shm",
            slabs,
            engine.l1.arena.slab_bytes >> 20,
            limit,
            slabs * DESCRIPTORS_PER_SLAB_SHARE,
        )


def _warn_if_shm_is_small(config: LMCacheEngineConfig, shm_dir: str) -> None:
    """Say at start, not at the first full region, when ``shm_dir`` cannot hold the L1."""
    wanted = config.max_local_cpu_bytes if config.local_cpu else 0
    try:
        st = os.statvfs(shm_dir)
    except OSError:
        return
    room = st.f_bavail * st.f_frsize
    if wanted > room:
        logger.warning(
            "%s has %.2f GiB free but L1 is %.2f GiB (--l1-size-gb): L1 will stop growing where the tmpfs "
            "is full; enlarge it (docker: --shm-size), use --l1-memory fd (L1 outside it), lower "
            "--l1-size-gb, or use --pool-sharing export (private L1 memory; V2 pools then get no cache)",
            shm_dir,
            room / (1 << 30),
            wanted / (1 << 30),
        )


class CacheServer:
    """Serves one engine to many clients: start / serve_forever / stop / close. With an engine whose
    L1 is in shared memory (:func:`server_engine`) it also serves the shared-L1 mode."""

    def __init__(self, engine: CacheEngine, config: ServerConfig | None = None) -> None:
        self.engine = engine
        self.config = config or ServerConfig()
        self.counters = ServerCounters()
        self.presence = PresenceCounts.for_engine(engine)
        self.service = CacheService(
            engine, self.config, self.counters, presence=self.presence.info if self.presence else None
        )
        source = engine.l1.arena.source
        if isinstance(source, SHARED_SOURCES):
            SharedL1Handlers.install(self.service, SharedL1Service(engine))
        self.descriptors: DescriptorChannel | None = None
        if isinstance(source, FdSlabSource):
            self.descriptors = DescriptorChannel(source.descriptor)
            source.channel = self.descriptors.path
        self.claims = ClaimIndex.for_engine(engine)
        self.claim_handlers = ClaimHandlers.install(self.service, self.claims) if self.claims else None
        self.admission = Admission(self.config)
        self._stop = threading.Event()
        self.dispatcher = Dispatcher(self.service, self.config, self.admission, self._stop)
        self.listeners = Listeners(self.config)
        self.transport = ServerTransport(
            self.config, self.counters, self.dispatcher, self.listeners, self.admission.policy
        )
        self.dispatcher.bind(self.transport)
        self._reaper: threading.Thread | None = None
        self._closed = False

    # ---- what the CLI, /metrics and tests read ---------------------------------------------------

    @property
    def server_id(self) -> str:
        return self.service.server_id

    @property
    def started(self) -> float:
        return self.service.started

    @property
    def endpoints(self) -> list[str]:
        return self.listeners.endpoints

    @property
    def tcp_port(self) -> int:
        return self.listeners.tcp_port

    @property
    def io_thread(self) -> int | None:
        """The id of the thread running the I/O loop (None before :meth:`serve_forever`)."""
        return self.transport.io_thread

    @property
    def requests(self) -> int:
        return self.counters.requests

    @property
    def errors(self) -> int:
        return self.counters.errors

    @property
    def reaped(self) -> int:
        return self.counters.reaped

    @property
    def refusals(self) -> dict[str, int]:
        return self.counters.refusals

    def stats(self) -> P.StatsInfo:
        return self.service.stats()

    def reap(self, now: float | None = None) -> None:
        self.service.reap(now)

    # ---- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Bind the sockets (raises :class:`ServerStartError` with a clear message on failure)."""
        self._load_secret()
        self.transport.bind()
        self._reaper = threading.Thread(target=self._reap_loop, name="lmcache-reaper", daemon=True)
        self._reaper.start()
        logger.info("LMCache server listening on %s", " and ".join(self.endpoints))

    def _load_secret(self) -> None:
        """Read (or create) the server secret; refuse a non-loopback bind without one."""
        if self.admission.secret is None:
            try:
                self.admission.secret = load_or_create_secret(self.config.secret_file)
            except SecretError as e:
                raise ServerStartError(str(e)) from None
        if self.admission.secret is None and not _is_loopback(self.config.host):
            raise ServerStartError(
                f"refusing to listen on {self.config.host} without a secret: anyone who reaches the port "
                "could use the cache; give one (--secret-file, $LMCACHE_SERVER_SECRET) or bind 127.0.0.1"
            )

    def stop(self) -> None:
        """Ask :meth:`serve_forever` to return (thread- and signal-safe)."""
        self._stop.set()
        self.transport.wake()

    def serve_forever(self) -> None:
        """Run the I/O loop until :meth:`stop`, then shut down cleanly."""
        if not self.transport.bound:
            self.start()
        try:
            self.transport.serve(self._stop)
        finally:
            self.close()

    def close(self) -> None:
        """Finish in-flight work, unmap every pool, close the sockets, remove the ipc file."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self.dispatcher.shutdown()
        self.service.close()
        if self.descriptors is not None:
            self.descriptors.close()
        self.engine.l1.arena.close()  # the L1's shared-memory names go (mappings stay valid)
        if self.presence is not None:
            self.presence.close()
        if self.claims is not None:
            self.claims.close()
        self.transport.close()
        logger.info("LMCache server stopped")

    def _reap_loop(self) -> None:
        timeout = self.config.client_timeout_s
        interval = min(1.0, timeout / 4) if timeout > 0 else 1.0
        while not self._stop.wait(max(0.05, interval)):
            try:
                self.service.reap()
                if self.claim_handlers is not None:
                    self.claim_handlers.check_shares()
            except Exception:
                logger.exception("reaper")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"
