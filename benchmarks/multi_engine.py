"""Several engines on one cache server: each an OS process with its own pool, scheduler and worker
(``lmcache-mp``, driven as TRT-LLM drives them, :class:`bench_adapters.AdapterRig`), all on one device.

For each engine count in ``--engines`` (default 1 2 4), all engines start each phase together:

* ceiling: every engine makes ``--iters`` plain pinned ``copy_``s of one request's bytes at once,
  device to host, then host to device;
* saves: every engine saves ``--iters`` fresh ``--tokens``-token prompts (``wait_for_save`` until
  ``get_finished`` reports them);
* loads: every engine loads them back, each into scattered blocks of a pool region of its own; after
  the phase (outside its time) each load is checked: a full hit, every row equal to the saved one.

First one engine fills the server's L1 once with prompts of its own, and every engine maps (and
page-locks) the server's L1 slabs before its first phase, so every figure is taken in steady state
(L1 full and evicting, as for long-running engines); L1 must hold every prompt a run's loads read back.

Aggregate GB/s is every engine's bytes over the span from the first start to the last end; the
ratio is to the ceiling's aggregate. Meanwhile this process looks up a fresh 8k-token prompt through
its own client, one every ``--lookup-interval-ms``, twice: as the MP scheduler does (hashed here,
claimed with no call where the server offers claims, pinned; ``lookup``) and as a plain round trip
(the tokens sent, the server hashes; ``round_trip``): p50 / p99 under load, beside the same idle.

``--mixed`` adds, with two engines, one saving while the other loads (prompts it saved first), against
the bidirectional ceiling: two plain copies in opposite directions at once.

``--pipelined-saves``: each engine hands its next prompt's save over (its lookup, planning and
``wait_for_save``) without waiting for the last one to land, as TRT-LLM's executor goes on to its next
iteration; by default an engine's next request starts once its last save landed, so its host work sits
between its copies.

``--forward-ms F`` hands each save over as TRT-LLM does (``bench_adapters.py``): F ms of a forward still
running on the device, every engine's at once. The aggregate then counts the forwards too; what TRT-LLM
waits for is each save from its forward's end until ``get_finished`` reports it, reported per save as a
ratio to one plain copy of the ceiling phase (every engine copying at once): ``save_after_forward``.

    python benchmarks/multi_engine.py --device cuda [--engines 1 2 4] [--mixed] [--pipelined-saves]
        [--out engines.json]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_adapters import SHAPES, AdapterRig, report, rig_parser, start_server  # noqa: E402
from kv_shapes import CHUNK  # noqa: E402
from mp_transfer import server_gc, server_l1_memory  # noqa: E402

from lmcache.server.client import CacheServerClient  # noqa: E402
from lmcache.testing import pool_modes  # noqa: E402

VOCAB = 150_000
LOOKUP_TOKENS = 8192


def _copy(pool: torch.Tensor, rows: int, to_host: bool, host: torch.Tensor) -> float:
    """One plain pinned copy of ``rows`` rows; its seconds."""
    began = time.perf_counter()
    if to_host:
        host.copy_(pool[:rows], non_blocking=True)
    else:
        pool[:rows].copy_(host, non_blocking=True)
    if pool.is_cuda:
        torch.cuda.current_stream(pool.device).synchronize()
    return time.perf_counter() - began


def engine_main(
    args: argparse.Namespace, url: str, seed: int, plan: list[str], barrier: Any, out: Any
) -> None:
    """One engine: for each phase of ``plan``, wait for every engine, then run it; send
    ``(phase, start, end, bytes, rows_equal, seconds)`` per phase (monotonic clock, shared by the host;
    ``seconds``: each copy's, or each save's from its forward's end).
    A failure breaks the barrier, so no one waits for this engine."""
    try:
        if args.pool_sharing:
            os.environ["LMCACHE_POOL_SHARING"] = args.pool_sharing  # this engine's, not the server's
        run_engine(args, url, seed, plan, barrier, out)
    except BaseException:
        barrier.abort()
        raise
    finally:
        out.close()


def run_engine(
    args: argparse.Namespace, url: str, seed: int, plan: list[str], barrier: Any, out: Any
) -> None:
    rig = AdapterRig(args, url, load_regions=args.iters)  # a region per load: checked after the phase
    rig.settle()  # a long-running engine's L1 mappings are in place: time the steady state
    rig.generator.manual_seed(seed)  # prompts no other engine (of any run) saves
    rows = rig.blocks
    request_bytes = rows * rig.pool[0].numel() * rig.pool.element_size()
    host = torch.empty(rig.pool[:rows].shape, dtype=rig.pool.dtype, pin_memory=rig.pool.is_cuda)
    saved: list[tuple[list[int], list[int]]] = []
    for phase in plan:
        barrier.wait()
        began, count, equal = time.monotonic(), 0, True
        seconds: list[float] = []
        if phase in ("copy_d2h", "copy_h2d"):
            for _ in range(args.iters):  # as many requests' bytes as a transfer phase
                seconds.append(_copy(rig.pool, rows, phase == "copy_d2h", host))
                count += 1
        elif phase in ("save", "fill"):
            pipelined = args.pipelined_saves and phase == "save"
            for _ in range(args.iters if phase == "save" else fill_count(args)):
                tokens = torch.randint(0, VOCAB, (rig.tokens,), generator=rig.generator).tolist()
                if pipelined:
                    pages = rig.hand_over_save(tokens)
                else:
                    _, save_s, pages = rig.save(tokens)
                    seconds.append(save_s)
                if phase == "save":
                    saved.append((tokens, pages))
                count += 1
            if pipelined:
                rig.wait_handed_over()
        elif phase == "load":
            recent = saved[-args.iters :]
            loads = [(rig.load_into(tokens, 1 + i), pages) for i, (tokens, pages) in enumerate(recent)]
            count = len(loads)
        else:
            raise ValueError(f"unknown phase {phase}")
        ended = time.monotonic()
        if phase == "load":  # outside the timed span: what a load costs TRT-LLM is its lookup and copies
            equal = all(loaded.full_hit and rig.rows_equal(loaded, pages) for loaded, pages in loads)
        out.send((phase, began, ended, count * request_bytes, equal, seconds))


def request_bytes(args: argparse.Namespace) -> int:
    """Bytes of one request's KV (as :class:`AdapterRig` shapes its pool)."""
    layers, heads, head_dim = SHAPES[args.model]
    element = 2 if args.device.startswith("cuda") else 4  # bfloat16 on CUDA, float32 on CPU
    return args.tokens // CHUNK * CHUNK * layers * 2 * heads * head_dim * element


def fill_count(args: argparse.Namespace) -> int:
    """Prompts that fill L1 once over."""
    return -(-int(args.l1_size_gb * (1 << 30)) // request_bytes(args))


def check_capacity(args: argparse.Namespace) -> None:
    """Refuse an L1 that cannot hold what a run loads back (partial hits would be timed as loads)."""
    held = max([*args.engines, 3 if args.mixed else 0]) * args.iters  # --mixed: 3 engines' worth
    need = held * request_bytes(args)
    if need > 0.9 * args.l1_size_gb * (1 << 30):  # L1's slabs are not all usable by one chunk size
        raise SystemExit(
            f"--l1-size-gb {args.l1_size_gb} cannot hold the {held} requests of "
            f"{request_bytes(args) / 2**20:.1f} MiB a run reads back ({args.iters} per engine, --iters): "
            f"raise --l1-size-gb to at least {need / 0.9 / 2**30:.3g} or lower --iters"
        )


def plan_of(count: int, mixed: bool) -> list[list[str]]:
    """Each engine's phases, in lockstep (one barrier per phase)."""
    common = ["copy_d2h", "copy_h2d", "save", "load"]
    if not mixed:
        return [common for _ in range(count)]
    return [common + ["copy_d2h", "save"], common + ["copy_h2d", "load"]]


Row = dict[str, Any]


def aggregate_gbps(rows: list[Row]) -> float:
    """GB/s of ``rows`` together (one per engine), first start to last end."""
    span = max(r["end"] for r in rows) - min(r["start"] for r in rows)
    return sum(r["bytes"] for r in rows) / span / 1e9


@dataclass
class LookupTimes:
    """Seconds of lookups of fresh prompts: as the MP scheduler makes them, and as plain round trips."""

    scheduler: list[float] = field(default_factory=list)
    round_trip: list[float] = field(default_factory=list)

    def __iadd__(self, other: LookupTimes) -> LookupTimes:
        self.scheduler += other.scheduler
        self.round_trip += other.round_trip
        return self

    def summary(self) -> dict[str, Any]:
        return {"lookup": percentiles_us(self.scheduler), "round_trip": percentiles_us(self.round_trip)}


def lookups_while(client: CacheServerClient, done: Any, limit: int, interval_s: float) -> LookupTimes:
    """Lookups of fresh prompts, both ways (see the module), one pair every ``interval_s`` (a scheduler
    asks as requests arrive, not in a loop that would keep the server busy), until ``done()`` (at most
    ``limit`` pairs)."""
    generator = torch.Generator().manual_seed(7)
    times = LookupTimes()
    while len(times.scheduler) < limit:  # one at least, however short the phase
        tokens = torch.randint(0, VOCAB, (LOOKUP_TOKENS,), generator=generator).tolist()
        began = time.perf_counter()
        if client.lookup(tokens, pin_id="lookups", chunk_hashes=client.chunk_hashes(tokens)):
            client.release("lookups")  # not expected of a fresh prompt; pins go either way
        times.scheduler.append(time.perf_counter() - began)
        sent = time.perf_counter()
        client.lookup(tokens)
        times.round_trip.append(time.perf_counter() - sent)
        if done():
            break
        time.sleep(max(0.0, began + interval_s - time.perf_counter()))
    return times


def percentiles_us(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    if not ordered:
        return {"p50_us": 0.0, "p99_us": 0.0, "count": 0}
    p99 = ordered[min(len(ordered) - 1, int(0.99 * (len(ordered) - 1)))]
    return {
        "p50_us": round(statistics.median(ordered) * 1e6, 1),
        "p99_us": round(p99 * 1e6, 1),
        "count": len(ordered),
    }


def run_count(
    args: argparse.Namespace, url: str, count: int, mixed: bool, client: CacheServerClient
) -> dict[str, Any]:
    """One run of ``count`` engine processes through their plans; this process looks up meanwhile."""
    plans = plan_of(count, mixed)
    steps, under_load = run_plans(args, url, plans, client, args.seed + 1000 * (count + 10 * mixed))
    result: dict[str, Any] = {
        "engines": len(plans),
        "rows_equal": all(r["equal"] for rows in steps for r in rows),
        "lookup_under_load": under_load.summary(),
    }
    if mixed:  # its last two steps: a copy each way at once, then a save beside a load
        ceiling, work = aggregate_gbps(steps[-2]), aggregate_gbps(steps[-1])
        result.update(
            bidirectional_ceiling_gbps=round(ceiling, 2),
            save_beside_load_gbps=round(work, 2),
            ratio=round(work / ceiling, 3),
        )
        return result
    if args.forward_ms > 0 and not args.pipelined_saves:  # pipelined, a save's landing is seen late
        result["save_after_forward"] = after_forward_ratios(steps[0], steps[2])
    copy_d2h, copy_h2d, save, load = (aggregate_gbps(rows) for rows in steps)
    result.update(
        ceiling_save_gbps=round(copy_d2h, 2),
        ceiling_load_gbps=round(copy_h2d, 2),
        save_gbps=round(save, 2),
        load_gbps=round(load, 2),
        save_ratio=round(save / copy_d2h, 3),
        load_ratio=round(load / copy_h2d, 3),
    )
    return result


def after_forward_ratios(copies: list[Row], saves: list[Row]) -> dict[str, float]:
    """Each save, from its forward's end until reported, as a ratio to the median plain copy of the
    same bytes while every engine copied at once: median and worst over all engines' saves."""
    ceiling = statistics.median(s for row in copies for s in row["seconds"])
    ratios = sorted(ceiling / s for row in saves for s in row["seconds"])
    return {
        "copy_ms": round(ceiling * 1e3, 3),
        "median_ratio": round(statistics.median(ratios), 3),
        "worst_ratio": round(ratios[0], 3),
        "count": len(ratios),
    }


def run_plans(
    args: argparse.Namespace, url: str, plans: list[list[str]], client: CacheServerClient, seed: int
) -> tuple[list[list[Row]], LookupTimes]:
    """One engine process per plan, all in lockstep: each step's rows, and the lookups this
    process timed while steps with saves or loads ran. Engine ``i`` draws its prompts from
    ``seed + i``: callers keep seeds apart, so no run saves a prompt another saved."""
    context = mp.get_context("spawn")  # CUDA in the children
    barrier = context.Barrier(len(plans) + 1)
    pipes, procs = [], []
    for index, plan in enumerate(plans):
        receive, send = context.Pipe(duplex=False)
        proc = context.Process(target=engine_main, args=(args, url, seed + index, plan, barrier, send))
        proc.start()
        send.close()
        pipes.append(receive)
        procs.append(proc)
    steps: list[list[Row]] = []
    under_load = LookupTimes()
    try:
        for step in range(len(plans[0])):
            try:
                barrier.wait(timeout=args.timeout_s)
            except threading.BrokenBarrierError:
                raise RuntimeError(f"an engine failed before step {step}; see its traceback") from None
            rows: list[Row] = []
            pending = list(pipes)

            def collect(pending: list[Any] = pending, rows: list[Row] = rows) -> bool:
                for pipe in list(pending):
                    if pipe.poll():
                        phase, start, end, nbytes, equal, seconds = pipe.recv()
                        rows.append(
                            {
                                "phase": phase,
                                "start": start,
                                "end": end,
                                "bytes": nbytes,
                                "equal": equal,
                                "seconds": seconds,
                            }
                        )
                        pending.remove(pipe)
                return not pending

            if any(plan[step] in ("save", "load") for plan in plans):
                under_load += lookups_while(client, collect, 100_000, args.lookup_interval_ms / 1e3)
            while not collect():
                time.sleep(0.001)
            steps.append(rows)
    finally:
        for proc in procs:
            proc.join(timeout=args.timeout_s)
            if proc.is_alive():
                proc.kill()
    return steps, under_load


def main() -> int:
    parser = rig_parser(__doc__, l1_size_gb=16.0)
    parser.set_defaults(preset="lmcache-mp")
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per request")
    parser.add_argument("--iters", type=int, default=4, help="saves (and loads) per engine")
    parser.add_argument("--engines", type=int, nargs="+", default=[1, 2, 4], help="engine counts")
    parser.add_argument("--mixed", action="store_true", help="also: one engine saves while another loads")
    parser.add_argument(
        "--pipelined-saves",
        action="store_true",
        help="each engine hands its next prompt's save over without waiting for the last one to land, "
        "as TRT-LLM's executor goes on to its next iteration (default: one save at a time)",
    )
    parser.add_argument("--timeout-s", type=float, default=600.0)
    parser.add_argument(
        "--forward-ms",
        type=float,
        default=0.0,
        help="device time of each saving forward, running when wait_for_save is called (see the module)",
    )
    parser.add_argument(
        "--overlap-scheduler",
        action="store_true",
        help="with --forward-ms: the previous iteration's forward runs first, as in bench_adapters.py",
    )
    parser.add_argument(
        "--lookup-interval-ms", type=float, default=5.0, help="one lookup per interval (0: back to back)"
    )
    parser.add_argument(
        "--pool-sharing",
        choices=("auto", "export", "shared-l1"),
        help="how the engines share their pools (LMCACHE_POOL_SHARING of each engine; the server's is auto)",
    )
    args = parser.parse_args()
    if args.preset != "lmcache-mp":
        parser.error("engines share the cache through the server: --preset lmcache-mp")
    check_capacity(args)
    workdir = Path(tempfile.mkdtemp(prefix="lmc-engines-", dir="/tmp"))
    server, url = start_server(args, workdir)
    results: dict[str, Any] = {
        "tokens": args.tokens,
        "iters": args.iters,
        "model_kv": args.model,
        "pool_sharing": args.pool_sharing or "auto",
        "lookup_interval_ms": args.lookup_interval_ms,
        "forward_ms": args.forward_ms,
        "overlap_scheduler": args.overlap_scheduler,
        "pipelined_saves": args.pipelined_saves,
        "runs": [],
    }
    try:
        with CacheServerClient(url, timeout_s=30) as client:
            pool_modes.register(client, torch.zeros(4, 1, 2, 64), pool_modes.SHARED_L1, "bench/lookups", 16)
            idle = lookups_while(client, lambda: False, 200, args.lookup_interval_ms / 1e3)
            results["lookup_idle"] = idle.summary()
            run_plans(args, url, [["fill"]], client, args.seed + 1)
            for count in args.engines:
                results["runs"].append(run_count(args, url, count, False, client))
            if args.mixed:
                results["mixed"] = run_count(args, url, 2, True, client)
            results["server_gc"] = server_gc(url)
            results["server_l1_memory"] = server_l1_memory(url)
    finally:
        server.terminate()
        server.wait(30)
    report(results, args.out)
    ok = all(run["rows_equal"] for run in results["runs"]) and results.get("mixed", {}).get(
        "rows_equal", True
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
