"""A shared-L1 load after this client's own lookup copies from the slots the lookup pinned before the
server answers the load; the load's reply names the slots to use, and a chunk it names otherwise is
copied again from the reply's slot. The server runs in a thread of this process (CPU pools)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
from in_process_server import start_serving, stop_serving
from support.server_process import CHUNK, MODEL, TPB, shared_pool

from lmcache import chunk_copy
from lmcache.chunk_copy import CopyBatcher
from lmcache.layered_load import LayerReady
from lmcache.server import framing
from lmcache.server import protocol as P
from lmcache.server.calls import Call
from lmcache.server.client import CacheServerClient
from lmcache.server.security import Peer
from lmcache.server.server import CacheServer
from lmcache.server.shared_l1_worker import SharedL1Copier
from lmcache.transfer import BlockTransfer

TOKENS = list(range(5000, 5000 + 4 * CHUNK))
SOURCE = list(range(4 * CHUNK // TPB))  # 16 blocks, four chunks
TARGET = [40, 17, 33, 20, 41, 18, 30, 25, 50, 51, 52, 60, 61, 44, 45, 46]


@pytest.fixture
def server() -> Iterator[CacheServer]:
    served = start_serving("shared-l1")
    yield served[0]
    stop_serving(*served)


@pytest.fixture
def client(server: CacheServer) -> Iterator[CacheServerClient]:
    with CacheServerClient(f"tcp://127.0.0.1:{server.tcp_port}", timeout_s=20.0) as c:
        yield c


class CopySpy:
    """Counts the chunk copies a shared-L1 load queues, and those it queued before any reply."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.chunks = 0
        self.early = 0
        add, add_looked_up = CopyBatcher.add, SharedL1Copier.add_looked_up

        def counted(batch, *args, **kwargs):  # type: ignore[no-untyped-def]
            self.chunks += 1
            add(batch, *args, **kwargs)

        def looked_up(copier, *args):  # type: ignore[no-untyped-def]
            queued = add_looked_up(copier, *args)
            self.early += len(queued)
            return queued

        monkeypatch.setattr(CopyBatcher, "add", counted)
        monkeypatch.setattr(SharedL1Copier, "add_looked_up", looked_up)


def stored(client: CacheServerClient, seed: int) -> tuple[torch.Tensor, int]:
    """A shared-L1 pool whose first blocks hold ``TOKENS``'s stored KV; its instance id."""
    pool = shared_pool(seed=seed)
    info = client.register(pool, 0, 1, MODEL, TPB, pool_sharing="shared-l1")
    assert client.store(BlockTransfer(TOKENS, None, SOURCE, 0, len(TOKENS))) == len(TOKENS)
    return pool, info.instance_id


def test_a_load_after_its_lookup_copies_before_the_reply_and_once(client, monkeypatch) -> None:
    pool, _ = stored(client, seed=21)
    spy = CopySpy(monkeypatch)
    start = CHUNK + TPB  # mid-chunk: the device already holds the first chunk and a block
    before = pool[TARGET[: start // TPB]].clone()
    assert client.lookup(TOKENS, pin_id="req") == len(TOKENS)
    loaded = client.retrieve(BlockTransfer(TOKENS, None, TARGET, start, len(TOKENS)), pin_id="req")
    assert loaded == len(TOKENS) - start
    assert spy.early == 3 and spy.chunks == 3  # three chunks touch the range: copied once, early
    assert torch.equal(pool[TARGET[start // TPB :]], pool[SOURCE[start // TPB :]])
    assert torch.equal(pool[TARGET[: start // TPB]], before)  # blocks before the range are never written
    assert client.stats().pinned_lookups == 0


def test_a_chunk_the_reply_names_otherwise_is_copied_again_from_the_reply(client, monkeypatch) -> None:
    """Slots named by a lookup whose pins lapsed may hold other chunks by the load: the reply's slots
    (or fillings) differ, and those chunks are copied again, after the first copies."""
    pool, iid = stored(client, seed=22)
    found = client.call(
        P.Lookup(instance_id=iid, tokens=P.tokens_to_bytes(TOKENS), pin_id="req", slots=True), P.LookupSlots
    )
    assert found.hit == len(TOKENS) and len(found.slots) == 4
    # As if chunks 0 and 1 had swapped slots since: the first copies write the wrong KV to their rows.
    stale = [found.slots[1], found.slots[0], *found.slots[2:]]
    client.shared_l1.remember_slots(iid, "req", stale)
    spy = CopySpy(monkeypatch)
    assert client.retrieve(BlockTransfer(TOKENS, None, TARGET, 0, len(TOKENS)), pin_id="req") == len(TOKENS)
    assert spy.early == 4 and spy.chunks == 6  # chunks 0 and 1 again, from the reply's slots
    assert torch.equal(pool[TARGET], pool[SOURCE])


class OrderSpy:
    """What a load did in order: ``"request"`` when it sent its ``load``, ``"copy"`` for each batch of
    layer-wise copies enqueued, ``"reply"`` when the server's reply came in."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[str] = []
        scatter, add_load = chunk_copy.scatter_layers, SharedL1Copier.add_load
        encode = framing.encode_request

        def request(req):  # type: ignore[no-untyped-def]
            if isinstance(req, P.Load):
                self.events.append("request")
            return encode(req)

        def copies(*args, **kwargs):  # type: ignore[no-untyped-def]
            self.events.append("copy")
            scatter(*args, **kwargs)

        def reply(copier, *args, **kwargs):  # type: ignore[no-untyped-def]
            self.events.append("reply")
            add_load(copier, *args, **kwargs)

        monkeypatch.setattr(framing, "encode_request", request)
        monkeypatch.setattr(chunk_copy, "scatter_layers", copies)
        monkeypatch.setattr(SharedL1Copier, "add_load", reply)


@pytest.mark.parametrize(
    ("named", "order"),
    [
        ("all", ["copy", "request", "reply"]),  # one batch, before the request
        ("stale", ["copy", "request", "reply", "copy"]),  # the chunks named otherwise land after
        ("some", ["request", "reply", "copy"]),  # one batch, once the reply named every slot
    ],
)
def test_a_layerwise_load_copies_before_the_reply_when_its_lookup_named_every_chunk(
    client, monkeypatch, named, order
) -> None:
    pool, iid = stored(client, seed=26)
    found = client.call(
        P.Lookup(instance_id=iid, tokens=P.tokens_to_bytes(TOKENS), pin_id="req", slots=True), P.LookupSlots
    )
    assert len(found.slots) == 4
    slots = {
        "all": found.slots,
        "stale": [found.slots[1], found.slots[0], *found.slots[2:]],
        "some": found.slots[:3],
    }[named]
    client.shared_l1.remember_slots(iid, "req", slots)
    spy = OrderSpy(monkeypatch)
    layers = LayerReady(pool.shape[1])
    load = BlockTransfer(TOKENS, None, TARGET, 0, len(TOKENS))
    assert client.retrieve(load, pin_id="req", layers=layers) == len(TOKENS)
    assert spy.events == order
    assert layers.went_layerwise
    assert torch.equal(pool[TARGET], pool[SOURCE])
    assert client.stats().pinned_lookups == 0


def test_slots_of_another_server_or_instance_are_not_used(client, monkeypatch) -> None:
    pool, iid = stored(client, seed=23)
    spy = CopySpy(monkeypatch)
    assert client.lookup(TOKENS, pin_id="a") == len(TOKENS)
    client.registrations.copier(iid).on_server("a restarted server")  # its slots are numbered anew
    assert client.retrieve(BlockTransfer(TOKENS, None, TARGET, 0, len(TOKENS)), pin_id="a") == len(TOKENS)
    assert (spy.early, spy.chunks) == (0, 4)
    assert torch.equal(pool[TARGET], pool[SOURCE])
    # Rank 1 of a TP world loads after rank 0's lookup (its pins, not its slots: they hold rank 0's KV).
    ranks = [shared_pool(seed=30 + r) for r in range(2)]
    ids = [
        client.register(p, r, 2, MODEL + "-tp2", TPB, pool_sharing="shared-l1").instance_id
        for r, p in enumerate(ranks)
    ]
    for rank_iid in ids:
        stored_tokens = client.store(
            BlockTransfer(TOKENS, None, SOURCE, 0, len(TOKENS)), instance_id=rank_iid
        )
        assert stored_tokens == len(TOKENS)
    assert client.lookup(TOKENS, pin_id="b", instance_id=ids[0]) == len(TOKENS)
    load = BlockTransfer(TOKENS, None, TARGET, 0, len(TOKENS))
    copied = spy.chunks
    assert client.retrieve(load, pin_id="b", pin_owner=ids[0], instance_id=ids[1]) == len(TOKENS)
    assert (spy.early, spy.chunks - copied) == (
        0,
        4,
    )  # another instance's load never takes the lookup's slots
    assert torch.equal(ranks[1][TARGET], ranks[1][SOURCE])


def test_a_released_lookup_leaves_no_slots_behind(client, monkeypatch) -> None:
    pool, _ = stored(client, seed=24)
    spy = CopySpy(monkeypatch)
    assert client.lookup(TOKENS, pin_id="req") == len(TOKENS)
    client.release("req")
    assert client.retrieve(BlockTransfer(TOKENS, None, TARGET, 0, len(TOKENS))) == len(TOKENS)
    assert (spy.early, spy.chunks) == (0, 4)
    assert torch.equal(pool[TARGET], pool[SOURCE])


def test_an_exported_pools_lookup_names_no_slots() -> None:
    served = start_serving("auto")
    try:
        with CacheServerClient(f"tcp://127.0.0.1:{served[0].tcp_port}", timeout_s=20.0) as client:
            info = client.register(shared_pool(seed=25), 0, 1, MODEL, TPB, pool_sharing="export")
            assert client.store(BlockTransfer(TOKENS, None, SOURCE, 0, len(TOKENS))) == len(TOKENS)
            tokens = P.tokens_to_bytes(TOKENS)
            req = P.Lookup(instance_id=info.instance_id, tokens=tokens, pin_id="x", slots=True)
            assert client.call(req, P.LookupSlots) == P.LookupSlots(hit=len(TOKENS), slots=[])
    finally:
        stop_serving(*served)


def test_a_report_read_in_the_same_round_as_a_lookup_is_published_first(server, client) -> None:
    """A worker reports its save done (one-way) and TRT-LLM's scheduler then looks the prompt up on
    another connection; when the I/O thread reads both in one poll round, the report runs first, so
    the lookup finds the chunks (served lookup first, it would miss)."""
    iid = client.register(shared_pool(seed=23), 0, 1, MODEL, TPB, pool_sharing="shared-l1").instance_id
    cap = client.registrations.cap(iid)
    peer = Peer(uid=os.geteuid())
    reserve = P.StoreReserve(instance_id=iid, tokens=P.tokens_to_bytes(TOKENS), end=len(TOKENS), cap=cap)
    reserved = server.service.handle(reserve, Call(peer))
    assert reserved.ticket  # the copies into its slots do not matter here: only who sees them first
    lookup = P.Lookup(rid=1, instance_id=iid, tokens=P.tokens_to_bytes(TOKENS), cap=cap)
    done = P.StoreDone(rid=2, instance_id=iid, ticket=reserved.ticket, cap=cap, one_way=True)
    hits = server.engine.stats.hit_tokens
    server.dispatcher.on_frames([(901, P.encode(lookup), peer), (902, P.encode(done), peer)])
    assert server.engine.stats.hit_tokens - hits == len(TOKENS)
    assert client.lookup(TOKENS) == len(TOKENS)
