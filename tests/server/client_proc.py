"""A client process for the multi-process tests: registers a shared CPU pool, stores a prompt.

The pool is filled with ``randn`` from ``--seed``, so the test can recompute the bytes. Prints one
JSON line (``instance_id``, ``stored``), then exits or (``--wait``) keeps heartbeating until killed.
``--sharing`` is the pool-sharing policy it registers with. ``--hold reserve`` (shared-l1) instead
reserves slots for the prompt and copies into them without reporting the copy done; ``--hold load``
stores the prompt, then opens a load of it (its chunks pinned) without reporting it done: either
prints its JSON line (with ``ticket``) and waits to be killed mid-copy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from shared_l1_support import copy_store
from support.server_process import MODEL, TPB, shared_pool

from lmcache.server import protocol as P
from lmcache.server.client import CacheServerClient
from lmcache.transfer import BlockTransfer


def hold(client: CacheServerClient, what: str, tokens: list[int], blocks: list[int]) -> dict[str, int]:
    """Leave a shared-L1 ticket open: a reservation copied into but not reported, or a load's pins."""
    iid = client.instance_id
    assert iid is not None
    reg = client.registrations.get(iid)
    assert reg is not None and reg.copier is not None, "--hold needs a shared-l1 registration"
    stored = 0
    if what == "reserve":
        slots = client.call(P.StoreReserve(instance_id=iid, tokens=tokens, end=len(tokens)), P.StoreSlots)
        copy_store(reg.copier, slots, blocks)
        ticket = slots.ticket
    else:
        stored = client.store(BlockTransfer(tokens, None, blocks, 0, len(tokens)))
        load = client.call(P.Load(instance_id=iid, tokens=tokens, end=len(tokens)), P.LoadSlots)
        ticket = load.ticket
    return {"instance_id": iid, "stored": stored, "ticket": ticket}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--tokens", type=int, required=True, help="tokens 0..N-1 (offset by --first)")
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--wait", action="store_true")
    parser.add_argument("--sharing", default="export", choices=["auto", "export", "shared-l1"])
    parser.add_argument("--hold", choices=["reserve", "load"], default=None)
    args = parser.parse_args()

    pool = shared_pool(args.seed)
    client = CacheServerClient(args.url, timeout_s=20.0)
    client.register(pool, 0, 1, MODEL, TPB, pool_sharing=args.sharing)
    tokens = list(range(args.first, args.first + args.tokens))
    blocks = list(range(args.tokens // TPB))
    if args.hold is not None:
        print(json.dumps(hold(client, args.hold, tokens, blocks)), flush=True)
        while True:
            time.sleep(1)  # killed by the test, mid-copy
    stored = client.store(BlockTransfer(tokens, None, blocks, 0, args.tokens))
    print(json.dumps({"instance_id": client.instance_id, "stored": stored}), flush=True)
    if args.wait:
        while True:
            time.sleep(1)
    client.close(unregister=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
