"""A cache server restarted under a worker with several shared-L1 pools (TRT-LLM V2's layer groups):
the pools share the client's slab mappings, which the first pool to register again points at the new
server, whose slabs are numbered anew. Slots the old server gave the other pools (their leases) must
never be copied into then: they would land in chunks the new server holds for others."""

from __future__ import annotations

import math

import torch
from in_process_server import start_serving, stop_serving
from support.server_process import CHUNK, POOL_SHAPE, TPB, shared_pool

from lmcache.server.client import CacheServerClient
from lmcache.transfer import BlockTransfer

ROWS = 2 * CHUNK // TPB  # a two-chunk prompt's rows
LEASE_BYTES = 2 * (CHUNK // TPB) * math.prod(POOL_SHAPE[1:]) * torch.float32.itemsize
"""Two slots a lease: the old server's leases then lie where the new server's first chunks go."""


def prompt(first: int) -> list[int]:
    return list(range(first, first + 2 * CHUNK))


def serve(ipc: str):  # type: ignore[no-untyped-def]
    server, thread = start_serving("shared-l1", ipc)
    shared = server.service.shared_l1
    assert shared is not None
    shared.max_lease_bytes = LEASE_BYTES
    return server, thread


def test_leases_of_the_old_server_are_never_copied_into_after_another_pool_registered_again(tmp_path) -> None:
    ipc = str(tmp_path / "s.sock")
    server, thread = serve(ipc)
    worker = CacheServerClient(f"ipc://{ipc}", timeout_s=20, heartbeat_interval_s=0)
    groups = [shared_pool(seed=1), shared_pool(seed=2)]
    ids = [
        worker.register(pool, 0, 1, f"model/group{g}", TPB, pool_sharing="shared-l1").instance_id
        for g, pool in enumerate(groups)
    ]
    for k in range(3):  # both groups store, and hold leases of the first server
        for g, iid in enumerate(ids):
            stored = worker.store(
                BlockTransfer(prompt(1000 * k + 100 * g), None, list(range(ROWS)), 0, 2 * CHUNK),
                instance_id=iid,
            )
            assert stored == 2 * CHUNK
    stop_serving(server, thread)
    server, thread = serve(ipc)
    other = CacheServerClient(f"ipc://{ipc}", timeout_s=20, heartbeat_interval_s=0)
    try:
        pool = shared_pool(seed=3)
        other.register(pool, 0, 1, "model/other", TPB, pool_sharing="shared-l1")
        held = {}
        for k in range(8):  # another engine's chunks fill the new server's first slabs
            tokens, source = prompt(50_000 + 1000 * k), list(range(ROWS * (k % 4), ROWS * (k % 4) + ROWS))
            assert other.store(BlockTransfer(tokens, None, source, 0, len(tokens))) == len(tokens)
            held[k] = (tokens, pool[source].clone())
        # The first group registers again (the mappings now are the new server's); the second still
        # holds the old server's leases when it stores.
        for g, iid in enumerate(ids):
            worker.store(
                BlockTransfer(prompt(7 + 100 * g), None, list(range(ROWS, 2 * ROWS)), 0, 2 * CHUNK),
                instance_id=iid,
            )
        target = list(range(4 * ROWS, 5 * ROWS))
        for k, (tokens, want) in held.items():
            pool[target] = 0
            assert other.lookup(tokens, pin_id=f"p{k}") == len(tokens)
            assert other.retrieve(BlockTransfer(tokens, None, target, 0, len(tokens)), pin_id=f"p{k}") == len(
                tokens
            )
            assert torch.equal(pool[target], want), f"prompt {k} came back with another engine's bytes"
    finally:
        worker.close()
        other.close()
        stop_serving(server, thread)
