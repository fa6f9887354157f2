"""The Python garbage collector in the cache server's process: what it may walk, and its pauses.

A collection stops every thread of the process, so in the cache server it holds up every client's
request. A full (generation 2) collection walks every object the collector tracks; most of them are
the modules start-up imported (torch's alone are well over a hundred thousand), and Python runs one
each time a quarter as many objects again have survived into that generation, which a server storing
chunks keeps doing. :func:`freeze_imports` takes what was imported out of the collector's sight, so
a full collection walks only what serving built. :func:`watch` times every collection, per
generation, for ``lmcache stats`` and ``/metrics`` (:func:`snapshot`).

Both act on the whole process: the standalone server calls them; the in-process connector never
does (the collector of TRT-LLM's process is TRT-LLM's to tune).
"""

from __future__ import annotations

import gc
import threading
import time
from typing import Any

import msgspec

__all__ = ["GcStats", "freeze_imports", "snapshot", "summary_line", "watch"]

GENERATIONS = 3


class GcStats(msgspec.Struct, kw_only=True):
    """The collector's work in this process since :func:`watch` (all zero before it): per generation
    (0, 1, 2), the collections, their pauses added up and the longest one; and how many objects
    :func:`freeze_imports` took out of its sight."""

    watched: bool = False
    collections: list[int] = msgspec.field(default_factory=lambda: [0] * GENERATIONS)
    pause_s: list[float] = msgspec.field(default_factory=lambda: [0.0] * GENERATIONS)
    longest_pause_s: list[float] = msgspec.field(default_factory=lambda: [0.0] * GENERATIONS)
    frozen_objects: int = 0


class _Pauses:
    """The ``gc.callbacks`` hook: the collector calls it at each collection's start and stop, on the
    thread that triggered the collection, under the GIL (collections never overlap)."""

    def __init__(self) -> None:
        self.started = 0.0
        self.collections = [0] * GENERATIONS
        self.pause_s = [0.0] * GENERATIONS
        self.longest_pause_s = [0.0] * GENERATIONS

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self.started = time.perf_counter()
            return
        generation = int(info["generation"])
        pause = time.perf_counter() - self.started
        self.collections[generation] += 1
        self.pause_s[generation] += pause
        self.longest_pause_s[generation] = max(self.longest_pause_s[generation], pause)


_pauses: _Pauses | None = None
_lock = threading.Lock()


def freeze_imports() -> int:
    """Collect once, then move every object alive now into the collector's permanent generation, which
    it never walks again; returns how many objects that is. Call it once the modules are imported and
    before anything is built that may later become cyclic garbage: a frozen cycle is never freed."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def watch() -> None:
    """Time every collection from now on (idempotent)."""
    global _pauses
    with _lock:
        if _pauses is None:
            _pauses = _Pauses()
            gc.callbacks.append(_pauses)


def snapshot() -> GcStats:
    """The collector's work so far (see :class:`GcStats`)."""
    pauses = _pauses
    if pauses is None:
        return GcStats(frozen_objects=gc.get_freeze_count())
    return GcStats(
        watched=True,
        collections=list(pauses.collections),
        pause_s=list(pauses.pause_s),
        longest_pause_s=list(pauses.longest_pause_s),
        frozen_objects=gc.get_freeze_count(),
    )


def summary_line(stats: GcStats) -> str:
    """One human line for ``lmcache stats``."""
    frozen = f"{stats.frozen_objects} objects frozen out of its walks"
    if not stats.watched:
        return f"garbage collector: pauses not timed, {frozen}"
    counts = "/".join(str(n) for n in stats.collections)
    longest = "/".join(f"{s * 1e3:.1f}" for s in stats.longest_pause_s)
    total = sum(stats.pause_s) * 1e3
    return (
        f"garbage collector: {counts} collections (generation 0/1/2), longest pause {longest} ms, "
        f"{total:.0f} ms in all; {frozen}"
    )
