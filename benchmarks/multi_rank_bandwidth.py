"""The bandwidth half of ``benchmarks/multi_rank.py`` (``--bandwidth``): each rank process drives its
preset's connector through TRT-LLM's calls, all ranks at once, and rank 0 reports store/load
bandwidth and lookup latency. Run through ``multi_rank.py``, not alone (see its docstring).
"""

from __future__ import annotations

import importlib
import math
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from kv_shapes import CHUNK as BANDWIDTH_CHUNK
from kv_shapes import KV_SHAPES

from lmcache.integration.tensorrt_llm._trtllm import RequestData, SchedulerOutput
from lmcache.testing.trtllm_replay import (
    CppRequestView,
    KvCacheConfig,
    KvCacheConnectorConfig,
    LlmRequest,
    ProcessGroupRanks,
    TorchLlmArgs,
    simulated_rank,
)

POLL_S = 0.0002  # between get_finished polls: short against a transfer


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


class ConnectorRank:
    """This rank's worker (and rank 0's scheduler) of a preset, called as TRT-LLM's executor calls them."""

    def __init__(self, job: dict[str, Any], ranks: ProcessGroupRanks, pool: torch.Tensor) -> None:
        self.ranks = ranks
        self.stream = torch.cuda.current_stream(pool.device) if pool.is_cuda else None
        self.device = pool.device
        config = KvCacheConnectorConfig(connector=job["preset"], server_url=job["server_url"])
        module = importlib.import_module(config.connector_module)
        self.llm_args = TorchLlmArgs(
            model=f"bench/{job['model']}",
            tensor_parallel_size=ranks.size,
            kv_cache_config=KvCacheConfig(
                tokens_per_block=job["tokens_per_block"], max_tokens=pool.shape[0] * job["tokens_per_block"]
            ),
            kv_connector_config=config,
        )
        with simulated_rank(ranks.rank):
            self.worker = getattr(module, config.connector_worker_class)(self.llm_args)
            self.worker.register_kv_caches(pool)
        self.scheduler = None
        if ranks.hosts_root:
            with simulated_rank(0):
                self.scheduler = getattr(module, config.connector_scheduler_class)(self.llm_args)
        self._next_id = 1

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def schedule(self, tokens: list[int], blocks: list[int]) -> tuple[LlmRequest, int]:
        """Rank 0: look up and allocate a new request of ``tokens`` into ``blocks``, build the
        metadata of its (only) context step; every rank binds it. Returns (request, matched)."""
        req = LlmRequest(self._next_id, tokens, 1)
        self._next_id += 1
        meta, matched = None, 0
        if self.scheduler is not None:
            with simulated_rank(0):
                matched, _ = self.scheduler.get_num_new_matched_tokens(CppRequestView(req), 0)
                self.scheduler.update_state_after_alloc(req, blocks)
                data = RequestData(
                    request_id=req.request_id,
                    new_tokens=tokens,
                    new_block_ids=blocks,
                    computed_position=0,
                    num_scheduled_tokens=len(tokens) - matched,
                )
                meta = self.scheduler.build_connector_meta(SchedulerOutput(new_requests=[data]))
                self.scheduler.request_finished(req, blocks)
        matched = self.ranks.broadcast(matched)
        with simulated_rank(self.ranks.rank):
            self.worker.bind_connector_meta(self.ranks.broadcast_copies(meta)[self.ranks.rank])
        return req, matched

    def store(self, req: LlmRequest, deadline_s: float) -> None:
        """``wait_for_save`` after the forward, then ``get_finished`` until this rank saved ``req``."""
        with simulated_rank(self.ranks.rank):
            self.worker.wait_for_save(self.stream)
            asked = [req.request_id]
            deadline = time.monotonic() + deadline_s
            while req.request_id not in self.worker.get_finished(asked, [])[0]:
                asked = []
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"rank {self.ranks.rank}: save of request {req.request_id} never finished"
                    )
                time.sleep(POLL_S)  # leave the GIL to the saver thread, as an executor's forward does

    def load(self) -> None:
        """``start_load_kv`` of the bound metadata (a synchronous load), until it is in the pool."""
        with simulated_rank(self.ranks.rank):
            self.worker.start_load_kv(self.stream)
        self.sync()

    def lookup_us(self, req: LlmRequest) -> float:
        """Rank 0: one ``get_num_new_matched_tokens`` (hash, lookup, pin), then its release."""
        assert self.scheduler is not None
        with simulated_rank(0):
            start = time.perf_counter()
            self.scheduler.get_num_new_matched_tokens(CppRequestView(req), 0)
            elapsed = (time.perf_counter() - start) * 1e6
            self.scheduler.request_reset(req)
        return elapsed


class LookupProbe:
    """Rank 0: lookups of a cached prompt on a thread, one every ``interval_s`` (0: back to back), while
    the block runs. A scheduler looks up as requests arrive, between its other work; back to back, the
    probe's thread would take the rank's GIL and, in-process, its engine's lock from the transfers
    timed beside it."""

    def __init__(self, rank: ConnectorRank, req: LlmRequest, interval_s: float) -> None:
        self.rank, self.req, self.interval_s = rank, req, interval_s
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> LookupProbe:
        if self.rank.scheduler is not None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="lookup-probe")
            self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            self.samples.append(self.rank.lookup_us(self.req))
            if self._stop.wait(self.interval_s):
                return

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()


def timed_together(ranks: ProcessGroupRanks, work: Callable[[], None]) -> float:
    """Seconds from a common barrier until the slowest rank finished ``work``."""
    dist.barrier()
    start = time.perf_counter()
    work()
    return max(ranks.gather({ranks.rank: time.perf_counter() - start}))


def run_bandwidth(job: dict[str, Any], ranks: ProcessGroupRanks, device: torch.device) -> dict[str, Any]:
    tpb, n = job["tokens_per_block"], job["tokens"] // BANDWIDTH_CHUNK * BANDWIDTH_CHUNK
    probe_n = job["lookup_tokens"] // BANDWIDTH_CHUNK * BANDWIDTH_CHUNK
    layers, kv_heads, head_dim = KV_SHAPES[job["model"]]
    heads = math.ceil(kv_heads / ranks.size)
    nb, probe_nb = n // tpb, probe_n // tpb
    # Prompts of n + 1 tokens: n tokens cached, the last one computed, no partial chunk saved.
    src = list(range(nb + 1))
    # Scattered, as TRT-LLM's block ids; the same on every rank (rank 0's metadata names them).
    dst = (nb + 1 + torch.randperm(nb + 1, generator=torch.Generator().manual_seed(0))).tolist()
    probe_blocks = list(range(2 * nb + 2, 2 * nb + 3 + probe_nb))
    pool = torch.zeros(
        probe_blocks[-1] + 1, layers, 2, heads * tpb * head_dim, dtype=torch.bfloat16, device=device
    )
    rank = ConnectorRank(job, ranks, pool)
    nbytes = nb * pool[0].numel() * pool.element_size()

    # A cached prompt for the lookups (stored once, looked up under load by rank 0).
    probe_tokens = torch.randint(
        0, 150_000, (probe_n + 1,), generator=torch.Generator().manual_seed(2**31)
    ).tolist()
    probe, _ = rank.schedule(probe_tokens, probe_blocks)
    rank.store(probe, job["collective_timeout_s"])
    probe_req = LlmRequest(10**9, probe_tokens, 1)
    idle = [rank.lookup_us(probe_req) for _ in range(job["lookups"])] if rank.scheduler is not None else []

    interval_s = job["lookup_interval_ms"] / 1e3
    store_s, load_s, d2h_s, h2d_s, under_load = [], [], [], [], []
    equal, hits_ok = True, True
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    flat = pool[:nb].view(-1).view(torch.uint8)
    for i in range(job["iters"] + 1):
        tokens = torch.randint(0, 150_000, (n + 1,), generator=torch.Generator().manual_seed(i)).tolist()
        pool[: nb + 1].normal_()  # the src blocks
        pool[nb + 1 : 2 * nb + 2].zero_()  # the dst blocks
        rank.sync()
        req, _ = rank.schedule(tokens, src)
        with LookupProbe(rank, probe_req, interval_s) as during_store:
            t_store = timed_together(ranks, lambda r=req: rank.store(r, job["collective_timeout_s"]))
        _, matched = rank.schedule(tokens, dst)
        with LookupProbe(rank, probe_req, interval_s) as during_load:
            t_load = timed_together(ranks, rank.load)
        hits_ok = hits_ok and matched == n
        equal = equal and torch.equal(pool[src[:nb]], pool[dst[:nb]])
        t_d2h = timed_together(ranks, lambda: (host.copy_(flat, non_blocking=True), rank.sync()))
        t_h2d = timed_together(ranks, lambda: (flat.copy_(host, non_blocking=True), rank.sync()))
        if i > 0:
            store_s.append(t_store)
            load_s.append(t_load)
            d2h_s.append(t_d2h)
            h2d_s.append(t_h2d)
            under_load += during_store.samples + during_load.samples
    everyone_equal = all(ranks.gather({ranks.rank: equal}))

    def gbps(seconds: list[float]) -> float:
        return round(ranks.size * nbytes / statistics.median(seconds) / 1e9, 3)

    result: dict[str, Any] = {
        "ranks": ranks.size,
        "preset": job["preset"],
        "model": job["model"],
        "pool_shape_per_rank": list(pool.shape),
        "tokens": n,
        "bytes_per_rank": nbytes,
        "iters": job["iters"],
        "store_GBps": gbps(store_s),
        "load_GBps": gbps(load_s),
        "copy_d2h_GBps": gbps(d2h_s),
        "copy_h2d_GBps": gbps(h2d_s),
        "lookups_under_load": len(under_load),
        "checks": {"loaded_bytes_equal": everyone_equal, "full_hits": hits_ok},
    }
    result["store_vs_copy"] = round(result["store_GBps"] / result["copy_d2h_GBps"], 3)
    result["load_vs_copy"] = round(result["load_GBps"] / result["copy_h2d_GBps"], 3)
    for name, samples in (("idle", idle), ("under_load", under_load)):
        if samples:
            result[f"lookup_{name}_us_p50"] = round(percentile(samples, 50), 1)
            result[f"lookup_{name}_us_p99"] = round(percentile(samples, 99), 1)
    result["ok"] = all(result["checks"].values())
    return result
