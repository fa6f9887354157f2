"""What a cold L1 does while it first fills, on one timeline: ``bench_adapters.py``'s run, traced.

    python3 benchmarks/fill_timeline.py [bench_adapters.py's options] [--saves N] [--out timeline.json]

Runs ``bench_adapters.py`` with the options given and records, on the host's clock from the run's
start, with the thread of each:

- every slab page-locked by registration: its pages faulted in (``page_locking.populate``), then
  registered (``cudart.register_host``); or made by the CUDA driver (``DriverHostMemory.allocate``);
  or, in a shared-L1 worker of a server started with ``--l1-memory fd``, imported
  (``DriverHostMemory.import_shared``);
- every wait of a pool for memory (``HostArena.wait_grown``);
- every forward enqueued (``forward_load.Forward.enqueue``) and every save (``AdapterRig.save``),
  with the save's time as the benchmark reports it.

Then, for each of the first ``--saves`` saves, how much of each kind of page-locking overlapped its
copies: the last ``save_ms`` of its call, since a save is timed from its forward's end to its landing
(or from ``wait_for_save`` without a forward), and it ends when its call returns. What to look for:
a slow save while L1 fills (``save_while_l1_fills``' worst) beside registrations or pool waits
(benchmarks/RESULTS.md, D80-D82). Only public functions are wrapped, for the run's length.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_adapters  # noqa: E402
import forward_load  # noqa: E402

from lmcache import cudart, driver_host_memory, memory, page_locking, shm_slabs  # noqa: E402

PAGE_LOCKING = ("populate", "register", "driver", "import", "pool_wait")
"""The kinds of span that may hold a save's copies up."""


@dataclass(frozen=True)
class Span:
    """One traced call: its kind, thread, and start and end in ms from the run's start."""

    kind: str
    thread: str
    start_ms: float
    end_ms: float
    detail: str = ""


class Timeline:
    """The spans recorded while :meth:`tracing` is active."""

    def __init__(self) -> None:
        self.began = time.perf_counter()
        self.spans: list[Span] = []
        self._lock = threading.Lock()

    def now_ms(self) -> float:
        return (time.perf_counter() - self.began) * 1e3

    def add(self, span: Span) -> None:
        with self._lock:
            self.spans.append(span)

    def wrapped(
        self, function: Callable[..., Any], kind: str, detail: Callable[..., str]
    ) -> Callable[..., Any]:
        """``function``, recording a span of ``kind`` for each call (``detail`` from its arguments)."""

        def traced(*args: Any, **kwargs: Any) -> Any:
            start = self.now_ms()
            try:
                return function(*args, **kwargs)
            finally:
                name = threading.current_thread().name
                self.add(Span(kind, name, round(start, 2), round(self.now_ms(), 2), detail(*args, **kwargs)))

        return traced

    @contextlib.contextmanager
    def tracing(self) -> Iterator[None]:
        """Wrap the traced functions (see the module) for the block's length."""
        mib = lambda nbytes: f"{nbytes >> 20} MiB"  # noqa: E731
        targets: list[tuple[Any, str, str, Callable[..., str]]] = [
            (page_locking, "populate", "populate", lambda address, nbytes, *_: mib(nbytes)),
            (shm_slabs, "populate", "populate", lambda address, nbytes, *_: mib(nbytes)),
            (cudart, "register_host", "register", lambda address, nbytes: mib(nbytes)),
            (driver_host_memory.DriverHostMemory, "allocate", "driver", lambda maker, nbytes: mib(nbytes)),
            (
                driver_host_memory.DriverHostMemory,
                "import_shared",
                "import",
                lambda maker, fd, nbytes, **_: mib(nbytes),
            ),
            (memory.HostArena, "wait_grown", "pool_wait", lambda arena: ""),
            (forward_load.Forward, "enqueue", "forward", lambda forward: ""),
        ]
        originals = [(owner, name, getattr(owner, name)) for owner, name, _, _ in targets]
        try:
            for owner, name, kind, detail in targets:
                setattr(owner, name, self.wrapped(getattr(owner, name), kind, detail))
            yield
        finally:
            for owner, name, original in originals:
                setattr(owner, name, original)


@dataclass(frozen=True)
class SaveWindow:
    """One save: its call's span, the benchmark's time for it, and the page-locking (ms of each kind,
    summed over threads) that overlapped its copies."""

    number: int
    start_ms: float
    end_ms: float
    save_ms: float
    overlapped_ms: dict[str, float]


def overlap_ms(spans: list[Span], start: float, end: float) -> dict[str, float]:
    """Per kind of :data:`PAGE_LOCKING`, the ms of ``spans`` inside ``[start, end]``."""
    totals = dict.fromkeys(PAGE_LOCKING, 0.0)
    for span in spans:
        if span.kind in totals:
            totals[span.kind] += max(0.0, min(end, span.end_ms) - max(start, span.start_ms))
    return {kind: round(ms, 2) for kind, ms in totals.items()}


def traced_saves(timeline: Timeline) -> Callable[[], list[SaveWindow]]:
    """Wrap ``AdapterRig.save`` for the run (undone by the returned function, which gives the saves)."""
    original = bench_adapters.AdapterRig.save
    windows: list[tuple[float, float, float]] = []

    def save(rig: bench_adapters.AdapterRig, tokens: list[int]) -> tuple[float, float, list[int]]:
        start = timeline.now_ms()
        result = original(rig, tokens)
        windows.append((start, timeline.now_ms(), result[1] * 1e3))
        return result

    bench_adapters.AdapterRig.save = save

    def done() -> list[SaveWindow]:
        bench_adapters.AdapterRig.save = original
        return [
            SaveWindow(i + 1, round(s, 2), round(e, 2), round(ms, 2), overlap_ms(timeline.spans, e - ms, e))
            for i, (s, e, ms) in enumerate(windows)
        ]

    return done


def main() -> int:
    parser = bench_adapters.run_parser(__doc__)
    parser.add_argument("--saves", type=int, default=12, help="saves whose overlaps are printed")
    args = bench_adapters.parse_run_args(parser)
    timeline = Timeline()
    saves = traced_saves(timeline)
    try:
        with timeline.tracing():
            results = bench_adapters.run(args)
    finally:
        windows = saves()
    for window in windows[: args.saves]:
        call = f"call {window.start_ms:9.1f}..{window.end_ms:9.1f}"
        print(f"save {window.number:3d}: {window.save_ms:7.2f} ms, {call}; overlaps {window.overlapped_ms}")
    report(timeline, windows, results, args)
    return 0 if results["loaded_rows_equal"] else 1


def report(
    timeline: Timeline, windows: list[SaveWindow], results: dict[str, Any], args: argparse.Namespace
) -> None:
    """Print the spans up to the end of the ``--saves``-th save; write all, the saves and the run's
    results to ``--out``."""
    until = windows[min(args.saves, len(windows)) - 1].end_ms if windows else 0.0
    for span in sorted(timeline.spans, key=lambda s: s.start_ms):
        if span.start_ms <= until:
            print(f"{span.kind:9s} {span.thread:22s} {span.start_ms:9.1f}..{span.end_ms:9.1f} {span.detail}")
    if args.out:
        data = {
            "results": results,
            "saves": [asdict(w) for w in windows],
            "spans": [asdict(s) for s in sorted(timeline.spans, key=lambda s: s.start_ms)],
        }
        Path(args.out).write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
