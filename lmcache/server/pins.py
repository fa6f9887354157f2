"""The server's pin table: which lookups hold pins in the engine, for whom, since when.

A lookup with a ``pin_id`` pins its hit chunks (for every rank of the world) under the key
``(instance_id, pin_id)``. The record goes when every rank has retrieved, on ``release``, when its
owner is retired, or after ``pin_ttl_s``. This table is bookkeeping only: the caller releases the
engine's pins of the keys it hands back.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

__all__ = ["PinKey", "PinRecord", "PinTable"]

PinKey = tuple[int, int | str]
"""(the instance whose lookup pinned, its pin id)."""


@dataclass
class PinRecord:
    world_size: int
    created: float
    nbytes: int = 0
    """L1 bytes the lookup pinned (all ranks)."""
    done: set[int] = field(default_factory=set)
    """Ranks that have loaded."""


class PinTable:
    """Pinned lookups by key; thread-safe."""

    def __init__(self) -> None:
        self._pins: dict[PinKey, PinRecord] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._pins)

    def get(self, key: PinKey) -> PinRecord | None:
        with self._lock:
            return self._pins.get(key)

    def replace(self, key: PinKey, record: PinRecord | None, share: int) -> tuple[int, bool]:
        """Drop ``key``'s record, then enter ``record`` unless the owner's other lookups plus it would
        hold more than ``share`` bytes. Returns (bytes the owner's other lookups hold, whether over)."""
        with self._lock:
            self._pins.pop(key, None)
            held = sum(st.nbytes for k, st in self._pins.items() if k[0] == key[0])
            over = record is not None and held + record.nbytes > share
            if record is not None and not over:
                self._pins[key] = record
        return held, over

    def pop(self, key: PinKey) -> bool:
        """Forget ``key``; whether it was held."""
        with self._lock:
            return self._pins.pop(key, None) is not None

    def rank_done(self, key: PinKey, rank: int) -> bool:
        """Note that ``rank`` has loaded; True when that was the last rank (the record is gone then)."""
        with self._lock:
            state = self._pins.get(key)
            if state is None:
                return False
            state.done.add(rank)
            if len(state.done) < state.world_size:
                return False
            del self._pins[key]
        return True

    def pop_owner(self, instance_id: int) -> list[PinKey]:
        """Forget the pins of ``instance_id``'s lookups; their keys."""
        with self._lock:
            owned = [key for key in self._pins if key[0] == instance_id]
            for key in owned:
                del self._pins[key]
        return owned

    def pop_stale(self, now: float, ttl: float) -> list[PinKey]:
        """Forget the records older than ``ttl`` seconds; their keys."""
        with self._lock:
            stale = [key for key, st in self._pins.items() if now - st.created > ttl]
            for key in stale:
                del self._pins[key]
        return stale
