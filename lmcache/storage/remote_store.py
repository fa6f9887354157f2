"""L3: chunks in Redis / Valkey (one server, or a Redis Cluster), shared by every node that uses it.

URLs: ``redis://[user:pass@]host:port[/db]``, ``rediss://`` (TLS), ``unix:///path/to.sock``,
``valkey://`` (the Redis protocol) and ``redis-cluster://[user:pass@]host:port[,host:port...]``.
Keys are ``lmcache:v<key format>.<chunk format>:<model>:<layout signature>:<chunk key hex>``; values
are :mod:`lmcache.storage.chunk_format` chunks (``remote_serde: naive``).

Every call is bounded: existence checks by ``lookup_timeout_ms`` (a separate connection pool), reads
and writes by ``blocking_timeout_secs``. redis-py's own retries are off. A failure marks the server
down for a backoff that doubles up to a cap (circuit breaker): while down, calls return ``None`` at
once instead of touching the network, so a dead server costs the engine nothing; one rate-limited
warning says so. The first call after the backoff probes the server again.

Writes send the chunk header and the L1 payload as separate buffers (a command packer that never
joins large arguments), so a chunk goes from pinned host memory to the socket without a copy.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from lmcache.keys import ChunkKey
from lmcache.logging import init_logger
from lmcache.rate_limit import RateLimitedLog
from lmcache.storage.chunk_format import (
    FIXED_HEADER_BYTES,
    ChunkHeader,
    CorruptChunk,
    Namespace,
    check_header,
    check_layout,
    header_length,
    new_checksum,
    parse_header,
    try_decode,
)

logger = init_logger(__name__)

_CUTOFF = 6000
_READ_SIZE = 1 << 16
_RECV_PIECE = 256 << 10

Sink = Callable[[int, ChunkHeader], "memoryview | None"]
"""Gives the buffer a verified-header chunk's payload goes into (an L1 slot), or None to skip it."""

# fetch_into statuses
OK, MISSING, CORRUPT, SKIPPED = "ok", "missing", "corrupt", "skipped"


class Parts:
    """A command argument made of several buffers, sent back to back without being joined."""

    __slots__ = ("nbytes", "parts")

    def __init__(self, parts: Sequence[Any]) -> None:
        self.parts = [memoryview(p).cast("B") if not isinstance(p, bytes) else p for p in parts]
        self.nbytes = sum(len(p) for p in self.parts)


class ZeroCopyPacker:
    """RESP command packer that keeps large arguments (and :class:`Parts`) as separate buffers.

    redis-py sends the list it returns item by item (``sendall``), and its pipeline packing keeps
    large items separate, so payloads are never copied into one big ``bytes``. (redis-py's hiredis
    packer, its default when hiredis is installed, copies every argument twice.)
    """

    def pack(self, *args: Any) -> list[Any]:
        first = args[0]
        if isinstance(first, str):
            args = (*first.encode().split(), *args[1:])
        elif b" " in first:
            args = (*first.split(), *args[1:])
        out: list[Any] = []
        buf = b"*%d\r\n" % len(args)
        for arg in args:
            if isinstance(arg, Parts):
                out.append(buf + b"$%d\r\n" % arg.nbytes)
                out.extend(arg.parts)
                buf = b"\r\n"
                continue
            if isinstance(arg, str):
                arg = arg.encode()
            elif isinstance(arg, bool):
                raise TypeError("refusing to send a bool to Redis")
            elif isinstance(arg, (int, float)):
                arg = repr(arg).encode()
            elif isinstance(arg, (bytearray, memoryview)):
                arg = memoryview(arg).cast("B")
            size = len(arg)
            if size > _CUTOFF or isinstance(arg, memoryview):
                out.append(buf + b"$%d\r\n" % size)
                out.append(arg)
                buf = b"\r\n"
            else:
                buf += b"$%d\r\n%s\r\n" % (size, arg)
        out.append(buf)
        return out


def _connection_class() -> type:
    from redis.connection import Connection

    class ZeroCopyConnection(Connection):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("command_packer", ZeroCopyPacker())
            super().__init__(*args, **kwargs)

    return ZeroCopyConnection


REDIS_INSTALL = "pip install 'lmcache-trtllm[redis]'"


def require_redis() -> None:
    """Raise ``ImportError`` naming the install command when the optional ``redis`` package is missing."""
    try:
        import redis  # noqa: F401 - only checking that it is there
    except ImportError:
        raise ImportError(
            f"remote_url is set but the Python package 'redis' is not installed: {REDIS_INSTALL} "
            "(or unset remote_url / LMCACHE_REMOTE_URL)"
        ) from None


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def describe_url(url: str) -> str:
    """The URL with its password masked (for logs)."""
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return parts._replace(netloc=netloc).geturl()
    return url


def parse_cluster_nodes(url: str) -> tuple[list[tuple[str, int]], str | None, str | None]:
    """``redis-cluster://[user:pass@]h1:p1,h2:p2`` -> ([(h1, p1), (h2, p2)], user, password)."""
    rest = url[len("redis-cluster://") :]
    rest = rest.split("/", 1)[0].split("?", 1)[0]
    user = password = None
    if "@" in rest:
        cred, rest = rest.rsplit("@", 1)
        if ":" in cred:
            user, password = (unquote(x) or None for x in cred.split(":", 1))
        else:
            password = unquote(cred) or None
    nodes = []
    for item in rest.split(","):
        item = item.strip()
        if not item:
            continue
        host, _, port = item.rpartition(":")
        if not host:
            host, port = item, "6379"
        nodes.append((host.strip("[]"), int(port)))
    if not nodes:
        raise ValueError(f"remote_url {describe_url(url)!r}: no host:port in a redis-cluster:// URL")
    return nodes, user, password


class RemoteStore:
    """Batched, bounded access to chunks in Redis/Valkey; ``None`` results mean "remote unavailable"."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 10.0,
        lookup_timeout_s: float = 3.0,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 30.0,
        max_connections: int = 16,
    ) -> None:
        self.url = url
        self.cluster = url.startswith("redis-cluster://")
        self.timeout_s = timeout_s
        self.lookup_timeout_s = lookup_timeout_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.max_connections = max_connections
        self._clients: tuple[Any, Any] | None = None
        self._lock = threading.Lock()
        self._warn = RateLimitedLog(logger)
        self._down_until = 0.0
        self._backoff = 0.0
        self.failures = 0
        self.closed = False
        require_redis()
        if self.cluster:
            parse_cluster_nodes(url)  # bad URLs fail at start-up

    # -- connection management ------------------------------------------------------------------

    def _make_client(self, timeout: float) -> Any:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        common: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "retry": Retry(NoBackoff(), 0),
            "max_connections": self.max_connections,
        }
        if self.cluster:
            from redis.cluster import ClusterNode, RedisCluster

            nodes, user, password = parse_cluster_nodes(self.url)
            host, port = nodes[0]
            cred = ""
            if user or password:
                cred = f"{quote(user or '', safe='')}:{quote(password or '', safe='')}@"
            # Given a URL, redis-py builds the node clients from connection kwargs, which is what
            # lets the zero-copy connection class through.
            return RedisCluster(
                url=f"redis://{cred}{_host_for_url(host)}:{port}",
                startup_nodes=[ClusterNode(h, p) for h, p in nodes[1:]],
                connection_class=_connection_class(),
                **common,
            )
        url = self.url
        if url.startswith("valkey://"):
            url = "redis://" + url[len("valkey://") :]
        pool = redis.ConnectionPool.from_url(url, command_packer=ZeroCopyPacker(), **common)
        return redis.Redis(connection_pool=pool)

    def _client(self, lookup: bool) -> Any:
        clients = self._clients
        if clients is None:
            with self._lock:
                if self.closed:
                    raise RuntimeError("remote store is closed")
                if self._clients is None:
                    self._clients = (
                        self._make_client(self.timeout_s),
                        self._make_client(self.lookup_timeout_s),
                    )
                clients = self._clients
        return clients[1] if lookup else clients[0]

    def available(self) -> bool:
        return not self.closed and time.monotonic() >= self._down_until

    def _failed(self, what: str, exc: BaseException) -> None:
        with self._lock:
            self.failures += 1
            self._backoff = min(self.backoff_max_s, max(self.backoff_initial_s, self._backoff * 2))
            self._down_until = time.monotonic() + self._backoff
            backoff = self._backoff
        self._warn.warning(
            "down",
            "remote tier %s unavailable during %s (%s: %s); serving from L1/L2 without it, retrying in "
            "%.1fs (with backoff)",
            describe_url(self.url),
            what,
            type(exc).__name__,
            exc,
            backoff,
        )
        if self.cluster:
            self._reset_clients()

    def _ok(self) -> None:
        if self._backoff:
            with self._lock:
                was_down = self._backoff != 0.0
                self._backoff = 0.0
                self._down_until = 0.0
            if was_down:
                logger.info("remote tier %s is reachable again", describe_url(self.url))

    def _reset_clients(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, None
        for client in clients or ():
            with contextlib.suppress(Exception):  # best effort on a broken client
                client.close()

    def _guard(self, what: str, lookup: bool, fn: Any) -> Any:
        if not self.available():
            return None
        try:
            result = fn(self._client(lookup))
        except Exception as exc:  # noqa: BLE001 - any failure of this tier is a miss, never the caller's error
            self._failed(what, exc)
            return None
        self._ok()
        return result

    def close(self) -> None:
        self.closed = True
        self._reset_clients()

    # -- keys -----------------------------------------------------------------------------------

    @staticmethod
    def key_name(ns: Namespace, key: ChunkKey) -> bytes:
        return (ns.remote_prefix + key.hex()).encode()

    # -- operations -----------------------------------------------------------------------------

    def exists_many(self, ns: Namespace, keys: Sequence[ChunkKey]) -> list[bool] | None:
        """Which chunks exist, in one round trip (a pipeline of EXISTS); None if unavailable."""
        if not keys:
            return []
        names = [self.key_name(ns, k) for k in keys]

        def run(client: Any) -> list[bool]:
            pipe = client.pipeline(transaction=False)
            for name in names:
                pipe.exists(name)
            return [bool(x) for x in pipe.execute()]

        return self._guard("lookup", True, run)

    def get_many(self, ns: Namespace, keys: Sequence[ChunkKey]) -> list[bytes | None] | None:
        """The values of ``keys`` (None where missing), one MGET (per cluster node); None if unavailable."""
        if not keys:
            return []
        names = [self.key_name(ns, k) for k in keys]

        def run(client: Any) -> list[bytes | None]:
            if self.cluster:
                return list(client.mget_nonatomic(names))
            return list(client.mget(names))

        return self._guard("fetch", False, run)

    def fetch_into(self, ns: Namespace, keys: Sequence[ChunkKey], sink: Sink) -> list[str] | None:
        """Fetch chunks straight into the buffers ``sink`` hands out; one MGET.

        Returns a status per key: ``ok`` (payload written and verified), ``missing``, ``corrupt``
        (bad header or checksum: the buffer, if one was handed out, holds garbage) or ``skipped``
        (``sink`` returned None); None if the remote is unavailable. On one server the reply is read
        from the socket directly into the buffers (one copy, no 7 MB ``bytes`` per chunk); on a
        cluster it goes through ``MGET`` per node and one copy.
        """
        if not keys:
            return []
        if self.cluster:
            return self._guard("fetch", False, lambda client: self._fetch_copy(client, ns, keys, sink))
        return self._guard("fetch", False, lambda client: self._fetch_raw(client, ns, keys, sink))

    def _fetch_copy(self, client: Any, ns: Namespace, keys: Sequence[ChunkKey], sink: Sink) -> list[str]:
        values = client.mget_nonatomic([self.key_name(ns, k) for k in keys])
        statuses = []
        for i, (key, value) in enumerate(zip(keys, values, strict=True)):
            if value is None:
                statuses.append(MISSING)
                continue
            decoded = try_decode(value, key, ns)
            if decoded is None or not _layout_ok(decoded[0]):
                statuses.append(CORRUPT)
                continue
            out = sink(i, decoded[0])
            if out is None:
                statuses.append(SKIPPED)
                continue
            out[:] = decoded[1]
            statuses.append(OK)
        return statuses

    def _fetch_raw(self, client: Any, ns: Namespace, keys: Sequence[ChunkKey], sink: Sink) -> list[str]:
        pool = client.connection_pool
        conn = pool.get_connection()
        try:
            conn.send_command("MGET", *[self.key_name(ns, k) for k in keys])
            reader = _RespReader(conn._sock)
            count = reader.array_header()
            if count != len(keys):
                raise _protocol_error(f"MGET returned {count} values for {len(keys)} keys")
            statuses = [reader.chunk_value(i, key, ns, sink) for i, key in enumerate(keys)]
        except BaseException:
            conn.disconnect()  # the stream position is unknown: never reuse this connection
            raise
        finally:
            pool.release(conn)
        return statuses

    def put_many(self, items: Sequence[tuple[Namespace, ChunkKey, Sequence[Any]]]) -> int | None:
        """Store chunks given as buffers (header, payload) not already present; one pipeline of EXISTS,
        one of SET. Returns how many were written, None if unavailable."""
        if not items:
            return 0
        names = [self.key_name(ns, key) for ns, key, _ in items]

        def run(client: Any) -> int:
            pipe = client.pipeline(transaction=False)
            for name in names:
                pipe.exists(name)
            present = pipe.execute()
            pipe = client.pipeline(transaction=False)
            written = 0
            for name, (_, _, parts), have in zip(names, items, present, strict=True):
                if not have:
                    pipe.set(name, Parts(parts))
                    written += 1
            if written:
                pipe.execute()
            return written

        return self._guard("write", False, run)

    def delete_many(self, ns: Namespace, keys: Sequence[ChunkKey]) -> int | None:
        if not keys:
            return 0
        names = [self.key_name(ns, k) for k in keys]

        def run(client: Any) -> int:
            pipe = client.pipeline(transaction=False)
            for name in names:
                pipe.delete(name)
            return sum(int(x) for x in pipe.execute())

        return self._guard("delete", False, run)

    def ping(self) -> bool:
        return bool(self._guard("ping", True, lambda client: client.ping()))


def _layout_ok(header: ChunkHeader) -> bool:
    try:
        check_layout(header)
    except CorruptChunk:
        return False
    return True


def _protocol_error(msg: str) -> Exception:
    from redis.exceptions import ResponseError

    return ResponseError(msg)


class _RespReader:
    """Reads one RESP2 reply off a socket: small items through a buffer, chunk payloads straight into
    the caller's buffers with ``recv_into``."""

    def __init__(self, sock: Any) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.pos = 0

    def _fill(self) -> None:
        if self.pos:
            del self.buf[: self.pos]
            self.pos = 0
        data = self.sock.recv(_READ_SIZE)
        if not data:
            from redis.exceptions import ConnectionError as RedisConnectionError

            raise RedisConnectionError("connection closed by the server while reading a reply")
        self.buf += data

    def line(self) -> bytes:
        while True:
            end = self.buf.find(b"\r\n", self.pos)
            if end >= 0:
                out = bytes(self.buf[self.pos : end])
                self.pos = end + 2
                return out
            self._fill()

    def read(self, n: int) -> bytes:
        while len(self.buf) - self.pos < n:
            self._fill()
        out = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return out

    def read_into(self, out: memoryview, checksum: Any = None) -> None:
        """Fill ``out`` (buffered bytes first, then ``recv_into``), feeding ``checksum`` as it goes."""
        buffered = min(len(self.buf) - self.pos, out.nbytes)
        if buffered:
            out[:buffered] = self.buf[self.pos : self.pos + buffered]
            self.pos += buffered
            if checksum is not None:
                checksum.update(out[:buffered])
        got = buffered
        while got < out.nbytes:
            n = self.sock.recv_into(out[got : got + _RECV_PIECE])
            if not n:
                from redis.exceptions import ConnectionError as RedisConnectionError

                raise RedisConnectionError("connection closed by the server while reading a value")
            if checksum is not None:
                checksum.update(out[got : got + n])
            got += n

    def skip(self, n: int) -> None:
        scratch = memoryview(bytearray(min(n, 1 << 20)))
        while n:
            step = min(n, scratch.nbytes)
            self.read_into(scratch[:step])
            n -= step

    def array_header(self) -> int:
        head = self.line()
        if head.startswith(b"-"):
            raise _protocol_error(head[1:].decode(errors="replace"))
        if not head.startswith(b"*"):
            raise _protocol_error(f"expected an array reply, got {head[:40]!r}")
        return int(head[1:])

    def chunk_value(self, index: int, key: ChunkKey, ns: Namespace, sink: Sink) -> str:
        head = self.line()
        if head == b"_":  # RESP3 null
            return MISSING
        if not head.startswith(b"$"):
            raise _protocol_error(f"expected a bulk string, got {head[:40]!r}")
        length = int(head[1:])
        if length < 0:
            return MISSING
        status = self._chunk_body(index, key, ns, sink, length)
        if self.read(2) != b"\r\n":
            raise _protocol_error("bulk string not terminated by CRLF")
        return status

    def _chunk_body(self, index: int, key: ChunkKey, ns: Namespace, sink: Sink, length: int) -> str:
        if length < FIXED_HEADER_BYTES:
            self.skip(length)
            return CORRUPT
        prefix = self.read(FIXED_HEADER_BYTES)
        consumed = FIXED_HEADER_BYTES
        try:
            header_len = header_length(prefix)
            if header_len > length:
                raise CorruptChunk("value shorter than its header")
            rest = self.read(header_len - FIXED_HEADER_BYTES)
            consumed = header_len
            header = parse_header(prefix + rest)
            check_header(header, key, ns)
            check_layout(header)
            if header.total_len != length:
                raise CorruptChunk("value length does not match its header")
        except CorruptChunk:
            self.skip(length - consumed)
            return CORRUPT
        out = sink(index, header)
        if out is None or out.nbytes != header.payload_len:
            self.skip(header.payload_len)
            return SKIPPED
        checksum = new_checksum()
        self.read_into(out, checksum)
        return OK if checksum.intdigest() == header.checksum else CORRUPT
