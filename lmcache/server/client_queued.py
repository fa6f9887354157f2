"""The client's I/O-thread path: one ZMQ DEALER socket owned by a private thread.

Calls of any number of threads are handed to the thread, which pipelines them and matches the
replies by request id. It also tracks the connection: ``connected`` (from ZMQ's monitor events)
and ``down`` (a call timed out: the client fails fast until the connection is seen up again). A
reset (after a timeout, or when the server is seen back) recreates the socket: requests queued in
the old one are dropped, never delivered late, and callers of requests already sent on it fail at
once. ZMQ reconnects every :data:`RECONNECT_MS` in the background. Over ``ipc://`` replies from a
process of another user than this one or root are ignored.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import deque
from dataclasses import dataclass, field

import zmq
from zmq.utils.monitor import recv_monitor_message

from lmcache.logging import init_logger
from lmcache.server import framing
from lmcache.server import protocol as P
from lmcache.server.client_errors import ServerUnavailable, timed_out
from lmcache.server.security import peer_of_zmq, trusted_owner

logger = init_logger(__name__)

__all__ = ["QueuedPath", "RECONNECT_MS"]

RECONNECT_MS = 100
"""ZMQ's reconnect interval to a server that went away (no growing back-off)."""


@dataclass
class _Pending:
    frame: bytes
    op: str
    event: threading.Event = field(default_factory=threading.Event)
    reply: P.Reply | None = None
    failure: str | None = None
    sent: bool = False


class QueuedPath:
    """The DEALER socket and its I/O thread; see the module docstring."""

    def __init__(self, url: str, context: zmq.Context) -> None:
        self.url = url
        self.context = context
        self.check_owner = url.startswith("ipc://")
        self.connected = False
        """Whether ZMQ reports the connection up (the server may still be slow to answer)."""
        self.down = False
        """A call timed out and the connection was not seen up since: calls may fail fast."""
        self.reconnects = 0
        self._lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._outbox: deque[int] = deque()
        self._reset_requested = False
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._io = threading.Thread(target=self._io_loop, name="lmcache-client-io", daemon=True)
        self._io.start()

    def call(self, frame: bytes, rid: int, op: str, timeout: float) -> P.Reply:
        """Hand the request to the I/O thread and wait for its reply (ServerUnavailable if none)."""
        pending = _Pending(frame, op)
        with self._lock:
            self._pending[rid] = pending
            self._outbox.append(rid)
        self._wake()
        if not pending.event.wait(timeout):
            with self._lock:
                self._pending.pop(rid, None)
                if pending.sent:
                    self._reset_requested = True
                else:
                    with contextlib.suppress(ValueError):
                        self._outbox.remove(rid)
                self.down = True
            self._wake()
            raise timed_out(self.url, op, timeout)
        if pending.failure is not None:
            raise ServerUnavailable(f"{op} to {self.url} failed: {pending.failure}")
        assert pending.reply is not None
        return pending.reply

    def mark_down(self, *, reset: bool = False) -> None:
        """Fail fast until the connection is seen up; ``reset``: recreate the socket too."""
        with self._lock:
            self.down = True
            self._reset_requested = self._reset_requested or reset
        if reset:
            self._wake()

    def mark_up(self) -> None:
        """A reply came (on any path): the server is there."""
        self.down = False

    def reconnect_now(self) -> None:
        """The server is back: leave the fail-fast state and connect a fresh socket at once rather
        than at ZMQ's next reconnect attempt."""
        with self._lock:
            self.down = False
            self._reset_requested = True
        self._wake()

    def close(self) -> None:
        """Stop the thread; calls still waiting fail with "client closed"."""
        self._stop.set()
        self._wake()
        self._io.join(timeout=5)
        with self._lock:
            for pending in self._pending.values():
                pending.failure = "client closed"
                pending.event.set()
            self._pending.clear()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    # ---- the I/O thread -------------------------------------------------------------------------

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"\0")

    def _new_socket(self) -> tuple[zmq.Socket, zmq.Socket]:
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # never queue requests for a server that is not there
        sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_MS)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_MS)
        if self.url.startswith("tcp://["):
            sock.setsockopt(zmq.IPV6, 1)
        monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        sock.connect(self.url)
        return sock, monitor

    def _io_loop(self) -> None:
        sock, monitor = self._new_socket()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        want_out = False
        try:
            while not self._stop.is_set():
                with self._lock:
                    reset, self._reset_requested = self._reset_requested, False
                if reset:
                    poller.unregister(sock)
                    poller.unregister(monitor)
                    sock, monitor = self._reset(sock, monitor)
                    poller.register(sock, zmq.POLLIN)
                    poller.register(monitor, zmq.POLLIN)
                    want_out = False
                if bool(self._outbox) != want_out:
                    want_out = not want_out
                    poller.modify(sock, zmq.POLLIN | (zmq.POLLOUT if want_out else 0))
                events = dict(poller.poll(200))
                if self._wake_r in events:
                    with contextlib.suppress(BlockingIOError, OSError):
                        while os.read(self._wake_r, 4096):
                            pass
                if monitor in events:
                    self._on_monitor(monitor)
                if events.get(sock, 0) & zmq.POLLIN:
                    self._receive(sock)
                if self._outbox:
                    self._send(sock)
        except zmq.ZMQError as e:
            if not self._stop.is_set():
                logger.error("cache server client I/O thread stopped: %s", e)
        finally:
            with contextlib.suppress(Exception):
                sock.disable_monitor()
            monitor.close(0)
            sock.close(0)

    def _reset(self, sock: zmq.Socket, monitor: zmq.Socket) -> tuple[zmq.Socket, zmq.Socket]:
        """Drop the connection (and anything queued in it); fail requests already sent on it."""
        with contextlib.suppress(Exception):
            sock.disable_monitor()
        monitor.close(0)
        sock.close(0)
        with self._lock:
            for pending in self._pending.values():
                if pending.sent:
                    pending.failure = "connection reset after a timeout"
                    pending.event.set()
            self._pending = {rid: p for rid, p in self._pending.items() if not p.sent}
            self.connected = False
        self.reconnects += 1
        return self._new_socket()

    def _on_monitor(self, monitor: zmq.Socket) -> None:
        while True:
            try:
                msg = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if msg["event"] == zmq.EVENT_CONNECTED:
                self.connected = True
                self.down = False
            elif msg["event"] == zmq.EVENT_DISCONNECTED:
                # Requests already sent on the lost connection will never be answered: fail them now
                # instead of letting their callers wait for the timeout.
                with self._lock:
                    self.connected = False
                    lost = [rid for rid, p in self._pending.items() if p.sent]
                    for rid in lost:
                        pending = self._pending.pop(rid)
                        pending.failure = "connection to the server lost before it answered"
                        pending.event.set()

    def _receive(self, sock: zmq.Socket) -> None:
        while True:
            try:
                msg = sock.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if self.check_owner:
                uid = peer_of_zmq(msg.get("Peer-Address")).uid
                if uid is not None and not trusted_owner(uid):
                    logger.error("ignoring a reply on %s from uid %d (not this user or root)", self.url, uid)
                    continue
            try:
                reply = framing.decode_reply(msg.bytes)
            except framing.REPLY_DECODE_ERRORS as e:
                logger.warning("undecodable reply from the cache server at %s: %s", self.url, e)
                continue
            with self._lock:
                pending = self._pending.pop(reply.rid, None)
                self.down = False
            if pending is not None:
                pending.reply = reply
                pending.event.set()

    def _send(self, sock: zmq.Socket) -> None:
        while True:
            with self._lock:
                if not self._outbox:
                    return
                rid = self._outbox[0]
                pending = self._pending.get(rid)
                if pending is None:
                    self._outbox.popleft()
                    continue
            try:
                sock.send(pending.frame, zmq.NOBLOCK)
            except zmq.Again:
                return  # not connected yet: retried when the socket becomes writable
            with self._lock:
                pending.sent = True
                if self._outbox and self._outbox[0] == rid:
                    self._outbox.popleft()
