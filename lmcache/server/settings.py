"""The cache server's settings (:class:`ServerConfig`), shared by its layers: the service reads the
limits and timeouts, the transport the addresses and connection caps."""

from __future__ import annotations

from dataclasses import dataclass

from lmcache.server import protocol as P

__all__ = ["ServerConfig", "DEFAULT_IPC_PATH", "DEFAULT_L1_MEMORY", "L1_MEMORY", "L1_MEMORY_ENV"]

DEFAULT_IPC_PATH = "/tmp/lmcache.sock"
L1_MEMORY = ("shm", "fd")
"""How the server's L1 is shared with the workers that copy into it (``--l1-memory``): named
``/dev/shm`` regions, or slabs passed by descriptor (driver-made on a CUDA host)."""
L1_MEMORY_ENV = "LMCACHE_L1_MEMORY"
DEFAULT_L1_MEMORY = "fd"
"""Slabs passed by descriptor: made page-locked once by the server, so a worker's saves while L1 first
fills are not held up page-locking it (benchmarks/RESULTS.md, D89), and L1 needs no room in
``/dev/shm`` (a container's is small)."""


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 5555
    ipc_path: str | None = DEFAULT_IPC_PATH
    """Unix socket bound in addition to TCP; None or "" disables it."""
    max_workers: int = 4
    client_timeout_s: float = 30.0
    """Instances silent (no request, no heartbeat) for this long are reaped; 0 disables reaping."""
    pin_ttl_s: float = 120.0
    """Pins of a lookup no retrieve or release came back for are dropped after this long."""
    max_frame_bytes: int = P.MAX_FRAME_BYTES
    busy_poll_s: float = 0.0
    """For this long after each request the I/O thread polls without sleeping (one core busy while
    clients are active, none when idle); 0 (default) always sleeps in poll. Off by default: it did
    not make lookups faster (see benchmarks/RESULTS.md)."""
    # ---- security (docs/security.md) ----
    secret: bytes | None = None
    """The secret TCP requests must carry; None: ``$LMCACHE_SERVER_SECRET`` or ``secret_file``."""
    secret_file: str | None = None
    """Where the secret is kept (created 0600 at first start); None: ``$LMCACHE_SERVER_SECRET_FILE``,
    else ``~/.lmcache/server_secret``; "": no file (then TCP serves only ``ping`` unless ``secret``)."""
    socket_group: str | None = None
    """Group (name or gid) given access to the Unix sockets (mode 0660); None: 0600, owner only."""
    allowed_uids: tuple[int, ...] = ()
    """Unix-socket peers served besides the server's own uid and root."""
    allowed_groups: tuple[int, ...] = ()
    """Unix-socket peers in these groups are served too (``socket_group`` is added to them)."""
    max_registrations: int = 256
    """Registered instances in total; a ``register`` beyond is refused (``limit``)."""
    max_registrations_per_client: int = 64
    """Registered instances per client (a Unix-socket peer's uid, a TCP peer's address)."""
    max_connections: int = 256
    """Open client connections in total; more are answered ``limit`` and closed."""
    max_connections_per_client: int = 128
    """Open connections per client (a Unix-socket peer's uid, a TCP peer's address); more are
    answered ``limit`` and closed. Each client holds a few (its lanes)."""
    max_pending_bytes_per_connection: int | None = None
    """Largest frame a connection may announce and buffer; None: ``max_frame_bytes``."""
    max_pending_bytes: int = 256 << 20
    """Bytes of unfinished frames announced by all connections together; also, separately, of the
    received requests queued behind each connection's running one, all connections together."""
    idle_timeout_s: float = 300.0
    """A connection that sent nothing for this long is closed (the client reopens it)."""
    frame_timeout_s: float = 30.0
    """A connection whose unfinished frame got no byte for this long is closed."""
    pool_sharing: str = "auto"
    """Pool-sharing modes taken at ``register`` (``--pool-sharing``): ``auto`` (any), ``export`` (the
    server maps the pool: CUDA IPC, CPU shared memory), ``shared-l1`` (the worker copies into L1)."""
    pin_share: float = 0.25
    """Largest fraction of L1 the pins of one instance's lookups may hold (``limit`` beyond)."""
