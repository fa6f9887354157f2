"""The cache server's I/O loop: the only code that touches the client connections.

One thread (the caller of :meth:`ServerTransport.serve`) polls the ROUTER socket, the direct
lane's listeners and connections, and a wake-up pipe, all in one poller. It reads frames (ZMQ
messages, or length-prefixed frames of a direct connection, see :mod:`lmcache.server.framing`) and
hands them to the dispatcher with the sender's identity and :class:`Peer`; it sends the replies
that workers queue (a worker writes a direct-lane reply itself when nothing waits before it on
that connection). Direct connections are capped: count (``max_connections``), unfinished-frame
bytes (per connection and in total), idle and mid-frame timeouts. With ``busy_poll_s`` it polls
without sleeping after a request while no worker runs.

Swapping the transport (e.g. a pool of direct lanes per client instead of ZMQ) touches this module
and :mod:`lmcache.server.listeners` only: the dispatcher sees identities, frames and peers.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import queue
import socket
import threading
import time
from typing import Protocol

import zmq

from lmcache.logging import init_logger
from lmcache.rate_limit import RateLimitedLog
from lmcache.server import framing
from lmcache.server import protocol as P
from lmcache.server.dispatch import Identity
from lmcache.server.failures import ServerCounters
from lmcache.server.listeners import Listeners
from lmcache.server.security import Peer, PeerPolicy, peer_of_socket, peer_of_zmq
from lmcache.server.settings import ServerConfig

logger = init_logger(__name__)

__all__ = ["DirectConn", "FrameReceiver", "ServerTransport"]

DIRECT_READ_BYTES = 1 << 16
DIRECT_READS = 16
"""Reads of one direct connection per poll round (1 MiB), so others get their turn."""


class FrameReceiver(Protocol):
    """What the transport hands frames to (the dispatcher)."""

    def on_frame(self, identity: Identity, frame: bytes, peer: Peer) -> None: ...

    def reply_error(self, identity: Identity, rid: int, code: P.ErrorCode, message: str) -> None: ...

    def busy_poll(self, now: float) -> bool: ...


class DirectConn:
    """A client's connection on the direct lane: frames in and out, each behind its length, over a
    non-blocking stream socket served by the I/O thread."""

    def __init__(self, sock: socket.socket, ident: int, peer: Peer, now: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.ident = ident
        """The connection's identity in the per-connection queues (ZMQ's are bytes, these ints)."""
        self.peer = peer
        self.last_rx = now
        """When a byte last arrived (idle and unfinished-frame timeouts)."""
        self.reserved = 0
        """Bytes of the unfinished frame counted against the server's total (``max_pending_bytes``)."""
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
    """The ROUTER socket, the direct lane and the I/O loop; see the module docstring."""

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
        self._sock: zmq.Socket | None = None
        self._direct: dict[int, DirectConn] = {}
        self._fds: dict[int, DirectConn | socket.socket] = {}
        """What the poller's native file descriptors are (it reports them as ints)."""
        self._direct_ids = itertools.count(1)
        self._poller: zmq.Poller | None = None
        self._replies: queue.SimpleQueue[tuple[Identity, bytes]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._pending_bytes = 0
        """Bytes of unfinished frames the direct connections announced (I/O thread only)."""
        self._next_expiry = 0.0
        self._warn = RateLimitedLog(logger)
        """Warnings a hostile client can trigger at will: at most one per topic and minute."""
        self.io_thread: int | None = None
        """The thread id of the I/O loop (None until it runs)."""

    @property
    def bound(self) -> bool:
        return self._sock is not None

    def bind(self) -> None:
        """Bind the listening sockets (raises ``ServerStartError``)."""
        self._sock = self.listeners.bind(self.hard_frame_cap)

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
        assert self._sock is not None, "bind() first"
        self.io_thread = threading.get_ident()
        self._poller = poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        for listener in self.listeners.direct_listeners:
            self._fds[listener.fileno()] = listener
            poller.register(listener, zmq.POLLIN)
        while not stop.is_set():
            try:
                events = poller.poll(self.poll_timeout_ms())
            except zmq.ZMQError as e:
                if e.errno == errno.EINTR:
                    continue
                raise
            for what, event in events:
                if what is self._sock:
                    self._receive_all()
                elif what == self._wake_r:
                    self._drain_wake()
                elif isinstance(conn := self._fds.get(what), DirectConn):
                    self._serve_direct(conn, event)
                elif conn is not None:
                    self._accept(conn)
            self.flush()
            self._expire_direct(time.monotonic())

    def close(self) -> None:
        """Send what is queued, then close every socket and remove the socket files."""
        if self._sock is not None:
            self.flush()
            self._sock.close(0)
            self._sock = None
        for conn in list(self._direct.values()):
            self._drop_direct(conn)
        self.listeners.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    # ---- replies --------------------------------------------------------------------------------

    def post(self, identity: Identity, reply: P.Reply) -> None:
        """Send ``reply`` to ``identity`` (any thread; dropped if the client went away)."""
        frame = framing.encode_reply(reply)
        on_worker = threading.get_ident() != self.io_thread
        if on_worker and isinstance(identity, int) and (conn := self._direct.get(identity)) is not None:
            sent = conn.send_from_worker(framing.framed(frame))
            if sent:
                return
            if sent is None:
                frame = b""  # tells the I/O thread to flush the rest
        self._replies.put((identity, frame))
        if on_worker:
            self.wake()

    def flush(self) -> None:
        """Send the queued replies (I/O thread)."""
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
                        if conn.outbox and not conn.closed and self._poller is not None:
                            self._poller.modify(conn.fd, zmq.POLLIN | zmq.POLLOUT)
                continue
            try:
                self._sock.send_multipart([identity, frame], zmq.NOBLOCK, copy=False)
            except zmq.ZMQError as e:  # the client went away (EHOSTUNREACH) or stopped reading (EAGAIN)
                logger.debug("dropping a reply to a gone client: %s", e)

    # ---- ZMQ --------------------------------------------------------------------------------------

    def _receive_all(self) -> None:
        assert self._sock is not None
        for _ in range(1024):
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            identity = frames[0].bytes
            if len(frames) != 2:
                self.counters.requests += 1
                self.receiver.reply_error(
                    identity,
                    -1,
                    P.ErrorCode.MALFORMED,
                    f"expected exactly one frame per request, got {len(frames) - 1}; use a DEALER socket "
                    "and send one msgpack-encoded request per message",
                )
            else:
                self.receiver.on_frame(identity, frames[1].bytes, peer_of_zmq(frames[1].get("Peer-Address")))

    # ---- the direct lane ------------------------------------------------------------------------

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
                self.counters.refuse("connections")
                n = len(self._direct)
                self._warn.warning("connections", "closing direct connections: %d open, --max-connections", n)
                sock.close()
                continue
            peer = peer_of_socket(sock)
            if sock.family == socket.AF_UNIX and not self.policy.allows(peer):
                self.counters.refuse("unauthorized")
                self._warn.warning("peer", "closing a direct connection of uid %s: not allowed", peer.uid)
                sock.close()
                continue
            sock.setblocking(False)
            if sock.family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = DirectConn(sock, next(self._direct_ids), peer, time.monotonic())
            self._direct[conn.ident] = conn
            self._fds[conn.fd] = conn
            self._poller.register(conn.fd, zmq.POLLIN)

    def _serve_direct(self, conn: DirectConn, event: int) -> None:
        if event & zmq.POLLOUT:
            self._flush_direct(conn)
        if not event & (zmq.POLLIN | zmq.POLLERR) or conn.ident not in self._direct:
            return
        for _ in range(DIRECT_READS):
            try:
                data = conn.sock.recv(DIRECT_READ_BYTES)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:  # closed by the client (an unfinished frame is dropped with it)
                self._drop_direct(conn)
                return
            conn.last_rx = time.monotonic()
            conn.inbox.feed(data)
            if not self._direct_frames(conn) or len(data) < DIRECT_READ_BYTES:
                return  # dropped, or nothing more to read now

    def _direct_frames(self, conn: DirectConn) -> bool:
        """Serve the whole frames received; False if the connection was dropped for a bad length."""
        while (size := conn.inbox.announced()) is not None:
            if size > self._frame_cap:
                self.counters.refuse("frame_bytes")
                self._warn.warning("frame", "dropping a direct connection that announced %d bytes", size)
                self._drop_direct(conn)
                return False
            frame = conn.inbox.pop()
            if frame is None:
                return self._reserve(conn, size)
            self._unreserve(conn)
            self.receiver.on_frame(conn.ident, frame, conn.peer)
        return True

    def _reserve(self, conn: DirectConn, size: int) -> bool:
        """Count an unfinished frame's announced size against ``max_pending_bytes``; over it, answer
        ``limit`` and drop the connection (False)."""
        if conn.reserved or size <= DIRECT_READ_BYTES:
            return True
        if self._pending_bytes + size > self.config.max_pending_bytes:
            self.counters.refuse("pending_bytes")
            message = (
                f"the server is receiving {self._pending_bytes} bytes of unfinished frames already "
                f"(--max-pending-mb); a frame of {size} bytes cannot be taken now: retry later"
            )
            self._send_direct(conn, framing.encode_reply(framing.error_reply(-1, P.ErrorCode.LIMIT, message)))
            self._drop_direct(conn)
            return False
        conn.reserved = size
        self._pending_bytes += size
        return True

    def _unreserve(self, conn: DirectConn) -> None:
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
                self.counters.refuse("idle")
                logger.debug("closing direct connection %d: idle for %.0f s", conn.ident, idle)
                self._drop_direct(conn)

    def _send_direct(self, conn: DirectConn, frame: bytes) -> None:
        assert self._poller is not None
        data = framing.framed(frame)
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
            if len(conn.outbox) > self.hard_frame_cap:
                logger.warning("dropping a direct connection that does not read its replies")
                self._drop_direct(conn)

    def _flush_direct(self, conn: DirectConn) -> None:
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

    def _drop_direct(self, conn: DirectConn) -> None:
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
