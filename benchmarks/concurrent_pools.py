"""Several pools copied at once by one process, as the cache server copies for the exported TP ranks of
one GPU (``multi_rank.py --bandwidth --pool-sharing export``): whether the copy layer holds up under
concurrency inside one process, apart from the server's requests, round trips and forward events.

For each pool count in ``--pools`` (default 1 2 4), pools of one rank's shape (``--model``, its KV heads
split over ``--tp`` ranks, at least one each) each move one ``--tokens``-token prompt at shuffled block
ids, one thread and one stream per pool, all at once:

* ``copy``: one plain ``copy_`` of the pool's first rows to or from pinned host memory (the ceiling);
* ``transfer_kernels``: :class:`lmcache.c_ops.Transfer` into one host buffer per chunk, as the engine
  batches them, scattered rows through the gather and scatter kernels;
* ``transfer_row_dma``: the same with every row moved by a DMA of its own;
* ``engine``: ``CacheEngine.store`` then ``retrieve`` of a fresh prompt, one engine for all pools, its
  L1 filled once before the timed rounds and sized so that every round's saves evict; rows move as
  the registration's trial settled (:mod:`lmcache.row_dma_trial`, run here first, and reported).

Each path's aggregate GB/s over the span from the common start to the last pool's end, as a ratio to
``copy``'s median at the same pool count: median and worst of ``--iters`` rounds after one warm-up.
Every load is checked row by row against the rows saved.

    python3 benchmarks/concurrent_pools.py --device cuda [--pools 1 2 4] [--tp 4] [--out pools.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kv_shapes import CHUNK, KV_SHAPES, add_shape_args  # noqa: E402

from lmcache import c_ops, cudart, row_dma_choice  # noqa: E402
from lmcache.chunk_copy import CopyBatcher  # noqa: E402
from lmcache.config import LMCacheEngineConfig  # noqa: E402
from lmcache.engine import CacheEngine, KeySpace  # noqa: E402
from lmcache.layout import PoolLayout  # noqa: E402
from lmcache.row_dma_trial import settle_by_trial  # noqa: E402
from lmcache.transfer import BlockTransfer  # noqa: E402

PATHS = ("copy", "transfer_kernels", "transfer_row_dma", "engine")


@dataclass
class RankPool:
    """One rank's pool: a prompt's rows at shuffled ``src`` ids, loaded back into ``dst`` ids."""

    pool: torch.Tensor
    src: list[int]
    dst: list[int]
    host: torch.Tensor
    """Pinned host memory for every row of the prompt (the other side of ``copy`` and the transfers)."""
    stream: Any
    space: KeySpace

    def synchronize(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()

    def prompt(self, salt: str, ids: list[int]) -> BlockTransfer:
        """The prompt of ``salt`` (its token ids are the same for every salt) in blocks ``ids``."""
        tokens = list(range(len(ids) * self.space.layout.tokens_per_block))
        return BlockTransfer(tokens, salt, ids, 0, len(tokens))

    def chunks(self, ids: list[int]) -> list[c_ops.ChunkCopy]:
        """The prompt's chunks at ``ids``: block ids and their slice of the host buffer."""
        step = CHUNK // self.space.layout.tokens_per_block
        return [(ids[at : at + step], self.host[at : at + step]) for at in range(0, len(ids), step)]


def make_pools(count: int, args: argparse.Namespace, device: torch.device) -> list[RankPool]:
    layers, kv_heads, head_dim = KV_SHAPES[args.model]
    heads = math.ceil(kv_heads / args.tp)
    blocks = args.tokens // args.tokens_per_block
    pools = []
    for i in range(count):
        pool = torch.randn(2 * blocks, layers, 2, heads * args.tokens_per_block * head_dim, device=device)
        pool = pool.to(torch.bfloat16)
        order = torch.randperm(2 * blocks, generator=torch.Generator().manual_seed(i)).tolist()
        host = torch.empty((blocks, *pool.shape[1:]), dtype=pool.dtype, pin_memory=device.type == "cuda")
        stream = cudart.new_stream(device) if device.type == "cuda" else None
        space = KeySpace(f"concurrent-pools/rank-{i}", PoolLayout.of_pool(pool, args.tokens_per_block))
        pools.append(RankPool(pool, order[:blocks], order[blocks:], host, stream, space))
    return pools


def move(path: str, rank: RankPool, engine: CacheEngine, transfer: BlockTransfer, save: bool) -> None:
    """One pool's save (from ``transfer.block_ids``) or load (into them) on ``path``, waited for."""
    if path == "copy":
        rows = rank.pool[: len(rank.src)].view(-1).view(torch.uint8)
        host = rank.host.view(-1).view(torch.uint8)
        with torch.cuda.stream(rank.stream) if rank.stream is not None else contextlib.nullcontext():
            (host.copy_(rows, non_blocking=True) if save else rows.copy_(host, non_blocking=True))
    elif path == "engine":
        (engine.store if save else engine.retrieve)(rank.space, 0, rank.pool, transfer, rank.stream)
    else:
        ids = list(transfer.block_ids)
        row_dma = path == "transfer_row_dma"
        copy = c_ops.Transfer(rank.pool, rank.stream, interleave=save, block_ids=ids, row_dma=row_dma)
        (copy.gather if save else copy.scatter)(rank.chunks(ids))
        copy.finish()
    rank.synchronize()


def together(pools: list[RankPool], work: Callable[[RankPool], None]) -> float:
    """Seconds from a common start until the last pool's ``work`` returned (its error re-raised here)."""
    start = threading.Barrier(len(pools) + 1)
    ends = [0.0] * len(pools)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        start.wait()
        try:
            work(pools[i])
        except BaseException as e:
            errors.append(e)
        ends[i] = time.perf_counter()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(pools))]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return max(ends) - began


def one_round(path: str, pools: list[RankPool], engine: CacheEngine, salt: str) -> tuple[float, float, bool]:
    """Every pool saves its ``src`` rows, then every pool loads them into its ``dst`` blocks: the
    seconds of each, and whether every loaded row equals its saved one (``copy`` moves rows in place)."""
    for rank in pools:
        rank.pool[rank.dst] = 0  # on the current stream: waited for below, before the timed copies
    if pools[0].pool.is_cuda:
        torch.cuda.synchronize()
    saved = together(pools, lambda r: move(path, r, engine, r.prompt(salt, r.src), save=True))
    loaded = together(pools, lambda r: move(path, r, engine, r.prompt(salt, r.dst), save=False))
    equal = path == "copy" or all(torch.equal(r.pool[r.src], r.pool[r.dst]) for r in pools)
    return saved, loaded, equal


def measure(pools: list[RankPool], engine: CacheEngine, iters: int) -> dict[str, Any]:
    """Every path at this pool count: GB/s median and worst, ratios to ``copy``'s median."""
    nbytes = len(pools) * pools[0].host.nbytes
    times: dict[str, tuple[list[float], list[float]]] = {}
    equal = True
    for path in PATHS:
        saves, loads = [], []
        for i in range(iters + 1):  # the first warms up
            saved, loaded, same = one_round(
                path, pools, engine, f"{path}-{len(pools)}-{i}-{time.monotonic_ns()}"
            )
            equal = equal and same
            if i:
                saves.append(saved)
                loads.append(loaded)
        times[path] = (saves, loads)
    result: dict[str, Any] = {"loads_equal": equal}
    for direction, k in (("save", 0), ("load", 1)):
        ceiling = nbytes / statistics.median(times["copy"][k])
        for path in PATHS:
            seconds = times[path][k]
            median, worst = nbytes / statistics.median(seconds), nbytes / max(seconds)
            result[f"{direction}/{path}"] = {
                "GBps": round(median / 1e9, 3),
                "vs_copy": round(median / ceiling, 3),
                "worst_vs_copy": round(worst / ceiling, 3),
            }
    return result


def fill_once(engine: CacheEngine, pools: list[RankPool], l1_bytes: int) -> None:
    """Save fresh prompts until L1 has been filled once: every timed save then evicts."""
    for round_ in range(math.ceil(l1_bytes / (len(pools) * pools[0].host.nbytes))):
        salt = f"fill-{round_}"
        together(pools, lambda r, s=salt: move("engine", r, engine, r.prompt(s, r.src), save=True))


def main() -> int:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_shape_args(parser)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--pools", type=int, nargs="+", default=[1, 2, 4], help="pool counts, one run each")
    parser.add_argument("--tp", type=int, default=4, help="TP ranks the model's KV heads are split over")
    parser.add_argument("--tokens", type=int, default=16384, help="prompt length per pool")
    parser.add_argument("--iters", type=int, default=5, help="timed rounds per path (after one warm-up)")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    for flag, value in (("--tp", args.tp), ("--iters", args.iters), *(("--pools", n) for n in args.pools)):
        if value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    if args.tokens < CHUNK or args.tokens % CHUNK:
        parser.error(f"--tokens must be a positive multiple of {CHUNK}, got {args.tokens}")
    device = torch.device(args.device)
    pools = make_pools(max(args.pools), args, device)
    prompt_bytes = pools[0].host.nbytes
    # Two rounds of every pool's prompt: a round's loads find its saves, the next round's saves evict.
    l1_bytes = 2 * len(pools) * prompt_bytes
    engine = CacheEngine(
        LMCacheEngineConfig.from_defaults(chunk_size=CHUNK, max_local_cpu_size=l1_bytes / 2**30)
    )
    pool = pools[0].pool
    trial = settle_by_trial(pool, pools[0].stream, CHUNK // args.tokens_per_block, CopyBatcher.FLUSH_CHUNKS)
    fill_once(engine, pools, l1_bytes)
    results: dict[str, Any] = {
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": args.model,
        "tp": args.tp,
        "row_bytes": pools[0].host[0].nbytes,
        "engine_row_dma": pool.is_cuda
        and row_dma_choice.uses_row_dma(pool.device.index, pools[0].host[0].nbytes),
        "row_dma_trial": None if trial is None else {"dma_ms": trial.dma_ms, "kernel_ms": trial.kernel_ms},
        "tokens": args.tokens,
        "iters": args.iters,
        "pools": {},
    }
    for count in args.pools:
        result = measure(pools[:count], engine, args.iters)
        results["pools"][str(count)] = result
        ratios = "  ".join(
            f"{key} {value['vs_copy']:.3f}/{value['worst_vs_copy']:.3f}"
            for key, value in result.items()
            if key != "loads_equal"
        )
        print(f"pools={count} loads_equal={result['loads_equal']}  {ratios}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0 if all(r["loads_equal"] for r in results["pools"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
