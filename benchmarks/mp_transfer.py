"""The measurements behind ``gpu_mp_check.py``: shapes, pools, a cache server per pool-sharing mode,
store/load series against a plain ``copy_``, the in-process engine beside them, lookup latency.

Every function runs on CUDA and on CPU (``device``: ``torch.device``); on CPU the "pinned copy" is a
plain host copy and the pools are shared-memory CPU tensors.
"""

from __future__ import annotations

import gc
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kv_shapes import CHUNK, KV_SHAPES  # noqa: E402

from lmcache.config import LMCacheEngineConfig  # noqa: E402
from lmcache.engine import CacheEngine, KeySpace  # noqa: E402
from lmcache.layout import PoolLayout  # noqa: E402
from lmcache.server.client import CacheServerClient, wait_for_server  # noqa: E402
from lmcache.testing import pool_modes  # noqa: E402
from lmcache.transfer import BlockTransfer  # noqa: E402

GIB = 1 << 30
DTYPE = torch.bfloat16

CUDAMALLOC = "cudamalloc"
"""A raw ``cudaMalloc`` pool, as TRT-LLM's V1 KV cache manager allocates it (exportable)."""
VMM = "vmm"
"""A ``cuMemCreate`` pool with no shareable handle, as KVCacheManagerV2 allocates it."""
CPU = "cpu"
"""A CPU pool in shared memory."""


class CheckFailed(RuntimeError):
    """A transfer moved the wrong bytes or the wrong number of tokens."""


@dataclass(frozen=True)
class Shape:
    """One measured case: a model's KV shape, tokens per block, tokens per transfer (bf16)."""

    model: str
    tokens_per_block: int
    tokens: int

    @property
    def label(self) -> str:
        return f"{self.model} t{self.tokens_per_block} {self.tokens / 1024:g}k"

    @property
    def row(self) -> tuple[int, int, int]:
        """A pool row of TRT-LLM's layout: ``[layers, 2 (K, V), kv_heads * tokens_per_block * head_dim]``."""
        layers, kv_heads, head_dim = KV_SHAPES[self.model]
        return layers, 2, kv_heads * self.tokens_per_block * head_dim

    @property
    def blocks(self) -> int:
        return self.tokens // self.tokens_per_block

    @property
    def pool_shape(self) -> tuple[int, ...]:
        """Room for the stored blocks, as many to load into, and a few spare."""
        return (2 * self.blocks + 8, *self.row)

    @property
    def nbytes(self) -> int:
        """Bytes of one transfer."""
        return self.blocks * math.prod(self.row) * DTYPE.itemsize


def parse_shapes(text: str) -> list[Shape]:
    """``MODEL:TOKENS_PER_BLOCK:TOKENS`` items, comma-separated; a clear error names a bad one."""
    shapes = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        parts = item.split(":")
        if len(parts) != 3 or parts[0] not in KV_SHAPES or not parts[1].isdigit() or not parts[2].isdigit():
            raise ValueError(
                f"bad shape {item!r}: use MODEL:TOKENS_PER_BLOCK:TOKENS with MODEL one of "
                f"{', '.join(sorted(KV_SHAPES))}, e.g. qwen2-1.5b:32:16384"
            )
        shape = Shape(parts[0], int(parts[1]), int(parts[2]))
        if CHUNK % shape.tokens_per_block or shape.tokens % CHUNK or shape.tokens < 2 * CHUNK:
            raise ValueError(
                f"bad shape {item!r}: tokens per block must divide {CHUNK} and tokens must be a multiple "
                f"of {CHUNK}, at least {2 * CHUNK}"
            )
        shapes.append(shape)
    if not shapes:
        raise ValueError("no shape given: use MODEL:TOKENS_PER_BLOCK:TOKENS[,...]")
    return shapes


def new_pool(shape: Shape, kind: str, device: torch.device) -> torch.Tensor:
    """A zeroed pool of ``shape`` allocated as ``kind`` (:data:`CUDAMALLOC`, :data:`VMM`, :data:`CPU`)."""
    if kind == CUDAMALLOC:
        from lmcache.testing.cuda_pools import allocate_cudamalloc_pool

        return allocate_cudamalloc_pool(shape.pool_shape, DTYPE, device)
    if kind == VMM:
        from lmcache.testing.vmm_pool import allocate_vmm_pool

        return allocate_vmm_pool(shape.pool_shape, DTYPE, device)
    return torch.zeros(shape.pool_shape, dtype=DTYPE).share_memory_()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


Timer = Callable[[Callable[[], Any], torch.device], tuple[Any, float]]
"""How a transfer is timed: ``timer(fn, device)`` runs ``fn`` and returns its result and wall seconds."""


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """``fn()`` and its wall seconds, device work before and inside it included."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


@dataclass
class Series:
    """Seconds of repeated transfers of ``nbytes`` each."""

    nbytes: int
    seconds: list[float] = field(default_factory=list)

    def gbps(self, seconds: float) -> float:
        return self.nbytes / seconds / 1e9

    def summary(self, ceiling: Series | None = None) -> dict[str, float]:
        """Median and worst GB/s, and with ``ceiling`` (the copy) their ratios to its median."""
        out = {
            "median_GBps": round(self.gbps(statistics.median(self.seconds)), 2),
            "worst_GBps": round(self.gbps(max(self.seconds)), 2),
        }
        if ceiling is not None:
            top = ceiling.gbps(statistics.median(ceiling.seconds))
            out["median_ratio"] = round(out["median_GBps"] / top, 3)
            out["worst_ratio"] = round(out["worst_GBps"] / top, 3)
        return out


def measure_copy(pool: torch.Tensor, shape: Shape, iters: int) -> tuple[Series, Series]:
    """The ceiling: a plain ``copy_`` of one transfer's bytes device -> pinned host and back."""
    device = pool.device
    host = torch.empty(shape.nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    flat = pool.view(-1).view(torch.uint8)[: shape.nbytes]  # the first rows, contiguous
    d2h, h2d = Series(shape.nbytes), Series(shape.nbytes)
    for i in range(iters + 1):  # the first of each is a warm-up
        t_out = timed(lambda: host.copy_(flat, non_blocking=True), device)[1]
        t_in = timed(lambda: flat.copy_(host, non_blocking=True), device)[1]
        if i:
            d2h.seconds.append(t_out)
            h2d.seconds.append(t_in)
    return d2h, h2d


def block_plan(shape: Shape, seed: int) -> tuple[list[int], list[int]]:
    """Blocks stored from (the first ones, adjacent) and loaded into (a shuffle of the next ones, as
    TRT-LLM's block ids are scattered): both the direct and the gather/scatter copy paths run."""
    gen = torch.Generator().manual_seed(seed)
    n = shape.blocks
    return list(range(n)), (n + torch.randperm(n, generator=gen)).tolist()


def fresh_blocks(pool: torch.Tensor, src: list[int], dst: list[int]) -> None:
    """New values in the stored blocks and zeros in the loaded ones, final before a transfer."""
    pool[src[0] : src[-1] + 1].normal_()
    pool[min(dst) : max(dst) + 1].zero_()
    sync(pool.device)


def random_tokens(n: int, gen: torch.Generator) -> list[int]:
    return torch.randint(0, 150_000, (n,), generator=gen).tolist()


@dataclass
class TransferRun:
    """Store and load series of one pool, and whether every load brought back the stored bytes."""

    store: Series
    load: Series
    load_by_tokens: Series | None = None
    bytes_equal: bool = True
    store_cold_s: float = 0.0

    def record(self, i: int, store_s: float, load_s: float, same: bool) -> None:
        """Iteration ``i``'s store and load (the first one's store is the cold one, its load a warm-up)."""
        self.bytes_equal = self.bytes_equal and same
        if i == 0:
            self.store_cold_s = store_s
        else:
            self.store.seconds.append(store_s)
            self.load.seconds.append(load_s)

    def summary(self, d2h: Series, h2d: Series) -> dict[str, Any]:
        out: dict[str, Any] = {
            "store": self.store.summary(d2h),
            "load": self.load.summary(h2d),
            "bytes_equal": self.bytes_equal,
            "store_cold_GBps": round(self.store.gbps(self.store_cold_s), 2),
        }
        if self.load_by_tokens is not None:
            out["load_by_tokens"] = self.load_by_tokens.summary(h2d)
        return out


def measure_engine(
    pool: torch.Tensor, shape: Shape, iters: int, seed: int, timer: Timer = timed
) -> TransferRun:
    """The in-process reference: ``CacheEngine`` store and load of the same blocks, as the in-process
    adapter makes them (its own L1, a side stream); each timed by ``timer``."""
    run = _engine_run(pool, shape, iters, seed, timer)
    # The engine's L1 lies in reference cycles (slot pools and their buffers): collected here, its
    # page-locked slabs are unregistered now, not by a collection inside whichever transfer comes next.
    gc.collect()
    return run


def _engine_run(pool: torch.Tensor, shape: Shape, iters: int, seed: int, timer: Timer) -> TransferRun:
    device = pool.device
    l1_gb = shape.nbytes * 1.25 / GIB + 0.1
    engine = CacheEngine(LMCacheEngineConfig.from_defaults(chunk_size=CHUNK, max_local_cpu_size=l1_gb))
    engine.l1.arena.wait_prepinned(120)  # L1 pinning in the background would share the copy engines
    space = KeySpace("bench/engine", PoolLayout.of_pool(pool, shape.tokens_per_block))
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    src, dst = block_plan(shape, seed)
    gen = torch.Generator().manual_seed(seed)
    run = TransferRun(Series(shape.nbytes), Series(shape.nbytes))
    for i in range(iters + 1):
        engine.clear()
        toks = random_tokens(shape.tokens, gen)
        fresh_blocks(pool, src, dst)
        stored, t_store = timer(
            lambda t=toks: engine.store(space, 0, pool, BlockTransfer(t, None, src, 0, shape.tokens), stream),
            device,
        )
        loaded, t_load = timer(
            lambda t=toks: engine.retrieve(
                space, 0, pool, BlockTransfer(t, None, dst, 0, shape.tokens), stream
            ),
            device,
        )
        same = stored == shape.tokens and loaded == shape.tokens and torch.equal(pool[src], pool[dst])
        run.record(i, t_store, t_load, same)
    engine.close()
    return run


def measure_server(
    client: CacheServerClient,
    pool: torch.Tensor,
    shape: Shape,
    iters: int,
    seed: int,
    timer: Timer = timed,
    settle: Callable[[], None] | None = None,
) -> TransferRun:
    """Store and load through the server for the pool ``client`` registered last, as the MP adapter
    makes them: the prompt hashed once, its chunks named by hash, the hit pinned by the lookup. A load
    by tokens is timed beside it. Each is timed by ``timer``, in that order. ``settle`` runs after the
    first (cold) iteration: the steady state the others measure starts once it returns."""
    device = pool.device
    src, dst = block_plan(shape, seed)
    gen = torch.Generator().manual_seed(seed)
    n = shape.tokens
    run = TransferRun(Series(shape.nbytes), Series(shape.nbytes), Series(shape.nbytes))
    for i in range(iters + 1):  # iteration 0 warms up (the server's L1 hands out its slabs)
        client.clear()
        toks = random_tokens(n, gen)
        hashes = client.chunk_hashes(toks)
        prompt = hashes if hashes is not None else toks
        fresh_blocks(pool, src, dst)
        stored, t_store = timer(lambda p=prompt: client.store(BlockTransfer(p, None, src, 0, n)), device)
        hit = client.lookup(toks, pin_id="bench", chunk_hashes=hashes)
        loaded, t_load = timer(
            lambda p=prompt, h=hit: client.retrieve(BlockTransfer(p, None, dst, 0, h), pin_id="bench"),
            device,
        )
        same = stored == n and hit == n and loaded == n and torch.equal(pool[src], pool[dst])
        pool[min(dst) : max(dst) + 1].zero_()
        again, t_tokens = timer(lambda t=toks: client.retrieve(BlockTransfer(t, None, dst, 0, n)), device)
        same = same and again == n and torch.equal(pool[src], pool[dst])
        run.record(i, t_store, t_load, same)
        if i:
            assert run.load_by_tokens is not None
            run.load_by_tokens.seconds.append(t_tokens)
        elif settle is not None:
            settle()
    return run


def timed_us(fn: Callable[[], Any], repeats: int) -> list[float]:
    """Wall times of ``repeats`` host-only calls, in microseconds."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e6)
    return samples


def measure_lookup(
    clients: dict[str, CacheServerClient], pool: torch.Tensor, tpb: int, tokens: int, repeats: int, seed: int
) -> dict[str, Any]:
    """Lookup round trips (p50/p99) of a stored ``tokens``-token prompt for each client (transport),
    each having registered ``pool`` last; beside them a pinning lookup and a ping."""
    gen = torch.Generator().manual_seed(seed)
    toks = random_tokens(tokens, gen)
    n = tokens // CHUNK * CHUNK
    first = next(iter(clients.values()))
    sync(pool.device)
    first.store(BlockTransfer(toks, None, list(range(n // tpb)), 0, n))
    out: dict[str, Any] = {"tokens": tokens}
    for name, client in clients.items():
        for _ in range(20):
            client.lookup(toks)
        lat = timed_us(lambda c=client: c.lookup(toks), repeats)
        pinned = timed_us(lambda c=client: c.lookup(toks, pin_id="lat"), repeats)
        client.release("lat")
        out[name] = {
            "p50_us": round(percentile(lat, 50), 1),
            "p99_us": round(percentile(lat, 99), 1),
            "pinned_p50_us": round(percentile(pinned, 50), 1),
            "ping_p50_us": round(percentile(timed_us(client.ping, repeats), 50), 1),
            "hit": client.lookup(toks) == n,
        }
    hashing = timed_us(lambda: first.chunk_hashes(toks), repeats)
    out["client_hashing_p50_us"] = round(percentile(hashing, 50), 1)
    return out


class ServerProc:
    """A cache server subprocess in one pool-sharing mode, with a client per transport."""

    def __init__(self, mode: str, l1_gb: float, workdir: Path, port: int) -> None:
        self.mode = mode
        self.ipc_path = workdir / f"{mode}.sock"
        self.tcp_url = f"tcp://127.0.0.1:{port}"
        self.log_path = workdir / f"server-{mode}.log"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        env.setdefault("LMCACHE_LOG_LEVEL", "WARNING")  # no logging on the measured paths
        cmd = [
            sys.executable, "-m", "lmcache.v1.multiprocess.server", "--port", str(port),
            "--ipc-path", str(self.ipc_path), "--l1-size-gb", f"{l1_gb:.2f}", "--eviction-policy", "LRU",
            "--max-workers", "4", "--chunk-size", str(CHUNK), *pool_modes.server_args(mode),
        ]  # fmt: skip
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.clients: dict[str, CacheServerClient] = {}

    def connect(self, timeout_s: float) -> None:
        """Wait until the server answers and its L1 is reserved (pinning in the background would
        share the copy engines with the measured transfers), then open the ipc and tcp clients."""
        wait_for_server(self.tcp_url, timeout_s)
        self.clients = {
            "ipc": CacheServerClient(f"ipc://{self.ipc_path}", timeout_s=120),
            "tcp": CacheServerClient(self.tcp_url, timeout_s=120),
        }
        # Until L1 is fully reserved, or its reservation stopped growing (no background pinning: the
        # server's L1 is not page-locked in the shared-L1 mode, nor on CPU); bounded by the deadline.
        deadline = time.monotonic() + timeout_s
        last, still = -1, 0
        while time.monotonic() < deadline and still < 5:
            stats = self.clients["ipc"].stats()
            if stats.engine.l1.reserved_bytes >= stats.engine.l1.capacity_bytes:
                return
            still = still + 1 if stats.engine.l1.reserved_bytes == last else 0
            last = stats.engine.l1.reserved_bytes
            time.sleep(0.2)  # polling another process's progress (a benchmark, not a test)

    @property
    def ipc(self) -> CacheServerClient:
        return self.clients["ipc"]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> int | None:
        """Close the clients (unregistering their pools), stop the server; its exit code."""
        for client in self.clients.values():
            client.close()
        self.proc.terminate()
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)
            return None


def server_l1_memory(url: str) -> str:
    """What the cache server's L1 is made of (``shm``, ``fd-cuda``, ...: its stats' ``l1_memory``)."""
    with CacheServerClient(url, timeout_s=30, heartbeat_interval_s=0) as client:
        return client.stats().l1_memory


def server_gc(url: str) -> dict[str, Any]:
    """The cache server's garbage-collection pauses so far (a full collection pauses every request)."""
    with CacheServerClient(url, timeout_s=30, heartbeat_interval_s=0) as client:
        return msgspec.to_builtins(client.stats().gc)
