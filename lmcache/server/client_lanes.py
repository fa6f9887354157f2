"""The client's transport: a small pool of *lanes*, plain stream sockets to the server's URL.

``tcp://host:port`` lanes are TCP connections, ``ipc:///path`` lanes Unix-socket connections; each
carries length-prefixed frames (:mod:`lmcache.server.framing`) with one request in flight. A call
takes a free lane (preferring the one its thread used last, so the calls of one thread normally
share a connection and the server runs them in order), opens a new one while the pool holds fewer
than its cap, else waits for one to come back. It sends its request and waits for the reply in the
calling thread: no hand-off to another thread on either end. Calls of different threads run on
different lanes, so a lookup never waits behind another thread's store.

Failures: a call whose reply does not come within its timeout, or whose lane breaks, closes that
lane (its reply can never arrive late); the next call opens a new one. A lane that the server closed
while idle (restart, idle timeout) is noticed before use and replaced. Connecting is the liveness
probe: a refused connect fails the call at once; after a timeout (``down``) a ``fail_fast`` pool
gives the server only :data:`PROBE_S` to accept, and a server that drops packets makes calls fail at
once for :data:`PROBE_QUIET_S`. Once a request went unanswered (a server that accepts connections
but serves nothing: stopped, wedged), fail-fast calls but loads and registrations wait
:data:`PROBE_REPLY_S` for their reply until one comes. Over ``ipc://`` a lane served by a process
of another user than this one or root is refused. A connection the server refuses (caps, peer
policy) brings its error frame (rid -1), which the caller raises like any error reply; so does a frame
it refuses unread (over its size caps), except after a one-way frame on that lane, whose refusal it
may be: the call then fails as unserved (the server closed the connection either way).
"""

from __future__ import annotations

import contextlib
import functools
import math
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from lmcache.backoff import Backoff
from lmcache.logging import init_logger
from lmcache.server import framing
from lmcache.server import protocol as P
from lmcache.server.client_errors import ServerUnavailable, timed_out
from lmcache.server.security import peer_of_socket, trusted_owner

logger = init_logger(__name__)

__all__ = ["DEFAULT_LANES", "Endpoint", "Lane", "LanePool", "PendingReply", "Submitted"]

T = TypeVar("T")

DEFAULT_LANES = 4
"""Lanes a client opens at most: enough for a lookup, a store, a retrieve and a heartbeat at once."""
POLL_S = 0.05
"""A call checks for a closed client this often while it waits."""
CONNECT_S = 1.0
"""Longest wait to open a lane."""
SPIN_S = 200e-6
"""How long a call spins for its reply before it sleeps (see :class:`Lane`)."""
PROBE_S = 0.05
"""Longest a fail-fast call waits for a connect while the server is thought down."""
PROBE_QUIET_S = 1.0
"""After a connect nobody answered (a host that drops packets), fail-fast calls fail at once this long."""
PROBE_REPLY_S = 0.1
"""Longest a fail-fast call waits for its reply after a request went unanswered (a stopped or wedged
server, which still accepts connections): a live server answers within it, and any reply ends it."""
ALWAYS_TRIED = frozenset(op.__struct_config__.tag for op in (P.Retrieve, P.Load, P.Register))
"""Ops given their whole timeout even then: a load TRT-LLM was promised fails its request if not made,
and a registration (which opens the pool) given up on would still be made, under a capability the
client never received."""
RETRY_S = 0.05
"""Without fail-fast, a refused connect is retried this often until the call's deadline."""


def _ms(seconds: float) -> int:
    """A poll timeout in whole milliseconds, rounded up (0 would not wait at all)."""
    return max(1, math.ceil(seconds * 1000))


@dataclass(frozen=True)
class Endpoint:
    """Where the server listens, from its URL."""

    family: int
    address: str | tuple[str, int]

    @classmethod
    def of(cls, url: str) -> Endpoint:
        """``tcp://host:port`` (IPv6 hosts in brackets) or ``ipc:///path``; ValueError otherwise."""
        scheme, _, rest = url.partition("://")
        if scheme == "ipc" and rest.startswith("/"):  # absolute: the same socket whatever the cwd
            return cls(socket.AF_UNIX, rest)
        host, _, port = rest.rpartition(":")
        if scheme != "tcp" or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(
                f"unsupported server URL {url!r}; use tcp://HOST:PORT (port 1-65535) or ipc:///ABSOLUTE/PATH"
            )
        family = socket.AF_INET6 if host.startswith("[") else socket.AF_INET
        return cls(family, (host.strip("[]"), int(port)))

    def connect(self, timeout: float) -> socket.socket:
        """A connected socket (OSError, TimeoutError); over a Unix socket, served by a trusted uid."""
        if self.family != socket.AF_UNIX:
            sock = socket.create_connection(self.address, timeout)  # type: ignore[arg-type]
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(self.address)
            uid = peer_of_socket(sock).uid
            if uid is None or not trusted_owner(uid):
                raise PermissionError(f"the server socket is served by uid {uid}, not this user or root")
        except BaseException:
            sock.close()
            raise
        return sock


class Lane:
    """One connection: one request in flight, frames behind their length.

    The socket is non-blocking: a reply is first awaited by spinning on ``recv`` for up to
    ``SPIN_S``, then by ``poll``. A short call's reply comes back within that, before this thread
    sleeps: waking a sleeping thread costs more than a whole short call on some hosts.
    """

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.thread = 0
        """The thread that used it last (calls prefer their own thread's lane)."""
        self.reported = False
        """A one-way frame went on it since the last reply read (see :meth:`LanePool._receive`)."""
        self._readable = select.poll()
        self._readable.register(sock, select.POLLIN)
        self._inbox = framing.FrameBuffer()

    def stale(self) -> bool:
        """Whether something arrived while no request was in flight: the server closed the lane."""
        return bool(self._readable.poll(0))

    def send(self, frames: Sequence[bytes], timeout: float) -> None:
        """Send ``frames`` in one write; TimeoutError if the server does not take them within ``timeout``."""
        data = memoryview(b"".join(framing.framed(frame) for frame in frames))
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(BlockingIOError):
                data = data[self.sock.send(data) :]
            if not data:
                return
            writable = select.poll()
            writable.register(self.sock, select.POLLOUT)
            if not writable.poll(_ms(deadline - time.monotonic())):
                raise TimeoutError("the server does not read its connection")

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


class LanePool:
    """The lanes of one client (see the module docstring); thread-safe."""

    def __init__(self, url: str, *, size: int = DEFAULT_LANES, fail_fast: bool = True) -> None:
        if size < 1:
            raise ValueError(f"a client needs at least one lane, got lanes={size}")
        self.url = url
        self.endpoint = Endpoint.of(url)
        self.size = size
        self.fail_fast = fail_fast
        self.calls = 0
        """Calls answered."""
        self.opened = 0
        """Lanes opened so far (a replaced lane counts again)."""
        self.down = False
        """A call timed out, or a connect failed, since the last reply: fail-fast calls probe briefly."""
        self.closed = False
        self._cond = threading.Condition()
        self._idle: list[Lane] = []
        self._count = 0
        """Lanes open or being opened (idle and in use)."""
        self._quiet = Backoff(PROBE_QUIET_S, PROBE_QUIET_S)
        """Fail-fast calls skip connecting while this is not ready (a connect went unanswered)."""
        self.unanswered = False
        """A request went unanswered since the last reply: fail-fast calls (but :data:`ALWAYS_TRIED`)
        wait at most :data:`PROBE_REPLY_S` for theirs."""
        self._waiters = 0

    @property
    def lanes(self) -> int:
        """Lanes open now (idle or carrying a call)."""
        return self._count

    @property
    def waiters(self) -> int:
        """Calls waiting for a lane to come free (all ``size`` carry calls)."""
        return self._waiters

    def submit(
        self, frame: bytes | Callable[[float], bytes], rid: int, op: str, timeout: float
    ) -> PendingReply:
        """Send ``frame`` on a lane now (a callable: the frame given the seconds the call still waits
        once it holds a lane); :meth:`PendingReply.result` waits for the reply (the lane is the
        call's until then, so it must be called, or :meth:`PendingReply.cancel`)."""
        if self.unanswered and self.fail_fast and op not in ALWAYS_TRIED:
            timeout = min(timeout, PROBE_REPLY_S)
        deadline = time.monotonic() + timeout
        lane = self._acquire(deadline, op, timeout)
        try:
            if callable(frame):
                frame = frame(deadline - time.monotonic())
            self._send(lane, frame, op, deadline, timeout)
        except BaseException:
            self._discard(lane)
            raise
        receive = functools.partial(self._receive, rid=rid, op=op, deadline=deadline, timeout=timeout)
        return PendingReply(lane, receive, self._release, self._discard)

    def send(self, frame: bytes, op: str, timeout: float) -> None:
        """Send a one-way ``frame`` (the server answers none, even when it fails; one it refuses unread
        closes the connection). The lane is this thread's again at once, so its next call normally
        follows on the same connection and is served after it."""
        self.send_all([frame], op, timeout)

    def send_all(self, frames: Sequence[bytes], op: str, timeout: float) -> None:
        """Send one-way ``frames`` in order, on one lane in one write (see :meth:`send`)."""
        deadline = time.monotonic() + timeout
        lane = self._acquire(deadline, op, timeout)
        try:
            lane.send(frames, max(deadline - time.monotonic(), 1e-3))
        except TimeoutError:
            self._discard(lane)
            self.down = True
            raise timed_out(self.url, op, timeout) from None
        except OSError as e:
            self._discard(lane)
            raise ServerUnavailable(f"{op} to {self.url} failed: {e.strerror or e}") from None
        except BaseException:
            self._discard(lane)
            raise
        lane.reported = True
        self._release(lane)

    @contextlib.contextmanager
    def hold(self, timeout: float = 10.0) -> Iterator[None]:
        """Keep one lane busy, as another thread's call in flight does."""
        lane = self._acquire(time.monotonic() + timeout, "hold", timeout)
        try:
            yield
        finally:
            self._release(lane)

    def close(self) -> None:
        """Refuse further calls and close the idle lanes (a call in flight notices within ``POLL_S``)."""
        with self._cond:
            self.closed = True
            for lane in self._idle:
                lane.close()
            self._count -= len(self._idle)
            self._idle.clear()
            self._cond.notify_all()

    # ---- lanes ----------------------------------------------------------------------------------

    def _acquire(self, deadline: float, op: str, timeout: float) -> Lane:
        me = threading.get_ident()
        with self._cond:
            while True:
                if self.closed:
                    raise ServerUnavailable("the cache server client is closed")
                lane = self._take_idle(me)
                if lane is not None:
                    lane.thread = me
                    return lane
                if self._count < self.size:
                    self._count += 1
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ServerUnavailable(
                        f"{op} to {self.url}: no lane came free within {timeout:g} s (all {self.size} carry "
                        "calls of other threads); raise the client's lanes= or timeout_s"
                    )
                self._waiters += 1
                try:
                    self._cond.wait(remaining)
                finally:
                    self._waiters -= 1
        try:
            lane = Lane(self._connect(deadline, op))
        except BaseException:
            with self._cond:
                self._count -= 1
                self._cond.notify()
            raise
        lane.thread = me
        self.opened += 1
        return lane

    def _take_idle(self, me: int) -> Lane | None:
        """An idle lane, this thread's own if idle, else the most recently used; stale ones are closed.
        Caller holds the lock."""
        while self._idle:
            last = len(self._idle) - 1
            mine = next((last - i for i, lane in enumerate(reversed(self._idle)) if lane.thread == me), last)
            lane = self._idle.pop(mine)
            if not lane.stale():
                return lane
            lane.close()
            self._count -= 1
        return None

    def _release(self, lane: Lane) -> None:
        with self._cond:
            if self.closed:
                lane.close()
                self._count -= 1
            else:
                self._idle.append(lane)
            self._cond.notify()

    def _discard(self, lane: Lane) -> None:
        """Close a lane whose call failed (a late reply dies with it)."""
        lane.close()
        with self._cond:
            self._count -= 1
            self._cond.notify()

    def _connect(self, deadline: float, op: str) -> socket.socket:
        """Open a connection to the server, probing briefly while it is thought down (fail fast)."""
        while True:
            now = time.monotonic()
            probing = self.fail_fast and self.down
            if probing and not self._quiet.ready():
                raise self._unreachable("it did not answer a connect recently")
            wait = min(CONNECT_S, max(deadline - now, 1e-3), PROBE_S if probing else CONNECT_S)
            try:
                sock = self.endpoint.connect(wait)
            except PermissionError as e:
                raise ServerUnavailable(f"{op} to {self.url} refused: {e}") from None
            except TimeoutError:
                self.down = True
                if probing:
                    self._quiet.failed()
                    raise self._unreachable(f"no answer to a connect within {wait:g} s") from None
                if time.monotonic() >= deadline:
                    raise timed_out(self.url, op, wait) from None
            except OSError as e:
                self.down = True
                if self.fail_fast or time.monotonic() + RETRY_S >= deadline:
                    raise self._unreachable(e.strerror or str(e)) from None
                with self._cond:  # close() ends the wait
                    if self._cond.wait_for(lambda: self.closed, RETRY_S):
                        raise ServerUnavailable("the cache server client is closed") from None
            else:
                self._quiet.succeeded()
                return sock

    def _unreachable(self, why: str) -> ServerUnavailable:
        return ServerUnavailable(
            f"cache server at {self.url} is unreachable ({why}); is it running? start it with: "
            "python -m lmcache.v1.multiprocess.server"
        )

    def _send(self, lane: Lane, frame: bytes, op: str, deadline: float, timeout: float) -> None:
        try:
            lane.send([frame], max(deadline - time.monotonic(), 1e-3))
        except TimeoutError:
            self.down = True
            raise timed_out(self.url, op, timeout) from None
        except OSError:
            pass  # the server closed the connection: its reason (a refusal frame) may be waiting

    def _receive(self, lane: Lane, rid: int, op: str, deadline: float, timeout: float) -> P.Reply:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.down = True
                self.unanswered = True
                raise timed_out(self.url, op, timeout)
            try:
                data = lane.receive(min(POLL_S, remaining), spin=SPIN_S)
            except OSError as e:  # its reason: closed, reset, or a frame no cache server sends
                raise ServerUnavailable(
                    f"{op} to {self.url} failed: connection to the server lost before it answered "
                    f"({e.strerror or e})"
                ) from None
            if data is None:
                if self.closed:
                    raise ServerUnavailable(f"{op} to {self.url} failed: client closed")
                continue
            try:
                reply = framing.decode_reply(data)
            except framing.REPLY_DECODE_ERRORS as e:
                raise ServerUnavailable(f"{op} to {self.url} failed: undecodable reply ({e})") from None
            # rid -1: the server could not read a frame's id (e.g. one over its size limit) or refused the
            # connection, then closed it. With only our request sent since the last reply, it is ours;
            # after a one-way frame (answered by nothing else) it may be that frame's.
            if reply.rid == -1 and lane.reported:
                error = reply.error or P.ErrorInfo(P.ErrorCode.INTERNAL.value, "no details")
                raise ServerUnavailable(
                    f"{op} to {self.url} failed: the server refused a frame on this connection, this "
                    f"request's or a one-way report's sent before it ({error.code}: {error.message})"
                )
            if reply.rid != rid and reply.rid != -1:  # cannot happen (a lane that timed out is closed)
                raise ServerUnavailable(f"{op} to {self.url} failed: reply to another request")
            lane.reported = False  # the frames before ours were read: none of them is answered
            self.down = False
            self.unanswered = False
            self.calls += 1
            return reply


class PendingReply:
    """The reply to a request already sent on ``lane`` (see :meth:`LanePool.submit`): ``receive``
    reads it, then the lane goes to ``release`` (or to ``discard`` if reading failed)."""

    def __init__(
        self,
        lane: Lane,
        receive: Callable[[Lane], P.Reply],
        release: Callable[[Lane], None],
        discard: Callable[[Lane], None],
    ) -> None:
        self._lane: Lane | None = lane
        self._receive = receive
        self._release = release
        self._discard = discard

    def result(self) -> P.Reply:
        """Wait for the next reply (ServerUnavailable if none by the call's deadline). A reply with
        ``more`` keeps the lane for the rest of the answer: call again; the last gives it back."""
        lane = self._lane
        if lane is None:
            raise RuntimeError("the reply was already taken or cancelled")
        try:
            reply = self._receive(lane)
        except BaseException:
            self._lane = None
            self._discard(lane)
            raise
        if reply.more and reply.ok:
            return reply
        self._lane = None
        self._release(lane)
        return reply

    def cancel(self) -> None:
        """Give up on the reply: the lane is closed, so it can never arrive late."""
        if self._lane is not None:
            self._discard(self._lane)
            self._lane = None


class Submitted(Generic[T]):
    """A request sent, its reply not read yet: :meth:`next` reads it part by part; the lane is the
    request's until the last part is read or :meth:`cancel` closes it."""

    def __init__(self, pending: PendingReply, value: Callable[[P.Reply], T]) -> None:
        self._pending = pending
        self._value = value
        self.more = True
        """Whether a part is still to be read."""

    def next(self) -> tuple[T, bool]:
        """The next part's value, and whether more parts follow."""
        self.more = False  # a failed read closes the lane: nothing more to read either way
        reply = self._pending.result()
        self.more = reply.more
        return self._value(reply), reply.more

    def cancel(self) -> None:
        """Give up on the parts not read yet (their lane is closed)."""
        if self.more:
            self._pending.cancel()
            self.more = False
