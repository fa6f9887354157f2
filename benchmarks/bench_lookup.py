"""Lookups as TRT-LLM's scheduler makes them: ``get_num_new_matched_tokens`` through a preset's
scheduler adapter, for prompts that miss and prompts that hit: back to back, after an idle gap, and
(on CUDA) after a forward of the same length.

A serving loop asks between forwards, not back to back. An idle gap (the host sleeps) makes every
thread answer late, the server's too (benchmarks/RESULTS.md, D27); during a forward, TRT-LLM's
executor thread waits in a CUDA synchronization instead, modelled here by matrix products filling
the gap on the GPU and a stream sync, which leaves only the server's thread asleep. For
``lmcache-mp`` the server's ping is reported the same ways.

After each hit, the pass's ``build_connector_meta`` (no request scheduled) is timed too
(``hit_*_report_p50_us``): through the server a hit claimed in shared memory is reported to the server
there, once per pass, not inside ``get_num_new_matched_tokens``.

    python benchmarks/bench_lookup.py --preset lmcache-mp [--lengths 8192 16384] [--out lookup.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_adapters import AdapterRig, report, rig_parser, start_cache  # noqa: E402
from forward_load import Forward  # noqa: E402

from lmcache.integration.tensorrt_llm._trtllm import SchedulerOutput  # noqa: E402
from lmcache.server.client import CacheServerClient  # noqa: E402

Wait = Callable[[], None]


def p50_us(fn: Callable[[], float], count: int, wait: Wait | None) -> float:
    """Median of ``count`` timings of ``fn`` (which returns seconds), each after ``wait()``."""
    times = []
    for _ in range(count):
        if wait is not None:
            wait()
        times.append(fn())
    return round(statistics.median(times) * 1e6, 1)


def waits(args: argparse.Namespace) -> dict[str, Wait | None]:
    """The conditions each figure is measured after, by name: back to back, an idle gap, and on CUDA
    a forward (the GPU busy for the gap while the host waits in a stream sync)."""
    gap = args.gap_ms / 1e3
    found: dict[str, Wait | None] = {"back_to_back": None, "after_gap": lambda: time.sleep(gap)}
    if args.device == "cuda":
        found["after_forward"] = Forward(torch.device("cuda"), args.gap_ms).run
    return found


def run(args: argparse.Namespace) -> dict[str, Any]:
    server, url = start_cache(args)
    results: dict[str, Any] = {
        "preset": args.preset,
        "gap_ms": args.gap_ms,
        "count": args.count,
        "fresh_token_lists": args.fresh_token_lists,
    }
    try:
        args.tokens = max(args.lengths)
        rig = AdapterRig(args, url)
        conditions = waits(args)
        vocab = 150_000

        def fresh(length: int) -> list[int]:
            return torch.randint(0, vocab, (length,), generator=rig.generator).tolist()

        def miss(length: int) -> float:
            request, matched, seconds = rig.lookup(fresh(length))
            rig.scheduler.request_finished(request, [])
            if matched:
                raise RuntimeError(f"a fresh {length}-token prompt matched {matched} tokens")
            return seconds

        reports: list[float] = []
        """Per hit, the following ``build_connector_meta``'s seconds."""

        for length in args.lengths:
            held = fresh(length)
            rig.save(held)  # one prompt the cache holds

            def hit(held: list[int] = held, length: int = length) -> float:
                request, matched, seconds = rig.lookup(held)
                began = time.perf_counter()
                rig.scheduler.build_connector_meta(SchedulerOutput())
                reports.append(time.perf_counter() - began)
                rig.scheduler.request_finished(request, [])  # releases the pins
                if matched != (length - 1) // args.tokens_per_block * args.tokens_per_block:
                    raise RuntimeError(f"a {length}-token prompt the cache holds matched {matched} tokens")
                return seconds

            figures: dict[str, float] = {}
            for kind, fn in (("miss", lambda length=length: miss(length)), ("hit", hit)):
                for name, wait in conditions.items():
                    reports.clear()
                    figures[f"{kind}_{name}_p50_us"] = p50_us(fn, args.count, wait)
                    if reports:
                        figures[f"{kind}_{name}_report_p50_us"] = round(statistics.median(reports) * 1e6, 1)
            results[str(length)] = figures
        if url is not None:
            with CacheServerClient(url, timeout_s=30) as client:

                def ping() -> float:
                    began = time.perf_counter()
                    client.ping()
                    return time.perf_counter() - began

                for name, wait in conditions.items():
                    results[f"ping_{name}_p50_us"] = p50_us(ping, args.count, wait)
        return results
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)


def main() -> int:
    parser = rig_parser(__doc__, l1_size_gb=4.0)
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384], help="prompt lengths")
    parser.add_argument("--count", type=int, default=30, help="lookups per figure")
    parser.add_argument("--gap-ms", type=float, default=20.0, help="idle time before each 'after gap' lookup")
    args = parser.parse_args()
    report(run(args), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
