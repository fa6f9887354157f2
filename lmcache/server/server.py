"""The multi-process cache server: one :class:`CacheEngine` behind a ZMQ ROUTER socket and the
direct lane (plain stream sockets for the clients' calls, see :mod:`lmcache.server.protocol`).

Threads:

* the **I/O thread** (the caller of :meth:`CacheServer.serve_forever`, the main thread under the
  CLI) owns the ROUTER socket and the direct lane's listeners and connections (one poller for
  all): it reads and decodes requests, answers ``ping``, ``heartbeat`` and ``stats`` itself (they
  never wait behind a long copy), queues everything else and sends the replies that workers hand
  back through a queue plus a wake-up pipe in its poller (a worker writes a direct-lane reply
  itself when nothing is waiting before it on that connection). With ``busy_poll_s`` it polls
  without sleeping for that long after each request, unless a worker runs. It also runs ``lookup`` and
  ``lookup_hashes`` (up to :data:`INLINE_LOOKUP_MAX_TOKENS` tokens, L1 only: no lower tier to
  read) and ``release`` itself, the hot metadata ops of the scheduler, but only when nothing of
  the same client connection is queued or running, so per-connection ordering is kept exactly;
  this saves two thread hand-offs (about half the round trip of a small lookup);
* ``--max-workers`` **worker threads** (a ThreadPoolExecutor) run the queued requests. Requests
  of one client connection run one at a time in arrival order (a per-client serial queue), while
  different clients run in parallel;
* a **reaper thread** drops instances that stopped heartbeating for ``client_timeout_s``
  (releasing their pool mapping and their pins; the chunks they stored stay cached) and pins no
  request came back for within ``pin_ttl_s``.

Handlers only translate messages into engine calls (lookup / store / retrieve / release /
clear); all cache logic lives in :class:`lmcache.engine.CacheEngine`.

CUDA ordering (first version, host-synchronous at the boundaries): the client must have finished
writing the blocks it asks to store (e.g. synchronized the stream of its forward pass) before it
sends ``store``; the server enqueues its copies on a per-instance CUDA stream and synchronizes
that stream before it replies to ``store`` and to ``retrieve``. So when a ``store`` reply arrives
the client may overwrite those blocks, and when a ``retrieve`` reply arrives the loaded blocks
are in device memory, visible to any later work on any stream of the client.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import ipaddress
import itertools
import logging
import os
import queue
import secrets
import socket
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import msgspec
import numpy as np
import torch
import zmq

from lmcache.engine import CacheEngine, KeySpace
from lmcache.keys import ChunkHashes
from lmcache.layout import PoolLayout
from lmcache.logging import init_logger
from lmcache.rate_limit import RateLimitedLog
from lmcache.server import protocol as P
from lmcache.server.pool_sharing import MappedPool, PoolSharingError, open_pool
from lmcache.server.security import (
    Peer,
    PeerPolicy,
    SecretError,
    group_id,
    load_or_create_secret,
    peer_of_socket,
    peer_of_zmq,
    secret_matches,
)
from lmcache.transfer import BlockTransfer

logger = init_logger(__name__)

__all__ = ["CacheServer", "ServerConfig", "ServerStartError", "DEFAULT_IPC_PATH"]

DEFAULT_IPC_PATH = "/tmp/lmcache.sock"
MAX_QUEUED_PER_CLIENT = 4096
_DRAIN_BURST = 16
INLINE_LOOKUP_MAX_TOKENS = 1 << 16
"""Longest lookup the I/O thread answers itself (hashing 64k tokens takes about a millisecond);
longer ones go to the workers so they never hold up other clients' replies for long."""


_DIRECT_READ_BYTES = 1 << 16
_DIRECT_READS = 16
"""Reads of one direct connection per poll round (1 MiB), so others get their turn."""
DIRECT_SUFFIX = ".direct"
"""The direct lane's Unix socket is the ipc socket's path plus this."""

_Identity = bytes | int
"""A client connection: a ZMQ routing id, or a direct connection's number."""


class ServerStartError(RuntimeError):
    """The server cannot start (address in use, bad ipc path...); the message says what to do."""


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
    clients are active, none when idle); 0 (default) always sleeps in poll. Off by default: on an
    H200 host lookups were no faster with it and the TTFT of a 4k-token hit through the server went
    from 9.6-9.8 to 11.1-11.4 ms (benchmarks/RESULTS.md, third session)."""
    direct_port: int | None = 0
    """TCP port of the direct lane on ``host`` (0: any free port); None disables the lane (its
    Unix socket, ``<ipc_path>.direct``, too)."""
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
    """Open direct-lane connections; more are closed at once (clients fall back to ZMQ)."""
    max_pending_bytes_per_connection: int | None = None
    """Largest frame a direct connection may announce and buffer; None: ``max_frame_bytes``."""
    max_pending_bytes: int = 256 << 20
    """Bytes of unfinished frames announced by all direct connections together."""
    idle_timeout_s: float = 300.0
    """A direct connection that sent nothing for this long is closed (the client reopens it)."""
    frame_timeout_s: float = 30.0
    """A direct connection whose unfinished frame got no byte for this long is closed."""
    pin_share: float = 0.25
    """Largest fraction of L1 the pins of one instance's lookups may hold (``limit`` beyond)."""


class _DirectConn:
    """A client's connection on the direct lane (see :mod:`lmcache.server.protocol`): frames in and
    out, each behind its length, over a non-blocking stream socket served by the I/O thread."""

    def __init__(self, sock: socket.socket, ident: int, peer: Peer, now: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.ident = ident
        """The connection's identity in the per-client queues (ZMQ's are bytes, these ints)."""
        self.peer = peer
        self.last_rx = now
        """When a byte last arrived (idle and unfinished-frame timeouts)."""
        self.reserved = 0
        """Bytes of the unfinished frame counted against the server's total (``max_pending_bytes``)."""
        self.inbox = bytearray()
        self.outbox = bytearray()
        self.lock = threading.RLock()
        """Guards the socket's writes, ``outbox`` and ``closed``: workers send replies too."""
        self.closed = False

    def send_from_worker(self, data: bytes) -> bool | None:
        """Send a reply from a worker thread, sparing the I/O thread's wake-up (~0.1 ms on a GPU
        host): True if all of it went, None if part did and the rest waits in ``outbox`` for the I/O
        thread, False if nothing was sent (queue it for the I/O thread)."""
        with self.lock:
            if self.closed or self.outbox:
                return False  # the I/O thread owns the order of what is already waiting
            try:
                sent = self.sock.send(data)
            except OSError:  # would block, or the client went away: the I/O thread deals with it
                return False
            if sent == len(data):
                return True
            self.outbox += data[sent:]
            return None


class _Fail(Exception):
    def __init__(self, code: P.ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(eq=False)
class _Instance:
    """One registered pool (one rank of one TRT-LLM process)."""

    request: P.Register
    pool: MappedPool
    space: KeySpace
    stream: Any
    last_seen: float
    cap: bytes
    """The capability every request naming this instance must carry."""
    client: tuple[str, int | str]
    """Who registered it (a Unix peer's uid, a TCP peer's address): per-client caps and pin sharing."""
    active: int = 0
    retired: bool = False

    @property
    def instance_id(self) -> int:
        return self.request.instance_id

    @property
    def rank(self) -> int:
        return self.request.rank

    @property
    def world_size(self) -> int:
        return self.request.world_size

    def same_registration(self, req: P.Register) -> bool:
        a, b = self.request, req
        return (a.rank, a.world_size, a.model_name, a.tokens_per_block, a.pool) == (
            b.rank,
            b.world_size,
            b.model_name,
            b.tokens_per_block,
            b.pool,
        )


@dataclass
class _PinState:
    world_size: int
    created: float
    nbytes: int = 0
    """L1 bytes the lookup pinned (all ranks)."""
    done: set[int] = field(default_factory=set)


def _client_key(peer: Peer) -> tuple[str, int | str]:
    return ("uid", peer.uid) if peer.uid is not None else ("tcp", peer.address)


class CacheServer:
    """Serves one engine to many clients; see the module docstring for the threading model."""

    def __init__(
        self, engine: CacheEngine, config: ServerConfig | None = None, *, context: zmq.Context | None = None
    ) -> None:
        self.engine = engine
        self.config = config or ServerConfig()
        self.server_id = secrets.token_hex(8)
        self.started = time.monotonic()
        self._ctx = context or zmq.Context.instance()
        self._sock: zmq.Socket | None = None
        self._unix_sockets: list[tuple[str, tuple[int, int]]] = []
        """Socket files this server created, with their (st_dev, st_ino): removed on close."""
        self.endpoints: list[str] = []
        self.direct: P.DirectLane | None = None
        self._listeners: list[socket.socket] = []
        self._direct: dict[int, _DirectConn] = {}
        self._fds: dict[int, _DirectConn | socket.socket] = {}
        """What the poller's native file descriptors are (it reports them as ints)."""
        self._direct_ids = itertools.count(1)
        self._poller: zmq.Poller | None = None
        self._replies: queue.SimpleQueue[tuple[_Identity, bytes]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._stop = threading.Event()
        self._executor = ThreadPoolExecutor(
            max(1, self.config.max_workers), thread_name_prefix="lmcache-worker"
        )
        self._queues: dict[_Identity, deque[tuple[Any, float, Peer]]] = {}
        self._running: set[_Identity] = set()
        self._qlock = threading.Lock()
        self._instances: dict[int, _Instance] = {}
        self._ilock = threading.Lock()
        self._pins: dict[tuple[int, int | str], _PinState] = {}
        self._plock = threading.Lock()
        self._worker = threading.local()
        """Per worker thread: ``after_reply``, the cleanups of the request it runs (``_after_reply``)."""
        self.requests = 0
        self.errors = 0
        self.reaped = 0
        self.refusals: dict[str, int] = {}
        """Requests refused by the security checks and resource caps, by reason (``/metrics``)."""
        groups = set(self.config.allowed_groups)
        if self.config.socket_group:
            groups.add(group_id(self.config.socket_group))
        self._policy = PeerPolicy(frozenset(self.config.allowed_uids), frozenset(groups))
        self._secret: bytes | None = self.config.secret
        self._pending_bytes = 0
        """Bytes of unfinished frames the direct connections announced (I/O thread only)."""
        self._next_expiry = 0.0
        self._warn = RateLimitedLog(logger)
        """Warnings a hostile client can trigger at will: at most one per topic and minute."""
        self._reaper: threading.Thread | None = None
        self._closed = False
        self._io_thread: int | None = None
        self._busy_until = 0.0
        """Until when the I/O thread polls without sleeping (see ``ServerConfig.busy_poll_s``)."""
        # Peers announcing more are disconnected; frames between the soft cap and this get an error
        # reply (see protocol.decode_request).
        self._hard_frame_cap = 2 * self.config.max_frame_bytes + (1 << 20)
        self._frame_cap = self.config.max_pending_bytes_per_connection or self._hard_frame_cap
        self._handlers: dict[type, Callable[[Any, Peer], Any]] = {
            P.Register: self._register,
            P.Unregister: self._unregister,
            P.Lookup: self._lookup,
            P.LookupHashes: self._lookup,
            P.Release: self._release,
            P.Store: self._store,
            P.Retrieve: self._retrieve,
            P.Clear: lambda req, peer: self.engine.clear(),
        }

    # ---- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Bind the sockets (raises :class:`ServerStartError` with a clear message on failure)."""
        self._load_secret()
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.MAXMSGSIZE, self._hard_frame_cap)
        host = self.config.host
        try:
            if ":" in host:
                sock.setsockopt(zmq.IPV6, 1)
                host = f"[{host}]"
            port = "*" if self.config.port == 0 else str(self.config.port)
            sock.bind(f"tcp://{host}:{port}")
            tcp = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            self.endpoints = [tcp]
            if self.config.ipc_path:
                self._prepare_ipc_path(self.config.ipc_path)
                with self._socket_umask():
                    sock.bind(f"ipc://{self.config.ipc_path}")
                self._created(self.config.ipc_path)
                self.endpoints.append(f"ipc://{self.config.ipc_path}")
            if self.config.direct_port is not None:
                self._listen_direct(self.config.direct_port)
        except zmq.ZMQError as e:
            sock.close(0)
            if e.errno == errno.EADDRINUSE:
                raise ServerStartError(
                    f"tcp port {self.config.port} on {self.config.host} is already in use (another lmcache "
                    "server?); stop it or pass another --port"
                ) from None
            raise ServerStartError(f"cannot bind the server's sockets: {e}") from None
        except BaseException:
            sock.close(0)
            self._close_listeners()
            raise
        self._sock = sock
        self._reaper = threading.Thread(target=self._reap_loop, name="lmcache-reaper", daemon=True)
        self._reaper.start()
        where = " and ".join(self.endpoints)
        if self.direct is not None:
            where += f" (direct lane: tcp port {self.direct.port}, ipc name {self.direct.ipc_name or '-'})"
        logger.info("LMCache server listening on %s", where)

    def _listen_direct(self, port: int) -> None:
        """Bind the direct lane: TCP on the ZMQ socket's host, and a Unix socket next to its ipc one."""
        host = self.config.host
        try:
            tcp = socket.create_server(
                (host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET
            )
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ServerStartError(
                    f"direct lane tcp port {port} on {host} is already in use; pass another --direct-port "
                    "(0: any free port)"
                ) from None
            raise ServerStartError(f"cannot bind the direct lane on {host}:{port}: {e}") from None
        self._listeners.append(tcp)
        self.direct = P.DirectLane(port=tcp.getsockname()[1])
        path = f"{self.config.ipc_path}{DIRECT_SUFFIX}" if self.config.ipc_path else ""
        if path and len(os.fsencode(path)) > 107:
            logger.warning("no direct lane on a Unix socket: %s is longer than 107 bytes", path)
        elif path:
            self._prepare_ipc_path(path)
            unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._listeners.append(unix)
            with self._socket_umask():
                unix.bind(path)
            self._created(path)
            unix.listen()
            self.direct.ipc_name = os.path.basename(path)
        for listener in self._listeners:
            listener.setblocking(False)

    def _load_secret(self) -> None:
        """Read (or create) the server secret; refuse a non-loopback bind without one."""
        if self._secret is None:
            try:
                self._secret = load_or_create_secret(self.config.secret_file)
            except SecretError as e:
                raise ServerStartError(str(e)) from None
        if self._secret is None and not _is_loopback(self.config.host):
            raise ServerStartError(
                f"refusing to listen on {self.config.host} without a secret: anyone who reaches the port "
                "could use the cache; give one (--secret-file, $LMCACHE_SERVER_SECRET) or bind 127.0.0.1"
            )

    @contextlib.contextmanager
    def _socket_umask(self) -> Iterator[None]:
        """Unix sockets are created 0600 (0660 with ``socket_group``): connecting needs write access."""
        old = os.umask(0o117 if self.config.socket_group else 0o177)
        try:
            yield
        finally:
            os.umask(old)

    def _created(self, path: str) -> None:
        try:
            if self.config.socket_group:
                os.chown(path, -1, group_id(self.config.socket_group))
            os.chmod(path, 0o660 if self.config.socket_group else 0o600)
        except (OSError, ValueError) as e:
            os.unlink(path)
            raise ServerStartError(f"cannot give {path} to group {self.config.socket_group}: {e}") from None
        st = os.stat(path)
        self._unix_sockets.append((path, (st.st_dev, st.st_ino)))

    @property
    def tcp_port(self) -> int:
        return int(self.endpoints[0].rsplit(":", 1)[1])

    @staticmethod
    def _prepare_ipc_path(path: str) -> None:
        if len(os.fsencode(path)) > 107:
            raise ServerStartError(
                f"--ipc-path {path!r} is longer than the 107 bytes a Unix socket path allows"
            )
        if os.path.lexists(path):
            st = os.lstat(path)
            if st.st_uid != os.geteuid():
                raise ServerStartError(
                    f"--ipc-path {path} exists and belongs to uid {st.st_uid}, not to this user: another "
                    "user may be impersonating the server; remove it (as root or that user) or pass another "
                    "--ipc-path"
                )
            if not stat.S_ISSOCK(st.st_mode):
                raise ServerStartError(
                    f"--ipc-path {path} exists and is not a socket; remove it or pick another"
                )
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            probe.settimeout(1.0)
            try:
                probe.connect(path)
            except (ConnectionRefusedError, FileNotFoundError):
                os.unlink(path)  # left behind by a server that died
            except OSError as e:
                raise ServerStartError(f"cannot check --ipc-path {path}: {e}") from None
            else:
                raise ServerStartError(
                    f"another process is serving on ipc://{path}; stop it, or pass another --ipc-path "
                    "(an empty --ipc-path disables the Unix socket)"
                )
            finally:
                probe.close()
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)

    def stop(self) -> None:
        """Ask :meth:`serve_forever` to return (thread- and signal-safe)."""
        self._stop.set()
        self._wake()

    def serve_forever(self) -> None:
        """Run the I/O loop until :meth:`stop`, then shut down cleanly."""
        if self._sock is None:
            self.start()
        assert self._sock is not None
        self._io_thread = threading.get_ident()
        self._poller = poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        for listener in self._listeners:
            self._fds[listener.fileno()] = listener
            poller.register(listener, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                try:
                    events = poller.poll(self._poll_timeout_ms())
                except zmq.ZMQError as e:
                    if e.errno == errno.EINTR:
                        continue
                    raise
                for what, event in events:
                    if what is self._sock:
                        self._receive_all()
                    elif what == self._wake_r:
                        self._drain_wake()
                    elif isinstance(conn := self._fds.get(what), _DirectConn):
                        self._serve_direct(conn, event)
                    elif conn is not None:
                        self._accept(conn)
                self._send_replies()
                self._expire_direct(time.monotonic())
        finally:
            self.close()

    def close(self) -> None:
        """Finish in-flight work, unmap every pool, close the sockets, remove the ipc file."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._executor.shutdown(wait=True)
        if self._sock is not None:
            self._send_replies()
        with self._ilock:
            instances = list(self._instances.values())
            self._instances.clear()
        for inst in instances:
            self._retire(inst, "server shutting down")
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None
        for conn in list(self._direct.values()):
            self._drop_direct(conn)
        self._close_listeners()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        logger.info("LMCache server stopped")

    def _close_listeners(self) -> None:
        for listener in self._listeners:
            listener.close()
        self._listeners.clear()
        for path, inode in self._unix_sockets:
            with contextlib.suppress(OSError):
                st = os.stat(path)
                if (st.st_dev, st.st_ino) == inode:  # not a successor's socket
                    os.unlink(path)
        self._unix_sockets.clear()

    # ---- I/O thread -----------------------------------------------------------------------------

    def _poll_timeout_ms(self) -> int:
        """0 (poll without sleeping) within ``busy_poll_s`` of a request while no worker runs, else
        500 ms. An awake thread answers the next call without a wake-up; never while a worker
        copies, as the two would fight for the GIL."""
        if self._running or time.monotonic() >= self._busy_until:
            return 500
        return 0

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"\0")

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self._wake_r, 4096):
                pass

    def _receive_all(self) -> None:
        assert self._sock is not None
        for _ in range(1024):
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            identity = frames[0].bytes
            if len(frames) != 2:
                self.requests += 1
                self._reply_error(
                    identity,
                    -1,
                    P.ErrorCode.MALFORMED,
                    f"expected exactly one frame per request, got {len(frames) - 1}; use a DEALER socket "
                    "and send one msgpack-encoded request per message",
                )
            else:
                self._on_frame(identity, frames[1].bytes, peer_of_zmq(frames[1].get("Peer-Address")))

    def _on_frame(self, identity: _Identity, frame: bytes, peer: Peer) -> None:
        try:
            self._on_request(identity, frame, peer)
        except Exception as e:  # never let one request take the I/O thread down
            logger.exception("internal error reading a request")
            message = f"internal server error: {type(e).__name__}"
            self._reply_error(identity, -1, P.ErrorCode.INTERNAL, message)

    def _refuse(self, reason: str) -> None:
        """Count a refusal for ``/metrics`` (any thread; a lost increment under a race is harmless)."""
        self.refusals[reason] = self.refusals.get(reason, 0) + 1

    def _admit(self, peer: Peer, req: Any) -> str | None:
        """Why ``peer`` may not send ``req`` (None: it may). ``ping`` is open to all; Unix-socket peers
        must pass the uid policy, TCP peers carry the server secret; ``stats`` and ``clear`` are the
        operator's (the server's own uid, root, or the secret over TCP)."""
        if isinstance(req, P.Ping):
            return None
        if peer.is_unix:
            if not self._policy.allows(peer):
                return f"uid {peer.uid} is not allowed to use this server (see --allow-uid / --socket-group)"
        elif not secret_matches(self._secret, req.auth):
            return (
                "TCP requests must carry this server's secret: run the client as the server's user (it reads "
                "~/.lmcache/server_secret) or set LMCACHE_SERVER_SECRET"
            )
        if isinstance(req, (P.Stats, P.Clear)) and not self._policy.is_operator(peer):
            return f"{type(req).__name__.lower()} is an operator operation (the server's own user or root)"
        return None

    def _on_request(self, identity: _Identity, frame: bytes, peer: Peer) -> None:
        self.requests += 1
        now = time.monotonic()
        self._busy_until = now + self.config.busy_poll_s
        try:
            req = P.decode_request(frame, self.config.max_frame_bytes)
        except P.ProtocolError as e:
            self._reply_error(identity, e.rid, e.code, str(e))
            return
        refused = self._admit(peer, req)
        if refused is not None:
            self._refuse("unauthorized")
            self._reply_error(identity, req.rid, P.ErrorCode.UNAUTHORIZED, refused)
            return
        self._touch(req, now)
        if isinstance(req, (P.Ping, P.Heartbeat)):  # liveness: never behind the client's queue
            self._post(identity, self._execute(req, now, peer))
            return
        inline = self._inline(req)
        with self._qlock:
            if inline and identity not in self._running:
                q = None  # nothing of this connection is queued or running: answering now keeps order
            else:
                q = self._queues.setdefault(identity, deque())
                if len(q) >= MAX_QUEUED_PER_CLIENT:
                    self._refuse("queue")
                    self._reply_error(
                        identity,
                        req.rid,
                        P.ErrorCode.LIMIT,
                        f"more than {len(q)} requests queued; slow down",
                    )
                    return
                q.append((req, now, peer))
                if identity in self._running:
                    return
                self._running.add(identity)
        if q is None:
            self._post(identity, self._execute(req, now, peer))
            return
        try:
            self._executor.submit(self._drain, identity)
        except RuntimeError:  # shutting down
            self._reply_error(identity, req.rid, P.ErrorCode.SHUTTING_DOWN, "the server is shutting down")

    def _inline(self, req: Any) -> bool:
        """Whether the I/O thread may run ``req`` itself: pure metadata work of bounded cost."""
        if isinstance(req, (P.Release, P.Stats)):  # stats in order: after the cleanups of earlier calls
            return True
        # With lower tiers a lookup that misses in L1 may read from disk or the network.
        if isinstance(req, P.Lookup):
            return self.engine.tiers is None and len(req.tokens) <= (
                8 * INLINE_LOOKUP_MAX_TOKENS if isinstance(req.tokens, bytes) else INLINE_LOOKUP_MAX_TOKENS
            )
        if isinstance(req, P.LookupHashes):
            return self.engine.tiers is None and req.num_tokens <= INLINE_LOOKUP_MAX_TOKENS
        return False

    def _reply_error(self, identity: _Identity, rid: int, code: P.ErrorCode, message: str) -> None:
        self.errors += 1
        logger.debug("request %d refused (%s): %s", rid, code.value, message)
        self._post(identity, P.Reply(rid=rid, ok=False, error=P.ErrorInfo(code.value, message)))

    def _post(self, identity: _Identity, reply: P.Reply) -> None:
        try:
            frame = P.encode(reply)
        except (TypeError, msgspec.EncodeError) as e:
            frame = P.encode(
                P.Reply(rid=reply.rid, ok=False, error=P.ErrorInfo(P.ErrorCode.INTERNAL.value, f"{e}"))
            )
        on_worker = threading.get_ident() != self._io_thread
        if on_worker and isinstance(identity, int) and (conn := self._direct.get(identity)) is not None:
            sent = conn.send_from_worker(P.DIRECT_HEADER.pack(len(frame)) + frame)
            if sent:
                return
            if sent is None:
                frame = b""  # tells the I/O thread to flush the rest
        self._replies.put((identity, frame))
        if on_worker:
            self._wake()

    def _send_replies(self) -> None:
        assert self._sock is not None
        while True:
            try:
                identity, frame = self._replies.get_nowait()
            except queue.Empty:
                return
            if isinstance(identity, int):
                conn = self._direct.get(identity)
                if conn is None:  # the client went away
                    continue
                if frame:
                    self._send_direct(conn, frame)
                else:  # a worker sent part of a reply: wait until the rest can go
                    with conn.lock:
                        if conn.outbox and not conn.closed:
                            self._poller.modify(conn.fd, zmq.POLLIN | zmq.POLLOUT)
                continue
            try:
                self._sock.send_multipart([identity, frame], zmq.NOBLOCK, copy=False)
            except zmq.ZMQError as e:  # the client went away (EHOSTUNREACH) or stopped reading (EAGAIN)
                logger.debug("dropping a reply to a gone client: %s", e)

    # ---- the direct lane (I/O thread) -------------------------------------------------------------

    def _accept(self, listener: socket.socket) -> None:
        assert self._poller is not None
        while True:
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # e.g. out of file descriptors: the client retries later
                logger.warning("cannot accept a direct connection: %s", e)
                return
            if len(self._direct) >= self.config.max_connections:
                self._refuse("connections")
                n = len(self._direct)
                self._warn.warning("connections", "closing direct connections: %d open, --max-connections", n)
                sock.close()
                continue
            peer = peer_of_socket(sock)
            if sock.family == socket.AF_UNIX and not self._policy.allows(peer):
                self._refuse("unauthorized")
                self._warn.warning("peer", "closing a direct connection of uid %s: not allowed", peer.uid)
                sock.close()
                continue
            sock.setblocking(False)
            if sock.family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _DirectConn(sock, next(self._direct_ids), peer, time.monotonic())
            self._direct[conn.ident] = conn
            self._fds[conn.fd] = conn
            self._poller.register(conn.fd, zmq.POLLIN)

    def _serve_direct(self, conn: _DirectConn, event: int) -> None:
        if event & zmq.POLLOUT:
            self._flush_direct(conn)
        if not event & (zmq.POLLIN | zmq.POLLERR) or conn.ident not in self._direct:
            return
        for _ in range(_DIRECT_READS):
            try:
                data = conn.sock.recv(_DIRECT_READ_BYTES)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:  # closed by the client (an unfinished frame is dropped with it)
                self._drop_direct(conn)
                return
            conn.last_rx = time.monotonic()
            conn.inbox += data
            if not self._direct_frames(conn) or len(data) < _DIRECT_READ_BYTES:
                return  # dropped, or nothing more to read now

    def _direct_frames(self, conn: _DirectConn) -> bool:
        """Serve the whole frames received; False if the connection was dropped for a bad length."""
        inbox = conn.inbox
        header = P.DIRECT_HEADER.size
        while len(inbox) >= header:
            (size,) = P.DIRECT_HEADER.unpack_from(inbox)
            if size > self._frame_cap:
                self._refuse("frame_bytes")
                self._warn.warning("frame", "dropping a direct connection that announced %d bytes", size)
                self._drop_direct(conn)
                return False
            if len(inbox) < header + size:
                if not self._reserve(conn, size):
                    return False
                break
            frame = bytes(inbox[header : header + size])
            del inbox[: header + size]
            self._unreserve(conn)
            self._on_frame(conn.ident, frame, conn.peer)
        return True

    def _reserve(self, conn: _DirectConn, size: int) -> bool:
        """Count an unfinished frame's announced size against ``max_pending_bytes``; over it, answer
        ``limit`` and drop the connection (False)."""
        if conn.reserved or size <= _DIRECT_READ_BYTES:
            return True
        if self._pending_bytes + size > self.config.max_pending_bytes:
            self._refuse("pending_bytes")
            message = (
                f"the server is receiving {self._pending_bytes} bytes of unfinished frames already "
                f"(--max-pending-mb); a frame of {size} bytes cannot be taken now: retry later"
            )
            self._send_direct(
                conn, P.encode(P.Reply(rid=-1, ok=False, error=P.ErrorInfo(P.ErrorCode.LIMIT.value, message)))
            )
            self._drop_direct(conn)
            return False
        conn.reserved = size
        self._pending_bytes += size
        return True

    def _unreserve(self, conn: _DirectConn) -> None:
        self._pending_bytes -= conn.reserved
        conn.reserved = 0

    def _expire_direct(self, now: float) -> None:
        """Close direct connections silent for ``idle_timeout_s``, or for ``frame_timeout_s`` mid-frame."""
        if now < self._next_expiry:
            return
        self._next_expiry = now + 1.0
        for conn in list(self._direct.values()):
            idle = now - conn.last_rx
            if idle > self.config.idle_timeout_s or (conn.inbox and idle > self.config.frame_timeout_s):
                self._refuse("idle")
                logger.debug("closing direct connection %d: idle for %.0f s", conn.ident, idle)
                self._drop_direct(conn)

    def _send_direct(self, conn: _DirectConn, frame: bytes) -> None:
        assert self._poller is not None
        data = P.DIRECT_HEADER.pack(len(frame)) + frame
        with conn.lock:
            if not conn.outbox:
                try:
                    sent = conn.sock.send(data)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError:
                    self._drop_direct(conn)
                    return
                if sent == len(data):
                    return
                self._poller.modify(conn.fd, zmq.POLLIN | zmq.POLLOUT)
                data = data[sent:]
            conn.outbox += data
            if len(conn.outbox) > self._hard_frame_cap:
                logger.warning("dropping a direct connection that does not read its replies")
                self._drop_direct(conn)

    def _flush_direct(self, conn: _DirectConn) -> None:
        assert self._poller is not None
        with conn.lock:
            try:
                sent = conn.sock.send(conn.outbox)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._drop_direct(conn)
                return
            del conn.outbox[:sent]
            if not conn.outbox:
                self._poller.modify(conn.fd, zmq.POLLIN)

    def _drop_direct(self, conn: _DirectConn) -> None:
        """Forget a direct connection; replies still due to it are dropped, as for a gone ZMQ peer."""
        if self._direct.pop(conn.ident, None) is None:
            return
        self._unreserve(conn)
        del self._fds[conn.fd]
        if self._poller is not None:
            self._poller.unregister(conn.fd)
        with conn.lock:  # no worker writes to the descriptor once closed (it may be reused)
            conn.closed = True
            conn.sock.close()

    def _touch(self, req: Any, now: float) -> None:
        """Note the liveness of the instances a request names with their capabilities."""
        if isinstance(req, P.Heartbeat):
            named = zip(req.instance_ids, req.caps, strict=False)
        else:
            named = [(getattr(req, "instance_id", None), getattr(req, "cap", None))]
        with self._ilock:
            for iid, cap in named:
                inst = self._instances.get(iid) if iid is not None else None
                if inst is not None and secret_matches(inst.cap, cap):
                    inst.last_seen = now

    # ---- workers --------------------------------------------------------------------------------

    def _drain(self, identity: _Identity) -> None:
        for _ in range(_DRAIN_BURST):
            with self._qlock:
                q = self._queues.get(identity)
                if not q:
                    self._running.discard(identity)
                    self._queues.pop(identity, None)
                    return
                req, received, peer = q.popleft()
            reply: P.Reply | None
            if self._stop.is_set():
                reply = P.Reply(
                    rid=req.rid,
                    ok=False,
                    error=P.ErrorInfo(P.ErrorCode.SHUTTING_DOWN.value, "the server is shutting down"),
                )
            else:
                after: list[Callable[[], None]] = []
                self._worker.after_reply = after
                try:
                    reply = self._execute(req, received, peer)
                finally:
                    self._worker.after_reply = None
                if after:
                    # The client's next request waits in this queue until the cleanup is done.
                    self._post(identity, reply)
                    self._run_after_reply(after)
                    reply = None
            with self._qlock:
                # Done before a reply without cleanups goes out: the client's next request may then
                # run inline.
                done = not self._queues.get(identity)
                if done:
                    self._running.discard(identity)
                    self._queues.pop(identity, None)
            if reply is not None:
                self._post(identity, reply)
            if done:
                return
        try:  # let other clients' queues run, then continue with this one
            self._executor.submit(self._drain, identity)
        except RuntimeError:
            self._executor_fallback(identity)

    def _after_reply(self, cleanup: Callable[[], None]) -> None:
        """Run ``cleanup`` once the reply of the request this worker runs is out (now, elsewhere):
        work the client need not wait for, still done before the client's next request runs."""
        pending = getattr(self._worker, "after_reply", None)
        if pending is None:
            cleanup()
        else:
            pending.append(cleanup)

    @staticmethod
    def _run_after_reply(cleanups: list[Callable[[], None]]) -> None:
        for cleanup in cleanups:
            try:
                cleanup()
            except Exception:
                logger.exception("cleanup after a reply")

    def _executor_fallback(self, identity: _Identity) -> None:
        """The executor is shutting down: answer what is left in this client's queue."""
        with self._qlock:
            q = self._queues.pop(identity, deque())
            self._running.discard(identity)
        for req, _, _ in q:
            self._reply_error(identity, req.rid, P.ErrorCode.SHUTTING_DOWN, "the server is shutting down")

    def _execute(self, req: Any, received: float, peer: Peer) -> P.Reply:
        if req.timeout_ms and (time.monotonic() - received) * 1000 > req.timeout_ms:
            self.errors += 1
            return P.Reply(
                rid=req.rid,
                ok=False,
                error=P.ErrorInfo(
                    P.ErrorCode.EXPIRED.value,
                    f"request waited longer than its timeout_ms={req.timeout_ms} and was not run",
                ),
            )
        try:
            if isinstance(req, P.Ping):
                value: Any = self._ping()
            elif isinstance(req, P.Heartbeat):
                value = self._heartbeat(req)
            elif isinstance(req, P.Stats):
                value = self.stats()
            else:
                value = self._handlers[type(req)](req, peer)
            return P.Reply(rid=req.rid, ok=True, value=value)
        except _Fail as e:
            code, message = e.code, str(e)
        except PoolSharingError as e:
            code, message = P.ErrorCode.BAD_POOL, str(e)
        except (ValueError, IndexError) as e:
            code, message = P.ErrorCode.INVALID, f"{type(req).__name__.lower()}: {e}"
        except Exception as e:
            logger.exception("internal error serving %s", type(req).__name__)
            code, message = P.ErrorCode.INTERNAL, f"internal server error: {type(e).__name__}"
        self.errors += 1
        logger.debug("request %d (%s) failed (%s): %s", req.rid, type(req).__name__, code.value, message)
        return P.Reply(rid=req.rid, ok=False, error=P.ErrorInfo(code.value, message))

    # ---- instances ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _use(self, instance_id: int, cap: bytes | None) -> Iterator[_Instance]:
        """The instance, held against unmapping; unknown unless ``cap`` is its capability."""
        with self._ilock:
            inst = self._instances.get(instance_id)
            if inst is not None and not secret_matches(inst.cap, cap):
                self._refuse("capability")
                inst = None  # the same answer as for an unknown id: nothing to learn from it
            if inst is None:
                raise _Fail(
                    P.ErrorCode.UNKNOWN_INSTANCE,
                    f"instance {instance_id} is not registered with this server (server {self.server_id}); "
                    "it restarted or reaped the client after "
                    f"{self.config.client_timeout_s:g} s without heartbeats: register the pool again",
                )
            inst.active += 1
        try:
            yield inst
        finally:
            with self._ilock:
                inst.active -= 1
                close_now = inst.retired and inst.active == 0
            if close_now:
                self._close_mapping(inst)

    def _retire_now(self, inst: _Instance, why: str) -> None:
        """Remove ``inst`` from the table (if still there) and retire it."""
        with self._ilock:
            if self._instances.get(inst.instance_id) is not inst:
                return
            del self._instances[inst.instance_id]
        self._retire(inst, why)

    def _retire(self, inst: _Instance, why: str) -> None:
        """Forget an instance (already removed from the table): release its pins, unmap its pool
        once no request is using it."""
        with self._ilock:
            inst.retired = True
            close_now = inst.active == 0
        with self._plock:
            owned = [key for key in self._pins if key[0] == inst.instance_id]
            for key in owned:
                del self._pins[key]
        for key in owned:
            self.engine.release(key)
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
            self._close_mapping(inst)

    @staticmethod
    def _close_mapping(inst: _Instance) -> None:
        try:
            if inst.stream is not None:
                inst.stream.synchronize()
            inst.pool.close()
        except Exception:
            logger.exception("closing the pool mapping of instance %d", inst.instance_id)

    # ---- handlers -------------------------------------------------------------------------------

    def _ping(self) -> P.PingInfo:
        return P.PingInfo(
            server_id=self.server_id,
            protocol_version=P.PROTOCOL_VERSION,
            chunk_size=self.engine.config.chunk_size,
            uptime_s=time.monotonic() - self.started,
            version=_package_version(),
            direct=self.direct,
        )

    def _heartbeat(self, req: P.Heartbeat) -> P.HeartbeatInfo:
        caps = req.caps + [b""] * (len(req.instance_ids) - len(req.caps))
        with self._ilock:
            unknown = [
                i
                for i, cap in zip(req.instance_ids, caps, strict=False)
                if (inst := self._instances.get(i)) is None or not secret_matches(inst.cap, cap)
            ]
        return P.HeartbeatInfo(server_id=self.server_id, unknown=unknown)

    def _check_room(self, client: tuple[str, int | str], replacing: _Instance | None) -> None:
        """Raise ``limit`` if one more registration of ``client`` exceeds a cap. Caller holds _ilock."""
        total = len(self._instances) - (replacing is not None)
        mine = sum(1 for i in self._instances.values() if i.client == client and i is not replacing)
        if total >= self.config.max_registrations:
            self._refuse("registrations")
            raise _Fail(
                P.ErrorCode.LIMIT,
                f"the server holds its maximum of {self.config.max_registrations} registrations "
                "(--max-registrations); unregister unused pools",
            )
        if mine >= self.config.max_registrations_per_client:
            self._refuse("registrations_per_client")
            raise _Fail(
                P.ErrorCode.LIMIT,
                f"this client holds its maximum of {self.config.max_registrations_per_client} registrations "
                "(--max-registrations-per-client); unregister unused pools",
            )

    def _register(self, req: P.Register, peer: Peer) -> P.RegisterInfo:
        if req.rank >= req.world_size:
            raise _Fail(P.ErrorCode.INVALID, f"rank {req.rank} is not below world_size {req.world_size}")
        client = _client_key(peer)
        with self._ilock:
            old = self._instances.get(req.instance_id)
            if old is not None and not secret_matches(old.cap, req.cap):
                self._refuse("capability")
                raise _Fail(
                    P.ErrorCode.UNAUTHORIZED,
                    f"instance id {req.instance_id} is registered by someone else; pick another id",
                )
            if old is not None and old.same_registration(req):
                old.last_seen = time.monotonic()
                return self._register_info(old, refreshed=True)
            self._check_room(client, old)
            if old is not None:
                del self._instances[req.instance_id]
        if old is not None:
            self._retire(old, "registered again with another pool")
        pool = open_pool(req.pool, peer)
        try:
            try:
                layout = PoolLayout.of_pool(pool.tensor, req.tokens_per_block)
                space = KeySpace(req.model_name, layout, req.world_size)
                self.engine.hasher(space)  # checks chunk_size against tokens_per_block
            except ValueError as e:
                raise _Fail(P.ErrorCode.BAD_POOL, f"pool rejected: {e}") from None
            stream = torch.cuda.Stream(device=pool.tensor.device) if pool.tensor.is_cuda else None
        except BaseException:
            pool.close()
            raise
        inst = _Instance(req, pool, space, stream, time.monotonic(), secrets.token_bytes(32), client)
        with self._ilock:
            clash = self._instances.get(req.instance_id)
            try:
                if clash is not None:
                    raise _Fail(P.ErrorCode.UNAUTHORIZED, f"instance id {req.instance_id} was just taken")
                self._check_room(client, None)
            except _Fail:
                self._close_mapping(inst)
                raise
            self._instances[req.instance_id] = inst
        logger.info(
            "registered instance %d: rank %d/%d of %s, %s pool %s %s (%d tokens/block) of pid %d",
            req.instance_id,
            req.rank,
            req.world_size,
            req.model_name,
            pool.kind,
            list(pool.tensor.shape),
            req.pool.dtype,
            req.tokens_per_block,
            req.pool.pid,
        )
        return self._register_info(inst, refreshed=False)

    def _register_info(self, inst: _Instance, refreshed: bool) -> P.RegisterInfo:
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
            direct=self.direct,
            cap=inst.cap,
        )

    def _unregister(self, req: P.Unregister, peer: Peer) -> bool:
        with self._ilock:
            inst = self._instances.get(req.instance_id)
            if inst is None or not secret_matches(inst.cap, req.cap):
                return False
            del self._instances[req.instance_id]
        self._retire(inst, "unregistered by the client")
        return True

    def _lookup(self, req: P.Lookup | P.LookupHashes, peer: Peer) -> int:
        with self._use(req.instance_id, req.cap) as inst:
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
                self._record_pins(inst, key, hit)
            return hit

    def _record_pins(self, inst: _Instance, key: tuple[int, int | str], hit: int) -> None:
        """Note the pins a lookup took; drop them and refuse if the instance's pins would hold more
        than ``pin_share`` of L1."""
        chunk_size = self.engine.config.chunk_size
        chunk_bytes = inst.space.layout.row_bytes * inst.space.layout.blocks_per_chunk(chunk_size)
        nbytes = -(-hit // chunk_size) * chunk_bytes * inst.world_size
        share = int(self.config.pin_share * self.engine.l1.arena.capacity_bytes)
        with self._plock:
            self._pins.pop(key, None)
            held = sum(st.nbytes for k, st in self._pins.items() if k[0] == key[0])
            over = held + nbytes > share
            if hit > 0 and not over:
                self._pins[key] = _PinState(inst.world_size, time.monotonic(), nbytes)
        if hit == 0 or over:
            self.engine.release(key)
        if hit > 0 and over:
            self._refuse("pinned_bytes")
            raise _Fail(
                P.ErrorCode.LIMIT,
                f"this lookup would pin {nbytes} bytes on top of the {held} the instance's lookups hold, "
                f"more than its share of L1 ({share} bytes, --pin-share {self.config.pin_share:g}); "
                "retrieve or release earlier lookups first",
            )

    def _pin_key(self, inst: _Instance, pin_owner: int | None, pin_id: int | str) -> tuple[int, int | str]:
        """The pins a request of ``inst`` may act on: its own lookup's, or those of ``pin_owner``, an
        instance of the same client, model and world (the scheduler's rank of a TP world)."""
        if pin_owner is None or pin_owner == inst.instance_id:
            return (inst.instance_id, pin_id)
        with self._ilock:
            owner = self._instances.get(pin_owner)
        if owner is None or (owner.client, owner.request.model_name, owner.world_size) != (
            inst.client,
            inst.request.model_name,
            inst.world_size,
        ):
            self._refuse("capability")
            raise _Fail(
                P.ErrorCode.UNAUTHORIZED,
                f"pin_owner {pin_owner} is not an instance of this client's world (same client, model and "
                "world size)",
            )
        return (pin_owner, pin_id)

    def _release(self, req: P.Release, peer: Peer) -> bool:
        with self._use(req.instance_id, req.cap) as inst:
            key = self._pin_key(inst, req.pin_owner, req.pin_id)
        with self._plock:
            held = self._pins.pop(key, None) is not None
        self.engine.release(key)
        return held

    def _transfer_args(
        self, req: P.Store | P.Retrieve, inst: _Instance
    ) -> BlockTransfer[np.ndarray | ChunkHashes]:
        """The request's transfer: its prompt (token ids, or the chunk hashes the client sent instead),
        salt, block ids and range."""
        blocks = P.ids_from_wire(req.block_ids, "block_ids")
        prompt: np.ndarray | ChunkHashes
        if req.chunk_hashes is not None:
            if len(req.tokens) or req.cache_salt is not None:
                raise _Fail(
                    P.ErrorCode.INVALID,
                    "send the prompt either as tokens (with cache_salt) or as chunk_hashes (the salt "
                    "folded in), not both",
                )
            digest_size = self.engine.hasher(inst.space).digest_size
            prompt = ChunkHashes.from_bytes(req.chunk_hashes, digest_size, self.engine.config.chunk_size)
            if req.start > req.end:
                raise _Fail(P.ErrorCode.INVALID, f"range [{req.start}, {req.end}) ends before it starts")
        else:
            prompt = P.ids_from_wire(req.tokens, "tokens")
            if not req.start <= req.end <= len(prompt):
                raise _Fail(
                    P.ErrorCode.INVALID,
                    f"range [{req.start}, {req.end}) is not within the request's {len(prompt)} tokens",
                )
        # Only the blocks the range touches are read; others may be -1 (no page, e.g. a passed window).
        num_blocks = inst.space.layout.num_blocks
        tpb = inst.space.layout.tokens_per_block
        used = blocks[req.start // tpb : -(-req.end // tpb)]
        if len(used) and (int(used.min()) < 0 or int(used.max()) >= num_blocks):
            raise _Fail(
                P.ErrorCode.INVALID,
                f"block ids must be in [0, {num_blocks}) (the registered pool's blocks); got min "
                f"{int(used.min())}, max {int(used.max())}",
            )
        if isinstance(req, P.Store) and len(np.unique(used)) != len(used):
            self._refuse("repeated_blocks")
            raise _Fail(P.ErrorCode.INVALID, "block ids repeat: each block of a prompt holds distinct tokens")
        self._check_pool(inst)
        return BlockTransfer(prompt, req.cache_salt, blocks.tolist(), req.start, req.end)

    def _check_pool(self, inst: _Instance) -> None:
        """Refuse (and drop) an instance whose shared memory no longer backs its pool."""
        try:
            inst.pool.check()
        except PoolSharingError as e:
            self._refuse("shrunk_pool")
            self._retire_now(inst, "its shared memory changed under the server")
            raise _Fail(P.ErrorCode.BAD_POOL, f"{e}; register the pool again") from None

    def _store(self, req: P.Store, peer: Peer) -> int:
        with self._use(req.instance_id, req.cap) as inst:
            transfer = self._transfer_args(req, inst)
            began = time.perf_counter()
            stored = self.engine.store(inst.space, inst.rank, inst.pool.tensor, transfer, inst.stream)
            self._copies_done(inst, "store", stored, began)  # the client may reuse the blocks then
            self._check_pool(inst)  # shrunk during the copy: what it read were zeros
            return stored

    def _retrieve(self, req: P.Retrieve, peer: Peer) -> int:
        with self._use(req.instance_id, req.cap) as inst:
            key = None if req.pin_id is None else self._pin_key(inst, req.pin_owner, req.pin_id)
            try:
                transfer = self._transfer_args(req, inst)
                began = time.perf_counter()
                loaded = self.engine.retrieve(inst.space, inst.rank, inst.pool.tensor, transfer, inst.stream)
                self._copies_done(inst, "retrieve", loaded, began)  # the blocks are in place then
                self._check_pool(inst)
                return loaded
            finally:
                if key is not None:  # the blocks are loaded (or the load failed): the pins may go
                    self._after_reply(functools.partial(self._rank_done, key, inst.rank))

    @staticmethod
    def _copies_done(inst: _Instance, op: str, tokens: int, began: float) -> None:
        """Wait for the instance's copies (CUDA pools); DEBUG-log where the call's time went."""
        enqueued = time.perf_counter()
        if inst.stream is not None:
            inst.stream.synchronize()
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "%s of %d tokens for instance %d: %.2f ms to enqueue, %.2f ms more until copied",
                op,
                tokens,
                inst.instance_id,
                (enqueued - began) * 1e3,
                (time.perf_counter() - enqueued) * 1e3,
            )

    def _rank_done(self, key: tuple[int, int | str], rank: int) -> None:
        """A rank has loaded: its pins of the lookup go now, the lookup's record once every rank of
        the world has loaded (or on release / owner reaped / TTL)."""
        self.engine.release(key, rank)
        with self._plock:
            state = self._pins.get(key)
            if state is None:
                return
            state.done.add(rank)
            if len(state.done) < state.world_size:
                return
            del self._pins[key]
        self.engine.release(key)

    # ---- liveness -------------------------------------------------------------------------------

    def _reap_loop(self) -> None:
        timeout = self.config.client_timeout_s
        interval = min(1.0, timeout / 4) if timeout > 0 else 1.0
        while not self._stop.wait(max(0.05, interval)):
            try:
                self.reap()
            except Exception:
                logger.exception("reaper")

    def reap(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        timeout = self.config.client_timeout_s
        dead: list[_Instance] = []
        if timeout > 0:
            with self._ilock:
                for iid, inst in list(self._instances.items()):
                    if now - inst.last_seen > timeout:
                        dead.append(self._instances.pop(iid))
        for inst in dead:
            self.reaped += 1
            self._retire(inst, f"no request or heartbeat for {now - inst.last_seen:.1f} s (client gone?)")
        ttl = self.config.pin_ttl_s
        if ttl > 0:
            with self._plock:
                stale = [key for key, st in self._pins.items() if now - st.created > ttl]
                for key in stale:
                    del self._pins[key]
            for key in stale:
                logger.warning("releasing pins of lookup %r: no retrieve or release within %g s", key, ttl)
                self.engine.release(key)

    # ---- stats ----------------------------------------------------------------------------------

    def stats(self) -> P.StatsInfo:
        engine, l1 = self.engine, self.engine.l1
        now = time.monotonic()
        with self._ilock:
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
                )
                for i in self._instances.values()
            ]
        with self._plock:
            pinned = len(self._pins)
        return P.StatsInfo(
            server_id=self.server_id,
            protocol_version=P.PROTOCOL_VERSION,
            uptime_s=now - self.started,
            chunk_size=engine.config.chunk_size,
            eviction_policy=l1.policy_name,
            l1_capacity_bytes=l1.arena.capacity_bytes,
            l1_reserved_bytes=l1.arena.reserved_bytes,
            l1_used_bytes=l1.used_bytes,
            l1_chunks=len(l1),
            l1_evictions=l1.evictions,
            pinned_lookups=pinned,
            refusals=dict(self.refusals),
            requests=self.requests,
            errors=self.errors,
            reaped_instances=self.reaped,
            engine={k: int(v) for k, v in asdict(engine.stats).items()},
            instances=instances,
        )


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


@functools.lru_cache(maxsize=1)
def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("lmcache-trtllm")
    except Exception:
        return "dev"
