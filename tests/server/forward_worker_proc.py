"""A worker process for the GPU test of a worker that dies mid-forward (export mode).

Registers a ``cudaMalloc`` pool in the export mode, enqueues a forward of minutes on a stream of its
own (one ``torch.cuda._sleep`` kernel), and stores a prompt after it, naming the forward's event, with
``--timeout-s``: the server polls that event while this process blocks in the store, until the test
kills it.
"""

from __future__ import annotations

import argparse

import torch
from support.server_process import MODEL, POOL_SHAPE, TPB

from lmcache.chunk_copy import EventStart
from lmcache.server.client import CacheServerClient
from lmcache.testing import pool_modes
from lmcache.testing.cuda_pools import allocate_cudamalloc_pool
from lmcache.transfer import BlockTransfer

FORWARD_CYCLES = 1 << 41
"""About 15 minutes of GPU clock: longer than any test waits."""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--first", type=int, required=True, help="the prompt is 64 tokens from this id on")
    parser.add_argument("--timeout-s", type=float, required=True)
    args = parser.parse_args()

    pool = allocate_cudamalloc_pool(POOL_SHAPE, torch.float32, 0)
    client = CacheServerClient(args.url, timeout_s=20.0)
    info = pool_modes.register(client, pool, pool_modes.EXPORT, MODEL, TPB)
    assert info.forward_events > 0, "the server opened none of this worker's forward events"
    torch.cuda.synchronize()
    forward = torch.cuda.Stream()
    with torch.cuda.stream(forward):
        torch.cuda._sleep(FORWARD_CYCLES)
        forward_done = torch.cuda.Event()
        forward_done.record()
    tokens = list(range(args.first, args.first + 64))
    client.store(
        BlockTransfer(tokens, None, list(range(8)), 0, 64),
        after=EventStart(forward_done),
        timeout_s=args.timeout_s,
    )
    raise SystemExit("the store returned before its forward ended")


if __name__ == "__main__":
    main()
