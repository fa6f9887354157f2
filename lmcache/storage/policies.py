"""Eviction orders (LRU, LFU, FIFO) over the chunks in L1; O(1) per operation.

A chunk pinned by a pending load stays in the order: the store steps past it to the next key in
``victims`` order, leaving its place and use count as they are, and counts its unpinning as a use
(``touch_all``). A lookup's pins then cost the order nothing, on the path TRT-LLM's scheduler waits
for.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Hashable, Iterable, Iterator, Sequence
from typing import Protocol


class EvictionPolicy(Protocol):
    def add(self, key: Hashable) -> None: ...

    def touch(self, key: Hashable) -> None: ...

    def discard(self, key: Hashable) -> None:
        """Remove ``key`` from the order (and its history)."""

    def victim(self) -> Hashable | None: ...

    def victims(self) -> Iterator[Hashable]:
        """Every key in eviction order, ``victim`` first, changing nothing: a store steps past those
        that may not go now (pinned, claimed). The order must not change while it is iterated."""

    def touch_all(self, keys: Iterable[Hashable]) -> None:
        """``touch`` of each key, in order."""

    def put_first(self, keys: Sequence[Hashable]) -> None:
        """Move ``keys`` (those in the order) ahead of every other key of their use count, in the
        given order: chunks found on disk at start-up go before those used since."""

    def __len__(self) -> int: ...


class FIFOPolicy:
    """Evicts in insertion order; hits do not matter."""

    def __init__(self) -> None:
        self._order: OrderedDict[Hashable, None] = OrderedDict()

    def add(self, key: Hashable) -> None:
        self._order[key] = None

    def touch(self, key: Hashable) -> None:
        return None

    def discard(self, key: Hashable) -> None:
        self._order.pop(key, None)

    def victim(self) -> Hashable | None:
        return next(iter(self._order), None)

    def victims(self) -> Iterator[Hashable]:
        return iter(self._order)

    def touch_all(self, keys: Iterable[Hashable]) -> None:
        return None

    def put_first(self, keys: Sequence[Hashable]) -> None:
        order = self._order
        for key in reversed(keys):
            if key in order:
                order.move_to_end(key, last=False)

    def __len__(self) -> int:
        return len(self._order)


class LRUPolicy(FIFOPolicy):
    """Evicts the least recently used chunk."""

    def touch(self, key: Hashable) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def touch_all(self, keys: Iterable[Hashable]) -> None:
        # Moved by a loop in C: an unpin touches every chunk a load read.
        order = self._order
        deque(map(order.move_to_end, filter(order.__contains__, keys)), maxlen=0)


class LFUPolicy:
    """Evicts the least frequently used chunk, the least recently used among equals."""

    def __init__(self) -> None:
        self._freq: dict[Hashable, int] = {}
        self._buckets: dict[int, OrderedDict[Hashable, None]] = {}
        self._min = 0

    def add(self, key: Hashable) -> None:
        self.discard(key)
        self._freq[key] = 1
        self._buckets.setdefault(1, OrderedDict())[key] = None
        self._min = 1

    def touch(self, key: Hashable) -> None:
        freq = self._freq.get(key)
        if freq is None:
            return
        self._unlink(key, freq)
        self._freq[key] = freq + 1
        self._buckets.setdefault(freq + 1, OrderedDict())[key] = None
        if self._min == freq and freq not in self._buckets:
            self._min = freq + 1

    def discard(self, key: Hashable) -> None:
        freq = self._freq.pop(key, None)
        if freq is not None:
            self._unlink(key, freq)

    def touch_all(self, keys: Iterable[Hashable]) -> None:
        for key in keys:
            self.touch(key)

    def put_first(self, keys: Sequence[Hashable]) -> None:
        for key in reversed(keys):
            freq = self._freq.get(key)
            if freq is not None:
                self._buckets[freq].move_to_end(key, last=False)

    def victim(self) -> Hashable | None:
        if not self._freq:
            return None
        if self._min not in self._buckets:
            self._min = min(self._buckets)
        return next(iter(self._buckets[self._min]))

    def victims(self) -> Iterator[Hashable]:
        if self.victim() is None:  # also settles ``_min``
            return
        yield from self._buckets[self._min]
        # The other frequencies are sorted only when a store steps past the whole least-used bucket.
        for freq in sorted(f for f in self._buckets if f != self._min):
            yield from self._buckets[freq]

    def _unlink(self, key: Hashable, freq: int) -> None:
        bucket = self._buckets[freq]
        del bucket[key]
        if not bucket:
            del self._buckets[freq]

    def __len__(self) -> int:
        return len(self._freq)


POLICIES: dict[str, type] = {"LRU": LRUPolicy, "LFU": LFUPolicy, "FIFO": FIFOPolicy}


def make_policy(name: str) -> EvictionPolicy:
    try:
        return POLICIES[name.upper()]()
    except KeyError:
        raise ValueError(f"unknown eviction policy {name!r}; use one of {sorted(POLICIES)}") from None
