"""Several TP ranks, one OS process each, through the executor replay and the TRT-LLM presets.

Each rank process owns its pool (its KV-head slice) on its own device (``cuda:{rank % GPUs}``, so
several ranks share a GPU when there are fewer GPUs than ranks, and the same command spreads over
several GPUs unchanged) and its connector worker; rank 0 also owns the connector scheduler. The
ranks talk over ``torch.distributed`` (gloo, CPU and CUDA alike) as TRT-LLM's ranks do over MPI:
the scheduler's answers and ``build_connector_meta`` are broadcast from rank 0, ``get_finished``
is all-gathered and intersected, and the model gathers every rank's attention heads
(``ProcessGroupRanks`` in the replay). Preset ``lmcache``: an in-process engine per rank process;
``lmcache-mp``: every rank process talks to one cache server this script starts.

Correctness (outputs, logits included, bit-equal to the same ranks with no connector; a connector
hit where the scenario expects one; no pin or reservation left)::

    python benchmarks/multi_rank.py --ranks 2 --preset lmcache-mp --device cpu \\
        [--scenario seed multi-turn sliding] [--mode v1 v2 v2-res] [--prompt-len 200]

``seed``: A, then B evicting A from a small device pool, then A again; ``multi-turn``: chunked
prefill, then a second turn that hits past the first turn's prompt; ``sliding``: a VSWA model
(windows 64/full/64, V2 modes only). Modes: V1, V2 with the legacy query, V2 with prefix
reservations. Prints one line per scenario and mode; exits 1 on any failure.

Scale (issue 18, item 3)::

    python benchmarks/multi_rank.py --bandwidth --ranks 1 2 4 8 --device cuda \\
        [--model qwen2-1.5b] [--tokens 32768] [--iters 5] [--lookup-tokens 8192] \\
        [--pool-sharing export|shared-l1]

For each rank count, every rank holds a pool shaped like one TP rank of ``--model`` (KV heads
``ceil(heads / ranks)``, bf16) and drives its preset's connector through TRT-LLM's calls: rank 0's
scheduler looks up, plans and broadcasts, then all ranks store ``--tokens`` tokens at once into
the one server's L1 (``wait_for_save`` until ``get_finished`` reports them), then load them
into other, scattered blocks at once (``start_load_kv``; bytes checked). Baseline, in the same
run: the same number of plain ``copy_``s of the same bytes at once (pinned host memory on CUDA),
device to host and back. Reported per rank count: aggregate GB/s (all ranks' bytes over the
slowest rank's time from a common barrier), the ratio to the concurrent copies, and rank 0's
``get_num_new_matched_tokens`` latency (a ``--lookup-tokens`` prompt, hashing, lookup and pin)
p50/p99 while the transfers run (one every ``--lookup-interval-ms``), beside the same latency idle.
Iteration 0 warms up.

``--out FILE`` writes everything as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(Path(__file__).resolve().parent)]

from kv_shapes import CHUNK as BANDWIDTH_CHUNK  # noqa: E402
from kv_shapes import KV_SHAPES  # noqa: E402
from multi_rank_bandwidth import run_bandwidth  # noqa: E402

from lmcache.testing.trtllm_replay import (  # noqa: E402
    KV_MANAGER_MODES,
    GenerationResult,
    KvCacheConnectorConfig,
    ModelConfig,
    ProcessGroupRanks,
    ReplayExecutor,
    TorchLlmArgs,
    llm_args_for,
)

PRESETS = ("lmcache", "lmcache-mp")
SCENARIOS = ("seed", "multi-turn", "sliding")
MODES = KV_MANAGER_MODES
TPB = 16  # correctness runs: tokens per block, and the cache's chunk
CHUNK = 64
MODEL = ModelConfig(vocab_size=512, hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=8, head_dim=16)
VSWA = ModelConfig(**{**MODEL.__dict__, "num_layers": 3, "layer_windows": (64, None, 64)})


# --- the parent: a cache server, one process per rank ---------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CacheServer:
    """``python -m lmcache.v1.multiprocess.server`` on a free port and a private ipc socket."""

    def __init__(self, workdir: Path, chunk: int, l1_size_gb: float) -> None:
        from lmcache.server.client import wait_for_server

        port = free_port()
        self.url = f"ipc://{workdir / 's.sock'}"
        self.log_path = workdir / "server.log"
        env = dict(
            os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        )
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable, "-m", "lmcache.v1.multiprocess.server", "--port", str(port),
                    "--ipc-path", str(workdir / "s.sock"), "--chunk-size", str(chunk),
                    "--l1-size-gb", str(l1_size_gb), "--eviction-policy", "LRU", "--max-workers", "4",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )  # fmt: skip
        wait_for_server(f"tcp://127.0.0.1:{port}", 120)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)


def run_ranks(world: int, job: dict[str, Any], workdir: Path, timeout_s: float) -> dict[str, Any]:
    """Run ``rank_main`` in ``world`` spawned processes; rank 0's JSON result. A rank that fails
    (or the deadline) ends the others."""
    out = workdir / f"result-{world}.json"
    out.unlink(missing_ok=True)
    init = workdir / f"pg-{world}-{time.monotonic_ns()}"
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=rank_main, args=(rank, world, job, str(init), str(out))) for rank in range(world)
    ]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout_s
    failed = None
    pending = list(procs)
    while pending and failed is None:
        left = deadline - time.monotonic()
        if left <= 0:
            failed = f"ranks still running after {timeout_s:.0f}s"
            break
        for sentinel in multiprocessing.connection.wait([p.sentinel for p in pending], timeout=left):
            proc = next(p for p in pending if p.sentinel == sentinel)
            proc.join()
            pending.remove(proc)
            if proc.exitcode != 0:
                failed = f"rank {procs.index(proc)} exited with {proc.exitcode}"
    for proc in pending:
        proc.kill()
        proc.join()
    if failed is not None:
        return {"ranks": world, "ok": False, "error": failed}
    return json.loads(out.read_text())


# --- inside a rank process -------------------------------------------------------------------------


def rank_main(rank: int, world: int, job: dict[str, Any], init: str, out: str) -> None:
    """One TP rank: join the group, pick the device, run the job; rank 0 writes the result."""
    torch.set_num_threads(1)
    if job["preset"] == "lmcache":  # an engine per rank process: this rank's share of the L1
        os.environ["LMCACHE_MAX_LOCAL_CPU_SIZE"] = str(job["l1_size_gb"] / world)
    if job["pool_sharing"]:
        os.environ["LMCACHE_POOL_SHARING"] = job["pool_sharing"]  # this rank's, not the server's
    timeout = datetime.timedelta(seconds=job["collective_timeout_s"])
    dist.init_process_group(
        "gloo", init_method=f"file://{init}", rank=rank, world_size=world, timeout=timeout
    )
    device = torch.device("cpu")
    if job["device"] == "cuda":
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    ranks = ProcessGroupRanks()
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = run_bandwidth(job, ranks, device) if job["bandwidth"] else run_correctness(job, ranks, device)
    result["devices"] = [f"{d} ({name})" for d, name in ranks.gather({rank: (str(device), card)})]
    if rank == 0:
        Path(out).write_text(json.dumps(result, indent=2))
    dist.barrier()
    dist.destroy_process_group()


def replay_args(
    preset: str | None, url: str | None, mode: str, tp: int, max_tokens: int, chunk: int | None
) -> TorchLlmArgs:
    connector = None if preset is None else KvCacheConnectorConfig(connector=preset, server_url=url)
    return llm_args_for(
        mode,
        connector,
        model="replay/multi-rank",
        tensor_parallel_size=tp,
        tokens_per_block=TPB,
        max_tokens=max_tokens,
        chunk=chunk,
    )


def prompt(n: int, start: int) -> list[int]:
    return [(start * 131 + 17 * i + (i * i) % 7) % MODEL.vocab_size for i in range(n)]


class Scenario:
    """One scenario under one mode, run by every rank process in lock step."""

    def __init__(
        self, job: dict[str, Any], ranks: ProcessGroupRanks, device: torch.device, mode: str, seed: int
    ):
        self.job, self.ranks, self.device, self.mode, self.seed = job, ranks, device, mode, seed
        self.executors: list[ReplayExecutor] = []
        self.checks: dict[str, bool] = {}
        self.references: dict[tuple[ModelConfig, tuple[int, ...], int], tuple[list[int], bytes]] = {}

    def executor(
        self, model: ModelConfig, max_tokens: int = 4096, chunk: int | None = None
    ) -> ReplayExecutor:
        args = replay_args(
            self.job["preset"], self.job["server_url"], self.mode, self.ranks.size, max_tokens, chunk
        )
        ex = ReplayExecutor(args, model, device=self.device, ranks=self.ranks)
        self.executors.append(ex)
        return ex

    def same_as_reference(
        self, name: str, got: GenerationResult, model: ModelConfig, tokens: list[int], n: int
    ) -> None:
        """Every rank's output equal to the same ranks' run, on the same devices, with no connector.

        (A run split otherwise, or on another device, may round differently: GEMM kernels promise no
        bit-equality across shapes.) Every rank runs the reference, in lock step."""
        key = (model, tuple(tokens), n)
        if key not in self.references:
            args = replay_args(None, None, self.mode, self.ranks.size, 4096, None)
            reference = ReplayExecutor(args, model, device=self.device, ranks=self.ranks)
            want = reference.generate([tokens], n)[0]
            self.references[key] = (want.tokens, want.logits.numpy().tobytes())
        mine = (got.tokens, got.logits.numpy().tobytes())
        everyone = self.ranks.gather({self.ranks.rank: mine})
        if self.ranks.hosts_root:
            self.checks[f"{name}_equal_no_connector"] = all(o == self.references[key] for o in everyone)

    def finish(self) -> None:
        """No reservation, request or pin left once every request is done (checked on every rank)."""
        from lmcache.config import load_engine_config
        from lmcache.integration.tensorrt_llm.server_backend import process_connection
        from lmcache.integration.tensorrt_llm.tensorrt_adapter import process_engine
        from lmcache.integration.tensorrt_llm.tensorrt_mp_adapter import reset_process_connections

        dist.barrier()  # every rank's loads released their pins
        if self.job["server_url"] is None:
            pinned = len(process_engine().engine.pinned_ids())
        elif self.ranks.hosts_root:
            pinned = (
                process_connection(self.job["server_url"], load_engine_config()).client.stats().pinned_lookups
            )
        else:
            pinned = 0
        left = 0
        for ex in self.executors:
            if ex.scheduler is not None:
                left += len(ex.scheduler.planner.reservation_ids()) + len(
                    ex.scheduler.planner.pending_requests()
                )
        self.checks["nothing_pinned_or_pending"] = all(
            n == 0 for n in self.ranks.gather({self.ranks.rank: pinned + left})
        )
        dist.barrier()
        if self.job["server_url"] is not None:
            reset_process_connections()

    def seed_scenario(self) -> dict[str, Any]:
        n = self.job["prompt_len"]
        a, b = prompt(n, self.seed), prompt(n, self.seed + 1)
        # Room for one request and its generated tokens, not two: B evicts A from the device.
        blocks = math.ceil((n + 8) / TPB) + 1
        ex = self.executor(MODEL, max_tokens=blocks * TPB)
        first = ex.generate([a], 8)[0]
        ex.generate([b], 8)
        third = ex.generate([a], 8)[0]
        self.checks["third_hit_from_connector"] = third.num_connector_matched_tokens > 0
        self.same_as_reference("first", first, MODEL, a, 8)
        self.same_as_reference("third", third, MODEL, a, 8)
        return {
            "connector_matched": third.num_connector_matched_tokens,
            "device_matched": third.num_device_matched_tokens,
        }

    def multi_turn(self) -> dict[str, Any]:
        n = self.job["prompt_len"]
        turn1 = prompt(n, self.seed)
        answer = (n // CHUNK + 1) * CHUNK - n + 4  # the first turn ends past a chunk boundary
        first = self.executor(MODEL, chunk=CHUNK).generate([turn1], answer)[0]
        turn2 = turn1 + first.tokens + prompt(30, self.seed + 1)
        second = self.executor(MODEL, chunk=CHUNK).generate([turn2], 6)[0]
        self.checks["second_turn_hit_past_first_prompt"] = second.num_connector_matched_tokens > len(turn1)
        self.same_as_reference("first", first, MODEL, turn1, answer)
        self.same_as_reference("second", second, MODEL, turn2, 6)
        return {"connector_matched": second.num_connector_matched_tokens}

    def sliding(self) -> dict[str, Any]:
        p = prompt(self.job["prompt_len"], self.seed)
        cold = self.executor(VSWA).generate([p], 6)[0]
        warm = self.executor(VSWA).generate([p], 6)[0]
        self.checks["warm_hit_from_connector"] = warm.num_connector_matched_tokens > 0
        self.same_as_reference("cold", cold, VSWA, p, 6)
        self.same_as_reference("warm", warm, VSWA, p, 6)
        return {"connector_matched": warm.num_connector_matched_tokens}


def run_correctness(job: dict[str, Any], ranks: ProcessGroupRanks, device: torch.device) -> dict[str, Any]:
    from lmcache.integration.tensorrt_llm.tensorrt_adapter import reset_process_engine

    rows = []
    for m, mode in enumerate(job["modes"]):
        for s, name in enumerate(job["scenarios"]):
            if name == "sliding" and mode == "v1":
                continue  # sliding windows need the V2 KV cache manager
            reset_process_engine()  # preset lmcache: each scenario starts from an empty cache
            scenario = Scenario(job, ranks, device, mode, seed=10 * (m * len(SCENARIOS) + s) + 1)
            run: Callable[[], dict[str, Any]] = {
                "seed": scenario.seed_scenario,
                "multi-turn": scenario.multi_turn,
                "sliding": scenario.sliding,
            }[name]
            row = {"scenario": name, "mode": mode, **run()}
            scenario.finish()
            row["checks"] = scenario.checks
            row["ok"] = all(scenario.checks.values())
            rows.append(row)
    return {"ranks": ranks.size, "preset": job["preset"], "results": rows, "ok": all(r["ok"] for r in rows)}


# --- command line -----------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ranks", type=int, nargs="+", default=[2], help="rank counts (one run each)")
    parser.add_argument("--preset", choices=PRESETS, default="lmcache-mp")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--scenario", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--mode", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--prompt-len", type=int, default=200, help="correctness prompts, in tokens")
    parser.add_argument("--bandwidth", action="store_true", help="measure scale instead of correctness")
    parser.add_argument(
        "--model", choices=sorted(KV_SHAPES), default="qwen2-1.5b", help="bandwidth: KV shape"
    )
    parser.add_argument("--tokens-per-block", type=int, choices=(16, 32, 64), default=32)
    parser.add_argument("--tokens", type=int, default=32768, help="bandwidth: tokens per rank per transfer")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--lookup-tokens", type=int, default=8192)
    parser.add_argument("--lookups", type=int, default=200, help="idle lookups timed before the transfers")
    parser.add_argument(
        "--lookup-interval-ms",
        type=float,
        default=5.0,
        help="rank 0's lookups during the transfers: one per interval (0: back to back)",
    )
    parser.add_argument(
        "--l1-size-gb",
        type=float,
        default=None,
        help="L1 of the server (lmcache: split over the rank processes); default: fits the run",
    )
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="per rank count, all ranks")
    parser.add_argument(
        "--pool-sharing",
        choices=("auto", "export", "shared-l1"),
        help="lmcache-mp: how the ranks share their pools (each rank's LMCACHE_POOL_SHARING)",
    )
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda needs a CUDA device", file=sys.stderr)
        return 2
    chunk = BANDWIDTH_CHUNK if args.bandwidth else CHUNK
    for key in [k for k in os.environ if k.startswith("LMCACHE_")]:
        del os.environ[key]
    os.environ.update(
        LMCACHE_CHUNK_SIZE=str(chunk),
        LMCACHE_LOCAL_CPU="True",
        LMCACHE_LOG_LEVEL="WARNING",
        OMP_NUM_THREADS="1",
    )
    if args.l1_size_gb is None:
        if args.bandwidth:
            layers, kv_heads, head_dim = KV_SHAPES[args.model]
            # All ranks together: the whole model's KV, KV heads repeated on ranks beyond their count
            # (a lookup pins for every rank; short of this, the probe's pins pass --pin-share).
            heads = max(ranks * math.ceil(kv_heads / ranks) for ranks in args.ranks)
            per_token = layers * 2 * heads * head_dim * 2
            args.l1_size_gb = max(1.0, 3 * (args.tokens + args.lookup_tokens) * per_token * 2 / 1e9)
        else:
            args.l1_size_gb = 0.25
    workdir = Path(tempfile.mkdtemp(prefix="lmc-ranks-", dir="/tmp"))
    server = CacheServer(workdir, chunk, args.l1_size_gb) if args.preset == "lmcache-mp" else None
    job = {
        "preset": args.preset,
        "server_url": server.url if server is not None else None,
        "device": args.device,
        "bandwidth": args.bandwidth,
        "scenarios": args.scenario,
        "modes": args.mode,
        "prompt_len": args.prompt_len,
        "model": args.model,
        "tokens_per_block": args.tokens_per_block,
        "tokens": args.tokens,
        "iters": args.iters,
        "lookup_tokens": args.lookup_tokens,
        "lookups": args.lookups,
        "lookup_interval_ms": args.lookup_interval_ms,
        "l1_size_gb": args.l1_size_gb,
        "pool_sharing": args.pool_sharing,
        "collective_timeout_s": min(args.timeout_s, 600.0),
    }
    runs = []
    try:
        for world in args.ranks:
            result = run_ranks(world, job, workdir, args.timeout_s)
            runs.append(result)
            report(result, args.bandwidth)
    finally:
        if server is not None:
            server.stop()
        if all(r["ok"] for r in runs):
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"kept {workdir} (server log, rank results)", file=sys.stderr)
    summary = {
        "device_kind": args.device,
        "torch": torch.__version__,
        "runs": runs,
        "ok": all(r["ok"] for r in runs),
    }
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))
    return 0 if summary["ok"] else 1


def report(result: dict[str, Any], bandwidth: bool) -> None:
    """One line per scenario (correctness) or per rank count (bandwidth)."""
    head = f"ranks={result['ranks']}"
    if "error" in result:
        print(f"{head} FAIL: {result['error']}")
        return
    print(f"{head} devices: {', '.join(result['devices'])}")
    if bandwidth:
        fields = (
            "store_GBps",
            "copy_d2h_GBps",
            "store_vs_copy",
            "load_GBps",
            "copy_h2d_GBps",
            "load_vs_copy",
        )
        lookup = ("lookup_idle_us_p50", "lookup_under_load_us_p50", "lookup_under_load_us_p99")
        shown = " ".join(f"{k}={result.get(k)}" for k in (*fields, *lookup))
        print(f"{head} {'ok' if result['ok'] else 'FAIL'} {shown} checks={result['checks']}")
        return
    for row in result["results"]:
        failed = [name for name, ok in row["checks"].items() if not ok]
        verdict = "pass" if row["ok"] else f"FAIL {failed}"
        print(
            f"{head} {result['preset']} {row['scenario']:<10} {row['mode']:<6} {verdict} "
            f"connector_matched={row['connector_matched']}"
        )


if __name__ == "__main__":
    sys.exit(main())
