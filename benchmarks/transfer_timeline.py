"""Where one store and one load of a prompt spend their time, beside a plain pinned copy of its bytes.

``python3 benchmarks/transfer_timeline.py --out timeline.json`` stores and loads prompts through a cache
server in the shared-L1 mode (as ``gpu_mp_check.py`` does) and through the in-process engine, and
times each transfer from the caller's side:

- on the device, every batch of copies :mod:`lmcache.dma_batch` enqueues, by CUDA events around it:
  when the first copy started, when the last one ended, the idle time between batches;
- on the host, when the worker's steps began and returned (``begin_store``, ``submit``, ``wait_stored``,
  ``send``...), by wrapping those public methods for the run.

So a ratio below the copy splits into the time before the first copy, the copies themselves and the
time after the last one (``benchmarks/RESULTS.md``, D61). Device times count from an event recorded
when the transfer began, host times from the same instant. On a CPU pool there are no device
batches (the copies are synchronous): only the host steps are reported.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_mp_check import MODEL_NAME, free_port, settle  # noqa: E402
from mp_transfer import (  # noqa: E402
    CPU,
    CUDAMALLOC,
    ServerProc,
    Shape,
    TransferRun,
    measure_copy,
    measure_engine,
    measure_server,
    new_pool,
    parse_shapes,
)

from lmcache import dma_batch  # noqa: E402
from lmcache.server.client_lanes import LanePool, PendingReply  # noqa: E402
from lmcache.server.client_shared_l1 import SharedL1Transfers  # noqa: E402
from lmcache.server.shared_l1_worker import SharedL1Copier  # noqa: E402
from lmcache.testing import pool_modes  # noqa: E402

HOST_STEPS: list[tuple[type, str]] = [
    (SharedL1Transfers, "store"),
    (SharedL1Transfers, "retrieve"),
    (SharedL1Copier, "begin_store"),
    (SharedL1Copier, "begin_load"),
    (SharedL1Copier, "add_looked_up"),
    (SharedL1Copier, "add_load"),
    (SharedL1Copier, "finish_store"),
    (SharedL1Copier, "wait_stored"),
    (SharedL1Copier, "finish_load"),
    (LanePool, "submit"),
    (LanePool, "send"),
    (PendingReply, "result"),
]
"""The worker's steps timed on the host: each one's first call and return in a transfer."""


class Timeline:
    """Host steps and device copy batches of the transfer being measured (see the module)."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        """One timeline per transfer timed by :meth:`timer`, in order."""
        self.steps: list[tuple[str, float]] = []
        self.batches: list[tuple[Any, Any, int]] = []
        """Per enqueued batch: CUDA events before and after it, and its bytes."""

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Record while inside: the steps of :data:`HOST_STEPS` and every batch of copies enqueued."""
        originals = [(cls, name, getattr(cls, name)) for cls, name in HOST_STEPS]
        enqueue = dma_batch.enqueue
        for cls, name, method in originals:
            setattr(cls, name, self._step(name, method))
        dma_batch.enqueue = self._enqueue(enqueue)
        try:
            yield
        finally:
            dma_batch.enqueue = enqueue
            for cls, name, method in originals:
                setattr(cls, name, method)

    def _step(self, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self.steps.append((f"{name}_in", time.perf_counter()))
            try:
                return method(*args, **kwargs)
            finally:
                self.steps.append((f"{name}_out", time.perf_counter()))

        return timed

    def _enqueue(self, enqueue: Callable[[Any, Any], int]) -> Callable[[Any, Any], int]:
        def timed(copies: Any, stream: Any) -> int:
            before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            before.record(stream)
            calls = enqueue(copies, stream)
            after.record(stream)
            self.batches.append((before, after, sum(copy[2] for copy in copies)))
            return calls

        return timed

    def timer(self, fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
        """A :data:`mp_transfer.Timer`: ``fn()`` and its wall seconds, its timeline kept in
        :attr:`records`."""
        out, record = self.measure(fn, device)
        self.records.append(record)
        return out, record["wall_ms"] / 1e3

    def measure(self, fn: Callable[[], Any], device: torch.device) -> tuple[Any, dict[str, Any]]:
        """Run ``fn`` (a transfer) and wait for the device; its result and timeline, in ms from its
        start."""
        self.steps.clear()
        self.batches.clear()
        cuda = device.type == "cuda"
        start_event = torch.cuda.Event(enable_timing=True) if cuda else None
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        if start_event is not None:
            start_event.record(torch.cuda.current_stream(device))
        result = fn()
        if cuda:
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - start
        out: dict[str, Any] = {"wall_ms": wall * 1e3, "steps": {}}
        for name, at in self.steps:
            out["steps"].setdefault(name, (at - start) * 1e3)
        if start_event is not None and self.batches:
            spans = sorted(
                (start_event.elapsed_time(b), start_event.elapsed_time(a)) for b, a, _ in self.batches
            )
            idle, end = 0.0, spans[0][1]
            for begin, finish in spans[1:]:
                idle += max(0.0, begin - end)
                end = max(end, finish)
            out.update(first_copy_ms=spans[0][0], last_copy_end_ms=end, idle_between_ms=idle)
            out.update(batches=len(spans), bytes=sum(b[2] for b in self.batches))
        return result, out


def median_timeline(runs: list[dict[str, Any]], copy_ms: float) -> dict[str, Any]:
    """Medians of each figure over ``runs``, and the ratio of the copy to the median wall time."""
    out: dict[str, Any] = {"ratio": copy_ms / statistics.median(r["wall_ms"] for r in runs)}
    for key in ("wall_ms", "first_copy_ms", "last_copy_end_ms", "idle_between_ms"):
        if all(key in r for r in runs):
            out[key] = statistics.median(r[key] for r in runs)
    if "first_copy_ms" in out:
        out["before_first_copy_ms"] = out["first_copy_ms"]
        out["after_last_copy_ms"] = out["wall_ms"] - out["last_copy_end_ms"]
    steps = {name for r in runs for name in r["steps"]}
    out["steps"] = {
        name: statistics.median(r["steps"][name] for r in runs if name in r["steps"])
        for name in sorted(steps, key=lambda n: statistics.median(r["steps"].get(n, 0.0) for r in runs))
    }
    return out


def split_runs(
    timeline: Timeline, run: TransferRun, label: str, per_iteration: int
) -> dict[str, list[dict[str, Any]]]:
    """The store and load timelines of a ``measure_server`` or ``measure_engine`` run (each iteration
    timed ``per_iteration`` transfers, store and load first; the first iteration warmed up)."""
    if not run.bytes_equal:
        raise RuntimeError(f"{label}: a load brought back other bytes")
    records, timeline.records = timeline.records[per_iteration:], []
    return {"store": records[0::per_iteration], "load": records[1::per_iteration]}


def print_row(shape: Shape, path: str, summary: dict[str, Any]) -> None:
    for op in ("store", "load"):
        s = summary[op]
        line = f"{shape.label:20s} {path:10s} {op:5s} ratio {s['ratio']:.3f} wall {s['wall_ms']:.3f} ms"
        if "first_copy_ms" in s:
            line += (
                f"; before the first copy {s['before_first_copy_ms']:.3f},"
                f" copies to {s['last_copy_end_ms']:.3f} (idle between {s['idle_between_ms']:.3f}),"
                f" after the last {s['after_last_copy_ms']:.3f}"
            )
        print(line)
        if s["steps"]:
            print("    " + " ".join(f"{name}={at:.3f}" for name, at in s["steps"].items()))


def main() -> int:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="where to write the JSON results")
    parser.add_argument(
        "--shapes", default="qwen2-1.5b:32:16384,qwen2-1.5b:64:16384", help="MODEL:TPB:TOKENS,..."
    )
    parser.add_argument(
        "--iters", type=int, default=6, help="measured transfers per case (after one warm-up)"
    )
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--l1-size-gb", type=float, default=8.0, help="the server's L1")
    args = parser.parse_args()
    try:
        shapes = parse_shapes(args.shapes)
    except ValueError as e:
        parser.error(str(e))
    if args.iters < 1:
        parser.error("--iters must be >= 1")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("transfer_timeline: no CUDA device is visible; use --device cpu here", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="lmc-timeline-", dir="/tmp"))
    server = ServerProc(pool_modes.SHARED_L1, args.l1_size_gb, workdir, free_port())
    timeline = Timeline()
    rows: list[dict[str, Any]] = []
    try:
        server.connect(120)
        with timeline.installed():
            for shape in shapes:
                pool = new_pool(shape, CUDAMALLOC if device.type == "cuda" else CPU, device)
                d2h, h2d = measure_copy(pool, shape, 5)
                copy_ms = {
                    "store": statistics.median(d2h.seconds) * 1e3,
                    "load": statistics.median(h2d.seconds) * 1e3,
                }
                row: dict[str, Any] = {"shape": shape.label, "copy_ms": copy_ms}
                info = pool_modes.register(server.ipc, pool, server.mode, MODEL_NAME, shape.tokens_per_block)
                timeline.records = []
                run = measure_server(
                    server.ipc,
                    pool,
                    shape,
                    args.iters,
                    seed=1,
                    timer=timeline.timer,
                    settle=lambda: settle(server),
                )
                server.ipc.unregister(info.instance_id)
                through_server = split_runs(timeline, run, f"{shape.label} shared-l1", per_iteration=3)
                run = measure_engine(pool, shape, args.iters, seed=1, timer=timeline.timer)
                in_process = split_runs(timeline, run, f"{shape.label} in-process", per_iteration=2)
                for path, runs in (("shared-l1", through_server), ("in-process", in_process)):
                    row[path] = {op: median_timeline(r, copy_ms[op]) for op, r in runs.items()}
                    row[path]["runs"] = runs
                    print_row(shape, path, row[path])
                rows.append(row)
    finally:
        server.stop()
        card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        Path(args.out).write_text(json.dumps({"card": card, "iters": args.iters, "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
