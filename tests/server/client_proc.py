"""A client process for the multi-process tests: registers a shared CPU pool, stores a prompt.

The pool is filled with ``randn`` from ``--seed``, so the test can recompute the bytes. Prints one
JSON line (``instance_id``, ``stored``), then exits or (``--wait``) keeps heartbeating until killed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from support.server_process import MODEL, TPB, shared_pool

from lmcache.server.client import CacheServerClient
from lmcache.transfer import BlockTransfer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--tokens", type=int, required=True, help="tokens 0..N-1 (offset by --first)")
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--wait", action="store_true")
    args = parser.parse_args()

    pool = shared_pool(args.seed)
    client = CacheServerClient(args.url, timeout_s=20.0)
    client.register(pool, 0, 1, MODEL, TPB)
    tokens = list(range(args.first, args.first + args.tokens))
    stored = client.store(BlockTransfer(tokens, None, list(range(args.tokens // TPB)), 0, args.tokens))
    print(json.dumps({"instance_id": client.instance_id, "stored": stored}), flush=True)
    if args.wait:
        while True:
            time.sleep(1)
    client.close(unregister=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
