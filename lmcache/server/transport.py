"""The cache server's I/O loop: the only code that touches the client connections.

Clients connect to the seed's URLs (:mod:`lmcache.server.listeners`): ``tcp://host:port`` and
``ipc://path``, plain stream sockets carrying length-prefixed frames (:mod:`lmcache.server.framing`).
Each client holds a small pool of such connections, its *lanes*, one request in flight on each.
One thread (the caller of :meth:`ServerTransport.serve`) polls the listeners, every connection and
a wake-up pipe. It reads frames and hands them to the dispatcher with the connection's number and
its :class:`Peer`; it sends the replies that workers queue (a worker writes a reply itself when
nothing waits before it on that connection).

Connections are capped: count in total (``max_connections``) and per client
(``max_connections_per_client``; a client is a Unix peer's uid or a TCP peer's address), a
connection over a cap, or from a Unix peer the policy refuses, is answered one error frame (``limit``
or ``unauthorized``, rid -1) and closed; unfinished-frame bytes (per connection and in total); idle
and mid-frame timeouts. With ``busy_poll_s`` it polls without sleeping after a request while no
worker runs.

A TCP connection is *unproven* until one of its requests carries the server secret (the receiver
says which did): anyone who can reach the port can open one, and ``ping`` needs no secret. So that
such peers cannot crowd out the clients the server serves, an unproven connection is closed
``frame_timeout_s`` after it opened whatever it sends, gives way (oldest first, once
:data:`UNPROVEN_GRACE_S` old) to a new connection a cap would refuse, and its unfinished frames
take at most :data:`UNPROVEN_PENDING_SHARE` of ``max_pending_bytes`` together.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import select
import socket
import threading
import time
from collections import Counter
from typing import Protocol

from lmcache.logging import init_logger
from lmcache.rate_limit import RateLimitedLog
from lmcache.server import framing
from lmcache.server import protocol as P
from lmcache.server.dispatch import Identity
from lmcache.server.failures import ServerCounters
from lmcache.server.instances import ClientKey, client_key
from lmcache.server.listeners import Listeners
from lmcache.server.security import Peer, PeerPolicy, peer_of_socket
from lmcache.server.settings import ServerConfig

logger = init_logger(__name__)

__all__ = ["Connection", "FrameReceiver", "ServerTransport"]

READ_BYTES = 1 << 16
READS = 16
"""Reads of one connection per poll round (1 MiB), so others get their turn."""
UNPROVEN_GRACE_S = 1.0
"""How long a new unproven connection has to send its first request before a connection a cap would
refuse may take its place (a client sends one at once)."""
UNPROVEN_PENDING_SHARE = 0.25
"""Of ``max_pending_bytes``, what the unfinished frames of unproven connections may announce together."""
_IN = select.POLLIN | select.POLLPRI
_OUT = select.POLLOUT


class FrameReceiver(Protocol):
    """What the transport hands frames to (the dispatcher)."""

    def on_frames(self, frames: list[tuple[Identity, framing.Frame, Peer]]) -> set[Identity]:
        """Serve the frames read in one poll round, in the order the receiver chooses; the connections
        whose requests proved their sender (the server secret over TCP)."""

    def busy_poll(self, now: float) -> bool: ...

    def closed(self, identity: Identity) -> None:
        """The connection ``identity`` is gone: replies still due to it will be dropped."""


class Connection:
    """A client's connection (one lane): frames in and out, each behind its length, over a
    non-blocking stream socket served by the I/O thread."""

    def __init__(self, sock: socket.socket, ident: int, peer: Peer, now: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.ident = ident
        """The connection's identity in the dispatcher's per-connection queues."""
        self.peer = peer
        self.client = client_key(peer)
        """Whose connection it is (per-client caps)."""
        self.opened = now
        self.proven = sock.family == socket.AF_UNIX
        """Whether its sender is one the server serves: a Unix peer passed the policy as it connected;
        a TCP peer, once a request of its carried the secret (see the module docstring)."""
        self.last_rx = now
        """When a byte last arrived (idle and unfinished-frame timeouts)."""
        self.reserved = 0
        """Bytes of the unfinished frame counted against the server's total (``max_pending_bytes``)."""
        self.reserved_unproven = False
        """Whether ``reserved`` counts against the unproven connections' part of it too."""
        self.inbox = framing.FrameBuffer()
        self.outbox = bytearray()
        self.lock = threading.RLock()
        """Guards the socket's writes, ``outbox`` and ``closed``: workers send replies too."""
        self.closed = False

    def send_from_worker(self, data: bytes) -> bool | None:
        """Send a reply from a worker thread, sparing the I/O thread a wake-up: True if all of it
        went, None if part did and the rest waits in ``outbox`` for the I/O thread, False if nothing
        was sent (queue it for the I/O thread)."""
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


class ServerTransport:
    """The listeners, the connections and the I/O loop; see the module docstring."""

    def __init__(
        self,
        config: ServerConfig,
        counters: ServerCounters,
        receiver: FrameReceiver,
        listeners: Listeners,
        policy: PeerPolicy,
    ) -> None:
        self.config = config
        self.counters = counters
        self.receiver = receiver
        self.listeners = listeners
        self.policy = policy
        self.hard_frame_cap = framing.hard_frame_cap(config.max_frame_bytes)
        self._frame_cap = config.max_pending_bytes_per_connection or self.hard_frame_cap
        self._conns: dict[int, Connection] = {}
        self._per_client: Counter[ClientKey] = Counter()
        self._fds: dict[int, Connection | socket.socket] = {}
        """What the poller's file descriptors are (it reports them as ints)."""
        self._ids = itertools.count(1)
        self._poller = select.poll()
        self._replies: queue.SimpleQueue[tuple[Identity, bytes]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._pending_bytes = 0
        """Bytes of unfinished frames the connections announced (I/O thread only)."""
        self._unproven_pending_bytes = 0
        """The part of ``_pending_bytes`` unproven connections announced."""
        self._next_expiry = 0.0
        self._warn = RateLimitedLog(logger)
        """Warnings a hostile client can trigger at will: at most one per topic and minute."""
        self.io_thread: int | None = None
        """The thread id of the I/O loop (None until it runs)."""

    @property
    def bound(self) -> bool:
        return self.listeners.bound

    @property
    def connections(self) -> int:
        """Open client connections."""
        return len(self._conns)

    def bind(self) -> None:
        """Bind the listening sockets (raises ``ServerStartError``)."""
        self.listeners.bind()

    def poll_timeout_ms(self) -> int:
        """0 (poll without sleeping) while the dispatcher asks for busy polling, else 500 ms."""
        return 0 if self.receiver.busy_poll(time.monotonic()) else 500

    def wake(self) -> None:
        """Make the I/O loop look at its queues now (any thread, signal-safe)."""
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"\0")

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self._wake_r, 4096):
                pass

    def serve(self, stop: threading.Event) -> None:
        """Run the I/O loop on this thread until ``stop`` is set (then call :meth:`wake`)."""
        assert self.bound, "bind() first"
        self.io_thread = threading.get_ident()
        poller = self._poller
        poller.register(self._wake_r, _IN)
        for listener in self.listeners.sockets:
            self._fds[listener.fileno()] = listener
            poller.register(listener, _IN)
        while not stop.is_set():
            try:
                events = poller.poll(self.poll_timeout_ms())
            except InterruptedError:
                continue
            frames: list[tuple[Identity, framing.Frame, Peer]] = []
            for fd, event in events:
                if fd == self._wake_r:
                    self._drain_wake()
                elif isinstance(conn := self._fds.get(fd), Connection):
                    self._serve(conn, event, frames)
                elif conn is not None:
                    self._accept(conn)
            if frames:
                self._proven(self.receiver.on_frames(frames))
            self.flush()
            self._expire(time.monotonic())
        self._serve_received(poller)

    def _proven(self, identities: set[Identity]) -> None:
        """These connections' requests proved their sender: they are no longer unproven."""
        for identity in identities:
            if (conn := self._conns.get(identity)) is not None:
                conn.proven = True

    def _serve_received(self, poller: select.poll) -> None:
        """On stopping: serve the requests already received (one-way reports among them finish what a
        client did before the stop: the stores it copied), accepting no new connection."""
        frames: list[tuple[Identity, framing.Frame, Peer]] = []
        with contextlib.suppress(InterruptedError):
            for fd, event in poller.poll(0):
                if isinstance(conn := self._fds.get(fd), Connection):
                    self._serve(conn, event, frames)
        if frames:
            self.receiver.on_frames(frames)

    def close(self) -> None:
        """Send what is queued, then close every socket and remove the socket files."""
        if self.bound:
            self.flush()
        for conn in list(self._conns.values()):
            self._drop(conn)
        self.listeners.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    # ---- replies --------------------------------------------------------------------------------

    def post(self, identity: Identity, reply: P.Reply) -> None:
        """Send ``reply`` to ``identity`` (any thread; dropped if the client went away)."""
        frame = framing.encode_reply(reply)
        on_worker = threading.get_ident() != self.io_thread
        if not on_worker:  # an inline reply goes at once, after those queued before it
            self.flush()
            if (conn := self._conns.get(identity)) is not None:
                self._send(conn, frame)
            return
        if (conn := self._conns.get(identity)) is not None:
            sent = conn.send_from_worker(framing.framed(frame))
            if sent:
                return
            if sent is None:
                frame = b""  # tells the I/O thread to flush the rest
        self._replies.put((identity, frame))
        self.wake()

    def flush(self) -> None:
        """Send the queued replies (I/O thread)."""
        while True:
            try:
                identity, frame = self._replies.get_nowait()
            except queue.Empty:
                return
            conn = self._conns.get(identity)
            if conn is None:  # the client went away
                continue
            if frame:
                self._send(conn, frame)
            else:  # a worker sent part of a reply: wait until the rest can go
                with conn.lock:
                    if conn.outbox and not conn.closed:
                        self._poller.modify(conn.fd, _IN | _OUT)

    # ---- connections ----------------------------------------------------------------------------

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # e.g. out of file descriptors: the client retries later
                logger.warning("cannot accept a connection: %s", e)
                return
            peer = peer_of_socket(sock)
            refusal = self._refusal(sock, peer, time.monotonic())
            if refusal is not None:
                code, message = refusal
                with contextlib.suppress(OSError):  # best effort: the client reads why, then EOF
                    sock.setblocking(False)
                    sock.send(framing.framed(framing.encode_reply(framing.error_reply(-1, code, message))))
                sock.close()
                continue
            sock.setblocking(False)
            if sock.family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Connection(sock, next(self._ids), peer, time.monotonic())
            self._conns[conn.ident] = conn
            self._per_client[conn.client] += 1
            self._fds[conn.fd] = conn
            self._poller.register(conn.fd, _IN)

    def _refusal(self, sock: socket.socket, peer: Peer, now: float) -> tuple[P.ErrorCode, str] | None:
        """Why a new connection is refused (its error code and message), or None; where a cap would
        refuse it, an unproven connection past its grace gives way first."""
        if sock.family == socket.AF_UNIX and not self.policy.allows(peer):
            self.counters.refuse("unauthorized")
            self._warn.warning("peer", "closing a connection of uid %s: not allowed", peer.uid)
            return P.ErrorCode.UNAUTHORIZED, (
                f"uid {peer.uid} is not allowed to use this server (see --allow-uid / --socket-group)"
            )
        if len(self._conns) >= self.config.max_connections and not self._give_way(now, None):
            self.counters.refuse("connections")
            self._warn.warning(
                "connections", "refusing connections: %d open, --max-connections", len(self._conns)
            )
            return P.ErrorCode.LIMIT, (
                f"the server has its maximum of {self.config.max_connections} connections open "
                "(--max-connections); close idle clients or raise the cap"
            )
        client = client_key(peer)
        mine = self._per_client[client]
        if mine >= self.config.max_connections_per_client and not self._give_way(now, client):
            self.counters.refuse("connections_per_client")
            self._warn.warning("connections_per_client", "refusing a connection: a client has %d open", mine)
            return P.ErrorCode.LIMIT, (
                f"this client (a Unix peer's uid, a TCP peer's address) has its maximum of "
                f"{self.config.max_connections_per_client} connections open (--max-connections-per-client); "
                "use fewer lanes per client (CacheServerClient(lanes=...)) or raise the cap"
            )
        return None

    def _give_way(self, now: float, client: ClientKey | None) -> bool:
        """Close the oldest unproven connection (of ``client``, unless None) past its grace, making room
        for a new one; False if there is none."""
        oldest = min(
            (
                conn
                for conn in self._conns.values()
                if not conn.proven
                and now - conn.opened >= UNPROVEN_GRACE_S
                and (client is None or conn.client == client)
            ),
            key=lambda conn: conn.opened,
            default=None,
        )
        if oldest is None:
            return False
        self._close_unproven(oldest, "closed to make room for another connection")
        return True

    def _close_unproven(self, conn: Connection, why: str) -> None:
        self.counters.refuse("unproven")
        self._warn.warning("unproven", "%s: a TCP connection sent no request with the server secret", why)
        message = (
            f"{why}: no request on this connection carried this server's secret; run the client as the "
            "server's user (it reads ~/.lmcache/server_secret) or set LMCACHE_SERVER_SECRET"
        )
        self._send(conn, framing.encode_reply(framing.error_reply(-1, P.ErrorCode.UNAUTHORIZED, message)))
        self._drop(conn)

    def _serve(
        self, conn: Connection, event: int, frames: list[tuple[Identity, framing.Frame, Peer]]
    ) -> None:
        """Read what ``conn`` sent; its whole frames go to ``frames``."""
        if event & _OUT:
            self._flush(conn)
        if not event & (_IN | select.POLLERR | select.POLLHUP) or conn.ident not in self._conns:
            return
        for _ in range(READS):
            try:
                data = conn.sock.recv(READ_BYTES)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:  # closed by the client (an unfinished frame is dropped with it)
                self._drop(conn)
                return
            conn.last_rx = time.monotonic()
            conn.inbox.feed(data)
            if not self._frames(conn, frames) or len(data) < READ_BYTES:
                return  # dropped, or nothing more to read now

    def _frames(self, conn: Connection, frames: list[tuple[Identity, framing.Frame, Peer]]) -> bool:
        """Take the whole frames received into ``frames``; False if the connection was dropped for a
        bad length."""
        while (size := conn.inbox.announced()) is not None:
            if size > self._frame_cap:
                self.counters.refuse("frame_bytes")
                self._warn.warning("frame", "dropping a connection that announced %d bytes", size)
                message = (
                    f"a frame of {size} bytes announced, over this server's cap of {self._frame_cap} "
                    "(--max-frame-mb): split the request"
                )
                self._send(
                    conn, framing.encode_reply(framing.error_reply(-1, P.ErrorCode.TOO_LARGE, message))
                )
                self._drop(conn)
                return False
            frame = conn.inbox.pop()
            if frame is None:
                return self._reserve(conn, size)
            self._unreserve(conn)
            frames.append((conn.ident, frame, conn.peer))
        return True

    def _reserve(self, conn: Connection, size: int) -> bool:
        """Count an unfinished frame's announced size against ``max_pending_bytes``; over it, answer
        ``limit`` and drop the connection (False)."""
        if conn.reserved or size <= READ_BYTES:
            return True
        unproven_cap = int(UNPROVEN_PENDING_SHARE * self.config.max_pending_bytes)
        if self._pending_bytes + size > self.config.max_pending_bytes or (
            not conn.proven and self._unproven_pending_bytes + size > unproven_cap
        ):
            self.counters.refuse("pending_bytes")
            message = (
                f"the server is receiving {self._pending_bytes} bytes of unfinished frames already "
                f"(--max-pending-mb; a connection whose requests have not carried the server secret yet, "
                f"{unproven_cap} together); a frame of {size} bytes cannot be taken now: retry later"
            )
            self._send(conn, framing.encode_reply(framing.error_reply(-1, P.ErrorCode.LIMIT, message)))
            self._drop(conn)
            return False
        conn.reserved = size
        conn.reserved_unproven = not conn.proven
        self._pending_bytes += size
        self._unproven_pending_bytes += size if conn.reserved_unproven else 0
        return True

    def _unreserve(self, conn: Connection) -> None:
        self._pending_bytes -= conn.reserved
        self._unproven_pending_bytes -= conn.reserved if conn.reserved_unproven else 0
        conn.reserved = 0
        conn.reserved_unproven = False

    def _expire(self, now: float) -> None:
        """Close connections silent for ``idle_timeout_s``, or for ``frame_timeout_s`` mid-frame, and
        unproven ones ``frame_timeout_s`` after they opened."""
        if now < self._next_expiry:
            return
        self._next_expiry = now + 1.0
        for conn in list(self._conns.values()):
            if not conn.proven and now - conn.opened > self.config.frame_timeout_s:
                self._close_unproven(conn, f"closed {self.config.frame_timeout_s:g} s after it opened")
                continue
            idle = now - conn.last_rx
            if idle > self.config.idle_timeout_s or (conn.inbox and idle > self.config.frame_timeout_s):
                self.counters.refuse("idle")
                logger.debug("closing connection %d: idle for %.0f s", conn.ident, idle)
                self._drop(conn)

    def _send(self, conn: Connection, frame: bytes) -> None:
        data = framing.framed(frame)
        with conn.lock:
            if not conn.outbox:
                try:
                    sent = conn.sock.send(data)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError:
                    self._drop(conn)
                    return
                if sent == len(data):
                    return
                self._poller.modify(conn.fd, _IN | _OUT)
                data = data[sent:]
            conn.outbox += data
            if len(conn.outbox) > self.hard_frame_cap:
                logger.warning("dropping a connection that does not read its replies")
                self._drop(conn)

    def _flush(self, conn: Connection) -> None:
        with conn.lock:
            try:
                sent = conn.sock.send(conn.outbox)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._drop(conn)
                return
            del conn.outbox[:sent]
            if not conn.outbox:
                self._poller.modify(conn.fd, _IN)

    def _drop(self, conn: Connection) -> None:
        """Forget a connection; replies still due to it are dropped."""
        if self._conns.pop(conn.ident, None) is None:
            return
        self._per_client[conn.client] -= 1
        if not self._per_client[conn.client]:
            del self._per_client[conn.client]
        self._unreserve(conn)
        del self._fds[conn.fd]
        self._poller.unregister(conn.fd)
        with conn.lock:  # no worker writes to the descriptor once closed (it may be reused)
            conn.closed = True
            conn.sock.close()
        self.receiver.closed(conn.ident)
