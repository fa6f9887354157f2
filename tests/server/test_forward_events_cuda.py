"""Forward events on CUDA (export mode; runs on a GPU machine).

- A worker that dies mid-forward: its store names the forward's event, which then never completes
  (benchmarks/RESULTS.md, D92); the server must neither wedge nor copy. The store is given up (at
  the latest at the request's deadline, at once since its connection closed), nothing of it is
  published, the worker is reaped, and other clients are served meanwhile.
- A load names the work on its stream before it: the server writes the blocks after that work, and
  the worker does not wait for it on the host.
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
STREAM_WORK_CYCLES = 4_000_000_000
"""About 2 s of GPU clock: the work on a stream before a load."""


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


def test_an_exported_pools_load_names_the_streams_work_and_the_server_writes_after_it(
    start_server: Callable[..., ServerProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A load given the stream that reads the blocks next names an event after that stream's work so
    far: the worker never waits for the stream on the host, the server's copies land after that work
    (which writes the load's blocks last), and the call returns once they landed."""
    server = start_server("--chunk-size", "64", *pool_modes.server_args(pool_modes.EXPORT))
    pool = allocate_cudamalloc_pool((64, 2, 2, TPB * 16), torch.float32, 0)
    pool[:8].copy_(torch.randn(8, 2, 2, TPB * 16))
    tokens, target = list(range(8000, 8064)), [40, 9, 33, 20, 41, 12, 30, 25]
    waited: list[object] = []

    def recorded(what: str, wait: Callable[[object], None]) -> Callable[[object], None]:
        def synchronize(self: object) -> None:
            waited.append(what)
            wait(self)

        return synchronize

    with CacheServerClient(server.ipc_url, timeout_s=20) as client:
        pool_modes.register(client, pool, pool_modes.EXPORT, MODEL, TPB)
        assert client.store(BlockTransfer(tokens, None, list(range(8)), 0, 64)) == 64
        assert client.lookup(tokens, pin_id="req") == 64
        torch.cuda.synchronize()
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            torch.cuda._sleep(STREAM_WORK_CYCLES)
            pool.index_fill_(0, torch.tensor(target, device=pool.device), -1.0)  # written last
        monkeypatch.setattr(
            torch.cuda.Stream, "synchronize", recorded("stream", torch.cuda.Stream.synchronize)
        )
        monkeypatch.setattr(torch.cuda.Event, "synchronize", recorded("event", torch.cuda.Event.synchronize))
        assert client.retrieve(BlockTransfer(tokens, None, target, 0, 64), pin_id="req", stream=stream) == 64
        assert waited == [], "the worker waited on the host for the stream's work"
        assert stream.query(), "the load returned before the stream's work ended"
    assert torch.equal(pool[target], pool[:8])
