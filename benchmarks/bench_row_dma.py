"""The copy engine's own ceiling for scattered pool rows: what any store or load path can reach.

For each KV shape (a 16k-token prompt of pool rows, ``[layers, 2, kv_heads * tokens_per_block *
head_dim]`` bf16 each), rows at shuffled block ids are copied to and from host memory by raw DMA,
with no lmcache path around them (no keys, no slots, no round trips):

* ``one_call``: every row in one :func:`lmcache.dma_batch.enqueue` (one ``cudaMemcpyBatchAsync``);
* ``per_chunk``: one call per chunk of 256 tokens, back to back, as the stores and loads batch them;

each as a ratio to one plain pinned ``copy_`` of the same bytes (the ceiling the other benchmarks
use), into page-locked host memory from ``cudaHostAlloc`` (``pinned``) and, with ``--shm``, into a
page-locked ``/dev/shm`` region (where the cache server's shared-L1 mode keeps L1). A path's ratio in
``bench_engine.py`` or ``gpu_mp_check.py`` over this one's is what that path itself costs.

    python3 benchmarks/bench_row_dma.py [--shapes qwen2-1.5b:32,qwen2-1.5b:64,...] [--shm] [--out r.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kv_shapes import CHUNK, KV_SHAPES  # noqa: E402

from lmcache import dma_batch  # noqa: E402

TOKENS = 16384
DEFAULT_SHAPES = "qwen2-1.5b:32,qwen2-1.5b:64,llama-3.1-8b:32,llama-3.1-70b-tp8:32"


def row_bytes(model: str, tokens_per_block: int) -> int:
    layers, kv_heads, head_dim = KV_SHAPES[model]
    return layers * 2 * kv_heads * tokens_per_block * head_dim * 2  # bf16


def median_s(fn: Callable[[], Any], stream: torch.cuda.Stream, repeats: int) -> float:
    """Median seconds of ``fn`` (which enqueues on ``stream``) until its copies are done."""
    times = []
    for _ in range(repeats + 2):  # the first two warm up
        torch.cuda.synchronize()
        began = time.perf_counter()
        with torch.cuda.stream(stream):
            fn()
        stream.synchronize()
        times.append(time.perf_counter() - began)
    return statistics.median(times[2:])


def host_memory(nbytes: int, shm: bool) -> tuple[torch.Tensor, Any]:
    """``nbytes`` of page-locked host memory: from ``cudaHostAlloc``, or a page-locked ``/dev/shm``
    region (its source returned second, to close after use). The region's slab is the tensor itself:
    the page-locking lasts while that object lives."""
    if not shm:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True), None
    from lmcache.shm_slabs import ShmSlabSource

    source = ShmSlabSource(pinned=True)
    return source.allocate(nbytes).tensor, source


def measure(model: str, tokens_per_block: int, shm: bool, repeats: int, seed: int) -> dict[str, Any]:
    row = row_bytes(model, tokens_per_block)
    rows = TOKENS // tokens_per_block
    per_chunk = CHUNK // tokens_per_block
    pool = torch.empty(2 * rows, row, dtype=torch.uint8, device="cuda")
    host, source = host_memory(rows * row, shm)
    try:
        blocks = torch.randperm(2 * rows, generator=torch.Generator().manual_seed(seed))[:rows].tolist()
        base = host.data_ptr()
        to_host = [(base + i * row, pool[b].data_ptr(), row) for i, b in enumerate(blocks)]
        to_pool = [(dst, src, n) for src, dst, n in to_host]
        dense = pool[:rows].reshape(-1)
        stream = torch.cuda.Stream()
        out: dict[str, Any] = {"row_kib": row >> 10, "rows": rows, "bytes": rows * row}
        for name, copies, ceiling in (
            ("store", to_host, lambda: host.copy_(dense, non_blocking=True)),
            ("load", to_pool, lambda: dense.copy_(host, non_blocking=True)),
        ):
            plain = median_s(ceiling, stream, repeats)
            chunks = [copies[i : i + per_chunk] for i in range(0, rows, per_chunk)]
            one = median_s(lambda c=copies: dma_batch.enqueue(c, stream), stream, repeats)
            each = median_s(lambda c=chunks: [dma_batch.enqueue(x, stream) for x in c], stream, repeats)
            out[name] = {
                "copy_GBps": round(rows * row / plain / 1e9, 2),
                "one_call": round(plain / one, 3),
                "per_chunk": round(plain / each, 3),
            }
        return out
    finally:
        if source is not None:
            source.close()


def main() -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="MODEL:TOKENS_PER_BLOCK[,...]")
    parser.add_argument("--shm", action="store_true", help="also into page-locked /dev/shm memory")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device: it measures the copy engine")
    shapes = []
    for spec in args.shapes.split(","):
        model, _, tpb = spec.partition(":")
        if model not in KV_SHAPES or tpb not in ("32", "64"):
            parser.error(
                f"--shapes: {spec!r} is not MODEL:TOKENS_PER_BLOCK (a model of {sorted(KV_SHAPES)}, 32 or 64)"
            )
        shapes.append((model, int(tpb)))
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    results: dict[str, Any] = {"card": torch.cuda.get_device_name(), "tokens": TOKENS, "rows": {}}
    for model, tpb in shapes:
        for memory in ("pinned", "shm") if args.shm else ("pinned",):
            label = f"{model} t{tpb} {memory}"
            found = measure(model, tpb, memory == "shm", args.repeats, args.seed)
            results["rows"][label] = found
            print(f"{label}: {json.dumps(found)}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
