"""Keep background saves off the GIL while the executor thread launches a forward.

A saver thread running Python while TRT-LLM's executor thread enqueues a forward takes the GIL at
each of the executor's releases (every torch call releases it) and holds it for its own stretch of
Python, so a decode step's launch is delayed (benchmarks/RESULTS.md, D37 and D41). The connector's
worker brackets the launch: it closes the gate in ``start_load_kv`` (after its long whole loads
are enqueued, D60) and opens it in ``wait_for_save`` (TRT-LLM calls them right before and right
after enqueueing the forward). Saves call :meth:`ForwardGate.wait` between chunks and block there,
without the GIL, while the gate is closed. Copies already enqueued keep running on the device
meanwhile.

The gate is per process, like the GIL and TRT-LLM's executor thread.
"""

from __future__ import annotations

import threading

MAX_HOLD_S = 0.02
"""Longest a save waits per chunk for a closed gate: a forward that never reports its end (it
raised) slows saves down until the next iteration reopens the gate, never stops them."""


class ForwardGate:
    """Open unless a forward is being launched; threads other than the launching one wait on it."""

    def __init__(self, max_hold_s: float = MAX_HOLD_S) -> None:
        self.max_hold_s = max_hold_s
        self._open = threading.Event()
        self._open.set()
        self._launcher: int | None = None
        self._waiters = threading.Condition()
        self._waiting = 0
        self.holds = 0
        """How many waits found the gate closed."""

    def close(self) -> None:
        """The calling thread starts enqueueing a forward."""
        self._launcher = threading.get_ident()
        self._open.clear()

    def open(self) -> None:
        """The forward is enqueued."""
        self._open.set()

    @property
    def is_open(self) -> bool:
        return self._open.is_set()

    def wait(self) -> None:
        """Return at once when open or on the launching thread; else block, without the GIL, until
        the gate opens or ``max_hold_s`` passed."""
        if self._open.is_set() or threading.get_ident() == self._launcher:
            return
        with self._waiters:
            self._waiting += 1
            self.holds += 1
            self._waiters.notify_all()
        try:
            self._open.wait(self.max_hold_s)
        finally:
            with self._waiters:
                self._waiting -= 1

    def wait_for_waiter(self, timeout: float) -> bool:
        """Block until a thread waits at the closed gate (for tests); False on timeout."""
        with self._waiters:
            return self._waiters.wait_for(lambda: self._waiting > 0, timeout)


FORWARD = ForwardGate()
"""The process's gate (see the module docstring)."""
