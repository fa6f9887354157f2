"""The shared-L1 mode's faults with real processes: a worker killed mid-copy, a server killed while
workers hold its slabs, the regions' lifetime and permissions (issue 13)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.server_process import (
    CLIENT_PROC,
    MODEL,
    POOL_SHAPE,
    TPB,
    ServerProcess,
    subprocess_env,
    wait_until,
)

from lmcache.server.client import CacheServerClient, ServerUnavailable
from lmcache.shm_slabs import SHM_DIR, SLAB_PREFIX
from lmcache.transfer import BlockTransfer

TOKENS = list(range(500, 500 + 96))  # 3 chunks of 32
BLOCKS = list(range(12))


def regions_of(server: ServerProcess) -> list[Path]:
    """The L1 regions the server process created (``lmcache-l1-<pid>-...``)."""
    assert server.proc is not None
    return sorted(Path(SHM_DIR).glob(f"{SLAB_PREFIX}-{server.proc.pid}-*"))


def holding_worker(server: ServerProcess, what: str) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    """A worker process that registered in the shared-L1 mode and left a ticket open (``what``)."""
    cmd = [sys.executable, str(CLIENT_PROC), "--url", server.ipc_url, "--seed", "3", "--tokens", "96"]
    cmd += ["--first", "500", "--sharing", "shared-l1", "--hold", what]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=subprocess_env())
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, f"worker ended without output: {proc.communicate()[1].decode(errors='replace')}"
    return proc, json.loads(line)


def probe(server: ServerProcess) -> tuple[CacheServerClient, torch.Tensor]:
    """A client with a pool of the workers' layout registered in the shared-L1 mode (same key space),
    heartbeating often enough never to be reaped itself."""
    client = CacheServerClient(server.ipc_url, timeout_s=20.0, heartbeat_interval_s=0.2)
    pool = torch.zeros(POOL_SHAPE)
    client.register(pool, 0, 1, MODEL, TPB, pool_sharing="shared-l1")
    return client, pool


def server_id(client: CacheServerClient) -> str | None:
    try:
        return client.ping(timeout_s=2.0).server_id
    except ServerUnavailable:
        return None


def test_a_worker_killed_between_reserve_and_done_publishes_nothing(start_server) -> None:
    server = start_server("--client-timeout-s", "3")
    worker, held = holding_worker(server, "reserve")
    assert held["ticket"] > 0
    client, _ = probe(server)
    try:
        assert client.stats().engine.l1.used_bytes > 0  # the reserved (and copied into) slots
        assert client.lookup(TOKENS) == 0  # copied but never reported done: invisible
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
        wait_until(lambda: len(client.stats().instances) == 1, "the killed worker reaped")
        stats = client.stats()
        assert stats.engine.l1.used_bytes == 0 and stats.engine.l1.chunks == 0  # its slots are free again
        assert client.lookup(TOKENS) == 0
        assert "reservations aborted" in server.log()
    finally:
        client.close()


def test_a_stopped_worker_keeps_its_registration_and_slots_until_its_process_exits(start_server) -> None:
    """A worker stopped past --client-timeout-s (SIGSTOP, a debugger, a frozen container) is not
    reaped while its process lives: the slots it reserved, which it copies into once it resumes, stay
    its own instead of going to another chunk. Once it exits, it is reaped."""
    server = start_server("--client-timeout-s", "2")
    worker, held = holding_worker(server, "reserve")
    assert held["ticket"] > 0
    client, _ = probe(server)
    try:
        reserved = client.stats().engine.l1.used_bytes
        assert reserved > 0
        worker.send_signal(signal.SIGSTOP)
        wait_until(lambda: "its process runs (stopped?)" in server.log(), "the stopped worker kept")
        stats = client.stats()
        assert len(stats.instances) == 2 and stats.reaped_instances == 0
        assert stats.engine.l1.used_bytes == reserved, "a stopped worker's reserved slots were freed"
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
        wait_until(lambda: len(client.stats().instances) == 1, "the killed worker reaped")
        assert client.stats().engine.l1.used_bytes == 0
    finally:
        worker.kill()
        client.close()


def test_a_killed_workers_load_pins_are_released_by_the_reaper(start_server) -> None:
    server = start_server("--client-timeout-s", "3")
    worker, held = holding_worker(server, "load")
    assert held["stored"] == 96 and held["ticket"] > 0
    client, _ = probe(server)
    try:
        assert client.clear() == 0  # the open load pins all three chunks
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
        wait_until(lambda: len(client.stats().instances) == 1, "the killed worker reaped")
        assert client.clear() == 3
    finally:
        client.close()


def test_a_registration_hands_the_worker_the_servers_slabs_to_map_ahead(start_server) -> None:
    """A worker registering with a server whose L1 has slabs maps (and, on CUDA, page-locks) them in
    the background before its first copy, so that copy waits for no mapping."""
    server = start_server()
    first, _ = probe(server)
    second: CacheServerClient | None = None
    try:
        assert first.store(BlockTransfer(TOKENS, None, BLOCKS, 0, 96)) == 96
        used = first.registrations.get(first.instance_id or 0)
        assert used is not None and used.copier is not None and used.copier.mapped_slabs
        second, _ = probe(server)  # copies nothing
        reg = second.registrations.get(second.instance_id or 0)
        assert reg is not None and reg.copier is not None and reg.info is not None
        announced = {slab.id for slab in reg.info.slabs_ahead}
        assert set(used.copier.mapped_slabs) <= announced  # the slab holding the chunks, among others
        assert second.registrations.wait_slabs_mapped(30)
        assert set(reg.copier.mapped_slabs) == announced
    finally:
        first.close()
        if second is not None:
            second.close()


def test_server_killed_while_a_worker_holds_its_slabs(start_server) -> None:
    server = start_server()
    client = CacheServerClient(server.ipc_url, timeout_s=5.0)
    pool = torch.randn(POOL_SHAPE, generator=torch.Generator().manual_seed(9))
    src = pool[:12].clone()
    client.register(pool, 0, 1, MODEL, TPB, pool_sharing="shared-l1")
    try:
        assert client.store(BlockTransfer(TOKENS, None, BLOCKS, 0, 96)) == 96
        reg = client.registrations.get(client.instance_id or 0)
        assert reg is not None and reg.copier is not None and reg.copier.mapped_slabs
        old_id, stale = reg.copier.server_id, regions_of(server)
        assert stale
        server.kill()  # SIGKILL: nothing unlinks its regions
        assert all(path.exists() for path in stale)
        with pytest.raises(ServerUnavailable):
            client.lookup(TOKENS)
        with pytest.raises(ServerUnavailable):
            client.store(BlockTransfer(TOKENS, None, BLOCKS, 0, 96))

        server.start()  # the same addresses: a new server, its own slabs
        assert not any(path.exists() for path in stale)  # the crashed server's regions are gone
        wait_until(lambda: server_id(client) not in (None, old_id), "the new server answering")
        assert client.store(BlockTransfer(TOKENS, None, BLOCKS, 0, 96)) == 96  # re-registers on the way
        assert client.reregistrations >= 1 and reg.copier.server_id != old_id
        assert client.lookup(TOKENS) == 96
        pool[20:32].zero_()
        assert client.retrieve(BlockTransfer(TOKENS, None, list(range(20, 32)), 0, 96)) == 96
        assert torch.equal(pool[20:32], src)
    finally:
        client.close()


def test_regions_are_private_to_the_servers_user_and_go_at_a_clean_exit(start_server) -> None:
    server = start_server()
    with CacheServerClient(server.ipc_url, timeout_s=20.0) as client:
        client.register(torch.randn(POOL_SHAPE), 0, 1, MODEL, TPB, pool_sharing="shared-l1")
        assert client.store(BlockTransfer(TOKENS, None, BLOCKS, 0, 96)) == 96
    regions = regions_of(server)
    assert regions
    for path in regions:
        st = path.stat()
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
    assert server.kill(signal.SIGTERM) == 0
    assert not any(path.exists() for path in regions)
