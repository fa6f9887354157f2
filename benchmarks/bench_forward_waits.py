"""What requests waiting for workers' forwards cost the cache server's other work, and how soon one
goes on once its forward ended.

An exported pool's store or load names a worker's forward event and waits on a server thread until
the event completed (:mod:`lmcache.server.forward_events`). With several workers, several such
requests wait at once, while the server's other threads serve lookups and transfers. For each count
of waiting requests this reports:

* ``work_ratio``: a Python loop's rate on another thread while they wait, over its rate with none
  waiting (1.0: they cost nothing; the interpreter is what they compete for);
* ``wake_p50_us`` / ``wake_p99_us``: from one request's event completing to its thread going on, with
  the others still waiting.

With ``--device cuda`` the waiting requests' events are interprocess CUDA events pending behind work on
a side stream, as a worker's are; the wake-up is timed with stand-in events (the host side is what is
measured: its completion time is then known exactly).

    python benchmarks/bench_forward_waits.py [--device cuda] [--waiters 1 4 16 32] [--out waits.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lmcache.server.forward_events import EVENT_POLL_S, WorkerForward  # noqa: E402

GPU_CYCLES_PER_S = 2e9
"""About an H100's or H200's clock: spinning this many cycles keeps a stream busy for at least a second."""


class StandIn:
    """A forward event on the host: complete once :meth:`end` was called, which notes when."""

    def __init__(self) -> None:
        self.ended_at: float | None = None
        self.queries = 0

    def query(self) -> bool:
        self.queries += 1
        return self.ended_at is not None

    def end(self) -> None:
        self.ended_at = time.perf_counter()


def pending_cuda_events(count: int, seconds: float) -> list[Any]:
    """``count`` interprocess events recorded behind ``seconds`` of spinning on a side stream."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(int(seconds * GPU_CYCLES_PER_S))
    events = [torch.cuda.Event(interprocess=True) for _ in range(count)]
    for event in events:
        event.record(stream)
    return events


@contextmanager
def waiting(events: list[Any]) -> Iterator[list[float]]:
    """A thread per event waiting for it as a server request does; yields the times each went on."""
    awaited: set[int] = set()
    returned: list[float] = []

    def wait(i: int) -> None:
        with WorkerForward(events[i], lambda: False, awaited, i, "bench") as start:
            start.wait()
        returned.append(time.perf_counter())

    threads = [threading.Thread(target=wait, args=(i,), daemon=True) for i in range(len(events))]
    for thread in threads:
        thread.start()
    if all(isinstance(event, StandIn) for event in events):
        while any(event.queries < 2 for event in events):  # each asked again: it waits
            time.sleep(1e-4)
    else:
        time.sleep(0.05)  # CUDA events: let every thread reach its wait
    try:
        yield returned
    finally:
        for event in events:
            if isinstance(event, StandIn) and event.ended_at is None:
                event.end()
        for thread in threads:
            thread.join(30)


def work_rate(seconds: float) -> float:
    """Rounds of a pure-Python loop per second on this thread."""
    rounds = 0
    began = time.perf_counter()
    while (elapsed := time.perf_counter() - began) < seconds:
        sum(i * i for i in range(500))
        rounds += 1
    return rounds / elapsed


def wake_us(others: int, repeats: int) -> list[float]:
    """From an event's completion to its waiter going on, ``repeats`` times, beside ``others`` waiting."""
    found = []
    with waiting([StandIn() for _ in range(others)]):
        for _ in range(repeats):
            event = StandIn()
            with waiting([event]) as returned:
                time.sleep(random.uniform(0, 4 * EVENT_POLL_S))  # the forward ends at any point of a round
                event.end()
                while not returned:
                    time.sleep(1e-4)
            assert event.ended_at is not None
            found.append((returned[0] - event.ended_at) * 1e6)
    return found


def run(args: argparse.Namespace) -> dict[str, Any]:
    make: Callable[[int], list[Any]]
    if args.device == "cuda":
        make = lambda n: pending_cuda_events(n, args.seconds * 3 + 1)  # noqa: E731
    else:
        make = lambda n: [StandIn() for _ in range(n)]  # noqa: E731
    results: dict[str, Any] = {"device": args.device, "seconds": args.seconds}
    if args.device == "cuda":
        results["card"] = torch.cuda.get_device_name(0)
    alone = work_rate(args.seconds)
    results["work_rate_alone"] = round(alone)
    for count in args.waiters:
        events = make(count)
        with waiting(events):
            busy = work_rate(args.seconds)
            assert not any(event.query() for event in events), "an event completed during the measure"
        if args.device == "cuda":
            torch.cuda.synchronize()
        wakes = sorted(wake_us(count - 1, args.repeats))
        results[str(count)] = {
            "work_ratio": round(busy / alone, 3),
            "wake_p50_us": round(statistics.median(wakes), 1),
            "wake_p99_us": round(wakes[int(len(wakes) * 0.99) - 1], 1),
        }
    return results


def main() -> int:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", choices=("cpu", "cuda"), default=default_device)
    parser.add_argument("--waiters", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--seconds", type=float, default=1.0, help="length of each rate measure")
    parser.add_argument("--repeats", type=int, default=200, help="wake-ups timed per count")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results = run(args)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
