"""The cache server's descriptor channel: a Unix socket on which its workers get the descriptors of
L1 slabs passed by descriptor (:mod:`lmcache.fd_slabs`), with ``SCM_RIGHTS``.

The socket lives in a directory of its own (0700; one a killed server left is removed by the next
server of that user), is 0600, and serves only peers of the server's
uid (and root), as a ``/dev/shm`` region of the server is theirs alone: other uids the server's
policy lets talk to it get no L1 memory. Each message is a request for at most
:data:`MAX_SLABS_PER_REQUEST` slab ids; the answer names the slabs found (live ones; a freed slab is
left out) and carries their descriptors in that order. At most :data:`MAX_CONNECTIONS` connections
are served at once, each closed after :data:`IDLE_TIMEOUT_S` of silence or a malformed request; a
failed ``accept`` (out of descriptors for a moment) is retried. A worker checks that the socket is its
own uid's and that the process serving it is too, and gives a request up after
:data:`FETCH_TIMEOUT_S`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import stat
import tempfile
import threading
from collections.abc import Callable, Sequence

import msgspec

from lmcache.logging import init_logger
from lmcache.rate_limit import RateLimitedLog
from lmcache.server.security import peer_of_socket
from lmcache.shm_slabs import pid_alive

logger = init_logger(__name__)
_limited = RateLimitedLog(logger)

__all__ = [
    "Answer",
    "DescriptorChannel",
    "DescriptorChannelError",
    "fetch_descriptors",
    "MAX_SLABS_PER_REQUEST",
]

MAX_SLABS_PER_REQUEST = 64
"""Slab ids one request may name (a message's descriptors stay far below the kernel's 253)."""
MAX_CONNECTIONS = 256
"""Connections served at once (a worker's mapping threads connect one each); more are refused."""
MAX_REFUSALS = 16
"""Refused connections answered at once (each waits a second at most for its request); more are closed
unanswered."""
IDLE_TIMEOUT_S = 30.0
"""A connection silent this long is closed (workers connect per request)."""
FETCH_TIMEOUT_S = 10.0
"""How long a worker waits for the channel to take and answer its request (a wedged server fails the
copy that needed the slab; it never blocks the worker's thread for good)."""
ACCEPT_RETRY_S = 0.05
"""Pause before accepting again after a transient failure (out of descriptors, memory)."""
MAX_MESSAGE_BYTES = 4096
DIR_PREFIX = "lmcache-slabs-"
"""The channel's directory: ``lmcache-slabs-<server pid>-<random>``, so a later server removes those of
servers that are gone (a killed server cannot)."""
_DIR = re.compile(rf"^{DIR_PREFIX}(\d+)-")


class DescriptorChannelError(RuntimeError):
    """The channel refused or failed a request; the message says why."""


class Answer(msgspec.Struct, array_like=True):
    """The slab ids whose descriptors follow, in order; ``error`` instead for a refused request."""

    ids: list[int] = []
    error: str = ""


_encode = msgspec.msgpack.Encoder().encode
_requests = msgspec.msgpack.Decoder(list[int])
_answers = msgspec.msgpack.Decoder(Answer)


class DescriptorChannel:
    """Serves ``descriptor(slab_id)`` (a new descriptor of the slab, which the channel closes once sent;
    None for no such slab) to the server's uid on a fresh socket (:attr:`path`), from a thread per
    connection, until :meth:`close`."""

    def __init__(self, descriptor: Callable[[int], int | None], directory: str | None = None) -> None:
        self._descriptor = descriptor
        remove_stale_channels(directory or tempfile.gettempdir())
        self._dir = tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-", dir=directory)
        self.path = os.path.join(self._dir, "slabs.sock")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._sock.bind(self.path)
        os.chmod(self.path, 0o600)
        self._sock.listen(16)
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._stopping = threading.Event()
        self._refusals = threading.BoundedSemaphore(MAX_REFUSALS)
        self._thread = threading.Thread(target=self._accept, name="lmcache-slab-fds", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError as e:
                if self._stopping.is_set():  # closed
                    return
                # Out of descriptors or memory for a moment (a peer's connection is waiting meanwhile):
                # accepting again later serves it; giving up would leave every worker unanswered.
                _limited.warning("accept", "L1 descriptor channel: accept failed (%s); retrying", e)
                self._stopping.wait(ACCEPT_RETRY_S)
                continue
            try:
                peer = peer_of_socket(conn)
            except OSError:  # gone before it could be asked: nothing to serve, keep accepting
                conn.close()
                continue
            with self._lock:
                if peer.uid not in (0, os.geteuid()):
                    refusal = f"this channel serves only uid {os.geteuid()}, not uid {peer.uid}"
                    logger.warning("L1 descriptor channel: refused pid %s of uid %s", peer.pid, peer.uid)
                elif self._closed or len(self._connections) >= MAX_CONNECTIONS:
                    refusal = f"the server is closing, or serves {MAX_CONNECTIONS} connections already"
                else:
                    refusal = ""
                    self._connections.add(conn)
            if refusal:  # answered on a thread of its own (a few at once): a silent peer holds up nothing
                if self._refusals.acquire(blocking=False):
                    threading.Thread(target=self._refuse, args=(conn, refusal), daemon=True).start()
                else:
                    conn.close()
                continue
            serving = threading.Thread(target=self._serve, args=(conn,), name="lmcache-slab-fds-conn")
            serving.daemon = True
            serving.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(IDLE_TIMEOUT_S)
            while True:
                message = conn.recv(MAX_MESSAGE_BYTES)
                if not message:
                    return
                try:
                    ids = _requests.decode(message)
                except msgspec.DecodeError:
                    conn.sendmsg([_encode(Answer(error="malformed request: a msgpack list of slab ids"))])
                    return
                if len(ids) > MAX_SLABS_PER_REQUEST:
                    error = f"{len(ids)} slab ids in one request; at most {MAX_SLABS_PER_REQUEST}"
                    conn.sendmsg([_encode(Answer(error=error))])
                    return
                found: dict[int, int] = {}
                try:
                    for slab_id in ids:
                        if slab_id in found:  # named again: sent once
                            continue
                        fd = self._descriptor(slab_id)
                        if fd is not None:
                            found[slab_id] = fd
                    socket.send_fds(conn, [_encode(Answer(ids=list(found)))], list(found.values()))
                finally:
                    for fd in found.values():
                        os.close(fd)
        except OSError:
            return
        finally:
            with self._lock:
                self._connections.discard(conn)
            conn.close()

    def _refuse(self, conn: socket.socket, why: str) -> None:
        """Answer the peer's first request (waited for a second at most) with ``why``, no descriptor."""
        try:
            with contextlib.suppress(OSError):
                conn.settimeout(1.0)
                conn.recv(MAX_MESSAGE_BYTES)
                conn.sendmsg([_encode(Answer(error=why))])
            conn.close()
        finally:
            self._refusals.release()

    def close(self) -> None:
        """Stop serving and remove the socket (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            connections = list(self._connections)
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        shutil.rmtree(self._dir, ignore_errors=True)


def remove_stale_channels(parent: str) -> int:
    """Remove this user's channel directories in ``parent`` whose server is gone; returns how many.
    Those of live servers and of other users are left alone."""
    removed = 0
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return 0
    for entry in entries:
        match = _DIR.match(entry.name)
        if match is None or pid_alive(int(match.group(1))):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid():
            shutil.rmtree(entry.path, ignore_errors=True)
            removed += 1
    return removed


def fetch_descriptors(path: str, slab_ids: Sequence[int]) -> dict[int, int]:
    """The descriptors of the live slabs among ``slab_ids`` (a freed one is missing), from the server's
    channel at ``path``: new descriptors, the caller's to close. DescriptorChannelError if the socket
    or its server is not of this uid, or the server refused the request."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise DescriptorChannelError(
            f"cannot reach the server's L1 descriptor channel {path}: {e.strerror}; run the worker on the "
            f"server's host where it sees that directory (in a container: mount {os.path.dirname(path)}), "
            "or start the server with --l1-memory shm and share /dev/shm"
        ) from None
    if st.st_uid != os.geteuid():
        raise DescriptorChannelError(
            f"the L1 descriptor channel {path} is owned by uid {st.st_uid}, not this process's "
            f"{os.geteuid()}; run the worker as the server's user"
        )
    got: dict[int, int] = {}
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(FETCH_TIMEOUT_S)
        try:
            sock.connect(path)
            server = peer_of_socket(sock)
            if server.uid != os.geteuid():
                raise DescriptorChannelError(
                    f"the L1 descriptor channel {path} is served by uid {server.uid}"
                )
            for first in range(0, len(slab_ids), MAX_SLABS_PER_REQUEST):
                sock.sendall(_encode(list(slab_ids[first : first + MAX_SLABS_PER_REQUEST])))
                message, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE_BYTES, MAX_SLABS_PER_REQUEST)
                answer = _answer(message, fds)
                got.update(zip(answer.ids, fds, strict=True))
        except (OSError, DescriptorChannelError) as e:
            for fd in got.values():
                os.close(fd)
            if isinstance(e, DescriptorChannelError):
                raise
            raise DescriptorChannelError(f"the server's L1 descriptor channel {path} failed: {e}") from None
    return got


def _answer(message: bytes, fds: list[int]) -> Answer:
    """The decoded answer; its descriptors are closed if it does not name as many slabs as it carries."""
    try:
        answer = _answers.decode(message)
    except msgspec.DecodeError:
        answer = Answer(error="a malformed answer (or none: the server closed the channel)")
    if answer.error or len(answer.ids) != len(fds):
        for fd in fds:
            os.close(fd)
        raise DescriptorChannelError(
            f"the server's L1 descriptor channel refused: {answer.error or 'bad answer'}"
        )
    return answer
