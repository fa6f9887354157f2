"""The server's pins of lookups: which lookups hold pins in the engine, for whom, since when.

A lookup with a ``pin_id`` pins its hit chunks (for every rank of the world) under the key
``(instance_id, pin_id)``. The record goes when every rank has retrieved, on ``release``, when its
owner is retired, or after ``pin_ttl_s``. :class:`PinTable` is the bookkeeping alone;
:class:`LookupPins` keeps it and the engine's pins together (a record that goes releases its pins).

A claimed lookup (:mod:`lmcache.server.claims`) reaches the server one-way, and may arrive after a
rank's load that used its hit (another connection, or another process for a rank of a TP world,
served first). The table remembers such loads (a rank loaded under a key with no record) and such
releases (the client's heartbeat may carry the report on its own connection): a claimed lookup's
record counts the loads served since its claim as done, and is not entered at all when its release
was served since its claim. No pin waits for a load or a release that already happened.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from lmcache.engine import CacheEngine

__all__ = ["CLIENT_PIN_SHARE", "LookupPins", "PinKey", "PinRecord", "PinTable"]

_T = TypeVar("_T")
_K = TypeVar("_K", bound=Hashable)
PinKey = tuple[int, int | str]
"""(the instance whose lookup pinned, its pin id)."""
CLIENT_PIN_SHARE = 0.5
"""Of L1, what the lookups of all of one client's instances may pin together (``--pin-share`` if that
is larger): a client registering more instances does not multiply its share."""
MAX_EARLY = 1024
"""Loads, and releases, remembered with no record to mark (the oldest go first): lookups late by more
are rare."""


@dataclass
class PinRecord:
    world_size: int
    created: float
    nbytes: int = 0
    """L1 bytes the lookup pinned (all ranks)."""
    client: Hashable = None
    """Who registered the instance that pinned (its client's instances share a cap)."""
    done: set[int] = field(default_factory=set)
    """Ranks that have loaded."""


class PinTable:
    """Pinned lookups by key; thread-safe."""

    def __init__(self) -> None:
        self._pins: dict[PinKey, PinRecord] = {}
        self._held: dict[int, int] = {}
        """Bytes of each owner's records: kept as they change, never summed per lookup (one owner
        may hold thousands of records)."""
        self._held_by_client: dict[Hashable, int] = {}
        """Bytes of the records of each client's instances, kept the same way."""
        self._early: OrderedDict[PinKey, dict[int, float]] = OrderedDict()
        """Ranks that loaded under a key with no record, and when (``time.monotonic()``)."""
        self._released: OrderedDict[PinKey, float] = OrderedDict()
        """Keys released with no record, and when."""
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._pins)

    def get(self, key: PinKey) -> PinRecord | None:
        with self._lock:
            return self._pins.get(key)

    def client_held(self, client: Hashable) -> int:
        """Bytes the records of ``client``'s instances hold."""
        with self._lock:
            return self._held_by_client.get(client, 0)

    def replace(
        self,
        key: PinKey,
        record: PinRecord | None,
        share: int,
        claimed_at: float | None = None,
        *,
        client_share: int | None = None,
    ) -> tuple[int, bool]:
        """Drop ``key``'s record, then enter ``record`` unless the owner's other lookups plus it would
        hold more than ``share`` bytes, or the lookups of all its client's instances more than
        ``client_share`` (None: no such cap). The ranks that loaded under ``key`` since ``claimed_at``
        (a claimed lookup's) join ``record.done``; a record every rank is done with, or released since
        ``claimed_at``, is not entered. Returns (bytes the owner's other lookups hold, whether over
        either cap)."""
        with self._lock:
            self._remove(key)
            early = self._early.pop(key, {})
            released = self._released.pop(key, None)
            if record is not None and claimed_at is not None:
                record.done.update(rank for rank, when in early.items() if when >= claimed_at)
                if released is not None and released >= claimed_at:
                    record.done.update(range(record.world_size))
            held = self._held.get(key[0], 0)
            over = record is not None and held + record.nbytes > share
            if record is not None and client_share is not None:
                over |= self._held_by_client.get(record.client, 0) + record.nbytes > client_share
            if record is not None and not over and len(record.done) < record.world_size:
                self._pins[key] = record
                self._held[key[0]] = held + record.nbytes
                by_client = self._held_by_client
                by_client[record.client] = by_client.get(record.client, 0) + record.nbytes
        return held, over

    def _remove(self, key: PinKey) -> PinRecord | None:
        """Drop ``key``'s record and its bytes from its owner's (lock held)."""
        record = self._pins.pop(key, None)
        if record is not None:
            _take(self._held, key[0], record.nbytes)
            _take(self._held_by_client, record.client, record.nbytes)
        return record

    def pop(self, key: PinKey, now: float) -> bool:
        """Forget ``key`` (released at ``now``); whether it was held. With no record, the release is
        remembered for a claimed lookup arriving late."""
        with self._lock:
            if self._remove(key) is not None:
                return True
            _remember(self._released, key, now)
            return False

    def rank_done(self, key: PinKey, rank: int, now: float) -> bool:
        """Note that ``rank`` has loaded (at ``now``); True when that was the last rank (the record is
        gone then). With no record, the load is remembered for a claimed lookup arriving late."""
        with self._lock:
            state = self._pins.get(key)
            if state is None:
                _remember(self._early, key, {**self._early.get(key, {}), rank: now})
                return False
            state.done.add(rank)
            if len(state.done) < state.world_size:
                return False
            self._remove(key)
        return True

    def pop_owner(self, instance_id: int) -> list[PinKey]:
        """Forget the pins of ``instance_id``'s lookups; their keys."""
        with self._lock:
            owned = [key for key in self._pins if key[0] == instance_id]
            for key in owned:
                self._remove(key)
            for early in (self._early, self._released):
                for key in [key for key in early if key[0] == instance_id]:
                    del early[key]
        return owned

    def pop_stale(self, now: float, ttl: float) -> list[PinKey]:
        """Forget the records older than ``ttl`` seconds; their keys."""
        with self._lock:
            stale = [key for key, st in self._pins.items() if now - st.created > ttl]
            for key in stale:
                self._remove(key)
            for key in [key for key, ranks in self._early.items() if now - max(ranks.values()) > ttl]:
                del self._early[key]
            for key in [key for key, when in self._released.items() if now - when > ttl]:
                del self._released[key]
        return stale


def _take(held: dict[_K, int], holder: _K, nbytes: int) -> None:
    """``holder``'s bytes in ``held`` less ``nbytes`` (an entry at zero goes)."""
    left = held[holder] - nbytes
    if left:
        held[holder] = left
    else:
        del held[holder]


def _remember(early: OrderedDict[PinKey, _T], key: PinKey, value: _T) -> None:
    """Note ``value`` under ``key`` as the newest entry of ``early``; the oldest beyond
    :data:`MAX_EARLY` go."""
    early[key] = value
    early.move_to_end(key)
    if len(early) > MAX_EARLY:
        early.popitem(last=False)


class LookupPins:
    """The lookups' records (:class:`PinTable`) and their pins in ``engine``, released together."""

    def __init__(self, engine: CacheEngine) -> None:
        self.engine = engine
        self.table = PinTable()

    def __len__(self) -> int:
        return len(self.table)

    def get(self, key: PinKey) -> PinRecord | None:
        return self.table.get(key)

    def record(
        self,
        key: PinKey,
        record: PinRecord | None,
        share: int,
        claimed_at: float | None,
        *,
        client_share: int | None = None,
    ) -> tuple[int, bool]:
        """Enter the record of a lookup that pinned under ``key`` (None: it pinned nothing), as
        :meth:`PinTable.replace`; the pins of a lookup refused, empty, or of ranks done go now."""
        held, over = self.table.replace(key, record, share, claimed_at, client_share=client_share)
        if record is None or over or len(record.done) >= record.world_size:
            self.engine.release(key)
        else:
            for rank in record.done:
                self.engine.release(key, rank)
        return held, over

    def rank_done(self, key: PinKey, rank: int) -> None:
        """A rank has loaded: its pins of the lookup go now, the lookup's record once every rank of
        the world has loaded (or on release / owner reaped / TTL)."""
        self.engine.release(key, rank)
        if self.table.rank_done(key, rank, time.monotonic()):
            self.engine.release(key)

    def release(self, key: PinKey) -> bool:
        """Drop the lookup's record and pins; whether it had a record."""
        held = self.table.pop(key, time.monotonic())
        self.engine.release(key)
        return held

    def release_owner(self, instance_id: int) -> None:
        """Drop the records and pins of ``instance_id``'s lookups."""
        for key in self.table.pop_owner(instance_id):
            self.engine.release(key)

    def release_stale(self, now: float, ttl: float) -> list[PinKey]:
        """Drop the records (and pins) older than ``ttl`` seconds; their keys."""
        stale = self.table.pop_stale(now, ttl)
        for key in stale:
            self.engine.release(key)
        return stale
