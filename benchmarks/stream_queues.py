"""Whether a load can wait for a save that waits for the forward, through the device's hardware queues.

CUDA spreads streams over a few hardware queues (``CUDA_DEVICE_MAX_CONNECTIONS``, 8 by default);
work on two streams that share one may run in order although nothing orders it. A save waits on its
stream for the forward that computed its rows (an event, on the device); a load on a stream that
shares that queue would then wait for the forward too, though the loads and saves of a worker have
streams of their own (``lmcache.chunk_copy.CopyStreams``, benchmarks/RESULTS.md, D57), and the forward
after the load would start late. PyTorch hands out the streams of ``torch.cuda.Stream()`` round-robin
from a pool of 32, so which streams share a queue depends on how many were taken before.

For each offset (streams taken from the pool first), this builds a worker's streams as the connector
does (a pool's store and load streams; the per-process helper streams are made at the first offset),
enqueues about ``--forward-ms`` of matrix products on a forward stream, makes every stream a save
uses wait for the forward's event and copy, then copies host to device on every stream a load uses,
and reports which of those load copies ended only after the forward (a false dependency).

    CUDA_DEVICE_MAX_CONNECTIONS=8 python3 benchmarks/stream_queues.py --out queues.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lmcache import c_ops  # noqa: E402
from lmcache.chunk_copy import CopyStreams  # noqa: E402

COPY_BYTES = 16 << 20


def forward_work(ms: float) -> tuple[torch.Tensor, int]:
    """A matrix and how many products of it take about ``ms`` on the device."""
    a = torch.randn(4096, 4096, device="cuda")
    torch.mm(a, a)
    torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(10):
        torch.mm(a, a)
    torch.cuda.synchronize()
    return a, max(1, round(ms / 1e3 / ((time.perf_counter() - began) / 10)))


def probe(offset: int, streams: dict[str, Any], work: tuple[torch.Tensor, int]) -> dict[str, Any]:
    """One offset: the load-side copies that ended after the forward they do not depend on."""
    torch.cuda.synchronize()
    a, products = work
    forward = torch.cuda.Stream()
    with torch.cuda.stream(forward):
        for _ in range(products):
            torch.mm(a, a)
        forward_done = torch.cuda.Event(enable_timing=True)
        forward_done.record()
    device = torch.empty(COPY_BYTES, dtype=torch.uint8, device="cuda")
    host = torch.empty(COPY_BYTES, dtype=torch.uint8, pin_memory=True)
    for name in ("store", "lane", "gather"):
        streams[name].wait_event(forward_done)
        with torch.cuda.stream(streams[name]):
            host.copy_(device, non_blocking=True)
    copied = {}
    for name in ("load", "scatter"):
        with torch.cuda.stream(streams[name]):
            device.copy_(host, non_blocking=True)
            copied[name] = torch.cuda.Event(enable_timing=True)
            copied[name].record()
    torch.cuda.synchronize()
    # Each copy judged by its own end against the forward's (a positive gap: it ended after).
    late = [name for name, event in copied.items() if forward_done.elapsed_time(event) > 0]
    return {"offset": offset, "loads_after_the_forward": late}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--offsets", type=int, default=16, help="offsets tried: 0 .. N-1 streams taken first")
    parser.add_argument("--forward-ms", type=float, default=200.0, help="device time of the forward")
    parser.add_argument("--out", help="write the JSON here too")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("stream_queues: needs a CUDA device", file=sys.stderr)
        return 2
    work = forward_work(args.forward_ms)
    pool = torch.empty(1, device="cuda")
    device = pool.device
    helpers = {
        "lane": c_ops.lane_stream(device),
        "gather": c_ops.side_stream(device, "gather"),
        "scatter": c_ops.side_stream(device, "scatter"),
    }
    runs = []
    for offset in range(args.offsets):
        for _ in range(offset):
            torch.cuda.Stream()
        copy_streams = CopyStreams.for_pool(pool)
        assert copy_streams is not None
        runs.append(probe(offset, {"store": copy_streams.store, "load": copy_streams.load, **helpers}, work))
        print(runs[-1])
    results = {
        "card": torch.cuda.get_device_name(),
        "max_connections": os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS", "default (8)"),
        "forward_ms": args.forward_ms,
        "runs": runs,
        "offsets_with_a_late_load": sum(bool(r["loads_after_the_forward"]) for r in runs),
    }
    text = json.dumps(results, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "runs"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
