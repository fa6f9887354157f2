"""How long a disk tier of many chunk files holds up start-up.

Writes ``--files`` chunk files (``--payload`` bytes each) into a fresh tier directory, then, in a fresh
interpreter each time, times building the tier as the engine and the cache server do
(``DiskTier.from_config``: the index is rebuilt in the background) and how long its scan takes to end,
against a scan in the caller's thread (``DiskStore(root, cap)``, what start-up waited for before).
"warm": the files in the page cache; "cold": evicted from it first (``posix_fadvise(DONTNEED)``).

    python benchmarks/bench_disk_startup.py [--files 20000] [--dir /var/tmp/x] [--repeats 3] [--out r.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench_tiers import drop_cache  # noqa: E402  (benchmarks/ is the script's own directory)

CHILD = r"""
import json, sys, time
from lmcache.config import LMCacheEngineConfig
from lmcache.storage.disk_store import DiskStore
from lmcache.storage.disk_tier import DiskTier

root, how = sys.argv[1], sys.argv[2]
started = time.perf_counter()
if how == "background":
    tier = DiskTier.from_config(LMCacheEngineConfig(local_disk=root, max_local_disk_size=100.0))
    built = time.perf_counter() - started
    tier.wait_scanned()
    store = tier.store
else:
    store = DiskStore(root, 100 << 30)
    built = time.perf_counter() - started
print(json.dumps({"built_s": built, "indexed_s": time.perf_counter() - started, "chunks": len(store)}))
"""


def fill(root: Path, files: int, payload: int) -> None:
    import numpy as np

    from lmcache.keys import ChunkKey
    from lmcache.storage.chunk_format import Namespace
    from lmcache.storage.disk_store import DiskStore

    store = DiskStore(root, 100 << 30)
    ns = Namespace("bench", b"layout")
    data = memoryview(np.zeros(payload, dtype=np.uint8))
    for i in range(files):
        store.write(ns, ChunkKey(i.to_bytes(32, "little"), 1, 0), 256, data)
    store.close()


def measure(local_disk: Path, how: str, cold: bool) -> dict[str, float]:
    if cold:
        drop_cache(local_disk)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(local_disk), how],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=20000)
    parser.add_argument("--payload", type=int, default=1024, help="bytes per chunk file's payload")
    parser.add_argument("--dir", default=None, help="where to write the files (default: a temp dir)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    results: dict[str, object] = {"files": args.files, "payload_bytes": args.payload}
    base = Path(args.dir or tempfile.mkdtemp(prefix="lmcache-disk-startup-"))
    local_disk = base / "tier"
    try:
        fill(local_disk, args.files, args.payload)
        for cold in (False, True):
            for how in ("foreground", "background"):
                runs = [measure(local_disk, how, cold) for _ in range(args.repeats)]
                results[f"{'cold' if cold else 'warm'}_{how}"] = runs
                built = sorted(r["built_s"] for r in runs)
                indexed = sorted(r["indexed_s"] for r in runs)
                print(
                    f"{'cold' if cold else 'warm'} {how:10s} {args.files} files: start-up "
                    f"{built[0]:.3f}-{built[-1]:.3f} s, index complete {indexed[0]:.3f}-{indexed[-1]:.3f} s, "
                    f"chunks {runs[-1]['chunks']}"
                )
    finally:
        shutil.rmtree(base if args.dir is None else local_disk, ignore_errors=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
