"""L3: chunks in Redis / Valkey (one server, or a Redis Cluster), shared by every node that uses it.

URLs: ``redis://[user:pass@]host:port[/db]``, ``rediss://`` (TLS), ``unix:///path/to.sock``,
``valkey://`` (the Redis protocol) and ``redis-cluster://[user:pass@]host:port[,host:port...]``.
Keys are ``lmcache:v<key format>.<chunk format>:<model>:<layout signature>:<chunk key hex>``; values
are :mod:`lmcache.storage.chunk_format` chunks (``remote_serde: naive``).

Every call is bounded: existence checks by ``lookup_timeout_ms`` (a separate connection pool), reads
(a whole ``MGET`` reply) and writes by ``blocking_timeout_secs``; a call beyond the pool's
connections waits for one that long, then misses. redis-py's own retries are off. A failure marks
the server down for a :class:`~lmcache.backoff.Backoff` (circuit breaker): while down, calls return
``None`` at once instead of touching the network, so a dead server costs the engine nothing; one
rate-limited warning says so. The first call after the backoff probes the server again. A full
server (``-OOM``) only pauses writes, with a backoff of its own.

Writes send the chunk header and the L1 payload as separate buffers and reads go straight into L1
slots (:mod:`lmcache.storage.resp`). :class:`RemoteStore` is the remote
:class:`~lmcache.storage.lower_tier.LowerTier`.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote, unquote

from lmcache.backoff import Backoff
from lmcache.config import LMCacheEngineConfig
from lmcache.keys import ChunkKey
from lmcache.logging import init_logger
from lmcache.rate_limit import RateLimitedLog
from lmcache.remote_url import client_url, mask_password
from lmcache.storage.chunk_format import (
    ChunkHeader,
    CorruptChunk,
    Namespace,
    check_layout,
    encode_header,
    payload_checksum,
    try_decode,
)
from lmcache.storage.lower_tier import (
    ChecksumMemo,
    FetchStatus,
    LowerTier,
    Sink,
    TierStatus,
    WriteItem,
    WriteOutcome,
    payload_view,
)
from lmcache.storage.resp import Parts, RespReader, ZeroCopyPacker, protocol_error

logger = init_logger(__name__)


def _connection_class() -> type:
    from redis.connection import Connection

    class ZeroCopyConnection(Connection):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("command_packer", ZeroCopyPacker())
            super().__init__(*args, **kwargs)

    return ZeroCopyConnection


REDIS_INSTALL = "pip install 'lmcache-trtllm[redis]'"


REDIS_MIN_VERSION = (5, 3)
"""redis-py's ``ConnectionPool.get_connection()`` takes no command name from 5.3 on (reads use it)."""


def require_redis(version: str | None = None) -> None:
    """Raise ``ImportError`` naming the install command when the optional ``redis`` package is missing
    or older than :data:`REDIS_MIN_VERSION` (``version``: the installed one, read if None)."""
    try:
        import redis
    except ImportError:
        raise ImportError(
            f"remote_url is set but the Python package 'redis' is not installed: {REDIS_INSTALL} "
            "(or unset remote_url / LMCACHE_REMOTE_URL)"
        ) from None
    installed = version if version is not None else str(redis.__version__)
    parts = tuple(int(p) if p.isdigit() else 0 for p in installed.split(".")[:2])
    if parts < REDIS_MIN_VERSION:
        raise ImportError(
            f"remote_url is set but the installed redis package is {installed}; it needs "
            f"{'.'.join(map(str, REDIS_MIN_VERSION))} or newer: {REDIS_INSTALL} --upgrade "
            "(or unset remote_url / LMCACHE_REMOTE_URL)"
        )


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def parse_cluster_nodes(url: str) -> tuple[list[tuple[str, int]], str | None, str | None]:
    """``redis-cluster://[user:pass@]h1:p1,h2:p2`` -> ([(h1, p1), (h2, p2)], user, password)."""
    rest = client_url(url)[len("redis-cluster://") :]
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
        raise ValueError(f"remote_url {mask_password(url)!r}: no host:port in a redis-cluster:// URL")
    return nodes, user, password


class RemoteStore(LowerTier):
    """Batched, bounded access to chunks in Redis/Valkey; ``None`` results of the ``*_many`` calls mean
    "remote unavailable". Also the remote :class:`LowerTier` (``name`` ``remote``)."""

    name = "remote"

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 10.0,
        lookup_timeout_s: float = 3.0,
        backoff: Backoff | None = None,
        write_batch: int = 8,
        max_connections: int = 16,
    ) -> None:
        self.url = url
        self.where = mask_password(url)
        self.cluster = url.startswith("redis-cluster://")
        self.timeout_s = timeout_s
        self.lookup_timeout_s = lookup_timeout_s
        self.backoff = backoff if backoff is not None else Backoff(1.0, 30.0)
        self.write_batch = max(1, write_batch)
        self.max_connections = max_connections
        # A call holds one connection of its client's pool (per node on a cluster) at a time, so at
        # most ``max_connections`` calls run at once per client and the pool never runs out.
        self._slots = tuple(threading.BoundedSemaphore(max_connections) for _ in range(2))
        # A full server (maxmemory, noeviction) pauses writes only: its chunks can still be read.
        self.write_backoff = Backoff(self.backoff.initial_s, self.backoff.max_s)
        self._clients: tuple[Any, Any] | None = None
        self._lock = threading.Lock()
        self._warn = RateLimitedLog(logger)
        self.corrupt_removed = 0
        self.closed = False
        require_redis()
        if self.cluster:
            parse_cluster_nodes(url)  # bad URLs fail at start-up

    @classmethod
    def from_config(cls, config: LMCacheEngineConfig) -> RemoteStore | None:
        """The tier ``remote_url`` asks for, or None when it is unset."""
        if config.remote_url is None:
            return None
        logger.info("remote tier: %s", mask_password(config.remote_url))
        return cls(
            config.remote_url,
            timeout_s=config.blocking_timeout_secs,
            lookup_timeout_s=config.lookup_timeout_ms / 1000.0,
            backoff=Backoff(config.tier_retry_initial_s, config.tier_retry_max_s),
            write_batch=config.remote_write_batch,
        )

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
            # RESP2: no push frames (invalidations, maintenance notices) a server may send a RESP3 client
            # at any time, e.g. between an MGET and its reply, which the zero-copy reader reads itself.
            "protocol": 2,
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
        url = client_url(self.url)
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
        return not self.closed and self.backoff.ready()

    def _failed(self, what: str, exc: BaseException) -> None:
        backoff = self.backoff.failed()
        self._warn.warning(
            "down",
            "remote tier %s unavailable during %s (%s: %s); serving from L1/L2 without it, retrying in "
            "%.1fs (with backoff)",
            self.where,
            what,
            type(exc).__name__,
            exc,
            backoff,
        )
        if self.cluster:
            self._reset_clients()

    def _full(self, exc: BaseException) -> None:
        pause = self.write_backoff.failed()
        self._warn.warning(
            "full",
            "remote tier %s is full (%s: %s); not writing new chunks for %.1fs (with backoff), reading "
            "goes on. Raise its maxmemory or choose an evicting maxmemory-policy (e.g. allkeys-lru).",
            self.where,
            type(exc).__name__,
            exc,
            pause,
        )

    def _ok(self) -> None:
        if self.backoff.succeeded():
            logger.info("remote tier %s is reachable again", self.where)

    def _reset_clients(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, None
        for client in clients or ():
            with contextlib.suppress(Exception):  # best effort on a broken client
                client.close()

    def _guard(self, what: str, lookup: bool, fn: Any) -> Any:
        if not self.available():
            return None
        slots = self._slots[1 if lookup else 0]
        if not slots.acquire(timeout=self.lookup_timeout_s if lookup else self.timeout_s):
            # Busy here, not down there: a miss for this call, the server is not backed off.
            self._warn.warning(
                "busy",
                "remote tier %s: all %d connections stayed busy for the whole %s timeout; answered as a miss",
                self.where,
                self.max_connections,
                what,
            )
            return None
        try:
            result = fn(self._client(lookup))
        except Exception as exc:  # noqa: BLE001 - any failure of this tier is a miss, never the caller's error
            if _server_full(exc):
                self._full(exc)
            else:
                self._failed(what, exc)
            return None
        finally:
            slots.release()
        self._ok()
        return result

    def close(self) -> None:
        self.closed = True
        self._reset_clients()

    # -- the LowerTier contract -----------------------------------------------------------------

    def known(self, ns: Namespace, key: ChunkKey) -> bool:
        return False  # only a round trip can tell

    def contains(self, ns: Namespace, keys: Sequence[ChunkKey]) -> list[bool]:
        return self.exists_many(ns, keys) or [False] * len(keys)

    def accepts_writes(self) -> bool:
        return self.available() and self.write_backoff.ready()

    def write(self, items: Sequence[WriteItem], checksums: ChecksumMemo) -> WriteOutcome:
        if not self.write_backoff.ready():  # queued before the server was found full
            return WriteOutcome(0, 0, len(items))
        batch = []
        for item in items:
            item.chunk.wait_ready_on_host()
            payload = payload_view(item.chunk)
            checksum = checksums.get(item.chunk)
            if checksum is None:
                checksum = payload_checksum(payload)
                checksums.put(item.chunk, checksum)
            header = encode_header(item.key, item.ns, item.chunk.num_tokens, payload, checksum)
            batch.append((item.ns, item.key, (header, payload)))
        written = self.put_many(batch)
        if written is None:
            return WriteOutcome(0, 0, len(items))
        return WriteOutcome(written, sum(item.chunk.nbytes for item in items), 0)

    def status(self) -> TierStatus:
        state = self.backoff.state()
        reason = None
        if self.closed:
            reason = "closed"
        elif state.failing:
            reason = f"unreachable ({state.failures} failures), next attempt in {state.retry_in_s:.1f}s"
        return TierStatus(
            healthy=reason is None,
            reason=reason,
            failures=state.failures,
            corrupt_chunks=self.corrupt_removed,
        )

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

    def fetch_into(self, ns: Namespace, keys: Sequence[ChunkKey], sink: Sink) -> list[FetchStatus]:
        """Fetch chunks straight into the buffers ``sink`` hands out; one MGET. All ``MISSING`` if the
        remote is unavailable; corrupt values are deleted (one warning, rate-limited).

        On one server the reply is read from the socket directly into the buffers (one copy, no
        chunk-sized ``bytes``); on a cluster it goes through ``MGET`` per node and one copy.
        """
        if not keys:
            return []
        fetch = self._fetch_copy if self.cluster else self._fetch_raw
        statuses = self._guard("fetch", False, lambda client: fetch(client, ns, keys, sink))
        if statuses is None:
            return [FetchStatus.MISSING] * len(keys)
        corrupt = [key for key, status in zip(keys, statuses, strict=True) if status is FetchStatus.CORRUPT]
        if corrupt:
            with self._lock:
                self.corrupt_removed += len(corrupt)
            self._warn.warning(
                "remote-corrupt",
                "remote tier: %d corrupt chunk values (e.g. %s) treated as misses and deleted",
                len(corrupt),
                self.key_name(ns, corrupt[0]).decode(errors="replace"),
            )
            self.delete_many(ns, corrupt)
        return statuses

    def _fetch_copy(
        self, client: Any, ns: Namespace, keys: Sequence[ChunkKey], sink: Sink
    ) -> list[FetchStatus]:
        values = client.mget_nonatomic([self.key_name(ns, k) for k in keys])
        statuses = []
        for i, (key, value) in enumerate(zip(keys, values, strict=True)):
            if value is None:
                statuses.append(FetchStatus.MISSING)
                continue
            decoded = try_decode(value, key, ns)
            if decoded is None or not _layout_ok(decoded[0]):
                statuses.append(FetchStatus.CORRUPT)
                continue
            out = sink(i, decoded[0].payload_len, decoded[0].num_tokens)
            if out is None:
                statuses.append(FetchStatus.SKIPPED)
                continue
            out[:] = decoded[1]
            statuses.append(FetchStatus.OK)
        return statuses

    def _fetch_raw(
        self, client: Any, ns: Namespace, keys: Sequence[ChunkKey], sink: Sink
    ) -> list[FetchStatus]:
        pool = client.connection_pool
        conn = pool.get_connection()
        try:
            conn.send_command("MGET", *[self.key_name(ns, k) for k in keys])
            sock = conn._sock  # redis-py keeps its socket there; no public accessor
            timeout = sock.gettimeout()
            # The whole reply within the timeout, not each receive: a server that trickles a large
            # reply would otherwise hold the caller (the scheduler) for as long as it trickles.
            reader = RespReader(sock, deadline=time.monotonic() + self.timeout_s)
            count = reader.array_header()
            if count != len(keys):
                raise protocol_error(f"MGET returned {count} values for {len(keys)} keys")
            statuses = [reader.chunk_value(i, key, ns, sink) for i, key in enumerate(keys)]
            sock.settimeout(timeout)  # back to redis-py as it was
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
                self.write_backoff.succeeded()
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


def _server_full(exc: BaseException) -> bool:
    """Whether ``exc`` is the server refusing a write for lack of memory (``-OOM``)."""
    from redis.exceptions import OutOfMemoryError

    return isinstance(exc, OutOfMemoryError)


def _layout_ok(header: ChunkHeader) -> bool:
    try:
        check_layout(header)
    except CorruptChunk:
        return False
    return True
