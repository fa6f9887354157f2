"""Saves that run late: a saver thread behind by a given number of executor iterations.

``LateSaves`` stands in for the connector's saver threads (``cudart.background_thread`` named
``lmcache-save-*`` / ``lmcache-mp-save-*``): a store handed over in iteration ``i`` runs at the start
of iteration ``i + lag`` (``tick``, from ``ReplayExecutor.on_iteration``), or as soon as someone
waits for its outcome (``result`` / ``exception``), always in submission order and on the calling
thread, so which forward ran before a store read its pages is deterministic.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import pytest

from lmcache import cudart

SAVER_PREFIXES = ("lmcache-save-", "lmcache-mp-save-")


class _LateFuture(Future):  # type: ignore[type-arg]
    """A store's future that runs the store (and every one handed over before it) when waited for."""

    def __init__(self, saves: LateSaves, work: Callable[[], Any], due: int) -> None:
        super().__init__()
        self.saves = saves
        self.work = work
        self.due = due

    def run(self) -> None:
        if not self.set_running_or_notify_cancel():
            return
        try:
            self.set_result(self.work())
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits, like a thread pool
            self.set_exception(exc)

    def result(self, timeout: float | None = None) -> Any:
        self.saves.run_through(self)
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self.saves.run_through(self)
        return super().exception(timeout)


class LateSaves:
    """The stores of every saver thread of the process, run ``lag`` iterations late."""

    def __init__(self, lag: int) -> None:
        self.lag = lag
        self.now = 0
        self.queue: deque[_LateFuture] = deque()
        self.on_demand = 0
        """Stores run because someone waited for them before they were due."""

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future[Any]:
        future = _LateFuture(self, lambda: fn(*args, **kwargs), self.now + self.lag)
        self.queue.append(future)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self.run_through(None)

    def tick(self) -> None:
        """An executor iteration starts: the stores due by now run."""
        self.now += 1
        while self.queue and self.queue[0].due <= self.now:
            self.queue.popleft().run()

    def run_through(self, future: _LateFuture | None) -> None:
        """Run the stores handed over up to ``future`` (None: all)."""
        while self.queue and (future is None or not future.done()):
            head = self.queue.popleft()
            self.on_demand += head.due > self.now
            head.run()


def late_saves(monkeypatch: pytest.MonkeyPatch, lag: int) -> Iterator[LateSaves]:
    """Make every saver thread started from now on a :class:`LateSaves` (other threads stay real)."""
    saves = LateSaves(lag)
    real = cudart.background_thread

    def background_thread(name: str, cuda_device: int | None) -> Any:
        return saves if name.startswith(SAVER_PREFIXES) else real(name, cuda_device)

    monkeypatch.setattr(cudart, "background_thread", background_thread)
    yield saves
    saves.run_through(None)
