"""One doubling back-off (a circuit breaker) shared by the lower tiers and the server client.

After a failure the guarded resource is skipped for ``initial_s``; each further failure while it is
failing doubles the wait, up to ``max_s``. The first success resets it. :meth:`Backoff.ready` says
whether an attempt is allowed now: callers skip the resource (a miss, a dropped write) while it is
False, and the first call after the wait is the probe.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Backoff", "BackoffState"]


@dataclass(frozen=True)
class BackoffState:
    """A back-off as seen at one instant.

    ``failing``: a failure happened and no success since. ``retry_in_s``: seconds until the next
    attempt is allowed (0 when one is allowed now). ``failures``: failures since creation.
    """

    failing: bool
    retry_in_s: float
    delay_s: float
    failures: int


class Backoff:
    """Thread-safe doubling back-off from ``initial_s`` up to ``max_s`` seconds."""

    def __init__(
        self, initial_s: float, max_s: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not 0 < initial_s <= max_s:
            raise ValueError(
                f"back-off: initial_s={initial_s!r}, max_s={max_s!r} (expected 0 < initial_s <= max_s)"
            )
        self.initial_s = initial_s
        self.max_s = max_s
        self._clock = clock
        self._lock = threading.Lock()
        self._delay = 0.0
        self._until = 0.0
        self._failures = 0

    def ready(self) -> bool:
        """True when an attempt is allowed now (not failing, or its wait is over)."""
        return self._clock() >= self._until

    def failed(self) -> float:
        """Record a failure; returns the wait (seconds) before the next attempt."""
        with self._lock:
            self._failures += 1
            self._delay = min(self.max_s, max(self.initial_s, self._delay * 2))
            self._until = self._clock() + self._delay
            return self._delay

    def succeeded(self) -> bool:
        """Record a success; returns True if this ended a failing period (to log the recovery once)."""
        if not self._delay:  # the common case, without the lock
            return False
        with self._lock:
            recovered = self._delay != 0.0
            self._delay = 0.0
            self._until = 0.0
            return recovered

    def state(self) -> BackoffState:
        with self._lock:
            return BackoffState(
                failing=self._delay != 0.0,
                retry_in_s=max(0.0, self._until - self._clock()),
                delay_s=self._delay,
                failures=self._failures,
            )
