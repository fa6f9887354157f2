"""Layer-wise loads against whole loads, by layer-group width (CUDA only).

For each KV shape, a 16k-token load into pool pages that are shuffled (``shuffled``: staged on the
device, then scattered) or follow each other (``adjacent``: copied straight into the pool), from
pinned host chunks that either follow each other in memory (``joined``: one 2-D copy per layer group)
or do not (``apart``: one per chunk and group, as in an L1 that has evicted for a while). Reported
per variant: the ratio of a plain pinned ``copy_`` of the same bytes to the whole load's time, when
layer 0 is in place, and the host time to enqueue it (the forward's launch waits for that). Every
variant's rows are checked against a whole load.

    python benchmarks/bench_layered.py --out layered.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmcache import c_ops, layered_load  # noqa: E402
from lmcache.layered_load import LayerReady, scatter_layers  # noqa: E402

SHAPES = {"qwen2-1.5b": (28, 2, 128), "llama-3.1-8b": (32, 8, 128), "llama-3.1-70b-tp8": (80, 1, 128)}
VARIANTS = {  # name: (MIN_GROUP_BYTES, MIN_COPY_BYTES, WIDEST_GROUP)
    "layered_default": (layered_load.MIN_GROUP_BYTES, layered_load.MIN_COPY_BYTES, layered_load.WIDEST_GROUP),
    "layered_uniform": (layered_load.MIN_GROUP_BYTES, layered_load.MIN_COPY_BYTES, 1),
    "layered_4mib_copies": (layered_load.MIN_GROUP_BYTES, 4 << 20, layered_load.WIDEST_GROUP),
    "layered_one_group": (1 << 40, 1, 1),
}
SETTINGS = ("MIN_GROUP_BYTES", "MIN_COPY_BYTES", "WIDEST_GROUP")


def timed(stream: Any, enqueue: Callable[[], Any], repeats: int) -> dict[str, float]:
    """Median device time of ``enqueue``'s work on ``stream``, of its first layer (when it returns an
    event for it) and its host time, after two untimed runs."""
    totals, firsts, hosts = [], [], []
    for i in range(repeats + 2):
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        start.record(stream)
        began = time.perf_counter()
        first = enqueue()
        host = time.perf_counter() - began
        end = torch.cuda.Event(enable_timing=True)
        end.record(stream)
        torch.cuda.synchronize()
        if i >= 2:
            totals.append(start.elapsed_time(end))
            hosts.append(host * 1e3)
            if first is not None:
                firsts.append(start.elapsed_time(first))
    out = {"ms": statistics.median(totals), "host_ms": statistics.median(hosts)}
    if firsts:
        out["first_layer_ms"] = statistics.median(firsts)
    return out


def run_shape(name: str, tokens: int, tpb: int, rows_per_chunk: int, repeats: int) -> dict[str, Any]:
    layers, heads, head_dim = SHAPES[name]
    rows = tokens // tpb
    pool = torch.zeros(2 * rows, layers, 2, heads * tpb * head_dim, dtype=torch.bfloat16, device="cuda")
    host = torch.randn((rows, *pool.shape[1:])).to(torch.bfloat16).pin_memory()
    shuffled = (torch.randperm(rows, generator=torch.Generator().manual_seed(0)) + rows).tolist()
    starts = list(range(0, rows, rows_per_chunk))
    stream = torch.cuda.Stream()
    dst = torch.empty_like(host, device="cuda")

    def copy() -> None:
        with torch.cuda.stream(stream):
            dst.copy_(host, non_blocking=True)

    ceiling = timed(stream, copy, repeats)["ms"]
    result: dict[str, Any] = {"copy_ms": ceiling}
    probe = torch.cuda.Stream()
    for (order_name, pages), hosts in itertools.product(
        (("shuffled", shuffled), ("adjacent", list(range(rows, 2 * rows)))), ("joined", "apart")
    ):
        swapped = [s for pair in zip(starts[1::2], starts[::2], strict=True) for s in pair]
        order = starts if hosts == "joined" else swapped
        chunks = [(pages[s : s + rows_per_chunk], host[s : s + rows_per_chunk]) for s in order]

        def whole(chunks: list[c_ops.ChunkCopy] = chunks) -> None:
            c_ops.scatter_from_host(pool, chunks, stream)

        def layered(chunks: list[c_ops.ChunkCopy] = chunks) -> Any:
            ready = LayerReady(layers)
            scatter_layers(pool, stream, chunks, ready)
            first = torch.cuda.Event(enable_timing=True)
            ready.wait(0, probe)
            first.record(probe)
            return first

        whole()
        stream.synchronize()
        want = pool[pages].clone()
        runs: dict[str, Any] = {"whole": timed(stream, whole, repeats)}
        for variant, settings in VARIANTS.items():
            for setting, value in zip(SETTINGS, settings, strict=True):
                setattr(layered_load, setting, value)
            pool[pages] = 0
            runs[variant] = timed(stream, layered, repeats)
            if not torch.equal(pool[pages], want):
                where = f"{name} {order_name} {hosts} {variant}"
                raise SystemExit(f"{where}: the layer-wise load wrote other rows")
        for run in runs.values():
            run["ratio"] = round(ceiling / run["ms"], 3)
        result.setdefault(order_name, {})[hosts] = runs
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--tokens-per-block", type=int, default=32)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", help="write the JSON here too")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    defaults = [getattr(layered_load, setting) for setting in SETTINGS]
    results = {"card": torch.cuda.get_device_name(), "tokens": args.tokens, "shapes": {}}
    try:
        rows_per_chunk = args.chunk_size // args.tokens_per_block
        for name in SHAPES:
            shape = run_shape(name, args.tokens, args.tokens_per_block, rows_per_chunk, args.repeats)
            results["shapes"][name] = shape
    finally:
        for setting, value in zip(SETTINGS, defaults, strict=True):
            setattr(layered_load, setting, value)
    text = json.dumps(results, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
