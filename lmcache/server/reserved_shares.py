"""The L1 bytes the open store reservations of shared-L1 instances hold, within their shares.

A reserved slot cannot be evicted until its store is reported done, so one instance reserving without
reporting could hold every slot and drop every other instance's saves. Each registration's
reservations hold at most :data:`INSTANCE_SHARE` of L1 and all of them together :data:`ALL_SHARE`; a
store reaching either reserves the chunks before it and no more (a prefix is saved).
"""

from __future__ import annotations

import threading

__all__ = ["ALL_SHARE", "INSTANCE_SHARE", "ReservedShares"]

INSTANCE_SHARE = 0.5
"""Of L1, the most one registration's open store reservations hold."""
ALL_SHARE = 0.75
"""Of L1, the most all registrations' open store reservations hold together, however many register."""


class ReservedShares:
    """Bytes reserved per registration and in all; thread-safe."""

    def __init__(self, capacity_bytes: int) -> None:
        self._instance_cap = int(capacity_bytes * INSTANCE_SHARE)
        self._all_cap = int(capacity_bytes * ALL_SHARE)
        self._held: dict[int, int] = {}
        self._total = 0
        self._lock = threading.Lock()

    def take(self, registration: int, nbytes: int) -> bool:
        """Count ``nbytes`` more for ``registration``; False (nothing counted) past either share."""
        with self._lock:
            mine = self._held.get(registration, 0)
            if mine + nbytes > self._instance_cap or self._total + nbytes > self._all_cap:
                return False
            self._held[registration] = mine + nbytes
            self._total += nbytes
            return True

    def give_back(self, registration: int, nbytes: int) -> None:
        """``nbytes`` of ``registration``'s are no longer reserved (nothing if it was forgotten)."""
        with self._lock:
            mine = self._held.get(registration)
            if mine is None:
                return
            nbytes = min(nbytes, mine)
            self._total -= nbytes
            if mine > nbytes:
                self._held[registration] = mine - nbytes
            else:
                del self._held[registration]

    def forget(self, registration: int) -> None:
        """The registration is gone: what it held is no longer counted."""
        with self._lock:
            self._total -= self._held.pop(registration, 0)

    def held(self, registration: int | None = None) -> int:
        """Bytes counted for ``registration`` (None: for all)."""
        with self._lock:
            return self._total if registration is None else self._held.get(registration, 0)
