"""A store or load of an exported pool that runs past its client's timeout: the client has given up, and
TRT-LLM may already have given its blocks to another request, so the server makes no further copy."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import torch
from in_process_server import client_of, start_serving, stop_serving
from support.server_process import MODEL, TPB, shared_pool

from lmcache import c_ops
from lmcache.server.client import ServerUnavailable
from lmcache.transfer import BlockTransfer

TIMEOUT_S = 0.4


def test_a_store_past_its_timeout_publishes_nothing_read_after_it(monkeypatch: pytest.MonkeyPatch) -> None:
    server, thread = start_serving("export")
    client = client_of(server)
    try:
        pool = shared_pool(seed=3)
        client.register(pool, 0, 1, MODEL, TPB, pool_sharing="export")
        original = pool.clone()
        engine = server.engine
        reserve = engine.reserve_store
        entered: list[float] = []
        go_on = threading.Event()

        def stalled(*args: object, **kwargs: object) -> Iterator[object]:
            """The server stalls after the first chunk (paging, a stopped process)."""
            entered.append(time.monotonic())
            for i, slot in enumerate(reserve(*args, **kwargs)):  # type: ignore[arg-type]
                if i == 1:
                    assert go_on.wait(30)
                yield slot

        store = engine.store
        stored = threading.Event()

        def store_then_tell(*args: object, **kwargs: object) -> int:
            try:
                return store(*args, **kwargs)  # type: ignore[arg-type]
            finally:
                stored.set()

        monkeypatch.setattr(engine, "reserve_store", stalled)
        monkeypatch.setattr(engine, "store", store_then_tell)
        tokens, blocks = list(range(64)), list(range(8))  # two chunks of four blocks
        with pytest.raises(ServerUnavailable):
            client.store(BlockTransfer(tokens, None, blocks, 0, 64), timeout_s=TIMEOUT_S)
        pool[0:8] = -7.0  # TRT-LLM gave the blocks to another request
        time.sleep(max(0.0, entered[0] + TIMEOUT_S - time.monotonic()))  # the server's deadline is past
        go_on.set()
        assert stored.wait(30)  # the stalled store has ended
        monkeypatch.setattr(engine, "reserve_store", reserve)
        fresh = torch.zeros_like(pool).share_memory_()
        reader = client_of(server)
        try:
            reader.register(fresh, 0, 1, MODEL, TPB, pool_sharing="export")
            hit = reader.lookup(tokens)
            if hit:
                assert reader.retrieve(BlockTransfer(tokens, None, list(range(20, 28)), 0, hit)) == hit
            rows = hit // TPB
            assert torch.equal(fresh[20 : 20 + rows], original[:rows]), "the reused blocks' rows were served"
            assert hit < 64
        finally:
            reader.close()
    finally:
        client.close(unregister=False)
        stop_serving(server, thread)


def test_a_store_stalled_inside_a_copy_past_its_timeout_publishes_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The guard before a batch passed, then the server stalls while it copies (paging, a stopped
    process): what it reads after its client gave up must not be published either."""
    server, thread = start_serving("export")
    client = client_of(server)
    try:
        pool = shared_pool(seed=4)
        client.register(pool, 0, 1, MODEL, TPB, pool_sharing="export")
        gather = c_ops.Transfer.gather
        entered: list[float] = []
        go_on = threading.Event()

        def stalled_gather(transfer: c_ops.Transfer, chunks: object) -> None:
            entered.append(time.monotonic())
            assert go_on.wait(30)
            gather(transfer, chunks)  # type: ignore[arg-type]

        monkeypatch.setattr(c_ops.Transfer, "gather", stalled_gather)
        store, stored = server.engine.store, threading.Event()

        def store_then_tell(*args: object, **kwargs: object) -> int:
            try:
                return store(*args, **kwargs)  # type: ignore[arg-type]
            finally:
                stored.set()

        monkeypatch.setattr(server.engine, "store", store_then_tell)
        tokens = list(range(64))
        with pytest.raises(ServerUnavailable):
            client.store(BlockTransfer(tokens, None, list(range(8)), 0, 64), timeout_s=TIMEOUT_S)
        pool[0:8] = -7.0  # TRT-LLM gave the blocks to another request
        time.sleep(max(0.0, entered[0] + TIMEOUT_S - time.monotonic()))  # the server's deadline is past
        go_on.set()
        assert stored.wait(30)
        monkeypatch.setattr(c_ops.Transfer, "gather", gather)
        reader = client_of(server)
        try:
            reader.register(torch.zeros_like(pool).share_memory_(), 0, 1, MODEL, TPB, pool_sharing="export")
            assert reader.lookup(tokens) == 0
        finally:
            reader.close()
    finally:
        client.close(unregister=False)
        stop_serving(server, thread)
