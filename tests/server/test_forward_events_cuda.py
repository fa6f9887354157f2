"""A worker that dies mid-forward, on CUDA (export mode; runs on a GPU machine).

Its store names the forward's event, which then never completes (benchmarks/RESULTS.md, D92): the
server must neither wedge nor copy. The store waits on the host until the request's deadline, nothing
of it is published, the worker is reaped, and other clients are served meanwhile.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from support.server_process import MODEL, TPB, ServerProcess, subprocess_env, wait_until

from lmcache.server.client import CacheServerClient
from lmcache.testing import pool_modes
from lmcache.testing.cuda_pools import allocate_cudamalloc_pool
from lmcache.transfer import BlockTransfer

pytestmark = pytest.mark.gpu

WORKER = Path(__file__).resolve().parent / "forward_worker_proc.py"
STORE_TIMEOUT_S = 15.0
"""The dying worker's store deadline: how long the server waits for its forward."""
PROBE_TIMEOUT_S = 5.0
"""The other client's calls: they must not wait behind that store."""


def test_a_worker_killed_mid_forward_costs_the_server_one_waiting_store(
    start_server: Callable[..., ServerProcess],
) -> None:
    server = start_server(
        "--chunk-size", "64", "--client-timeout-s", "3", *pool_modes.server_args(pool_modes.EXPORT)
    )
    theirs, mine = list(range(9000, 9064)), list(range(7000, 7064))
    worker = subprocess.Popen(
        [
            sys.executable,
            str(WORKER),
            "--url",
            server.ipc_url,
            "--first",
            "9000",
            "--timeout-s",
            str(STORE_TIMEOUT_S),
        ],
        env=subprocess_env(),
    )
    pool = allocate_cudamalloc_pool((64, 2, 2, TPB * 16), torch.float32, 0)
    pool[:8].copy_(torch.randn(8, 2, 2, TPB * 16))
    target = [40, 9, 33, 20, 41, 12, 30, 25]
    try:
        with CacheServerClient(server.ipc_url, timeout_s=PROBE_TIMEOUT_S, heartbeat_interval_s=0.2) as client:
            pool_modes.register(client, pool, pool_modes.EXPORT, MODEL, TPB)

            def waiting() -> list[int]:
                return [i.forward_waits for i in client.stats().instances if i.pid == worker.pid]

            wait_until(lambda: waiting() == [1] or worker.poll() is not None, "the worker's store waiting")
            assert worker.poll() is None, "the worker exited before its store waited for the forward"
            errors = client.stats().errors
            worker.send_signal(signal.SIGKILL)
            worker.wait(timeout=30)
            assert client.store(BlockTransfer(mine, None, list(range(8)), 0, 64)) == 64
            assert client.lookup(mine, pin_id="req") == 64
            assert client.retrieve(BlockTransfer(mine, None, target, 0, 64), pin_id="req") == 64
            torch.cuda.synchronize()
            assert torch.equal(pool[target], pool[:8])
            wait_until(lambda: client.stats().errors == errors + 1, "the waiting store expired", limit_s=60)
            wait_until(lambda: len(client.stats().instances) == 1, "the killed worker reaped", limit_s=60)
            assert client.lookup(theirs) == 0  # nothing of its store was published
            assert client.lookup(mine) == 64
    finally:
        worker.kill()
        worker.wait(timeout=30)
    assert "internal error" not in server.log()
