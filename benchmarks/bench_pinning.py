"""How fast this host page-locks fresh memory, the rate L1 is pinned ahead at from start-up.

Three ways, each with 1, 4 and 8 threads, 16 slabs of 256 MiB: pages only faulted in (no CUDA call),
L1's former way (ordinary 4 KiB pages faulted in, then ``cudaHostRegister``), and L1's way now
(:func:`lmcache.host_slabs.allocate_slab`: an anonymous mapping advised to use huge pages). Saves into
a cold L1 wait for pinning when they come faster than this rate. Needs CUDA.

    python benchmarks/bench_pinning.py [--out pinning.json]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lmcache.host_slabs import allocate_slab  # noqa: E402
from lmcache.page_locking import pin_in_place  # noqa: E402

SLAB = 256 << 20
SLABS = 16


def fault_only() -> Any:
    tensor = torch.empty(SLAB, dtype=torch.uint8)
    ctypes.memset(tensor.data_ptr(), 0, SLAB)
    return tensor


def small_pages_pinned() -> Any:
    tensor = torch.empty(SLAB, dtype=torch.uint8)
    ctypes.memset(tensor.data_ptr(), 0, SLAB)
    if not pin_in_place(tensor, fault_in=False):
        raise RuntimeError("cudaHostRegister refused")
    return tensor


def l1_slab() -> Any:
    return allocate_slab(SLAB, pinned=True)


def rate_gbps(make: Callable[[], Any], threads: int) -> float:
    """GB/s of ``SLABS`` slabs made by ``threads`` threads."""
    kept: list[Any] = []
    per = SLABS // threads

    def work() -> None:
        for _ in range(per):
            kept.append(make())

    workers = [threading.Thread(target=work) for _ in range(threads)]
    began = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    seconds = time.perf_counter() - began
    kept.clear()
    gc.collect()
    return round(per * threads * SLAB / seconds / 1e9, 2)


def main() -> int:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", help="write the JSON here too")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("page-locking needs CUDA")
    torch.empty(1, device="cuda")  # the context, outside the timings
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    results: dict[str, Any] = {"transparent_hugepage": thp.read_text().strip() if thp.exists() else None}
    for name, make in (
        ("fault_only", fault_only),
        ("small_pages_pinned", small_pages_pinned),
        ("l1_slab", l1_slab),
    ):
        results[name] = {f"{t}_threads_gbps": rate_gbps(make, t) for t in (1, 4, 8)}
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
