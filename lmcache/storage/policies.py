"""Eviction orders (LRU, LFU, FIFO) over the chunks that may be evicted; O(1) per operation.

A chunk pinned by a pending load is taken out of the order while pinned, so ``victim()``
never has to skip over it.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Hashable, Iterable
from itertools import repeat
from typing import Protocol


class EvictionPolicy(Protocol):
    def add(self, key: Hashable) -> None: ...

    def touch(self, key: Hashable) -> None: ...

    def discard(self, key: Hashable, forget: bool = True) -> None:
        """Remove ``key`` from the order; ``forget=False`` keeps its history for a later ``add``."""

    def victim(self) -> Hashable | None: ...

    def withdraw(self, keys: Iterable[Hashable]) -> None:
        """Take ``keys`` out of the order while they are pinned, keeping their history; keys not in
        the order are ignored."""

    def restore(self, keys: Iterable[Hashable]) -> None:
        """Put withdrawn ``keys`` back, in order, each as just used."""

    def __len__(self) -> int: ...


class FIFOPolicy:
    """Evicts in insertion order; hits do not matter."""

    def __init__(self) -> None:
        self._order: OrderedDict[Hashable, None] = OrderedDict()

    def add(self, key: Hashable) -> None:
        self._order[key] = None

    def touch(self, key: Hashable) -> None:
        return None

    def discard(self, key: Hashable, forget: bool = True) -> None:
        self._order.pop(key, None)

    def victim(self) -> Hashable | None:
        return next(iter(self._order), None)

    def withdraw(self, keys: Iterable[Hashable]) -> None:
        # Popped by a loop in C: a lookup withdraws every chunk it pins.
        deque(map(self._order.pop, keys, repeat(None)), maxlen=0)

    def restore(self, keys: Iterable[Hashable]) -> None:
        self._order.update(zip(keys, repeat(None)))

    def __len__(self) -> int:
        return len(self._order)


class LRUPolicy(FIFOPolicy):
    """Evicts the least recently used chunk."""

    def touch(self, key: Hashable) -> None:
        if key in self._order:
            self._order.move_to_end(key)


class LFUPolicy:
    """Evicts the least frequently used chunk, the least recently used among equals."""

    def __init__(self) -> None:
        self._freq: dict[Hashable, int] = {}
        self._buckets: dict[int, OrderedDict[Hashable, None]] = {}
        self._remembered: dict[Hashable, int] = {}
        self._min = 0

    def add(self, key: Hashable) -> None:
        freq = self._remembered.pop(key, 1)
        self._freq[key] = freq
        self._buckets.setdefault(freq, OrderedDict())[key] = None
        if self._min == 0 or freq < self._min:
            self._min = freq

    def touch(self, key: Hashable) -> None:
        freq = self._freq.get(key)
        if freq is None:
            if key in self._remembered:
                self._remembered[key] += 1
            return
        self._unlink(key, freq)
        self._freq[key] = freq + 1
        self._buckets.setdefault(freq + 1, OrderedDict())[key] = None
        if self._min == freq and freq not in self._buckets:
            self._min = freq + 1

    def discard(self, key: Hashable, forget: bool = True) -> None:
        freq = self._freq.pop(key, None)
        if freq is None:
            if forget:
                self._remembered.pop(key, None)
            return
        self._unlink(key, freq)
        if not forget:
            self._remembered[key] = freq

    def withdraw(self, keys: Iterable[Hashable]) -> None:
        for key in keys:
            self.discard(key, forget=False)

    def restore(self, keys: Iterable[Hashable]) -> None:
        for key in keys:
            self.add(key)
            self.touch(key)

    def victim(self) -> Hashable | None:
        if not self._freq:
            return None
        if self._min not in self._buckets:
            self._min = min(self._buckets)
        return next(iter(self._buckets[self._min]))

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
