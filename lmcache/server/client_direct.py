"""The client's direct lane: calls sent over a plain stream socket to the server's direct lane
(see :mod:`lmcache.server.protocol`), each waited for in the calling thread, with no hand-off
between threads and no ZMQ I/O thread on either end.

:class:`DirectPath` holds one connection, used by one call at a time (a caller that finds it busy
takes the I/O-thread path instead). The lane's address comes with the reply to ``register`` or
``ping`` (:meth:`DirectPath.learn`); it is used once a ping on it reached the same server. A lane
that cannot be opened is tried again after a growing pause (up to a minute). A call that times out
closes the lane, so its reply can never arrive late. Over ``ipc://`` a lane served by another user
than this one or root is refused. :func:`server_listening` probes whether the server's address
accepts connections (the client's fail-fast policy).
"""

from __future__ import annotations

import contextlib
import math
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgspec

from lmcache.logging import init_logger
from lmcache.server import framing
from lmcache.server import protocol as P
from lmcache.server.client_errors import ServerUnavailable, timed_out
from lmcache.server.security import peer_of_socket, trusted_owner

logger = init_logger(__name__)

__all__ = ["DirectConnection", "DirectPath", "Prober"]

POLL_S = 0.05
"""A direct call checks for a closed client this often while it waits."""
CONNECT_S = 1.0
"""Longest wait to open the direct lane (connect, then a ping on it)."""
RETRY_MIN_S = 0.1
RETRY_MAX_S = 60.0
SPIN_S = 200e-6
"""How long a direct call spins for its reply before it sleeps (see :class:`DirectConnection`)."""
PROBE_S = 0.05
"""Longest a fail-fast call waits to learn whether the server's address accepts connections again."""
PROBE_QUIET_S = 1.0
"""After a probe nobody answered (a host that drops packets), calls skip probing this long."""


def _ms(seconds: float) -> int:
    """A poll timeout in whole milliseconds, rounded up (0 would not wait at all)."""
    return max(1, math.ceil(seconds * 1000))


class DirectConnection:
    """The client end of a direct connection: one request in flight, frames behind their length.

    The socket is non-blocking: a reply is first awaited by spinning on ``recv`` for up to
    ``SPIN_S``, then by ``poll``. A short call's reply comes back within that, before this thread
    sleeps: waking a sleeping thread costs more than a whole short call on some hosts.
    """

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._readable = select.poll()
        self._readable.register(sock, select.POLLIN)
        self._inbox = framing.FrameBuffer()

    def stale(self) -> bool:
        """Whether something arrived while no request was in flight: the server closed the lane."""
        return bool(self._readable.poll(0))

    def send(self, frame: bytes, timeout: float) -> None:
        """Send one frame; TimeoutError if the server does not take it within ``timeout``."""
        data = memoryview(framing.framed(frame))
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(BlockingIOError):
                data = data[self.sock.send(data) :]
            if not data:
                return
            writable = select.poll()
            writable.register(self.sock, select.POLLOUT)
            if not writable.poll(_ms(deadline - time.monotonic())):
                raise TimeoutError("the server does not read its direct connection")

    def receive(self, timeout: float, spin: float = 0.0) -> bytes | None:
        """The next frame, or None if it did not complete within ``timeout`` (spinning for the first
        ``spin`` seconds of it); OSError if the connection closed."""
        inbox = self._inbox
        now = time.monotonic()
        deadline, spin_until = now + timeout, now + min(spin, timeout)
        while True:
            size = inbox.announced()
            if size is not None and size > framing.MAX_REPLY_BYTES:
                raise ConnectionError(f"a reply frame of {size} bytes announced: not a cache server")
            frame = inbox.pop()
            if frame is not None:
                return frame
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                now = time.monotonic()
                if now >= deadline:
                    return None
                if now >= spin_until:
                    self._readable.poll(_ms(deadline - now))
                continue
            if not data:
                raise ConnectionResetError("the server closed the connection")
            inbox.feed(data)

    def close(self) -> None:
        self.sock.close()


class DirectPath:
    """The client's direct lane (see the module docstring); thread-safe."""

    def __init__(
        self,
        url: str,
        next_rid: Callable[[], int],
        on_answer: Callable[[], None],
        on_timeout: Callable[[], None],
    ) -> None:
        """``on_answer``: a reply came (the server is up); ``on_timeout``: a call timed out (fail fast
        until the connection is seen up again)."""
        self.url = url
        self.calls = 0
        """Calls answered on this path."""
        self.closed = False
        self._next_rid = next_rid
        self._on_answer = on_answer
        self._on_timeout = on_timeout
        self._lock = threading.Lock()
        self._lane: DirectConnection | None = None
        # Where the lane is (server id, (AF_UNIX or AF_INET for any TCP, address)), and when to try
        # opening it again after a failure.
        self._target: tuple[str, tuple[int, Any] | None, float] = ("", None, 0.0)
        self._announced: tuple[str, P.DirectLane | None] = ("", None)
        self._pause = 0.0

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Keep the lane busy (calls meanwhile take the I/O-thread path), as another thread's call does."""
        with self._lock:
            yield

    def learn(self, server_id: str, lane: P.DirectLane | None) -> None:
        """Note where the server's direct lane listens (from a ping or register reply)."""
        if (server_id, lane) == self._announced:
            return
        self._announced = (server_id, lane)
        scheme, rest = self.url.split("://", 1)
        target: tuple[int, Any] | None = None
        if lane is not None and scheme == "tcp" and lane.port:
            target = (socket.AF_INET, (rest.rsplit(":", 1)[0].strip("[]"), lane.port))
        elif lane is not None and scheme == "ipc" and lane.ipc_name:
            target = (socket.AF_UNIX, os.path.join(os.path.dirname(rest), lane.ipc_name))
        if (server_id, target) != self._target[:2]:
            self._target = (server_id, target, 0.0)

    def call(self, frame: bytes, rid: int, op: str, timeout: float) -> P.Reply | None:
        """Send and wait on the direct lane, in the calling thread.

        None when the call should go through the I/O thread instead: another thread is using the
        lane, or it is not open (the server's lane is not known yet, or cannot be reached).
        """
        if not self._lock.acquire(blocking=False):
            return None
        try:
            if self.closed:
                raise ServerUnavailable("the cache server client is closed")
            lane = self._lane
            if lane is None or lane.stale():  # the server went away since the last call: no news
                lane = self._open(timeout)
                if lane is None:
                    return None
            deadline = time.monotonic() + timeout
            try:
                lane.send(frame, timeout)
            except TimeoutError:
                raise self._timed_out(op, timeout) from None
            except OSError:
                self._drop()
                return None  # the server did not take it: the I/O thread's path will
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._timed_out(op, timeout)
                try:
                    data = lane.receive(min(POLL_S, remaining), spin=SPIN_S)
                except OSError:
                    self._drop()
                    raise ServerUnavailable(
                        f"{op} to {self.url} failed: connection to the server lost before it answered"
                    ) from None
                if data is None:
                    if self.closed:
                        raise ServerUnavailable(f"{op} to {self.url} failed: client closed")
                    continue
                try:
                    reply = framing.decode_reply(data)
                except framing.REPLY_DECODE_ERRORS as e:
                    self._drop()
                    raise ServerUnavailable(f"{op} to {self.url} failed: undecodable reply ({e})") from None
                # rid -1: the server could not read our request's id (e.g. a frame over its size
                # limit); with one request in flight on this lane, the answer is ours.
                if reply.rid != rid and reply.rid != -1:  # cannot happen (a lane that timed out is closed)
                    self._drop()
                    raise ServerUnavailable(f"{op} to {self.url} failed: reply to another request")
                self._on_answer()
                self.calls += 1
                return reply
        finally:
            self._lock.release()

    def close(self) -> None:
        """Refuse further calls and close the lane (a call in flight notices within ``POLL_S``)."""
        self.closed = True
        if self._lock.acquire(timeout=5):
            try:
                self._drop()
            finally:
                self._lock.release()

    def _timed_out(self, op: str, timeout: float) -> ServerUnavailable:
        """Never let the reply arrive late on this lane; the client fails fast until the connection is
        seen up again. Caller holds the lock."""
        self._drop()
        self._on_timeout()
        return timed_out(self.url, op, timeout)

    def _open(self, timeout: float) -> DirectConnection | None:
        """Connect to the server's direct lane and check it is the server that advertised it. Caller
        holds the lock."""
        self._drop()
        server_id, target, retry_at = self._target
        if target is None or time.monotonic() < retry_at:
            return None
        family, address = target
        wait = min(timeout, CONNECT_S)
        sock: socket.socket | None = None
        try:
            if family == socket.AF_UNIX:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(wait)
                sock.connect(address)
                uid = peer_of_socket(sock).uid
                if uid is None or not trusted_owner(uid):
                    raise ConnectionError(f"the direct lane is served by uid {uid}, not this user or root")
            else:
                sock = socket.create_connection(address, wait)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            lane = DirectConnection(sock)
            rid = self._next_rid()
            lane.send(framing.encode_request(P.Ping(rid=rid)), wait)
            data = lane.receive(wait)
            reply = framing.decode_reply(data) if data is not None else None
            if reply is None or not reply.ok or reply.rid != rid:
                raise ConnectionError("no ping reply")
            if msgspec.convert(reply.value, P.PingInfo).server_id != server_id:
                raise ConnectionError(f"not the server {server_id} (a successor, or another program)")
        except (OSError, msgspec.DecodeError, msgspec.ValidationError, ValueError) as e:
            if sock is not None:
                sock.close()
            pause = min(RETRY_MAX_S, max(RETRY_MIN_S, 2 * self._pause))
            self._pause = pause
            self._target = (server_id, target, time.monotonic() + pause)
            logger.debug(
                "cannot open the direct lane of %s at %s (%s); next try in %g s", self.url, address, e, pause
            )
            return None
        self._pause = 0.0
        self._lane = lane
        return lane

    def _drop(self) -> None:
        """Close the lane (a late reply dies with it). Caller holds the lock."""
        if self._lane is not None:
            self._lane.close()
            self._lane = None


class Prober:
    """Whether something accepts connections at the server's address now (the fail-fast policy)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._quiet_until = 0.0

    def listening(self) -> bool | None:
        """True: something accepts connections there; False: refused or no socket file; None: cannot
        tell (inproc URLs, or a TCP probe nobody answered within ``PROBE_S``, after which probes pause
        for ``PROBE_QUIET_S`` so a host that drops packets does not slow every call down)."""
        scheme, rest = self.url.split("://", 1)
        if scheme == "inproc" or time.monotonic() < self._quiet_until:
            return None
        try:
            if scheme == "ipc":
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.settimeout(PROBE_S)
                    sock.connect(rest)
            else:
                host, _, port = rest.rpartition(":")
                with socket.create_connection((host.strip("[]"), int(port)), PROBE_S):
                    pass
        except TimeoutError:
            self._quiet_until = time.monotonic() + PROBE_QUIET_S
            return None
        except (OSError, ValueError):
            return False
        return True
