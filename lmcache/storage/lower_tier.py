"""The contract every tier below L1 implements (disk, Redis, ...), and the types it speaks in.

:class:`~lmcache.storage.tiers.TierManager` holds an ordered list of :class:`LowerTier` (L2 first)
and never names one: adding a tier (an object store, say) is a new module implementing this class
plus its line in :data:`lmcache.storage.tiers.TIER_FACTORIES`.

What the manager relies on:

- every method is thread-safe and fail-soft: an unavailable tier answers "not there" / "dropped"
  (and warns once, rate-limited) instead of raising; it backs off (:class:`lmcache.backoff.Backoff`)
  and :meth:`LowerTier.status` reports it unhealthy meanwhile;
- nothing unverified reaches L1: :meth:`LowerTier.fetch_into` reports ``OK`` only for a payload
  whose header matched the key and whose checksum matched the bytes written into the buffer;
- :meth:`LowerTier.write` never keeps a reference to an item's L1 bytes after it returns (the
  manager unpins the chunk then).

The manager calls a tier through :class:`FailSoft`, so a tier that raises all the same (a bug, or
one closed under a call) costs that call's answer, never the caller's lookup or store.
"""

from __future__ import annotations

import enum
import threading
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from lmcache.keys import ChunkKey
from lmcache.logging import init_logger
from lmcache.rate_limit import RateLimitedLog
from lmcache.storage.chunk_format import Namespace
from lmcache.storage.cpu_store import CachedChunk
from lmcache.storage.fetch_threads import FetchThreads

logger = init_logger(__name__)
_T = TypeVar("_T")

__all__ = [
    "ChecksumMemo",
    "FailSoft",
    "FetchStatus",
    "LowerTier",
    "Sink",
    "TierStatus",
    "WriteItem",
    "WriteOutcome",
    "payload_view",
    "submit_or_run",
]


class FetchStatus(enum.Enum):
    """What :meth:`LowerTier.fetch_into` did for one key."""

    OK = "ok"
    """Payload written into the sink's buffer and verified."""
    MISSING = "missing"
    """Not in the tier (or the tier is unavailable)."""
    CORRUPT = "corrupt"
    """Found but failed a check; the buffer, if one was handed out, holds garbage."""
    SKIPPED = "skipped"
    """The sink gave no buffer (e.g. the chunk reached L1 meanwhile)."""


Sink = Callable[[int, int, int], "memoryview | None"]
"""``sink(index, payload_len, num_tokens)``: the buffer the ``index``-th key's verified-header
payload goes into (exactly ``payload_len`` bytes, an L1 slot), or None to skip it."""


@dataclass(frozen=True, eq=False)
class WriteItem:
    """One committed L1 chunk to write; pinned by the manager until :meth:`LowerTier.write` returns."""

    ns: Namespace
    key: ChunkKey
    chunk: CachedChunk


@dataclass(frozen=True)
class WriteOutcome:
    """What one :meth:`LowerTier.write` call did: chunks now in the tier (newly written or already
    there), their payload bytes, and chunks not written (tier down, full, an I/O error)."""

    written: int
    written_bytes: int
    dropped: int


@dataclass(frozen=True)
class TierStatus:
    """A tier's own view of itself: health, failure and corruption counts, usage where known, and
    ``state``: what it is busy with besides serving, in words (the disk tier's start-up scan)."""

    healthy: bool
    reason: str | None
    failures: int
    corrupt_chunks: int
    used_bytes: int | None = None
    capacity_bytes: int | None = None
    chunks: int | None = None
    evictions: int | None = None
    state: str | None = None


def payload_view(chunk: CachedChunk) -> memoryview:
    """The chunk's L1 bytes as a flat memoryview (no copy)."""
    return memoryview(chunk.buffer.data[: chunk.nbytes].numpy())


class ChecksumMemo:
    """Payload checksums of L1 chunks, so a chunk written to several tiers is hashed once.

    Keyed weakly by the :class:`CachedChunk`: a chunk's bytes never change while it is committed,
    and a reused slot belongs to a new chunk object.
    """

    def __init__(self) -> None:
        self._sums: weakref.WeakKeyDictionary[CachedChunk, int] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def get(self, chunk: CachedChunk) -> int | None:
        with self._lock:
            return self._sums.get(chunk)

    def put(self, chunk: CachedChunk, checksum: int) -> None:
        with self._lock:
            self._sums[chunk] = checksum


class LowerTier(ABC):
    """A tier below L1. ``name`` labels it in stats and metrics; ``where`` says where it is (a path,
    a URL without its password); ``write_batch`` is how many chunks one :meth:`write` takes."""

    name: str
    where: str
    write_batch: int = 1

    @abstractmethod
    def known(self, ns: Namespace, key: ChunkKey) -> bool:
        """True if the tier holds the chunk and knows it without I/O (an index); False otherwise."""

    @abstractmethod
    def contains(self, ns: Namespace, keys: Sequence[ChunkKey]) -> list[bool]:
        """Which chunks the tier holds, in one bounded round trip at most; all False if unavailable."""

    @abstractmethod
    def accepts_writes(self) -> bool:
        """False while the tier is backing off after a failure (writes are dropped, not queued)."""

    @abstractmethod
    def write(self, items: Sequence[WriteItem], checksums: ChecksumMemo) -> WriteOutcome:
        """Write chunks (waiting for each one's filling copy first); chunks already there count as
        written. Uses and fills ``checksums``."""

    @abstractmethod
    def fetch_into(self, ns: Namespace, keys: Sequence[ChunkKey], sink: Sink) -> list[FetchStatus]:
        """Read chunks straight into the buffers ``sink`` hands out; a status per key. A corrupt
        chunk is removed from the tier (and counted)."""

    @abstractmethod
    def status(self) -> TierStatus:
        """Health and counters now."""

    @abstractmethod
    def close(self) -> None:
        """Release threads and connections (idempotent); afterwards the tier is reported closed."""


class FailSoft:
    """The manager's calls into one :class:`LowerTier`, none of which raises: an exception is logged
    (rate-limited) and answered as an unavailable tier answers ("not there", "missing", no writes)."""

    def __init__(self, tier: LowerTier) -> None:
        self.tier = tier
        self._warn = RateLimitedLog(logger)

    def known(self, ns: Namespace, key: ChunkKey) -> bool:
        try:
            return self.tier.known(ns, key)
        except Exception as exc:  # noqa: BLE001 - a tier's failure is its miss, never the caller's error
            return self._raised("known", exc, False)

    def contains(self, ns: Namespace, keys: Sequence[ChunkKey]) -> list[bool]:
        try:
            return self.tier.contains(ns, keys)
        except Exception as exc:  # noqa: BLE001
            return self._raised("contains", exc, [False] * len(keys))

    def accepts_writes(self) -> bool:
        try:
            return self.tier.accepts_writes()
        except Exception as exc:  # noqa: BLE001
            return self._raised("accepts_writes", exc, False)

    def fetch_into(self, ns: Namespace, keys: Sequence[ChunkKey], sink: Sink) -> list[FetchStatus]:
        """Every key MISSING when the tier raises (or answers for other keys): the caller drops the
        slots its sink handed out."""
        try:
            statuses = self.tier.fetch_into(ns, keys, sink)
            if len(statuses) != len(keys):
                raise ValueError(f"{len(statuses)} statuses for {len(keys)} keys")
            return statuses
        except Exception as exc:  # noqa: BLE001
            return self._raised("fetch_into", exc, [FetchStatus.MISSING] * len(keys))

    def _raised(self, call: str, exc: Exception, answer: _T) -> _T:
        tier = self.tier
        self._warn.warning(
            f"{call}-raised",
            "the %s tier (%s) raised from %s (%r); answered as unavailable",
            tier.name,
            tier.where,
            call,
            exc,
        )
        return answer


def submit_or_run(pool: FetchThreads, fn: Callable[..., _T], *args: Any) -> Future[_T]:
    """``pool.submit(fn, *args)``; once the pool is shut down (its owner closed meanwhile), ``fn`` runs
    in this thread instead, its result or exception in the returned (done) future."""
    try:
        return pool.submit(fn, *args)
    except RuntimeError:  # "cannot schedule new futures after shutdown"
        done: Future[_T] = Future()
        try:
            done.set_result(fn(*args))
        except Exception as exc:  # noqa: BLE001 - handed to whoever waits on the future, as submit does
            done.set_exception(exc)
        return done
