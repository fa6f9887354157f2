"""Multi-process server latency: ``lookup`` round trips over ``ipc://`` and ``tcp://``, and ``ping``.

Starts a cache server subprocess (CPU L1, ``--chunk-size 256``), registers a shared CPU pool
(32 tokens per block), stores one prompt per size, then times ``client.lookup`` of each stored
prompt (a full hit: every chunk is hashed and found) over both transports, plus a plain ``ping``.
CPU only, so it runs anywhere; the numbers are client-side wall times of whole round trips.

    python benchmarks/bench_mp_latency.py [--sizes 1024,8192,32768] [--repeats 1000] [--out r.json]
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
from pathlib import Path

import torch

from lmcache.server.client import CacheServerClient, wait_for_server
from lmcache.transfer import BlockTransfer

TPB = 32
CHUNK = 256
ROW_ELEMS = 512  # one block row: 2 layers x K/V x 512 floats = 8 KiB


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentiles(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    pick = lambda q: s[min(len(s) - 1, int(q * len(s)))] * 1e6  # noqa: E731
    return {"p50_us": round(pick(0.50), 1), "p90_us": round(pick(0.90), 1), "p99_us": round(pick(0.99), 1)}


def _time(fn, repeats: int, warmup: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return _percentiles(samples)


def main() -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1024,8192,32768", help="prompt sizes in tokens")
    parser.add_argument("--repeats", type=int, default=1000, help="timed round trips per case")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--max-workers", type=int, default=4, help="the server's --max-workers")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    workdir = Path(tempfile.mkdtemp(prefix="lmbench-", dir="/tmp"))
    port = _free_port()
    ipc = f"ipc://{workdir}/s.sock"
    tcp = f"tcp://127.0.0.1:{port}"
    repo = Path(__file__).resolve().parents[1]
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))
    )
    env.setdefault("LMCACHE_LOG_LEVEL", "WARNING")
    cmd = [sys.executable, "-m", "lmcache.v1.multiprocess.server", "--port", str(port)]
    cmd += ["--ipc-path", f"{workdir}/s.sock", "--chunk-size", str(CHUNK), "--l1-size-gb", "1"]
    cmd += ["--max-workers", str(args.max_workers)]
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    results: dict[str, object] = {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "repeats": args.repeats,
        "chunk_size": CHUNK,
        "lookup": {},
        "ping": {},
    }
    try:
        wait_for_server(tcp, 60)
        num_blocks = max(sizes) // TPB + 1
        pool = torch.zeros(num_blocks, 2, 2, ROW_ELEMS)
        pool.share_memory_()
        prompts = {n: list(range(n * 7, n * 8)) for n in sizes}
        for name, url in (("ipc", ipc), ("tcp", tcp)):
            with CacheServerClient(url, timeout_s=30) as client:
                client.register(pool, 0, 1, "bench/model", TPB)
                for n, toks in prompts.items():
                    client.store(BlockTransfer(toks, None, list(range(n // TPB)), 0, n))
                    hit = client.lookup(toks)
                    assert hit == n, f"expected a full hit of {n} tokens, got {hit}"
                    res = _time(lambda t=toks: client.lookup(t), args.repeats, args.warmup)
                    results["lookup"][f"{name}_{n}"] = res  # type: ignore[index]
                    print(f"lookup {name:3s} {n:6d} tokens: {json.dumps(res)}", flush=True)
                res = _time(client.ping, args.repeats, args.warmup)
                results["ping"][name] = res  # type: ignore[index]
                print(f"ping   {name:3s}              : {json.dumps(res)}", flush=True)
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(workdir, ignore_errors=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
