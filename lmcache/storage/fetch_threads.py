"""Daemon threads for the lower tiers' reads (:class:`FetchThreads`): a read hung on a dead mount never
holds up the process's exit."""

from __future__ import annotations

import queue
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

__all__ = ["FetchThreads"]

_T = TypeVar("_T")

_Work = tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]


class FetchThreads:
    """Up to ``workers`` daemon threads running submitted calls in order, started as work comes.

    Not a ThreadPoolExecutor: Python joins its threads at interpreter exit (before atexit handlers run),
    so a read hung on a dead NFS mount would hang the process's exit (the promotions' reads of every
    tier, :mod:`lmcache.storage.promotion`, and the disk tier's own reads). Like one, :meth:`submit`
    returns a future (cancellable while queued) and raises RuntimeError once :meth:`shutdown` (what
    :func:`~lmcache.storage.lower_tier.submit_or_run` expects); work queued before still runs."""

    def __init__(self, workers: int, name: str) -> None:
        self._workers = workers
        self._name = name
        self._work: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._shut = False
        # Dropped unclosed: its idle threads end (they hold the queue, never the pool).
        weakref.finalize(self, _stop, self._work, self._threads)

    def submit(self, fn: Callable[..., _T], *args: Any) -> Future[_T]:
        future: Future[_T] = Future()
        with self._lock:
            if self._shut:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._work.put((future, fn, args))
            if len(self._threads) < self._workers:
                thread = threading.Thread(
                    target=_serve, args=(self._work,), name=f"{self._name}-{len(self._threads)}", daemon=True
                )
                thread.start()
                self._threads.append(thread)
        return future

    def shutdown(self) -> None:
        """No new work; each thread ends once the work queued before is done (idempotent)."""
        with self._lock:
            if not self._shut:
                self._shut = True
                _stop(self._work, self._threads)


def _serve(work: queue.SimpleQueue[_Work | None]) -> None:
    while (item := work.get()) is not None:
        future, fn, args = item
        del item
        if future.set_running_or_notify_cancel():  # False: cancelled while queued
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
                future.set_exception(exc)
        del future, fn, args


def _stop(work: queue.SimpleQueue[_Work | None], threads: list[threading.Thread]) -> None:
    for _ in threads:
        work.put(None)
