"""A client whose server is restarted with another chunk size than its pools were registered for:
nothing of theirs is looked up, stored or loaded under the other layout, and they are used again once
a server that fits is back (its heartbeat re-registers them)."""

from __future__ import annotations

from pathlib import Path

import pytest
from in_process_server import client_of
from support.server_process import CHUNK, MODEL, TPB, ServerProcess, shared_pool, wait_until

from lmcache.server import protocol as P
from lmcache.server.client import CacheServerClient, InvalidRequest, SettingsMismatch, UnknownInstance
from lmcache.transfer import BlockTransfer

TOKENS = list(range(1000, 1000 + 2 * CHUNK))


def _transfer(first_block: int) -> BlockTransfer:
    return BlockTransfer(TOKENS, None, list(range(first_block, first_block + 8)), 0, len(TOKENS))


def _stored_chunks(server: ServerProcess) -> int:
    with CacheServerClient(server.ipc_url, timeout_s=20.0, heartbeat_interval_s=0) as probe:
        return probe.stats().engine.l1.chunks


@pytest.mark.parametrize("sharing", ["export", "shared-l1"])
def test_a_restart_with_another_chunk_size_stores_and_loads_nothing_until_one_that_fits(
    workdir: Path, sharing: str
) -> None:
    server = ServerProcess(workdir).start()
    other = ServerProcess(workdir, server.port, "--chunk-size", str(2 * CHUNK))
    client = CacheServerClient(server.ipc_url, timeout_s=20.0)
    try:
        client.register(shared_pool(seed=1), 0, 1, MODEL, TPB, pool_sharing=sharing, chunk_size=CHUNK)
        assert client.store(_transfer(0)) == len(TOKENS)
        server.kill()
        other.start()
        # The call finds the server restarted, registers the pool again, and sends nothing more to it.
        with pytest.raises(SettingsMismatch, match=f"chunk size {2 * CHUNK} .* chunks of {CHUNK} tokens"):
            client.store(_transfer(0))
        with pytest.raises(SettingsMismatch):
            client.lookup(TOKENS, pin_id="p")
        with pytest.raises(SettingsMismatch):
            client.retrieve(_transfer(16))
        assert client.chunk_hashes(TOKENS) is None  # no key scheme of the server's is used
        assert _stored_chunks(other) == 0
        other.kill()
        server.start()
        wait_until(lambda: client.chunk_hashes(TOKENS) is not None, "the heartbeat's re-registration")
        assert client.store(_transfer(0)) == len(TOKENS)
        assert client.lookup(TOKENS) == len(TOKENS)
    finally:
        client.close()
        server.stop()
        other.stop()


def test_a_pool_registered_with_a_server_of_another_chunk_size_is_refused_its_calls(workdir: Path) -> None:
    server = ServerProcess(workdir, None, "--chunk-size", str(2 * CHUNK)).start()
    try:
        with CacheServerClient(server.ipc_url, timeout_s=20.0) as client:
            info = client.register(shared_pool(seed=2), 0, 1, MODEL, TPB, chunk_size=CHUNK)
            assert info.chunk_size == 2 * CHUNK  # the caller decides; the pool stays registered, unused
            with pytest.raises(SettingsMismatch):
                client.store(_transfer(0))
            with pytest.raises(SettingsMismatch):
                client.lookup(TOKENS)
            assert _stored_chunks(server) == 0
    finally:
        server.stop()


def test_an_export_only_server_answers_a_shared_l1_op_so_the_client_learns_why(serve) -> None:
    """A worker registered in shared-l1 whose server came back in --pool-sharing export: its store
    gets ``unknown_instance`` (not an internal error), so the client registers again and is told
    which setting refuses its pool."""
    server = serve("export")
    with client_of(server) as client:
        req = P.StoreReserve(instance_id=12345, tokens=P.tokens_to_bytes(TOKENS), end=len(TOKENS))
        with pytest.raises(UnknownInstance):
            client.call(req, P.StoreSlots, retry=False)
        iid = client.register(shared_pool(seed=3), 0, 1, MODEL, TPB, pool_sharing="export").instance_id
        req = P.StoreReserve(instance_id=iid, tokens=P.tokens_to_bytes(TOKENS), end=len(TOKENS))
        with pytest.raises(
            InvalidRequest, match="does not serve StoreReserve requests .--pool-sharing export"
        ):
            client.call(req, P.StoreSlots, retry=False)
