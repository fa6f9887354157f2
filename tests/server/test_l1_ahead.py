"""A worker maps the server's L1 slabs before it registers (``l1_slabs``), where its pools will be
shared in the shared-L1 mode: TRT-LLM builds the worker before the model's warm-up and registers after
it, so the first saves find L1 mapped and page-locked. The server runs in a thread of this process."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import torch
from in_process_server import client_of
from support.server_process import CHUNK, MODEL, TPB, shared_pool, wait_until

from lmcache.config import LMCacheEngineConfig
from lmcache.integration.tensorrt_llm.server_backend import ProcessConnection, ServerTransfers
from lmcache.integration.tensorrt_llm.settings import ConnectorSettings
from lmcache.server.client import ServerUnavailable
from lmcache.server.client_shared_l1 import SharedL1Transfers
from lmcache.server.server import CacheServer
from lmcache.transfer import BlockTransfer

TOKENS = list(range(5000, 5000 + 4 * CHUNK))
BLOCKS = list(range(4 * CHUNK // TPB))


def fill_some_slabs(server: CacheServer) -> tuple[torch.Tensor, list[int]]:
    """Store a prompt through another client (a CPU server's L1 grows with use); the rows stored and
    the ids of the server's slabs."""
    pool = shared_pool(seed=21)
    with client_of(server) as writer:
        writer.register(pool, 0, 1, MODEL, TPB, pool_sharing="shared-l1")
        assert writer.store(BlockTransfer(TOKENS, None, BLOCKS, 0, len(TOKENS))) == len(TOKENS)
    # The server allocates a slab ahead of need, in the background: list the slabs once that is done.
    assert server.service.engine.l1.arena.wait_growth(20)
    ids = [slab.id for slab in server.service.l1_slabs().slabs]
    assert ids
    return pool[BLOCKS].clone(), ids


def test_a_client_maps_the_slabs_before_it_registers_and_not_again_after(serve, mapped) -> None:
    server = serve("auto")
    rows, ids = fill_some_slabs(server)
    mapped.clear()
    with client_of(server) as client:
        found = client.shared_l1.map_l1_ahead(pin=False, certain=True, timeout_s=20.0)
        assert found is not None and len(found.slabs) == len(ids) and not found.more
        assert client.registrations.wait_slabs_mapped(30)
        assert sorted(mapped) == sorted(ids)  # before any registration
        pool = shared_pool(seed=22)
        client.register(pool, 0, 1, MODEL, TPB, pool_sharing="shared-l1")
        dst = list(range(20, 20 + len(BLOCKS)))
        assert client.retrieve(BlockTransfer(TOKENS, None, dst, 0, len(TOKENS))) == len(TOKENS)
        assert torch.equal(pool[dst], rows)
        assert client.registrations.wait_slabs_mapped(30)
    assert sorted(mapped) == sorted(ids)  # registering and loading mapped nothing again


@pytest.mark.parametrize(
    ("policy", "certain", "expected"),
    [
        ("auto", False, False),  # an exportable pool in auto: export, no slab of use to this worker
        ("auto", True, True),
        ("shared-l1", False, True),  # the server forces the mode
        ("export", True, False),  # an export-only server keeps no L1 in shared memory
    ],
)
def test_slabs_are_mapped_ahead_only_where_the_mode_will_be_shared_l1(
    serve, mapped, policy: str, certain: bool, expected: bool
) -> None:
    server = serve(policy)
    if policy != "export":
        fill_some_slabs(server)
    mapped.clear()
    with client_of(server) as client:
        found = client.shared_l1.map_l1_ahead(pin=False, certain=certain, timeout_s=20.0)
        assert client.registrations.wait_slabs_mapped(30)
        assert (found is not None and len(found.slabs) > 0) == expected
        assert len(mapped) == (len(found.slabs) if found is not None else 0)


class _Asked:
    """Stands in for the client's ``map_l1_ahead``: records what a worker asked, and when."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.done = threading.Event()

    def __call__(self, **kw: Any) -> None:
        self.calls.append(kw)
        self.done.set()


@pytest.mark.parametrize(
    ("policy", "cuda", "v2", "certain"),
    [
        ("auto", False, False, True),  # CPU pools: always shared-l1
        ("auto", True, False, False),  # V1 CUDA pools: exported unless the server forces shared-l1
        ("auto", True, True, True),  # V2 pools: CUDA IPC cannot export them
        ("shared-l1", True, False, True),
        ("export", True, True, None),  # never asked
    ],
)
def test_a_worker_asks_at_construction_with_what_it_knows_of_its_pools(
    monkeypatch, policy: str, cuda: bool, v2: bool, certain: bool | None
) -> None:
    asked = _Asked()
    monkeypatch.setattr(SharedL1Transfers, "map_l1_ahead", lambda transfers, **kw: asked(**kw))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    config = LMCacheEngineConfig.from_defaults(chunk_size=CHUNK, pool_sharing=policy)
    connection = ProcessConnection("tcp://127.0.0.1:1", config)
    settings = ConnectorSettings(MODEL, 1, TPB, CHUNK, kv_manager_v2=v2)
    try:
        ServerTransfers(connection, settings, 0)
        if certain is None:
            assert asked.calls == []  # decided on the constructing thread: no request to wait for
        else:
            wait_until(asked.done.is_set, "the worker's request for the server's slabs")
            assert asked.calls == [{"pin": cuda, "certain": certain, "timeout_s": pytest.approx(2.0)}]
    finally:
        connection.client.close(unregister=False)


def test_a_server_that_is_down_maps_nothing_and_fails_nothing(mapped, caplog) -> None:
    """No server at construction: the worker's request fails in its background thread, which says so
    at DEBUG (registration retries, and warns); nothing is mapped."""
    config = LMCacheEngineConfig.from_defaults(chunk_size=CHUNK, pool_sharing="shared-l1")
    connection = ProcessConnection("tcp://127.0.0.1:1", config)
    try:
        with pytest.raises(ServerUnavailable):
            connection.client.shared_l1.map_l1_ahead(pin=False, certain=True, timeout_s=1.0)
        with caplog.at_level("DEBUG", logger="lmcache"):
            ServerTransfers(connection, ConnectorSettings(MODEL, 1, TPB, CHUNK), 0)
            wait_until(
                lambda: "not mapped ahead of registration" in caplog.text, "the request failing quietly"
            )
        assert mapped == []
    finally:
        connection.client.close(unregister=False)


def _join_l1_ahead_threads() -> None:
    for thread in [t for t in threading.enumerate() if t.name == "lmcache-l1-ahead"]:
        thread.join(30)
        assert not thread.is_alive()


def test_a_worker_asks_again_while_the_server_creates_its_l1_until_it_registers(monkeypatch) -> None:
    """A server started just before the worker is still creating its L1 (``more``): the worker asks
    again for the slabs created since, until the server is done, and stops asking once it registers."""
    from lmcache.server import protocol as P

    answers = [True, True, False]
    calls: list[bool] = []

    def answer(transfers: SharedL1Transfers, **kw: Any) -> P.SlabList:
        more = answers[min(len(calls), len(answers) - 1)]
        calls.append(more)
        return P.SlabList(server_id="s", pool_sharing="auto", more=more)

    monkeypatch.setattr(SharedL1Transfers, "map_l1_ahead", answer)
    config = LMCacheEngineConfig.from_defaults(chunk_size=CHUNK, pool_sharing="shared-l1")
    connection = ProcessConnection("tcp://127.0.0.1:1", config)
    try:
        ServerTransfers(connection, ConnectorSettings(MODEL, 1, TPB, CHUNK), 0)
        wait_until(lambda: len(calls) >= 3, "the worker asking again")
        _join_l1_ahead_threads()
        assert calls == [True, True, False]  # asked until the server said its L1 was complete
        answers[:] = [True]  # a server that never completes: registration ends the asking
        calls.clear()
        transfers = ServerTransfers(connection, ConnectorSettings(MODEL, 1, TPB, CHUNK), 0)
        wait_until(lambda: len(calls) >= 2, "the worker asking again")
        transfers.register([])
        _join_l1_ahead_threads()
    finally:
        connection.client.close(unregister=False)


def test_registration_returns_once_the_slabs_announced_are_mapped(serve, monkeypatch) -> None:
    """A worker registering while its slabs are still being mapped ahead waits for them (bounded), so
    its first saves copy at once instead of mapping them first (RESULTS D105)."""
    from lmcache.integration.tensorrt_llm.targets import targets_of_pool
    from lmcache.server import slab_mappings

    server = serve("shared-l1")
    _, ids = fill_some_slabs(server)
    began, done = threading.Event(), []

    def slowly(real: Any) -> Any:
        def mapping(info: Any, *args: Any, **kw: Any) -> Any:
            began.set()
            time.sleep(0.2)  # an import behind the server's makings
            mapped = real(info, *args, **kw)
            done.append(info.id)
            return mapped

        return mapping

    monkeypatch.setattr(slab_mappings, "map_slab", slowly(slab_mappings.map_slab))
    monkeypatch.setattr(slab_mappings, "map_descriptor", slowly(slab_mappings.map_descriptor))
    config = LMCacheEngineConfig.from_defaults(chunk_size=CHUNK, pool_sharing="shared-l1")
    connection = ProcessConnection(f"tcp://127.0.0.1:{server.tcp_port}", config)
    try:
        transfers = ServerTransfers(connection, ConnectorSettings(MODEL, 1, TPB, CHUNK), 0)
        assert began.wait(30)  # the slabs were announced and their mapping began
        transfers.register(targets_of_pool(shared_pool(seed=23)))
        assert set(ids) <= set(done)
    finally:
        connection.client.close()
