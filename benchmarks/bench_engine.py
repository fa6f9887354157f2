"""Core engine benchmark: hashing, L1 store/retrieve bandwidth against a plain copy, lookup latency.

Everything is measured in one run against a baseline on the same machine:
- store/retrieve GB/s of 256-token chunks of a TRT-LLM-layout pool (``--model``: Qwen2-1.5B's KV,
  28 layers x 2 KV heads x 128, or Llama-3.1-8B's, 32 x 8 x 128; bf16; ``--tokens-per-block`` 32
  or 64), as a ratio to one plain ``copy_`` of the same total bytes (on CUDA: device <-> pinned
  host, the PCIe ceiling);
- a store of a fresh prompt beside a retrieve of a stored one (scattered blocks, L1 evicting),
  enqueued from one thread in either order, as a ratio to two plain copies in opposite directions at
  once, with each one's host time: how much of a save beside a load the host work serialises
  (benchmarks/RESULTS.md, D49);
- hashing throughput from a Python list of 32k tokens;
- lookup latency (p50, p99) for 8k and 32k-token prompts, stored (hit) and new (miss).

``--shm-l1`` keeps L1 where the server's shared-L1 mode keeps it (page-locked ``/dev/shm`` slabs).

    python benchmarks/bench_engine.py [--device cuda] [--tokens 65536] [--model llama-3.1-8b] \
        [--tokens-per-block 64] [--out results.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lmcache.config import LMCacheEngineConfig
from lmcache.engine import CacheEngine, KeySpace
from lmcache.keys import TokenHasher
from lmcache.layout import PoolLayout
from lmcache.shm_slabs import ShmSlabSource
from lmcache.transfer import BlockTransfer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kv_shapes import CHUNK, add_shape_args, row_shape  # noqa: E402


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def best_of(
    fn: Callable[[], object], device: str, repeats: int, setup: Callable[[], object] = lambda: None
) -> float:
    """Best wall time of ``repeats`` runs (after one warm-up), device work included, setup excluded."""
    setup()
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        setup()
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def bench_transfer(args: argparse.Namespace, scattered: bool) -> dict[str, float]:
    device, tokens, repeats, tpb = args.device, args.tokens, args.repeats, args.tokens_per_block
    num_blocks = 2 * tokens // tpb
    pool = torch.randn(num_blocks, *row_shape(args), device=device).to(torch.bfloat16)
    layout = PoolLayout.of_pool(pool, tpb)
    nbytes = tokens * layout.bytes_per_token
    n = tokens // tpb
    blocks, targets = list(range(n)), list(range(n, 2 * n))
    if scattered:  # no two adjacent, as in a pool after churn
        blocks, targets = list(range(0, 2 * n, 2)), list(range(2 * n - 1, 0, -2))

    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device == "cuda")
    flat = pool.view(-1).view(torch.uint8)[:nbytes]
    d2h = best_of(lambda: host.copy_(flat, non_blocking=True), device, repeats)
    h2d = best_of(lambda: flat.copy_(host, non_blocking=True), device, repeats)

    cfg = LMCacheEngineConfig.from_defaults(chunk_size=CHUNK, max_local_cpu_size=2 * nbytes / 2**30 + 0.1)
    # --shm-l1: L1 as the cache server's shared-L1 mode keeps it (page-locked /dev/shm slabs).
    engine = (
        CacheEngine(cfg, slab_source=ShmSlabSource(device == "cuda")) if args.shm_l1 else CacheEngine(cfg)
    )
    space = KeySpace("bench", layout)
    toks = torch.randint(0, 150_000, (tokens,)).tolist()
    stream = torch.cuda.Stream() if device == "cuda" else None

    def store() -> None:
        engine.store(space, 0, pool, BlockTransfer(toks, None, blocks, 0, tokens), stream)

    t_store = best_of(store, device, repeats, setup=engine.clear)
    engine.store(space, 0, pool, BlockTransfer(toks, None, blocks, 0, tokens), stream)
    sync(device)

    def retrieve() -> None:
        assert (
            engine.retrieve(space, 0, pool, BlockTransfer(toks, None, targets, 0, tokens), stream) == tokens
        )

    t_retrieve = best_of(retrieve, device, repeats)
    correct = bool(torch.equal(pool[blocks], pool[targets]))
    return {
        "bytes": nbytes,
        "copy_d2h_gbps": nbytes / d2h / 1e9,
        "copy_h2d_gbps": nbytes / h2d / 1e9,
        "store_gbps": nbytes / t_store / 1e9,
        "retrieve_gbps": nbytes / t_retrieve / 1e9,
        "store_ratio": d2h / t_store,
        "retrieve_ratio": h2d / t_retrieve,
        "bytes_identical": correct,
    }


def bench_store_beside_retrieve(args: argparse.Namespace) -> dict[str, float]:
    """A store of a fresh prompt and a retrieve of a stored one, scattered blocks, each on its own
    stream, enqueued back to back from one thread (store first, then retrieve first), against two
    plain copies of as many bytes in opposite directions at once; and the host time each takes to
    enqueue alone (no sync). L1 holds three prompts, so every store evicts."""
    device, tokens, repeats, tpb = args.device, args.tokens, args.repeats, args.tokens_per_block
    n = tokens // tpb
    pool = torch.randn(2 * n, *row_shape(args), device=device).to(torch.bfloat16)
    layout = PoolLayout.of_pool(pool, tpb)
    nbytes = tokens * layout.bytes_per_token
    blocks, targets = list(range(0, 2 * n, 2)), list(range(2 * n - 1, 0, -2))
    cuda = device == "cuda"
    streams = (torch.cuda.Stream(), torch.cuda.Stream()) if cuda else (None, None)
    flat = pool.view(-1).view(torch.uint8)
    out_host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
    in_host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)

    def plain_both() -> None:
        with torch.cuda.stream(streams[0]) if cuda else contextlib.nullcontext():
            out_host.copy_(flat[:nbytes], non_blocking=True)
        with torch.cuda.stream(streams[1]) if cuda else contextlib.nullcontext():
            flat[nbytes : 2 * nbytes].copy_(in_host, non_blocking=True)

    t_plain = best_of(plain_both, device, repeats)
    engine = CacheEngine(
        LMCacheEngineConfig.from_defaults(chunk_size=CHUNK, max_local_cpu_size=3 * nbytes / 2**30 + 0.01)
    )
    engine.l1.arena.wait_prepinned(120)  # L1 is page-locked in the background from start: not while timing
    space = KeySpace("bench", layout)
    generator = torch.Generator().manual_seed(0)
    held = torch.randint(0, 150_000, (tokens,), generator=generator).tolist()

    def keep_held() -> None:  # stored again if a store evicted it (a no-op while it is cached)
        engine.store(space, 0, pool, BlockTransfer(held, None, blocks, 0, tokens), streams[0])
        sync(device)

    def store() -> None:
        fresh = torch.randint(0, 150_000, (tokens,), generator=generator).tolist()
        engine.store(space, 0, pool, BlockTransfer(fresh, None, blocks, 0, tokens), streams[0])

    def retrieve() -> None:
        got = engine.retrieve(space, 0, pool, BlockTransfer(held, None, targets, 0, tokens), streams[1])
        assert got == tokens, f"the stored prompt was not retrieved whole ({got} of {tokens} tokens)"

    t_store_first = best_of(lambda: (store(), retrieve()), device, repeats, setup=keep_held)
    t_retrieve_first = best_of(lambda: (retrieve(), store()), device, repeats, setup=keep_held)
    host = {}
    for name, fn in (("store", store), ("retrieve", retrieve)):
        times = []
        for _ in range(repeats):
            keep_held()
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
            sync(device)
        host[name] = min(times)
    return {
        "bytes_each_way": nbytes,
        "plain_both_ways_gbps": 2 * nbytes / t_plain / 1e9,
        "store_then_retrieve_ratio": t_plain / t_store_first,
        "retrieve_then_store_ratio": t_plain / t_retrieve_first,
        "store_host_ms": host["store"] * 1e3,
        "retrieve_host_ms": host["retrieve"] * 1e3,
    }


def bench_hashing(repeats: int) -> dict[str, float]:
    toks = list(range(32_768))
    out = {}
    for algorithm in ("blake3", "sha256", "xxh3_128"):
        hasher = TokenHasher(CHUNK, algorithm, "bench", b"sig")
        t = best_of(lambda h=hasher: h.chunk_hashes(toks), "cpu", repeats)
        out[f"{algorithm}_mtok_per_s"] = len(toks) / t / 1e6
    return out


def bench_lookup(args: argparse.Namespace) -> dict[str, float]:
    """Lookup latency of stored prompts (a full hit: every chunk hashed and found) and of new ones
    (a miss on the first chunk). The pool rows are tiny: a lookup's cost does not depend on them."""
    tpb = args.tokens_per_block
    pool = torch.zeros(32768 // tpb, 1, 2, tpb)
    space = KeySpace("bench", PoolLayout.of_pool(pool, tpb))
    engine = CacheEngine(LMCacheEngineConfig.from_defaults(chunk_size=CHUNK, max_local_cpu_size=0.01))
    out = {}
    for n in (8192, 32768):
        hit = torch.randint(0, 150_000, (n,)).tolist()
        engine.store(space, 0, pool, BlockTransfer(hit, None, list(range(n // tpb)), 0, n))
        for kind, toks in (("hit", hit), ("miss", torch.randint(0, 150_000, (n,)).tolist())):
            samples = []
            for _ in range(max(args.repeats * 20, 50)):
                start = time.perf_counter()
                found = engine.lookup(space, toks, pin_id="bench")
                samples.append(time.perf_counter() - start)
            assert found == (n if kind == "hit" else 0), f"{kind} lookup of {n} tokens found {found}"
            samples.sort()
            out[f"lookup_{kind}_{n}_p50_us"] = statistics.median(samples) * 1e6
            out[f"lookup_{kind}_{n}_p99_us"] = samples[int(len(samples) * 0.99) - 1] * 1e6
        engine.clear()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=16384, help="tokens moved per store/retrieve")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument(
        "--shm-l1",
        action="store_true",
        help="L1 in page-locked /dev/shm slabs of 4 KiB pages, as the server's shared-L1 mode, not in "
        "private pinned memory (huge pages where the host allows)",
    )
    add_shape_args(parser)
    args = parser.parse_args()

    results: dict[str, object] = {
        "device": args.device,
        "tokens": args.tokens,
        "model_kv": args.model,
        "tokens_per_block": args.tokens_per_block,
        "l1_memory": "shm" if args.shm_l1 else "private",
    }
    if args.device == "cuda":
        results["card"] = torch.cuda.get_device_name()
    for layout_name, scattered in (("adjacent_blocks", False), ("scattered_blocks", True)):
        results[layout_name] = bench_transfer(args, scattered)
    results["store_beside_retrieve"] = bench_store_beside_retrieve(args)
    results["hashing"] = bench_hashing(args.repeats)
    results["lookup"] = bench_lookup(args)

    card = results.get("card", args.device)
    shape = f"{args.model}-shaped KV, {args.tokens_per_block} tokens/block"
    print(f"device: {card}  ({args.tokens} tokens of {shape} per op)")
    header = ("blocks", "copy D2H", "store", "ratio", "copy H2D", "retrieve", "ratio")
    print(f"{header[0]:<18}" + "".join(f"{h:>10}" if "ratio" not in h else f"{h:>8}" for h in header[1:]))
    for name in ("adjacent_blocks", "scattered_blocks"):
        r = results[name]
        assert isinstance(r, dict)
        print(
            f"{name:<18}{r['copy_d2h_gbps']:>9.1f}G{r['store_gbps']:>9.1f}G{r['store_ratio']:>8.2f}"
            f"{r['copy_h2d_gbps']:>9.1f}G{r['retrieve_gbps']:>9.1f}G{r['retrieve_ratio']:>8.2f}"
            f"  identical={r['bytes_identical']}"
        )
    for section in ("store_beside_retrieve", "hashing", "lookup"):
        r = results[section]
        assert isinstance(r, dict)
        print(section + ": " + ", ".join(f"{k}={v:.3g}" for k, v in r.items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
