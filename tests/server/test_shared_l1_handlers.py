"""The shared-L1 mode at handler level: SharedL1Service (server) + SharedL1Copier (worker), CPU pools."""

import threading

import pytest
import torch
from shared_l1_support import CHUNK, TOKENS, copy_load, copy_store, shared_l1_env, shuffled_blocks

from lmcache.config import LMCacheEngineConfig
from lmcache.engine import CacheEngine
from lmcache.server import protocol as P
from lmcache.server.shared_l1 import BadTicket, InstanceScope, TicketLimitExceeded
from lmcache.server.shared_l1_worker import SharedL1Copier
from lmcache.shm_slabs import ShmSlabError
from lmcache.transfer import BlockTransfer


@pytest.fixture
def env(tmp_path):
    env = shared_l1_env(tmp_path, max_tickets=4)
    yield env.engine, env.service, env.copier, env.pool, env.scope
    env.close()


def store(service, copier, scope, blocks, end=4 * CHUNK, ok=True) -> int:
    reply = service.store_reserve(scope, P.StoreReserve(instance_id=7, tokens=TOKENS, end=end))
    copy_store(copier, reply, blocks)
    return service.store_done(scope, P.StoreDone(instance_id=7, ticket=reply.ticket, ok=ok))


def test_reserve_copy_done_publishes_and_loads_bit_equal_with_the_in_process_engine(env) -> None:
    engine, service, copier, pool, scope = env
    src = shuffled_blocks(18, seed=1)
    reply = service.store_reserve(scope, P.StoreReserve(instance_id=7, tokens=TOKENS, end=4 * CHUNK))
    assert reply.ticket and len(reply.chunks) == 4 and reply.slabs
    copy_store(copier, reply, src)
    assert engine.lookup(scope.space, TOKENS) == 0  # copied but not reported: not published
    assert service.store_done(scope, P.StoreDone(instance_id=7, ticket=reply.ticket)) == 4 * CHUNK
    assert engine.lookup(scope.space, TOKENS) == 4 * CHUNK

    # Load [48, 256) into other shuffled blocks, -1 outside the range.
    dst = shuffled_blocks(16, seed=2, base=32)
    dst[:3] = [-1, -1, -1]
    before = pool.clone()
    load = service.load(scope, P.Load(instance_id=7, tokens=TOKENS, start=48, end=4 * CHUNK))
    assert load.loaded == 4 * CHUNK - 48 and load.chunks[0].skip == 3
    assert copy_load(copier, load, dst) == 4 * CHUNK - 48
    assert service.load_done(scope, P.LoadDone(instance_id=7, ticket=load.ticket))
    assert torch.equal(pool[dst[3:16]], pool[src[3:16]])
    untouched = [b for b in range(64) if b not in dst[3:16]]
    assert torch.equal(pool[untouched], before[untouched])

    # The in-process engine, same data, same blocks: the same bytes land.
    reference = CacheEngine(
        LMCacheEngineConfig.from_defaults(chunk_size=CHUNK, max_local_cpu_size=0.05), pinned=False
    )
    pool2 = before.clone()
    assert reference.store(scope.space, 0, pool2, BlockTransfer(TOKENS, None, src, 0, 4 * CHUNK)) == 4 * CHUNK
    assert reference.retrieve(scope.space, 0, pool2, BlockTransfer(TOKENS, None, dst, 48, 4 * CHUNK)) == 208
    assert torch.equal(pool2, pool)


def test_already_cached_chunks_are_skipped_and_a_second_store_needs_no_ticket(env) -> None:
    engine, service, copier, pool, scope = env
    assert store(service, copier, scope, shuffled_blocks(16, 3)) == 4 * CHUNK
    reply = service.store_reserve(scope, P.StoreReserve(instance_id=7, tokens=TOKENS, end=4 * CHUNK))
    assert reply.ticket == 0 and all(c.slot is None for c in reply.chunks)


@pytest.mark.parametrize("how", ["abort", "reap"])
def test_abandoned_reservations_free_their_slots_and_are_never_visible(env, how) -> None:
    engine, service, copier, pool, scope = env
    reply = service.store_reserve(scope, P.StoreReserve(instance_id=7, tokens=TOKENS, end=4 * CHUNK))
    assert engine.l1.used_bytes > 0
    if how == "abort":
        assert service.store_done(scope, P.StoreDone(instance_id=7, ticket=reply.ticket, ok=False)) == 0
    else:
        assert service.forget(7) == 1
    assert engine.l1.used_bytes == 0 and len(engine.l1) == 0
    assert engine.lookup(scope.space, TOKENS) == 0
    with pytest.raises(BadTicket):  # and the ticket is gone
        service.store_done(scope, P.StoreDone(instance_id=7, ticket=reply.ticket))


@pytest.mark.parametrize("how", ["done", "reap"])
def test_a_load_holds_its_pins_until_done_or_reaped(env, how) -> None:
    engine, service, copier, pool, scope = env
    store(service, copier, scope, shuffled_blocks(16, 4))
    load = service.load(scope, P.Load(instance_id=7, tokens=TOKENS, end=4 * CHUNK))
    assert len(engine.l1.pinned_keys()) == 4 and engine.clear() == 0
    if how == "done":
        service.load_done(scope, P.LoadDone(instance_id=7, ticket=load.ticket))
    else:
        service.forget(7)
    assert engine.l1.pinned_keys() == [] and service.open_tickets(7) == 0
    assert engine.clear() == 4


def test_a_load_stops_at_the_first_chunk_not_cached(env) -> None:
    engine, service, copier, pool, scope = env
    store(service, copier, scope, shuffled_blocks(16, 5), end=2 * CHUNK)
    load = service.load(scope, P.Load(instance_id=7, tokens=TOKENS, end=4 * CHUNK))
    assert load.loaded == 2 * CHUNK and len(load.chunks) == 2
    miss = service.load(scope, P.Load(instance_id=7, tokens=list(range(4 * CHUNK)), end=CHUNK))
    assert miss.ticket == 0 and miss.loaded == 0 and service.open_tickets(7) == 1


def test_bad_tickets_are_refused(env) -> None:
    engine, service, copier, pool, scope = env
    reply = service.store_reserve(scope, P.StoreReserve(instance_id=7, tokens=TOKENS, end=4 * CHUNK))
    other = InstanceScope(8, scope.space, 0, registration=8)
    with pytest.raises(BadTicket, match="not an open store_reserve ticket of instance 8"):
        service.store_done(other, P.StoreDone(instance_id=8, ticket=reply.ticket))
    with pytest.raises(BadTicket, match="not an open load ticket"):
        service.load_done(scope, P.LoadDone(instance_id=7, ticket=reply.ticket))
    with pytest.raises(BadTicket):
        service.store_done(scope, P.StoreDone(instance_id=7, ticket=12345))
    assert service.store_done(scope, P.StoreDone(instance_id=7, ticket=reply.ticket, ok=False)) == 0


def test_tickets_are_bounded_per_instance(env) -> None:
    engine, service, copier, pool, scope = env
    for i in range(4):
        toks = list(range(i * 10_000, i * 10_000 + CHUNK))
        assert service.store_reserve(scope, P.StoreReserve(instance_id=7, tokens=toks, end=CHUNK)).ticket
    with pytest.raises(TicketLimitExceeded, match="maximum of 4"):
        service.store_reserve(scope, P.StoreReserve(instance_id=7, tokens=TOKENS, end=CHUNK))
    other = InstanceScope(8, scope.space, 0, registration=8)  # another instance has its own bound
    assert service.store_reserve(other, P.StoreReserve(instance_id=8, tokens=TOKENS, end=CHUNK)).ticket


def test_requests_running_at_once_cannot_open_more_tickets_than_the_cap_together(env, monkeypatch) -> None:
    """The cap counts the places taken by requests still running: with three tickets open, a store
    paused after its check and a second store arriving meanwhile cannot both open one."""
    engine, service, copier, pool, scope = env
    for i in range(3):
        toks = list(range(i * 10_000, i * 10_000 + CHUNK))
        assert service.store_reserve(scope, P.StoreReserve(instance_id=7, tokens=toks, end=CHUNK)).ticket
    checked, go_on = threading.Event(), threading.Event()
    reserve_store = engine.reserve_store

    def paused(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            checked.set()
            go_on.wait(20)
        return reserve_store(*args, **kwargs)

    monkeypatch.setattr(engine, "reserve_store", paused)
    tickets: list[int] = []
    first = threading.Thread(
        target=lambda: tickets.append(
            service.store_reserve(scope, P.StoreReserve(instance_id=7, tokens=TOKENS, end=CHUNK)).ticket
        )
    )
    first.start()
    try:
        assert checked.wait(20)
        with pytest.raises(TicketLimitExceeded, match="maximum of 4"):
            service.store_reserve(
                scope, P.StoreReserve(instance_id=7, tokens=list(range(90_000, 90_256)), end=CHUNK)
            )
    finally:
        go_on.set()
        first.join(20)
    assert tickets and tickets[0] and service.open_tickets(7) == 4


def test_open_reservations_hold_at_most_half_of_l1_an_instance_and_three_quarters_in_all(env) -> None:
    """Reserved slots cannot be evicted until reported: one store reserving all of L1, never reported,
    would drop every other instance's saves for as long as its worker lives. A store reaching the
    share reserves the chunks before it (a prefix is saved); chunks already cached cost nothing."""
    engine, service, copier, pool, scope = env
    slot_bytes = CHUNK // 16 * pool[0].numel() * pool.element_size()
    half = engine.l1.arena.capacity_bytes // 2 // slot_bytes  # chunks

    def reserve(instance: int, first: int, chunks: int) -> P.StoreSlots:
        tokens = list(range(first, first + chunks * CHUNK))
        at = InstanceScope(instance, scope.space, 0, registration=instance)
        return service.store_reserve(at, P.StoreReserve(instance_id=instance, tokens=tokens, end=len(tokens)))

    whole = reserve(7, 0, 2 * half)
    assert len(whole.chunks) == half and whole.tokens == half * CHUNK  # the first half of L1 only
    assert len(reserve(7, 10_000_000, 2).chunks) == 0  # nothing more while it holds its share
    assert len(reserve(8, 20_000_000, half).chunks) == half // 2  # 3/4 of L1 in all
    assert len(reserve(9, 30_000_000, 2).chunks) == 0
    service.store_done(scope, P.StoreDone(instance_id=7, ticket=whole.ticket, ok=True))
    assert len(reserve(9, 30_000_000, 2).chunks) == 2
    cached = reserve(7, 0, half)  # what it published: nothing to reserve, nothing counted
    assert len(cached.chunks) == half and cached.tokens == 0 and not cached.ticket
    assert len(reserve(7, 40_000_000, 2).chunks) == 2


def test_bad_ranges_and_slots_are_refused(env) -> None:
    engine, service, copier, pool, scope = env
    with pytest.raises(ValueError, match="not within the request's"):
        service.store_reserve(scope, P.StoreReserve(instance_id=7, tokens=TOKENS[:10], end=64))
    with pytest.raises(ValueError, match="multiple of chunk_size"):
        service.store_reserve(scope, P.StoreReserve(instance_id=7, tokens=TOKENS, start=16, end=128))
    reply = service.store_reserve(scope, P.StoreReserve(instance_id=7, tokens=TOKENS, end=CHUNK))
    unknown = P.StoreSlots(ticket=reply.ticket, chunks=[P.StoreChunk(0, 4, P.SlotInfo(99, 0, 4 * 1024))])
    with pytest.raises(ShmSlabError, match="never described"):
        copy_store(copier, unknown, list(range(4)))
    copier.apply(reply)
    slot = reply.chunks[0].slot
    wrong = P.StoreSlots(
        ticket=reply.ticket, chunks=[P.StoreChunk(0, 4, P.SlotInfo(slot.slab, slot.offset, 8))]
    )
    with pytest.raises(ShmSlabError, match="does not hold 4 rows"):
        copy_store(copier, wrong, list(range(4)))
    misaligned = P.StoreSlots(
        ticket=reply.ticket,
        chunks=[P.StoreChunk(0, 4, P.SlotInfo(slot.slab, slot.offset + 8, slot.nbytes))],
    )
    with pytest.raises(ShmSlabError, match="does not hold 4 rows"):  # not on a row boundary
        copy_store(copier, misaligned, list(range(4)))


def test_a_new_server_drops_every_mapping(env) -> None:
    engine, service, copier, pool, scope = env
    copier.on_server("a")
    store(service, copier, scope, shuffled_blocks(16, 6))
    assert copier.mapped_slabs
    copier.on_server("b")
    assert copier.mapped_slabs == []


def test_every_reply_describes_its_own_slabs_so_concurrent_copies_need_no_order(env) -> None:
    engine, service, copier, pool, scope = env
    src = shuffled_blocks(16, 6)
    store(service, copier, scope, src)  # this instance was told of the slabs then
    load = service.load(scope, P.Load(instance_id=7, tokens=TOKENS, end=4 * CHUNK))
    assert {s.id for s in load.slabs} == {c.slot.slab for c in load.chunks}
    other_thread = SharedL1Copier(pool, shm_dir=copier.slabs.shm_dir)  # has applied no earlier reply
    dst = shuffled_blocks(16, 7, base=32)
    assert copy_load(other_thread, load, dst) == 4 * CHUNK
    assert torch.equal(pool[dst], pool[src])
    service.load_done(scope, P.LoadDone(instance_id=7, ticket=load.ticket))


def test_a_load_answers_its_first_chunks_ahead_under_one_ticket(env) -> None:
    engine, service, copier, pool, scope = env
    src = shuffled_blocks(16, seed=11)
    store(service, copier, scope, src)
    parts: list[P.LoadSlots] = []
    req = P.Load(instance_id=7, tokens=TOKENS, start=16, end=4 * CHUNK, first=1)
    final = service.load(scope, req, parts.append)
    assert [len(p.chunks) for p in parts] == [1] and len(final.chunks) == 3
    assert parts[0].ticket == final.ticket and final.loaded == 4 * CHUNK - 16
    assert parts[0].slabs and service.open_tickets(7) == 1
    dst = shuffled_blocks(16, seed=12, base=32)
    batch = copier.begin_load(dst)
    for part in (*parts, final):
        copier.add_load(batch, part, dst)
    copier.finish_store(batch)
    copier.wait_stored()
    assert torch.equal(pool[dst[1:]], pool[src[1:]])
    service.load_done(scope, P.LoadDone(instance_id=7, ticket=final.ticket))
    assert engine.l1.pinned_keys() == []

    whole: list[P.LoadSlots] = []  # no more chunks than ``first``: one reply
    assert (
        len(
            service.load(scope, P.Load(instance_id=7, tokens=TOKENS, end=CHUNK, first=1), whole.append).chunks
        )
        == 1
    )
    assert whole == []


def test_a_load_failing_after_its_first_part_keeps_the_pins_for_its_ticket(env, monkeypatch) -> None:
    engine, service, copier, pool, scope = env
    store(service, copier, scope, shuffled_blocks(16, seed=13))
    real = engine.hold_chunks

    def fail_after_two(hold):  # type: ignore[no-untyped-def]
        for i, slot in enumerate(real(hold)):
            if i == 2:
                raise OSError("lower tier gone")
            yield slot

    monkeypatch.setattr(engine, "hold_chunks", fail_after_two)
    parts: list[P.LoadSlots] = []
    with pytest.raises(OSError):
        service.load(scope, P.Load(instance_id=7, tokens=TOKENS, end=4 * CHUNK, first=2), parts.append)
    assert len(parts) == 1 and len(engine.l1.pinned_keys()) >= 2  # the worker may be copying them
    service.load_done(scope, P.LoadDone(instance_id=7, ticket=parts[0].ticket))
    assert engine.l1.pinned_keys() == [] and service.open_tickets(7) == 0


def test_replies_announce_new_slabs_ahead_once_and_the_worker_maps_them_in_the_background(env) -> None:
    engine, service, copier, pool, scope = env
    engine.l1.arena.prepin()  # every slab of the budget exists now, as on a CUDA host
    assert engine.l1.arena.wait_prepinned(30)
    live = engine.l1.arena.source.live_ids()
    assert len(live) > 2
    reply = service.store_reserve(scope, P.StoreReserve(instance_id=7, tokens=TOKENS, end=CHUNK))
    named = {s.id for s in reply.slabs}
    assert named and {s.id for s in reply.ahead} == live - named  # told of every slab, once
    copier.apply(reply)
    assert copier.slabs.wait_ahead(30) and set(copier.mapped_slabs) == live
    service.store_done(scope, P.StoreDone(instance_id=7, ticket=reply.ticket, ok=False))
    again = service.store_reserve(scope, P.StoreReserve(instance_id=7, tokens=TOKENS, end=CHUNK))
    assert again.ahead == [] and again.slabs  # a reply still names its own slabs
