"""Tier benchmark: disk (L2) and Redis (L3) bandwidth for 256-token chunks of a Qwen2-1.5B-shaped layout.

The layout is 28 layers, K and V, ``block_elems = 2 * 32 * 128`` (2 KV heads x 32 tokens x head dim
128), bf16, 32 tokens per block: one 256-token chunk is 8 pool rows = 7.34 MB. Measured, all in one
run on the same machine and against the same bytes:

- disk write-behind: chunks committed in L1 -> ``TierManager.write_behind`` -> files (writer thread),
  timed from the first enqueue until ``flush()`` returns;
- disk -> L1 promotion: ``TierManager.promote_prefix`` into an empty L1 (reserve, ``readinto`` the
  L1 slot, xxh3 verify, commit), with the files in the page cache ("warm") and evicted from it with
  ``posix_fadvise(DONTNEED)`` after a sync ("cold"), for each ``--read-threads`` value;
- the baseline: plain ``write`` / ``readinto`` of the same bytes to/from files in the same directory
  (reads into one distinct, already touched buffer per chunk, as a promotion into a warm L1 does);
- Redis write-behind (pipelined SETs on the writer thread) and Redis -> L1 fetch (pipelined EXISTS,
  batched MGET, verify, copy into L1), against plain redis-py ``SET`` / ``GET`` of the same bytes.

Every rate is compared with 3.6 GB/s, the bandwidth a tier needs to beat recomputing a
Qwen2-1.5B prefill on an H100 (docs: anchors section 3.4).

    python benchmarks/bench_tiers.py [--chunks 64] [--dir /var/tmp/x] [--redis-url redis://...] [--out r.json]

Without ``--redis-url`` a private ``redis-server`` is started on a free port (if installed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from lmcache.backoff import Backoff
from lmcache.config import GiB
from lmcache.keys import ChunkKey
from lmcache.layout import PoolLayout
from lmcache.memory import HostArena
from lmcache.storage.chunk_format import Namespace
from lmcache.storage.cpu_store import CpuStore
from lmcache.storage.disk_store import DiskStore
from lmcache.storage.disk_tier import DiskTier
from lmcache.storage.remote_store import RemoteStore
from lmcache.storage.tiers import TierManager

LAYERS, KV, HEADS, HEAD_DIM, TPB, CHUNK = 28, 2, 2, 128, 32, 256
BREAK_EVEN_GBS = 3.6


def layout() -> PoolLayout:
    return PoolLayout(1, LAYERS, KV, HEADS * TPB * HEAD_DIM, TPB, torch.bfloat16)


def chunk_bytes() -> int:
    return layout().row_bytes * (CHUNK // TPB)


class Fixture:
    """An L1 holding ``n`` random chunks, and their keys."""

    def __init__(self, n: int, pinned: bool, repeats: int) -> None:
        self.n = n
        self.nbytes = chunk_bytes()
        self.total = n * self.nbytes
        self.repeats = repeats
        self.ns = Namespace("bench-qwen2-1.5b", layout().signature())
        self.keys = [ChunkKey(i.to_bytes(32, "little"), 1, 0) for i in range(n)]
        self.pinned = pinned
        rng = np.random.default_rng(0)
        self.source = rng.integers(0, 256, self.nbytes, dtype=np.uint8)

    def l1(self, fill: bool) -> CpuStore:
        """An L1 big enough for every chunk, its memory touched once (as a long-running L1's is)."""
        store = CpuStore(HostArena(int(self.total * 1.05) + (64 << 20), pinned=self.pinned))
        for i, key in enumerate(self.keys):
            chunk = store.reserve(key, self.nbytes, CHUNK)
            assert chunk is not None
            data = chunk.buffer.data[: self.nbytes].numpy()
            data[:] = self.source
            data[:8] = np.frombuffer(i.to_bytes(8, "little"), dtype=np.uint8)  # distinct chunks
            store.commit(key)
        if not fill:
            store.clear()
        return store

    def views(self, store: CpuStore) -> list[memoryview]:
        """The L1 bytes of every chunk (what the tiers write), for the plain baselines."""
        out = []
        for key in self.keys:
            chunk = store.get(key)
            assert chunk is not None
            out.append(memoryview(chunk.buffer.data[: self.nbytes].numpy()))
        return out


def best(fx: Fixture, run: Callable[[], float]) -> float:
    """Best GB/s of ``fx.repeats`` runs; ``run`` returns the seconds of its timed part."""
    return max(fx.total / run() / 1e9 for _ in range(fx.repeats))


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def drop_cache(root: Path) -> bool:
    """Evict ``root``'s files from the page cache (clean pages only: sync first)."""
    if not hasattr(os, "posix_fadvise"):
        return False
    os.sync()
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return True


# -- disk ---------------------------------------------------------------------------------------


class DiskBench:
    """Plain files and the disk tier, measured in alternation (the page cache's dirty-page throttling
    makes consecutive write runs on a small VM vary a lot; alternating keeps the comparison fair)."""

    def __init__(self, fx: Fixture, root: Path, threads: list[int], fsync: bool) -> None:
        self.fx = fx
        self.threads = threads
        self.fsync = fsync
        self.plain_dir = root / "plain"
        self.plain_dir.mkdir(parents=True, exist_ok=True)
        self.tier_dir = root / "tier"
        # One destination per chunk, touched beforehand: what a promotion into a warm L1 writes to.
        self.views = [memoryview(np.ones(fx.nbytes, dtype=np.uint8)) for _ in range(fx.n)]
        self.l1 = fx.l1(fill=True)
        self.disk = DiskStore(self.tier_dir, capacity_bytes=2 * fx.total + GiB, fsync=fsync)
        disk_tier = DiskTier(self.disk, backoff=Backoff(1.0, 30.0))
        self.tiers = TierManager(self.l1, [disk_tier], queue_bytes=2 * fx.total, timeout_s=600)
        self.best: dict[str, float] = {}

    def record(self, name: str, seconds: float) -> None:
        self.best[name] = max(self.best.get(name, 0.0), self.fx.total / seconds / 1e9)

    def plain_write(self) -> float:
        for path in self.plain_dir.glob("*.bin"):
            path.unlink()
        os.sync()
        sources = self.fx.views(self.l1)  # the very bytes the tier writes

        def body() -> None:
            for i in range(self.fx.n):
                with open(self.plain_dir / f"{i}.bin", "wb", buffering=0) as f:
                    f.write(sources[i])
                    if self.fsync:
                        os.fsync(f.fileno())

        return timed(body)

    def plain_read(self, cold: bool) -> float:
        if cold:
            drop_cache(self.plain_dir)

        def body() -> None:
            for i in range(self.fx.n):
                with open(self.plain_dir / f"{i}.bin", "rb", buffering=0) as f:
                    f.readinto(self.views[i])

        return timed(body)

    def write_behind(self) -> float:
        self.disk.clear()
        os.sync()
        before = self.tiers.snapshots()[0].writes

        def body() -> None:
            self.tiers.write_behind(self.fx.ns, self.fx.keys)
            assert self.tiers.flush(600)

        seconds = timed(body)
        after = self.tiers.snapshots()[0]
        assert after.writes - before == self.fx.n, after
        return seconds

    def promote(self, n_threads: int, cold: bool) -> float:
        target = self.fx.l1(fill=False)
        disk = DiskStore(self.tier_dir, 2 * self.fx.total + GiB)
        manager = TierManager(target, [DiskTier(disk, backoff=Backoff(1.0, 30.0), read_threads=n_threads)])
        if cold:
            drop_cache(self.tier_dir)
        positions, lengths = [[k] for k in self.fx.keys], [CHUNK] * len(self.fx.keys)
        got: list[int] = []
        seconds = timed(lambda: got.append(manager.promote_prefix(self.fx.ns, positions, lengths)[0]))
        assert got == [self.fx.n], got
        manager.close()
        return seconds

    def run(self) -> dict[str, float]:
        cold_ok = hasattr(os, "posix_fadvise")
        for _ in range(self.fx.repeats):
            self.record("plain_write_gbs", self.plain_write())
            self.record("write_behind_gbs", self.write_behind())
            for cold in (False, True) if cold_ok else (False,):
                label = "cold" if cold else "warm"
                self.record(f"plain_read_{label}_gbs", self.plain_read(cold))
                for t in self.threads:
                    self.record(f"promote_{label}_t{t}_gbs", self.promote(t, cold))
        self.tiers.close()
        shutil.rmtree(self.plain_dir, ignore_errors=True)
        shutil.rmtree(self.tier_dir, ignore_errors=True)
        return self.best


# -- redis --------------------------------------------------------------------------------------


def start_redis(workdir: Path, max_bytes: int) -> tuple[subprocess.Popen[bytes] | None, str | None]:
    exe = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.access(exe, os.X_OK):
        return None, None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    args += ["--daemonize", "no", "--dir", str(workdir), "--maxmemory", str(max_bytes)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    client = redis.Redis(port=port)
    for _ in range(500):
        try:
            client.ping()
            return proc, f"redis://127.0.0.1:{port}"
        except redis.ConnectionError:
            time.sleep(0.01)
    proc.kill()
    return None, None


def bench_plain_redis(fx: Fixture, url: str) -> dict[str, float]:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=600)
    sources = fx.views(fx.l1(fill=True))
    names = [f"plain:{i}" for i in range(fx.n)]

    def write() -> float:
        client.flushall()
        return timed(lambda: [client.set(name, src) for name, src in zip(names, sources, strict=True)])

    def read() -> float:
        return timed(lambda: [client.get(name) for name in names])

    result = {"plain_set_gbs": best(fx, write), "plain_get_gbs": best(fx, read)}
    client.flushall()
    return result


def bench_redis(fx: Fixture, url: str, fetch_batch: int) -> dict[str, float]:
    import redis

    l1 = fx.l1(fill=True)
    remote = RemoteStore(url, timeout_s=600, lookup_timeout_s=60)
    tiers = TierManager(l1, [remote], queue_bytes=2 * fx.total, timeout_s=600)
    admin = redis.Redis.from_url(url)

    def write_behind() -> float:
        admin.flushall()
        before = tiers.snapshots()[0].writes

        def body() -> None:
            tiers.write_behind(fx.ns, fx.keys)
            assert tiers.flush(600)

        seconds = timed(body)
        after = tiers.snapshots()[0]
        assert after.writes - before == fx.n, after
        return seconds

    result = {"write_behind_gbs": best(fx, write_behind)}
    tiers.close()

    def fetch() -> float:
        target = fx.l1(fill=False)
        manager = TierManager(target, [RemoteStore(url, timeout_s=600)], fetch_batch=fetch_batch)
        positions, lengths = [[k] for k in fx.keys], [CHUNK] * len(fx.keys)
        got: list[int] = []
        seconds = timed(lambda: got.append(manager.promote_prefix(fx.ns, positions, lengths)[0]))
        assert got == [fx.n], got
        manager.close()
        return seconds

    result["fetch_gbs"] = best(fx, fetch)
    admin.flushall()
    return result


# -- report -------------------------------------------------------------------------------------


Row = tuple[str, float, "float | None"]


def table(rows: list[Row]) -> str:
    """Name, GB/s, ratio to the 3.6 GB/s break-even, ratio to the row's baseline (if any)."""
    lines = [f"{'measurement':<52} {'GB/s':>7} {'/3.6':>6} {'/baseline':>10}", "-" * 79]
    for name, value, baseline in rows:
        vs = f"{value / baseline:>9.2f}x" if baseline else f"{'':>10}"
        lines.append(f"{name:<52} {value:>7.2f} {value / BREAK_EVEN_GBS:>5.2f}x {vs}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--chunks", type=int, default=64, help="256-token chunks per measurement")
    parser.add_argument("--dir", default=None, help="directory for the disk tier (default: a temp dir)")
    parser.add_argument("--read-threads", default="1,2,4", help="promotion thread counts to try")
    parser.add_argument("--fsync", action="store_true", help="fsync every chunk file")
    parser.add_argument("--redis-url", default=None, help="use this server instead of starting one")
    parser.add_argument("--fetch-batch", type=int, default=8, help="chunks per MGET")
    parser.add_argument("--no-redis", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()

    pinned = torch.cuda.is_available()
    fx = Fixture(args.chunks, pinned, args.repeats)
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="lmcache-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    threads = [int(t) for t in args.read_threads.split(",")]
    results: dict[str, object] = {
        "chunk_bytes": fx.nbytes,
        "chunks": fx.n,
        "total_bytes": fx.total,
        "repeats": args.repeats,
        "layout": layout().signature().decode(),
        "break_even_gbs": BREAK_EVEN_GBS,
        "pinned_l1": pinned,
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "disk_dir": str(base),
        "fsync": args.fsync,
    }
    try:
        results["disk"] = disk = DiskBench(fx, base, threads, args.fsync).run()
        sync_note = "fsync per file" if args.fsync else "page cache, no fsync"
        rows: list[Row] = [
            (f"plain file write ({sync_note})", disk["plain_write_gbs"], None),
            (
                "  disk write-behind (writer thread, atomic files)",
                disk["write_behind_gbs"],
                disk["plain_write_gbs"],
            ),
        ]
        for label, note in (("warm", "page cache"), ("cold", "cold, fadvise DONTNEED")):
            if f"plain_read_{label}_gbs" not in disk:
                continue
            plain = disk[f"plain_read_{label}_gbs"]
            rows.append((f"plain file readinto ({note})", plain, None))
            for t in threads:
                rows.append(
                    (f"  disk -> L1 promote, {t} thread(s)", disk[f"promote_{label}_t{t}_gbs"], plain)
                )
        proc = None
        url = args.redis_url
        if not args.no_redis and url is None:
            proc, url = start_redis(base, 4 * fx.total + GiB)
        if url is not None and not args.no_redis:
            try:
                results["redis_plain"] = plain_r = bench_plain_redis(fx, url)
                results["redis"] = red = bench_redis(fx, url, args.fetch_batch)
                rows += [
                    ("redis-py SET, one chunk per call", plain_r["plain_set_gbs"], None),
                    (
                        "  Redis write-behind (pipelined SET, zero-copy)",
                        red["write_behind_gbs"],
                        plain_r["plain_set_gbs"],
                    ),
                    ("redis-py GET, one chunk per call", plain_r["plain_get_gbs"], None),
                    (
                        f"  Redis -> L1 fetch (EXISTS + MGET x{args.fetch_batch})",
                        red["fetch_gbs"],
                        plain_r["plain_get_gbs"],
                    ),
                ]
            finally:
                if proc is not None:
                    proc.terminate()
                    proc.wait(10)
        print(
            f"{fx.n} chunks of {fx.nbytes / 1e6:.2f} MB ({layout().signature().decode()}, {CHUNK} tokens), "
            f"{os.cpu_count()} CPUs, disk dir {base}"
        )
        print(table(rows))
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
