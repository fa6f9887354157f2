"""Client of the cache server: a ZMQ DEALER plus the direct lane, thread-safe, never hangs.

``CacheServerClient`` mirrors the server's ops as blocking methods. Any thread may call them.
Each call takes one of two paths:

* the **direct lane**: a caller that finds it free (a non-blocking lock) sends its request over
  a plain socket to the server's direct lane (see :mod:`lmcache.server.protocol`) and waits for
  the reply in its own thread, with no hand-off between threads and no ZMQ I/O thread on either
  end, so a ``lookup`` round trip costs little more than the server's work, and a ``store`` or
  ``retrieve`` saves the ~1 ms of thread hand-offs the other path costs on a slow host CPU
  (measured on an H200 host: 1.3 ms of a 16k-token transfer's 10.6 ms). The lane's address
  comes with the reply to ``register`` or ``ping``, and it is used once a ping on it reached
  the same server;
* the **I/O-thread path**: heartbeats, and calls that find the lane busy (another thread's call
  is in flight, e.g. a save while the executor loads) or not open (not known yet, unreachable)
  go to a private I/O thread. It owns the DEALER socket, pipelines the requests of any number of
  threads and matches replies by request id.

``lookup`` of an instance this client registered sends the prompt's chunk hashes, computed with
the key scheme the server announced at registration, instead of its tokens.

Ordering: a caller sends its next request only after the reply to the previous one, so the calls
of one thread are served in the order it made them. Calls of different threads that overlap in
time are not ordered: a ``lookup`` sent while another thread's ``store`` is still in flight may
miss that store's chunks (it does not wait behind it, which is what keeps lookups fast while a
background thread saves).

Failure behaviour:

* No reply within ``timeout_s`` (server down, restarting or wedged) raises
  :class:`ServerUnavailable`. The sockets are then recreated (queued requests are dropped, never
  delivered late), and until the connection is seen up again further calls fail at once
  (``fail_fast``) instead of each waiting ``timeout_s``. ZMQ keeps reconnecting in the background
  every 100 ms. While not connected, each call first checks whether the server's address accepts
  connections (a Unix-socket or TCP connect, at most 50 ms): if it does after a failure, the client
  reconnects at once, so a restarted server is used by the next call, not after a reconnect
  back-off; if it refuses, a ``fail_fast`` call fails at once instead of waiting ``timeout_s``.
* ``store`` and ``retrieve`` carry ``timeout_ms``: the server skips them if they could not start
  before the caller gave up, so a late retrieve never writes into blocks the caller has reused.
* An error reply raises :class:`ServerError` (or a subclass named after its code). When the server
  answers ``unknown_instance`` (it restarted, or reaped us) for an instance this client
  registered, the client registers that pool again by itself and retries the call once. The
  heartbeat thread does the same as soon as the server reports the instance unknown.
* Every ``heartbeat_interval_s`` the client sends a heartbeat for its instances, so an idle but
  alive client is never reaped.

Credentials (``docs/security.md``), all carried by the client itself: over TCP every request
carries the server secret (``secret``, else ``$LMCACHE_SERVER_SECRET``, else the secret file the
server created for this user); every request naming an instance carries the capability its
registration returned. Over ``ipc://`` the client refuses a socket owned by another user than
itself or root, and replies or direct connections from a process of such a user.

CUDA pools: the caller must have finished writing the blocks before ``store`` (e.g. synchronize
the forward pass's stream); ``retrieve`` returns after the server's copies into the pool have
completed (see :mod:`lmcache.server.server`).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import secrets
import select
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
import zmq
from zmq.utils.monitor import recv_monitor_message

from lmcache.keys import HASH_ALGORITHMS, TokenHasher, Tokens
from lmcache.logging import init_logger
from lmcache.server import protocol as P
from lmcache.server.security import client_secret, peer_of_socket, peer_of_zmq, trusted_owner
from lmcache.transfer import BlockTransfer

if TYPE_CHECKING:  # torch and pool sharing load on first register: `lmcache stats` never imports torch
    import torch

    from lmcache.server.pool_sharing import RawCudaIPCWrapper

logger = init_logger(__name__)

__all__ = [
    "DEFAULT_SERVER_URL",
    "CacheServerClient",
    "PromptHashes",
    "ServerError",
    "ServerUnavailable",
    "UnknownInstance",
    "VersionMismatch",
    "BadPool",
    "InvalidRequest",
    "LimitExceeded",
    "Unauthorized",
    "new_instance_id",
    "normalize_url",
]

DEFAULT_SERVER_URL = "ipc:///tmp/lmcache.sock"
T = TypeVar("T")
_DIRECT_POLL_S = 0.05
"""A direct call checks for a closed client this often while it waits."""
_DIRECT_CONNECT_S = 1.0
"""Longest wait to open the direct lane (connect, then a ping on it)."""
_DIRECT_RETRY_MIN_S = 0.1
_DIRECT_RETRY_MAX_S = 60.0
_DIRECT_SPIN_S = 200e-6
"""How long a direct call spins for its reply before it sleeps (see :class:`_DirectLane`)."""
_MAX_REPLY_BYTES = 2 * P.MAX_FRAME_BYTES
_RECONNECT_MS = 100
"""ZMQ's reconnect interval to a server that went away (no growing back-off)."""
_PROBE_S = 0.05
"""Longest a fail-fast call waits to learn whether the server's address accepts connections again."""
_PROBE_QUIET_S = 1.0
"""After a probe nobody answered (a host that drops packets), calls skip probing this long."""


class _DirectLane:
    """The client end of a direct connection: one request in flight, frames behind their length.

    The socket is non-blocking: a reply is first awaited by spinning on ``recv`` for up to
    ``_DIRECT_SPIN_S``, then by ``poll``. A short call's reply comes back within that, before
    this thread sleeps; waking a sleeping thread costs more than the whole call on VMs (about
    60 us per round trip where a spinning one takes 11).
    """

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._readable = select.poll()
        self._readable.register(sock, select.POLLIN)
        self._inbox = bytearray()

    def stale(self) -> bool:
        """Whether something arrived while no request was in flight: the server closed the lane."""
        return bool(self._readable.poll(0))

    def send(self, frame: bytes, timeout: float) -> None:
        """Send one frame; TimeoutError if the server does not take it within ``timeout``."""
        data = memoryview(P.DIRECT_HEADER.pack(len(frame)) + frame)
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
        inbox, header = self._inbox, P.DIRECT_HEADER.size
        now = time.monotonic()
        deadline, spin_until = now + timeout, now + min(spin, timeout)
        while True:
            if len(inbox) >= header:
                (size,) = P.DIRECT_HEADER.unpack_from(inbox)
                if size > _MAX_REPLY_BYTES:
                    raise ConnectionError(f"a reply frame of {size} bytes announced: not a cache server")
                if len(inbox) >= header + size:
                    frame = bytes(inbox[header : header + size])
                    del inbox[: header + size]
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
            inbox += data

    def close(self) -> None:
        self.sock.close()


def _ms(seconds: float) -> int:
    """A poll timeout in whole milliseconds, rounded up (0 would not wait at all)."""
    return max(1, math.ceil(seconds * 1000))


class ServerUnavailable(ConnectionError):
    """The server did not answer in time (not running, restarting, unreachable or stuck)."""


class ServerError(RuntimeError):
    """The server answered with an error; ``code`` is a :class:`protocol.ErrorCode` value."""

    def __init__(self, code: str, message: str, op: str = "") -> None:
        super().__init__(f"{op + ': ' if op else ''}{message} [{code}]")
        self.code = code
        self.message = message
        self.op = op


class UnknownInstance(ServerError):
    pass


class VersionMismatch(ServerError):
    pass


class BadPool(ServerError):
    pass


class InvalidRequest(ServerError):
    pass


class Unauthorized(ServerError):
    """The server refused the client's credentials (secret, uid, or an instance's capability)."""


class LimitExceeded(ServerError):
    """A resource cap of the server refused the request; the message names the cap."""


_ERRORS: dict[str, type[ServerError]] = {
    P.ErrorCode.UNKNOWN_INSTANCE.value: UnknownInstance,
    P.ErrorCode.VERSION_MISMATCH.value: VersionMismatch,
    P.ErrorCode.BAD_POOL.value: BadPool,
    P.ErrorCode.INVALID.value: InvalidRequest,
    P.ErrorCode.UNAUTHORIZED.value: Unauthorized,
    P.ErrorCode.LIMIT.value: LimitExceeded,
}


def new_instance_id() -> int:
    """A random 63-bit instance id (not the pid: pids repeat across restarts and containers)."""
    return secrets.randbits(63) or 1


def normalize_url(url: str | None) -> str:
    """``url``, else ``$LMCACHE_SERVER_URL``, else ``ipc:///tmp/lmcache.sock``; bare ``host:port`` is TCP."""
    url = (url or os.environ.get("LMCACHE_SERVER_URL") or DEFAULT_SERVER_URL).strip()
    if "://" not in url:
        url = f"tcp://{url}"
    scheme = url.split("://", 1)[0]
    if scheme not in ("tcp", "ipc", "inproc"):
        raise ValueError(f"unsupported server URL {url!r}; use tcp://HOST:PORT or ipc:///PATH")
    return url


@dataclass
class _Pending:
    frame: bytes
    op: str
    event: threading.Event = field(default_factory=threading.Event)
    reply: P.Reply | None = None
    failure: str | None = None
    sent: bool = False


@dataclass(frozen=True)
class PromptHashes:
    """A prompt's chunk hashes (:meth:`CacheServerClient.chunk_hashes`), the key scheme that made
    them, and the prompt they were made from: a call uses the hashes only for an instance whose
    scheme is the same, else it sends ``tokens`` and ``cache_salt``."""

    scheme: bytes
    digests: bytes
    """The full chunks' digests, in order, concatenated."""
    tokens: Tokens | bytes
    """The prompt's token ids (kept by reference, never copied)."""
    cache_salt: str | int | None


@dataclass
class _Registration:
    request: P.Register
    keep_alive: Any  # the pool tensor / wrapper: the memory must outlive the registration
    info: P.RegisterInfo | None = None
    hasher: TokenHasher | None = None
    """Hashes prompts as the server keys this instance's chunks; None: lookups carry tokens."""

    def update(self, info: P.RegisterInfo) -> None:
        self.info = info
        hashing = info.hashing
        self.hasher = None
        if hashing is not None and hashing.algorithm in HASH_ALGORITHMS:
            self.hasher = TokenHasher(
                info.chunk_size, hashing.algorithm, self.request.model_name, hashing.layout_signature
            )


class CacheServerClient:
    """Talks to one cache server over ``tcp://`` or ``ipc://``."""

    def __init__(
        self,
        url: str | None = None,
        *,
        timeout_s: float = 10.0,
        heartbeat_interval_s: float = 1.0,
        fail_fast: bool = True,
        context: zmq.Context | None = None,
        secret: bytes | str | None = None,
    ) -> None:
        """``secret``: the server secret for TCP (default: ``$LMCACHE_SERVER_SECRET``, else this user's
        secret file, see :mod:`lmcache.server.security`)."""
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.url = normalize_url(url)
        self._ipc_path = self.url[len("ipc://") :] if self.url.startswith("ipc://") else None
        # Never handed to a Unix socket, whose owner is checked instead. Found by itself (not given),
        # it is read again while missing (the server creates it at first start) and after a refusal.
        self._tcp = self.url.startswith("tcp://")
        self._find_secret = secret is None
        self._secret: bytes | None = secret.encode() if isinstance(secret, str) else secret
        if self._tcp and self._find_secret:
            self._secret = client_secret()
        self.timeout_s = timeout_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self.fail_fast = fail_fast
        self._ctx = context or zmq.Context.instance()
        self._rids = itertools.count(1)
        self._lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._outbox: deque[int] = deque()
        self._reset_requested = False
        self._connected = False
        self._down = False
        self._closed = False
        self._registrations: dict[int, _Registration] = {}
        self._reg_lock = threading.RLock()
        self.instance_id: int | None = None
        self.server_id: str | None = None
        self.reconnects = 0
        self.reregistrations = 0
        self.direct_calls = 0
        """Calls answered on the direct path (the rest went through the I/O thread)."""
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._stop = threading.Event()
        # The direct lane, used only under _direct_lock; where it is (server id, (AF_UNIX or AF_INET
        # for any TCP, address)), and when to try opening it again after a failure.
        self._direct_lock = threading.Lock()
        self._direct: _DirectLane | None = None
        self._direct_target: tuple[str, tuple[int, Any] | None, float] = ("", None, 0.0)
        self._direct_announced: tuple[str, P.DirectLane | None] = ("", None)
        self._direct_pause = 0.0
        self._probe_quiet_until = 0.0
        self._io = threading.Thread(target=self._io_loop, name="lmcache-client-io", daemon=True)
        self._io.start()
        self._hb: threading.Thread | None = None
        if heartbeat_interval_s > 0:
            self._hb = threading.Thread(target=self._heartbeat_loop, name="lmcache-client-hb", daemon=True)
            self._hb.start()

    # ---- public API -----------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether the transport is up (the server may still be slow to answer)."""
        return self._connected

    def ping(self, *, timeout_s: float | None = None) -> P.PingInfo:
        return self._call(P.Ping(), P.PingInfo, timeout_s)

    def register(
        self,
        pool: torch.Tensor | P.PoolDescriptor | RawCudaIPCWrapper,
        rank: int = 0,
        world_size: int = 1,
        model_name: str = "model",
        tokens_per_block: int = 32,
        *,
        instance_id: int | None = None,
        timeout_s: float | None = None,
    ) -> P.RegisterInfo:
        """Share ``pool`` with the server (CPU: after ``pool.share_memory_()``; CUDA: raw IPC).

        Becomes this client's default instance. Returns the server's chunk size among others.
        """
        from lmcache.server.pool_sharing import describe_pool

        desc = describe_pool(pool)
        iid = new_instance_id() if instance_id is None else instance_id
        self._check_ipc_owner()
        req = P.Register(
            instance_id=iid,
            rank=rank,
            world_size=world_size,
            model_name=model_name,
            tokens_per_block=tokens_per_block,
            pool=desc,
        )
        with self._reg_lock:
            info = self._call(req, P.RegisterInfo, timeout_s, retry_unknown=False)
            self._registrations[iid] = reg = _Registration(req, pool)
            reg.update(info)
            self.instance_id = iid
            self.server_id = info.server_id
        logger.info(
            "registered KV pool with the cache server at %s as instance %d (rank %d/%d, %s)",
            self.url,
            iid,
            rank,
            world_size,
            model_name,
        )
        return info

    def unregister(self, instance_id: int | None = None, *, timeout_s: float | None = None) -> bool:
        iid = self._iid(instance_id)
        req = P.Unregister(instance_id=iid, cap=self._cap(iid) or None)
        with self._reg_lock:
            self._registrations.pop(iid, None)
            if self.instance_id == iid:
                self.instance_id = next(iter(self._registrations), None)
        return self._call(req, bool, timeout_s, retry_unknown=False)

    def lookup(
        self,
        tokens: Any,
        cache_salt: str | int | None = None,
        pin_id: int | str | None = None,
        *,
        chunk_hashes: PromptHashes | None = None,
        instance_id: int | None = None,
        timeout_s: float | None = None,
    ) -> int:
        """Tokens of the longest prefix cached for every rank of this instance's world.

        With ``pin_id`` the hit stays pinned until every rank retrieved with that pin id (and
        ``pin_owner`` = this instance), ``release`` is called, or the server's pin TTL passes.
        For an instance this client registered, it sends the prompt's chunk hashes (when the server
        allows it), not its tokens; pass ``chunk_hashes`` (from :meth:`chunk_hashes`) to reuse them.
        """
        iid = self._iid(instance_id)
        req: P.Lookup | P.LookupHashes
        digests = self._digests(iid, chunk_hashes)
        if digests is None:
            hashed = self.chunk_hashes(tokens, cache_salt, instance_id=iid)
            digests = hashed.digests if hashed is not None else None
        if digests is not None:
            num_tokens = (
                len(tokens) // 8 if isinstance(tokens, (bytes, bytearray, memoryview)) else len(tokens)
            )
            req = P.LookupHashes(instance_id=iid, chunk_hashes=digests, num_tokens=num_tokens, pin_id=pin_id)
        else:
            req = P.Lookup(
                instance_id=iid, tokens=P.tokens_to_bytes(tokens), cache_salt=cache_salt, pin_id=pin_id
            )
        return self._call(req, int, timeout_s)

    def chunk_hashes(
        self, tokens: Any, cache_salt: str | int | None = None, *, instance_id: int | None = None
    ) -> PromptHashes | None:
        """The digests of the prompt's full chunks, as the server keys them for this instance (None if
        the server wants tokens, e.g. with ``save_unfull_chunk``).

        Hash a prompt once and pass the result as ``chunk_hashes`` to :meth:`lookup`, and as the
        prompt of :meth:`store` and :meth:`retrieve` transfers: they then send 32 bytes per chunk
        instead of 8 per token, and neither side hashes again.
        """
        reg = self._registrations.get(self._iid(instance_id))
        if reg is None or reg.hasher is None:
            return None
        ids = (
            P.ids_from_wire(bytes(tokens), "tokens")
            if isinstance(tokens, (bytes, bytearray, memoryview))
            else tokens
        )
        return PromptHashes(reg.hasher.scheme, reg.hasher.chunk_digests(ids, cache_salt), tokens, cache_salt)

    def _digests(self, iid: int, hashes: PromptHashes | None) -> bytes | None:
        """``hashes``' digests if the server keys this instance's chunks by the same scheme (it may
        have restarted with another, or the instance has another layout); else None: send tokens."""
        reg = self._registrations.get(iid)
        if hashes is None or reg is None or reg.hasher is None or reg.hasher.scheme != hashes.scheme:
            return None
        return hashes.digests

    def _prompt(self, iid: int, transfer: BlockTransfer[Tokens | bytes | PromptHashes]) -> dict[str, Any]:
        """The prompt fields of a store or retrieve: the chunk hashes if given and usable, else tokens."""
        prompt = transfer.prompt
        if isinstance(prompt, PromptHashes):
            digests = self._digests(iid, prompt)
            if digests is not None:
                return {"tokens": b"", "chunk_hashes": digests}
            return {"tokens": P.tokens_to_bytes(prompt.tokens), "cache_salt": prompt.cache_salt}
        return {"tokens": P.tokens_to_bytes(prompt), "cache_salt": transfer.salt}

    def release(
        self,
        pin_id: int | str,
        *,
        pin_owner: int | None = None,
        instance_id: int | None = None,
        timeout_s: float | None = None,
    ) -> bool:
        req = P.Release(instance_id=self._iid(instance_id), pin_id=pin_id, pin_owner=pin_owner)
        return self._call(req, bool, timeout_s, retry_unknown=False)

    def store(
        self,
        transfer: BlockTransfer[Tokens | bytes | PromptHashes],
        *,
        instance_id: int | None = None,
        timeout_s: float | None = None,
    ) -> int:
        """Save the chunks of ``transfer`` (see :class:`BlockTransfer`) from this rank's blocks;
        returns tokens newly stored.

        The prompt is token ids, or a :class:`PromptHashes` (see :meth:`chunk_hashes`): it then travels
        as its chunk hashes, and only the full chunks they name are stored. CUDA: the blocks must
        already hold their final values (synchronize the producing stream).
        """
        iid = self._iid(instance_id)
        req = P.Store(
            instance_id=iid,
            block_ids=P.tokens_to_bytes(transfer.block_ids),
            start=transfer.start,
            end=transfer.end,
            **self._prompt(iid, transfer),
        )
        return self._call(req, int, timeout_s, deadline=True)

    def retrieve(
        self,
        transfer: BlockTransfer[Tokens | bytes | PromptHashes],
        pin_id: int | str | None = None,
        *,
        pin_owner: int | None = None,
        instance_id: int | None = None,
        timeout_s: float | None = None,
    ) -> int:
        """Load tokens ``[transfer.start, transfer.end)`` into their blocks; returns how many were
        loaded (a prefix).

        The prompt as for :meth:`store`; hashes must name every chunk up to the one holding ``end``.
        """
        iid = self._iid(instance_id)
        req = P.Retrieve(
            instance_id=iid,
            block_ids=P.tokens_to_bytes(transfer.block_ids),
            start=transfer.start,
            end=transfer.end,
            pin_id=pin_id,
            pin_owner=pin_owner,
            **self._prompt(iid, transfer),
        )
        return self._call(req, int, timeout_s, deadline=True)

    def heartbeat(self, *, timeout_s: float | None = None) -> P.HeartbeatInfo:
        """Refresh this client's instances; re-registers those the server no longer knows."""
        with self._reg_lock:
            ids = list(self._registrations)
        info = self._call(P.Heartbeat(instance_ids=ids), P.HeartbeatInfo, timeout_s)
        if self.server_id is not None and info.server_id != self.server_id:
            logger.warning(
                "cache server at %s restarted (server id %s -> %s)", self.url, self.server_id, info.server_id
            )
        self.server_id = info.server_id
        for iid in info.unknown:
            self._reregister(iid, timeout_s)
        return info

    def stats(self, *, timeout_s: float | None = None) -> P.StatsInfo:
        return self._call(P.Stats(), P.StatsInfo, timeout_s)

    def clear(self, *, timeout_s: float | None = None) -> int:
        """Drop every cached chunk not pinned by a pending load (all clients'!)."""
        return self._call(P.Clear(), int, timeout_s)

    def close(self, *, unregister: bool = True) -> None:
        """Stop the threads and close the socket (first unregistering this client's pools)."""
        if self._closed:
            return
        if unregister:
            with self._reg_lock:
                ids = list(self._registrations)
            for iid in ids:
                with contextlib.suppress(ServerUnavailable, ServerError):
                    self.unregister(iid, timeout_s=min(self.timeout_s, 1.0))
        self._closed = True
        self._stop.set()
        self._wake()
        self._io.join(timeout=5)
        if self._hb is not None and self._hb is not threading.current_thread():
            self._hb.join(timeout=5)
        if self._direct_lock.acquire(timeout=5):  # a direct call in flight notices within 50 ms
            try:
                self._drop_direct()
            finally:
                self._direct_lock.release()
        with self._lock:
            for pending in self._pending.values():
                pending.failure = "client closed"
                pending.event.set()
            self._pending.clear()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> CacheServerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- calls ----------------------------------------------------------------------------------

    def _iid(self, instance_id: int | None) -> int:
        iid = self.instance_id if instance_id is None else instance_id
        if iid is None:
            raise RuntimeError("no instance registered with this client yet: call register(pool, ...) first")
        return iid

    def _call(
        self,
        req: Any,
        result_type: type[T],
        timeout_s: float | None,
        *,
        retry_unknown: bool = True,
        deadline: bool = False,
    ) -> T:
        try:
            return self._call_once(req, result_type, timeout_s, deadline)
        except Unauthorized:
            if not (self._tcp and self._find_secret) or client_secret() in (None, self._secret):
                raise
            self._secret = client_secret()  # the server's secret changed (a new file, after a restart)
            return self._call(req, result_type, timeout_s, retry_unknown=retry_unknown, deadline=deadline)
        except UnknownInstance:
            iid = getattr(req, "instance_id", None)
            if not retry_unknown or iid is None or iid not in self._registrations:
                raise
            self._reregister(iid, timeout_s)
            return self._call_once(req, result_type, timeout_s, deadline)

    def _check_ipc_owner(self) -> None:
        """Before a pool descriptor goes out: refuse an ipc socket another user owns (an impostor
        that took the path first would be handed the pool)."""
        if self._ipc_path is None:
            return
        try:
            owner = os.stat(self._ipc_path).st_uid
        except OSError:
            return  # not there (yet): the call fails as unreachable
        if not trusted_owner(owner):
            raise ServerUnavailable(
                f"the socket {self._ipc_path} belongs to uid {owner}, not to this user or root: refusing to "
                "hand it the KV pool; stop whatever made it, or use another --ipc-path / server_url"
            )

    def _stamp(self, req: Any) -> None:
        """Put the credentials in ``req``: the server secret (TCP), the named instances' capabilities."""
        if self._tcp and self._secret is None and self._find_secret:
            self._secret = client_secret()
        req.auth = self._secret
        if isinstance(req, P.Heartbeat):
            req.caps = [self._cap(iid) for iid in req.instance_ids]
        elif hasattr(req, "cap"):  # the current one: a retry after re-registering has a new one
            req.cap = self._cap(req.instance_id) or req.cap

    def _cap(self, iid: int) -> bytes:
        reg = self._registrations.get(iid)
        return reg.info.cap if reg is not None and reg.info is not None else b""

    def _reregister(self, iid: int, timeout_s: float | None) -> None:
        self._check_ipc_owner()
        with self._reg_lock:
            reg = self._registrations.get(iid)
            if reg is None:
                return
            info = self._call_once(reg.request, P.RegisterInfo, timeout_s, False)
            reg.update(info)
            self.server_id = info.server_id
            self.reregistrations += 1
        logger.warning(
            "cache server at %s did not know instance %d (it restarted or reaped us); "
            "registered the pool again",
            self.url,
            iid,
        )

    def _call_once(self, req: Any, result_type: type[T], timeout_s: float | None, deadline: bool) -> T:
        if self._closed:
            raise ServerUnavailable("the cache server client is closed")
        timeout = self.timeout_s if timeout_s is None else timeout_s
        op = type(req).__struct_config__.tag
        if not self._connected:
            listening = self._server_listening()
            if self._down and listening:
                self._reconnect_now()
            elif self.fail_fast and (listening is False or (self._down and listening is None)):
                with self._lock:
                    self._down = True
                raise ServerUnavailable(
                    f"cache server at {self.url} is unreachable (nothing accepts connections there); "
                    "is it running? start it with: python -m lmcache.v1.multiprocess.server"
                )
        rid = next(self._rids)
        req.rid = rid
        self._stamp(req)
        if deadline:
            req.timeout_ms = max(1, int(timeout * 1000))
        frame = P.encode(req)
        reply = None
        if threading.current_thread() is not self._hb:  # see the module docstring
            reply = self._direct_call(frame, rid, op, timeout)
        if reply is None:
            reply = self._queued_call(frame, rid, op, timeout)
        if reply.v != P.PROTOCOL_VERSION:
            raise VersionMismatch(
                P.ErrorCode.VERSION_MISMATCH.value,
                f"server replied with protocol v{reply.v}, this client speaks v{P.PROTOCOL_VERSION}; "
                "install the same lmcache release on both sides",
                op,
            )
        if not reply.ok:
            err = reply.error or P.ErrorInfo(P.ErrorCode.INTERNAL.value, "error reply without details")
            raise _ERRORS.get(err.code, ServerError)(err.code, err.message, op)
        try:
            value = msgspec.convert(reply.value, result_type)
        except msgspec.ValidationError as e:
            raise ServerError(P.ErrorCode.INTERNAL.value, f"unexpected reply value: {e}", op) from None
        if isinstance(value, (P.PingInfo, P.RegisterInfo)):
            self._learn_direct(value.server_id, value.direct)
        return value

    def _server_listening(self) -> bool | None:
        """Whether something accepts connections at the server's address now; None: cannot tell.

        Asked while the client is not connected. True after a failure: the server is back, and the
        call goes ahead on a freshly connected socket. False: refused or no socket file, so a
        ``fail_fast`` call fails at once instead of waiting ``timeout_s``. None (inproc URLs, or a
        TCP probe nobody answered within ``_PROBE_S``, after which probes pause for
        ``_PROBE_QUIET_S`` so a host that drops packets does not slow every call down).
        """
        scheme, rest = self.url.split("://", 1)
        if scheme == "inproc" or time.monotonic() < self._probe_quiet_until:
            return None
        try:
            if scheme == "ipc":
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.settimeout(_PROBE_S)
                    sock.connect(rest)
            else:
                host, _, port = rest.rpartition(":")
                with socket.create_connection((host.strip("[]"), int(port)), _PROBE_S):
                    pass
        except TimeoutError:
            self._probe_quiet_until = time.monotonic() + _PROBE_QUIET_S
            return None
        except (OSError, ValueError):
            return False
        return True

    def _reconnect_now(self) -> None:
        """The server is back: leave the fail-fast state and have the I/O thread connect a fresh socket
        at once rather than at ZMQ's next reconnect attempt."""
        with self._lock:
            self._down = False
            self._reset_requested = True
        self._wake()

    def _timed_out(self, op: str, timeout: float) -> ServerUnavailable:
        return ServerUnavailable(
            f"no reply to {op} from the cache server at {self.url} within {timeout:g} s; is it running? "
            "(start it with: python -m lmcache.v1.multiprocess.server)"
        )

    def _direct_call(self, frame: bytes, rid: int, op: str, timeout: float) -> P.Reply | None:
        """Send and wait on the direct lane, in the calling thread.

        None when the call should go through the I/O thread instead: another thread is using the
        lane, or it is not open (the server's lane is not known yet, or cannot be reached).
        """
        if not self._direct_lock.acquire(blocking=False):
            return None
        try:
            if self._closed:
                raise ServerUnavailable("the cache server client is closed")
            lane = self._direct
            if lane is None or lane.stale():  # the server went away since the last call: no news
                lane = self._open_direct(timeout)
                if lane is None:
                    return None
            deadline = time.monotonic() + timeout
            try:
                lane.send(frame, timeout)
            except TimeoutError:
                raise self._direct_timed_out(op, timeout) from None
            except OSError:
                self._drop_direct()
                return None  # the server did not take it: the I/O thread's path will
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._direct_timed_out(op, timeout)
                try:
                    data = lane.receive(min(_DIRECT_POLL_S, remaining), spin=_DIRECT_SPIN_S)
                except OSError:
                    self._drop_direct()
                    raise ServerUnavailable(
                        f"{op} to {self.url} failed: connection to the server lost before it answered"
                    ) from None
                if data is None:
                    if self._closed:
                        raise ServerUnavailable(f"{op} to {self.url} failed: client closed")
                    continue
                try:
                    reply = P.decode_reply(data)
                except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as e:
                    self._drop_direct()
                    raise ServerUnavailable(f"{op} to {self.url} failed: undecodable reply ({e})") from None
                # rid -1: the server could not read our request's id (e.g. a frame over its size
                # limit); with one request in flight on this lane, the answer is ours.
                if reply.rid != rid and reply.rid != -1:  # cannot happen (a lane that timed out is closed)
                    self._drop_direct()
                    raise ServerUnavailable(f"{op} to {self.url} failed: reply to another request")
                self._down = False
                self.direct_calls += 1
                return reply
        finally:
            self._direct_lock.release()

    def _direct_timed_out(self, op: str, timeout: float) -> ServerUnavailable:
        """Never let the reply arrive late on this lane, and fail fast until the connection is seen
        up again (like a timeout on the I/O thread's socket). Caller holds _direct_lock."""
        self._drop_direct()
        with self._lock:
            self._down = True
            self._reset_requested = True
        self._wake()
        return self._timed_out(op, timeout)

    def _learn_direct(self, server_id: str, lane: P.DirectLane | None) -> None:
        """Note where the server's direct lane listens (from a ping or register reply)."""
        if (server_id, lane) == self._direct_announced:
            return
        self._direct_announced = (server_id, lane)
        scheme, rest = self.url.split("://", 1)
        target: tuple[int, Any] | None = None
        if lane is not None and scheme == "tcp" and lane.port:
            target = (socket.AF_INET, (rest.rsplit(":", 1)[0].strip("[]"), lane.port))
        elif lane is not None and scheme == "ipc" and lane.ipc_name:
            target = (socket.AF_UNIX, os.path.join(os.path.dirname(rest), lane.ipc_name))
        if (server_id, target) != self._direct_target[:2]:
            self._direct_target = (server_id, target, 0.0)

    def _open_direct(self, timeout: float) -> _DirectLane | None:
        """Connect to the server's direct lane and check it is the server that advertised it.

        A lane that cannot be opened is tried again after a growing pause (up to a minute), so a
        port that a firewall drops costs a connect timeout rarely. Caller holds _direct_lock.
        """
        self._drop_direct()
        server_id, target, retry_at = self._direct_target
        if target is None or time.monotonic() < retry_at:
            return None
        family, address = target
        wait = min(timeout, _DIRECT_CONNECT_S)
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
            lane = _DirectLane(sock)
            rid = next(self._rids)
            lane.send(P.encode(P.Ping(rid=rid)), wait)
            data = lane.receive(wait)
            reply = P.decode_reply(data) if data is not None else None
            if reply is None or not reply.ok or reply.rid != rid:
                raise ConnectionError("no ping reply")
            if msgspec.convert(reply.value, P.PingInfo).server_id != server_id:
                raise ConnectionError(f"not the server {server_id} (a successor, or another program)")
        except (OSError, msgspec.DecodeError, msgspec.ValidationError, ValueError) as e:
            if sock is not None:
                sock.close()
            pause = min(_DIRECT_RETRY_MAX_S, max(_DIRECT_RETRY_MIN_S, 2 * self._direct_pause))
            self._direct_pause = pause
            self._direct_target = (server_id, target, time.monotonic() + pause)
            logger.debug(
                "cannot open the direct lane of %s at %s (%s); next try in %g s", self.url, address, e, pause
            )
            return None
        self._direct_pause = 0.0
        self._direct = lane
        return lane

    def _drop_direct(self) -> None:
        """Close the direct lane (a late reply dies with it). Caller holds _direct_lock."""
        if self._direct is not None:
            self._direct.close()
            self._direct = None

    def _queued_call(self, frame: bytes, rid: int, op: str, timeout: float) -> P.Reply:
        """Hand the request to the I/O thread and wait for its reply."""
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
                self._down = True
            self._wake()
            raise self._timed_out(op, timeout)
        if pending.failure is not None:
            raise ServerUnavailable(f"{op} to {self.url} failed: {pending.failure}")
        assert pending.reply is not None
        return pending.reply

    # ---- I/O thread -----------------------------------------------------------------------------

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"\0")

    def _new_socket(self) -> tuple[zmq.Socket, zmq.Socket]:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # never queue requests for a server that is not there
        sock.setsockopt(zmq.RECONNECT_IVL, _RECONNECT_MS)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, _RECONNECT_MS)
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
            self._connected = False
        self.reconnects += 1
        return self._new_socket()

    def _on_monitor(self, monitor: zmq.Socket) -> None:
        while True:
            try:
                msg = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if msg["event"] == zmq.EVENT_CONNECTED:
                self._connected = True
                self._down = False
            elif msg["event"] == zmq.EVENT_DISCONNECTED:
                # Requests already sent on the lost connection will never be answered: fail them now
                # instead of letting their callers wait for the timeout.
                with self._lock:
                    self._connected = False
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
            if self._ipc_path is not None:
                uid = peer_of_zmq(msg.get("Peer-Address")).uid
                if uid is not None and not trusted_owner(uid):
                    logger.error("ignoring a reply on %s from uid %d (not this user or root)", self.url, uid)
                    continue
            try:
                reply = P.decode_reply(msg.bytes)
            except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as e:
                logger.warning("undecodable reply from the cache server at %s: %s", self.url, e)
                continue
            with self._lock:
                pending = self._pending.pop(reply.rid, None)
                self._down = False
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

    # ---- heartbeat ------------------------------------------------------------------------------

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_interval_s):
            if not self._registrations:
                continue
            try:
                self.heartbeat(timeout_s=max(2.0, 2 * self.heartbeat_interval_s))
            except (ServerUnavailable, ServerError) as e:
                logger.debug("heartbeat to %s failed: %s", self.url, e)
            except Exception:
                if not self._stop.is_set():
                    logger.exception("heartbeat to %s", self.url)


def wait_for_server(url: str | None = None, timeout_s: float = 30.0) -> P.PingInfo:
    """Ping until the server answers (for scripts and tests); raises ServerUnavailable after timeout_s."""
    deadline = time.monotonic() + timeout_s
    with CacheServerClient(url, timeout_s=1.0, heartbeat_interval_s=0, fail_fast=False) as client:
        while True:
            try:
                return client.ping(timeout_s=min(1.0, max(0.05, deadline - time.monotonic())))
            except ServerUnavailable:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)
