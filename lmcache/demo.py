"""A self-contained demonstration of the cache engine on a synthetic TensorRT-LLM pool.

Stores a prompt's KV, looks it up, loads it into other blocks and checks the bytes, printing
hit counts and copy bandwidth: the median of ``--runs`` runs after one warm-up run. Runs on CPU
anywhere, and on CUDA where available.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lmcache.config import LMCacheEngineConfig
from lmcache.engine import CacheEngine, KeySpace
from lmcache.layout import PoolLayout
from lmcache.transfer import BlockTransfer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=8192, help="prompt length")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--runs", type=int, default=5, help="timed runs after one warm-up; the median is printed"
    )
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error(f"--runs must be >= 1, got {args.runs}")
    if args.tokens < 256:
        parser.error(f"--tokens must be >= 256 (one chunk), got {args.tokens}")

    # Qwen2-1.5B's KV geometry: 28 layers, 2 KV heads of 128, bf16, 32 tokens per block.
    tpb, layers, block_elems = 32, 28, 2 * 32 * 128
    num_blocks = 2 * args.tokens // tpb
    pool = torch.randn(num_blocks, layers, 2, block_elems, device=args.device).to(torch.bfloat16)
    layout = PoolLayout.of_pool(pool, tpb)
    space = KeySpace("demo/qwen2-1.5b-shape", layout)
    engine = CacheEngine(LMCacheEngineConfig.from_defaults(chunk_size=256, max_local_cpu_size=2.0))
    tokens = torch.randint(0, 150_000, (args.tokens,)).tolist()
    saved_blocks = list(range(args.tokens // tpb))
    loaded_blocks = list(range(num_blocks - 1, num_blocks - 1 - args.tokens // tpb, -1))

    def timed(fn):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        out = fn()
        if pool.is_cuda:
            torch.cuda.synchronize()
        return out, time.perf_counter() - start

    def run(salt: str) -> tuple[int, int, int, bool, float, float, float]:
        """One store, lookup and load under a fresh cache salt (so every run moves every byte)."""
        engine.clear()
        stored, t_store = timed(
            lambda: engine.store(space, 0, pool, BlockTransfer(tokens, salt, saved_blocks, 0, args.tokens))
        )
        hit, t_lookup = timed(lambda: engine.lookup(space, tokens, salt, pin_id=salt))
        pool[loaded_blocks] = 0
        loaded, t_load = timed(
            lambda: engine.retrieve(
                space, 0, pool, BlockTransfer(tokens, salt, loaded_blocks, 0, hit), pin_id=salt
            )
        )
        same = torch.equal(pool[saved_blocks], pool[loaded_blocks])
        return stored, hit, loaded, same, t_store, t_lookup, t_load

    run("warm-up")  # first-touch costs (pinned slabs, kernels, caches) are not what a running cache pays
    runs = [run(f"run-{i}") for i in range(args.runs)]
    stored, hit, loaded = runs[-1][:3]
    same = all(r[3] for r in runs)
    t_store, t_lookup, t_load = (statistics.median(r[i] for r in runs) for i in (4, 5, 6))
    nbytes = stored * layout.bytes_per_token
    print(f"device={args.device} prompt={args.tokens} tokens, {nbytes / 2**20:.0f} MiB of KV")
    print(f"median of {args.runs} runs after a warm-up:")
    print(f"stored    {stored} tokens   {nbytes / t_store / 1e9:6.2f} GB/s")
    print(f"lookup    {hit} of {args.tokens} tokens hit in {t_lookup * 1e3:.2f} ms")
    print(f"retrieved {loaded} tokens   {nbytes / t_load / 1e9:6.2f} GB/s   bytes identical: {same}")
    if not same or any(r[2] != r[0] for r in runs):
        raise SystemExit("demo failed: loaded KV differs from what was stored")


if __name__ == "__main__":
    main()
