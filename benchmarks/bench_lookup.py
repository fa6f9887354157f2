"""Lookups as TRT-LLM's scheduler makes them: ``get_num_new_matched_tokens`` through a preset's
scheduler adapter, for prompts that miss and prompts that hit, back to back and after an idle gap.

An idle gap matters through the server: a server thread that slept for a few milliseconds answers
its next request late (benchmarks/RESULTS.md, D27), and a serving loop asks between forwards, not
back to back. For ``lmcache-mp`` the server's ping is reported the same two ways.

    python benchmarks/bench_lookup.py --preset lmcache-mp [--tokens 8192 16384] [--out lookup.json]
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

from lmcache.server.client import CacheServerClient  # noqa: E402


def p50_us(fn: Callable[[], float], count: int, gap_s: float) -> float:
    """Median of ``count`` timings of ``fn`` (which returns seconds), ``gap_s`` apart."""
    times = []
    for _ in range(count):
        if gap_s:
            time.sleep(gap_s)
        times.append(fn())
    return round(statistics.median(times) * 1e6, 1)


def run(args: argparse.Namespace) -> dict[str, Any]:
    server, url = start_cache(args)
    results: dict[str, Any] = {"preset": args.preset, "gap_ms": args.gap_ms, "count": args.count}
    try:
        args.tokens = max(args.lengths)
        rig = AdapterRig(args, url)
        vocab = 150_000

        def fresh(length: int) -> list[int]:
            return torch.randint(0, vocab, (length,), generator=rig.generator).tolist()

        def miss(length: int) -> float:
            request, matched, seconds = rig.lookup(fresh(length))
            rig.scheduler.request_finished(request, [])
            if matched:
                raise RuntimeError(f"a fresh {length}-token prompt matched {matched} tokens")
            return seconds

        for length in args.lengths:
            held = fresh(length)
            rig.save(held)  # one prompt the cache holds

            def hit(held: list[int] = held, length: int = length) -> float:
                request, matched, seconds = rig.lookup(held)
                rig.scheduler.request_finished(request, [])  # releases the pins
                if matched != (length - 1) // args.tokens_per_block * args.tokens_per_block:
                    raise RuntimeError(f"a {length}-token prompt the cache holds matched {matched} tokens")
                return seconds

            gap = args.gap_ms / 1e3
            results[str(length)] = {
                "miss_back_to_back_p50_us": p50_us(lambda length=length: miss(length), args.count, 0.0),
                "miss_after_gap_p50_us": p50_us(lambda length=length: miss(length), args.count, gap),
                "hit_back_to_back_p50_us": p50_us(hit, args.count, 0.0),
                "hit_after_gap_p50_us": p50_us(hit, args.count, gap),
            }
        if url is not None:
            with CacheServerClient(url, timeout_s=30) as client:

                def ping() -> float:
                    began = time.perf_counter()
                    client.ping()
                    return time.perf_counter() - began

                results["ping_back_to_back_p50_us"] = p50_us(ping, args.count, 0.0)
                results["ping_after_gap_p50_us"] = p50_us(ping, args.count, args.gap_ms / 1e3)
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
