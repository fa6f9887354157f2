"""Multi-process mode on a GPU: correctness and speed of the cache server with a raw-cudaMalloc pool.

Run on a CUDA machine (not in CI):

    python benchmarks/gpu_mp_check.py --out mp_check.json [--tokens 32768] [--iters 5]

What it does, all in one run:

1. starts ``python -m lmcache.v1.multiprocess.server`` as a subprocess (free TCP port and a
   private ipc path, chunk 256);
2. allocates a KV pool of TRT-LLM's layout (``--model``: Qwen2-1.5B's KV shape
   ``[num_blocks, 28, 2, 2*32*128]`` by default, or Llama-3.1-8B's; ``--tokens-per-block`` 32/64),
   bf16, with a raw ``cudaMalloc`` (cuda-python ``cudart.cudaMalloc``; else ``cuMemAlloc``
   through ctypes), outside PyTorch's allocator, like TensorRT-LLM does, and wraps it as a tensor;
3. registers it through :class:`RawCudaIPCWrapper` (``cudaIpcGetMemHandle`` on the allocation);
4. stores ``--tokens`` tokens (fresh random tokens each iteration), retrieves them into other
   blocks and checks the bytes are equal; reports store/retrieve GB/s next to a plain pinned
   ``copy_`` of the same bytes (device -> host and host -> device) measured in the same run. Like
   the MP adapter, it hashes each prompt once and names its chunks by those hashes; a retrieve
   by tokens is timed too (``retrieve_by_tokens_vs_copy``);
5. measures ``lookup`` round-trip latency (p50/p99) for an 8k-token prompt over ipc:// and tcp://,
   and beside it a pinning lookup, a ping and the client's hashing of the prompt alone;
6. reads the server's DEBUG timing of each store/retrieve (time to enqueue the copies, then until
   they were done), to split the client's time into the server's handling and the round trip.

Synchronization: before each ``store`` the script synchronizes the device (the blocks are final);
the server synchronizes its copy stream before it replies to ``store`` and ``retrieve``, so the
retrieved blocks can be compared right after the call returns.

Writes the numbers as JSON to ``--out`` and exits non-zero if any check fails.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lmcache.server.client import CacheServerClient, wait_for_server  # noqa: E402
from lmcache.server.pool_sharing import CudaArray, RawCudaIPCWrapper, cuda_api  # noqa: E402
from lmcache.transfer import BlockTransfer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kv_shapes import CHUNK, add_shape_args, row_shape  # noqa: E402


def raw_cuda_malloc(nbytes: int, device: int) -> tuple[int, Any]:
    """A raw device allocation outside PyTorch's caching allocator; returns (ptr, free function)."""
    torch.cuda.set_device(device)
    torch.cuda.init()
    try:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart  # type: ignore[no-redef]
        err, ptr = cudart.cudaMalloc(nbytes)
        if int(err) != 0:
            raise RuntimeError(f"cudaMalloc({nbytes}) failed: {err}")
        return int(ptr), lambda: cudart.cudaFree(ptr)
    except ImportError:
        lib = ctypes.CDLL("libcuda.so.1")
        cuda_api().set_device(device)
        ptr = ctypes.c_uint64()
        lib.cuMemAlloc_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_size_t]
        err = lib.cuMemAlloc_v2(ctypes.byref(ptr), nbytes)
        if err != 0:
            raise RuntimeError(f"cuMemAlloc({nbytes}) failed: error {err}") from None
        lib.cuMemFree_v2.argtypes = [ctypes.c_uint64]
        return ptr.value, lambda: lib.cuMemFree_v2(ptr.value)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def timed(fn: Any) -> tuple[Any, float]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


def timed_us(fn: Any, repeats: int) -> list[float]:
    """Wall times of ``repeats`` host-only calls, in microseconds."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e6)
    return samples


def server_transfer_ms(log_text: str, op: str, tokens: int) -> dict[str, float]:
    """Median enqueue and copy-wait times of the server's DEBUG lines for ``op`` (store/retrieve)
    of ``tokens`` tokens, the iteration-0 warm-up excluded."""
    line = rf"{op} of {tokens} tokens for instance \d+: ([\d.]+) ms to enqueue, ([\d.]+) ms more"
    found = re.findall(line, log_text)
    pairs = [(float(a), float(b)) for a, b in found][1:]
    if not pairs:
        return {}
    return {
        "enqueue_ms": round(statistics.median(a for a, _ in pairs), 3),
        "until_copied_ms": round(statistics.median(b for _, b in pairs), 3),
        "total_ms": round(statistics.median(a + b for a, b in pairs), 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="where to write the JSON results")
    parser.add_argument("--tokens", type=int, default=32768, help="tokens per store/retrieve")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--lookups", type=int, default=500, help="lookups per transport for latency")
    parser.add_argument("--lookup-tokens", type=int, default=8192)
    parser.add_argument("--device", type=int, default=0)
    parser.add_argument("--l1-size-gb", type=float, default=16.0)
    add_shape_args(parser)
    args = parser.parse_args()
    tpb, row = args.tokens_per_block, row_shape(args)
    if not torch.cuda.is_available():
        print("gpu_mp_check needs a CUDA device", file=sys.stderr)
        return 2
    tokens_n = args.tokens // CHUNK * CHUNK
    blocks_n = tokens_n // tpb
    num_blocks = 2 * blocks_n + 8
    row_bytes = row[0] * row[1] * row[2] * 2
    pool_bytes = num_blocks * row_bytes
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(args.device),
        "torch": torch.__version__,
        "cuda_ipc_backend": None,
        "model_kv": args.model,
        "tokens_per_block": tpb,
        "pool_shape": [num_blocks, *row],
        "tokens": tokens_n,
        "bytes_per_transfer": blocks_n * row_bytes,
        "iters": args.iters,
        "checks": {},
    }

    tmpdir = Path(tempfile.mkdtemp(prefix="lmc-gpu-", dir="/tmp"))
    ipc_path, port = str(tmpdir / "s.sock"), free_port()
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    )
    log = open(tmpdir / "server.log", "wb")  # noqa: SIM115
    server = subprocess.Popen(
        [
            sys.executable, "-m", "lmcache.v1.multiprocess.server", "--port", str(port),
            "--ipc-path", ipc_path, "--l1-size-gb", str(args.l1_size_gb), "--eviction-policy", "LRU",
            "--max-workers", "4", "--chunk-size", str(CHUNK),
            "--log-level", "DEBUG",  # its per-transfer timing lines; nothing is logged per lookup
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )  # fmt: skip
    free = None
    ok = True
    try:
        wait_for_server(f"tcp://127.0.0.1:{port}", 120)
        ptr, free = raw_cuda_malloc(pool_bytes, args.device)
        raw = torch.as_tensor(CudaArray(ptr, pool_bytes), device=torch.device("cuda", args.device))
        pool = raw.view(torch.bfloat16).view(num_blocks, *row)
        pool.normal_()
        results["cuda_ipc_backend"] = cuda_api().name
        wrapper = RawCudaIPCWrapper(pool)
        ipc = CacheServerClient(f"ipc://{ipc_path}", timeout_s=120)
        tcp = CacheServerClient(f"tcp://127.0.0.1:{port}", timeout_s=120)
        info = ipc.register(wrapper, 0, 1, f"bench/{args.model}", tpb)
        tcp.register(wrapper, 0, 1, f"bench/{args.model}", tpb)  # same allocation, opened once
        results["server_chunk_size"] = info.chunk_size

        # Stored from contiguous blocks, loaded into a random permutation of other blocks (TRT-LLM's
        # block ids are scattered), so both the direct and the gather/scatter copy paths run.
        gen = torch.Generator().manual_seed(0)
        src = list(range(blocks_n))
        dst = (blocks_n + torch.randperm(blocks_n, generator=gen)).tolist()
        # As the MP adapter does: the prompt is hashed once (for the lookup) and its store and
        # retrieve name the chunks by those hashes. A retrieve by tokens is timed beside it.
        store_s, retrieve_s, by_tokens_s, equal = [], [], [], True
        for i in range(args.iters + 1):  # iteration 0 warms up: L1 reserves its pinned slabs
            ipc.clear()  # keeps the slabs; the next store reuses them
            toks = torch.randint(0, 150_000, (tokens_n,), generator=gen).tolist()
            hashes = ipc.chunk_hashes(toks)
            prompt = hashes if hashes is not None else toks
            pool[:blocks_n].normal_()
            pool[blocks_n : 2 * blocks_n].zero_()
            torch.cuda.synchronize()  # the blocks are final before the server reads them
            stored, t_store = timed(lambda p=prompt: ipc.store(BlockTransfer(p, None, src, 0, tokens_n)))
            hit = ipc.lookup(toks, pin_id="bench", chunk_hashes=hashes)
            loaded, t_load = timed(
                lambda p=prompt, n=hit: ipc.retrieve(BlockTransfer(p, None, dst, 0, n), pin_id="bench")
            )
            same = stored == tokens_n and hit == tokens_n and loaded == tokens_n
            same = same and torch.equal(pool[src], pool[dst])
            pool[blocks_n : 2 * blocks_n].zero_()
            again, t_tokens = timed(lambda t=toks: ipc.retrieve(BlockTransfer(t, None, dst, 0, tokens_n)))
            same = same and again == tokens_n and torch.equal(pool[src], pool[dst])
            equal = equal and same
            if i == 0:
                results["store_cold_GBps"] = round(blocks_n * row_bytes / t_store / 1e9, 2)
            else:
                store_s.append(t_store)
                retrieve_s.append(t_load)
                by_tokens_s.append(t_tokens)
        results["checks"]["retrieved_bytes_equal"] = equal
        ok = ok and equal

        nbytes = blocks_n * row_bytes
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        flat = raw[:nbytes]  # the first blocks_n rows, contiguous
        d2h, h2d = [], []
        for _ in range(args.iters):
            d2h.append(timed(lambda: host.copy_(flat, non_blocking=True))[1])
            h2d.append(timed(lambda: flat.copy_(host, non_blocking=True))[1])

        def gbps(seconds: list[float]) -> float:
            return round(nbytes / statistics.median(seconds) / 1e9, 2)

        results["store_GBps"] = gbps(store_s)
        results["retrieve_GBps"] = gbps(retrieve_s)
        results["pinned_copy_d2h_GBps"] = gbps(d2h)
        results["pinned_copy_h2d_GBps"] = gbps(h2d)
        results["store_vs_copy"] = round(results["store_GBps"] / results["pinned_copy_d2h_GBps"], 3)
        results["retrieve_vs_copy"] = round(results["retrieve_GBps"] / results["pinned_copy_h2d_GBps"], 3)
        results["retrieve_by_tokens_vs_copy"] = round(gbps(by_tokens_s) / results["pinned_copy_h2d_GBps"], 3)

        lookup_toks = torch.randint(0, 150_000, (args.lookup_tokens,), generator=gen).tolist()
        lookup_n = args.lookup_tokens // CHUNK * CHUNK
        torch.cuda.synchronize()
        ipc.store(BlockTransfer(lookup_toks, None, list(range(lookup_n // tpb)), 0, lookup_n))
        for name, client in (("ipc", ipc), ("tcp", tcp)):
            for _ in range(20):
                client.lookup(lookup_toks)
            lat = timed_us(lambda c=client: c.lookup(lookup_toks), args.lookups)
            hit = client.lookup(lookup_toks)
            results[f"lookup_{name}_us_p50"] = round(percentile(lat, 50), 1)
            results[f"lookup_{name}_us_p99"] = round(percentile(lat, 99), 1)
            results["checks"][f"lookup_{name}_hit"] = hit == lookup_n
            ok = ok and hit == lookup_n
            # Where a lookup's time goes: the same lookup pinning its hit (as the adapter does),
            # an empty round trip, and the client's own hashing of the prompt.
            pinned = timed_us(lambda c=client: c.lookup(lookup_toks, pin_id="lat"), args.lookups)
            client.release("lat")
            results[f"lookup_pinned_{name}_us_p50"] = round(percentile(pinned, 50), 1)
            results[f"ping_{name}_us_p50"] = round(percentile(timed_us(client.ping, args.lookups), 50), 1)
        if ipc.chunk_hashes(lookup_toks) is not None:  # the server takes hashes: the client hashes
            hashing = timed_us(lambda: ipc.chunk_hashes(lookup_toks), args.lookups)
            results["lookup_client_hashing_us_p50"] = round(percentile(hashing, 50), 1)
        stats = msgspec.structs.asdict(ipc.stats())
        results["server_stats"] = {k: v for k, v in stats.items() if k != "instances"}
        ipc.close()
        tcp.close()
        results["checks"]["unregistered_cleanly"] = True
    except Exception as e:  # report what failed with the server log
        ok = False
        results["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        server.terminate()
        try:
            results["server_exit_code"] = server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            results["server_exit_code"] = None
        log.close()
        server_log = (tmpdir / "server.log").read_text(errors="replace")
        results["server_store"] = server_transfer_ms(server_log, "store", tokens_n)
        results["server_retrieve"] = server_transfer_ms(server_log, "retrieve", tokens_n)
        results["server_log_tail"] = server_log[-3000:]
        if free is not None:
            free()
        results["ok"] = ok and results.get("server_exit_code") == 0
        Path(args.out).write_text(json.dumps(results, indent=2))
        print(json.dumps({k: v for k, v in results.items() if k != "server_log_tail"}, indent=2))
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
