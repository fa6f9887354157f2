"""A second engine in its own process, for the tier tests.

    python tier_proc.py store '{"disk": ..., "remote_url": ..., "tokens": 256, "slow": 0.02}'
    python tier_proc.py load  '{"disk": ..., "remote_url": ..., "tokens": 256}'

``store`` stores a prompt and exits WITHOUT ``close()`` (the atexit hook must flush); ``load`` looks
the prompt up in a fresh engine, retrieves it into other blocks and prints JSON with the hit, the
tokens loaded and whether the bytes equal the source blocks.
"""

from __future__ import annotations

import json
import sys
import time

import torch
from tier_helpers import load_all, make_engine, make_pool, store_all, tokens


def main() -> None:
    mode, args = sys.argv[1], json.loads(sys.argv[2])
    pool = make_pool(128, seed=args.get("seed", 0))
    toks = tokens(args["tokens"], args.get("offset", 0))
    engine = make_engine(args.get("disk"), args.get("remote_url"), cpu_chunks=args.get("cpu_chunks", 64))
    if mode == "store":
        if args.get("slow"):
            from lmcache.storage.disk_store import DiskStore

            original = DiskStore.write

            def slow_write(self, *a, **kw):  # type: ignore[no-untyped-def]
                time.sleep(args["slow"])
                return original(self, *a, **kw)

            DiskStore.write = slow_write  # type: ignore[method-assign]
        stored = store_all(engine, pool, toks)
        print(json.dumps({"stored": stored}), flush=True)
        return  # no close(): the atexit hook flushes the write-behind queues
    n = len(toks) // 16
    dst = list(range(64, 64 + n))
    pool[dst] = 0
    loaded = load_all(engine, pool, toks, dst, pin="proc")
    k = loaded // 16
    equal = bool(torch.equal(pool[dst[:k]], pool[:k]))
    print(
        json.dumps(
            {"loaded": loaded, "equal": equal, "hits": {t.name: t.hits for t in engine.snapshot().tiers}}
        ),
        flush=True,
    )
    engine.close()


if __name__ == "__main__":
    main()
