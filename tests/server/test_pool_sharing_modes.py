"""Which mode a pool is registered in: the client's policy (``LMCACHE_POOL_SHARING``), the server's
(``--pool-sharing``), what each mode does with a CPU pool, and the refusal of a mode a server does not
take. The server runs in a thread of this process with its L1 in shared memory (:func:`server_engine`)."""

from __future__ import annotations

import math
import threading

import pytest
import torch
from in_process_server import client_of, start_serving, stop_serving
from raw_lane import connect, framed, read_reply
from support.server_process import CHUNK, MODEL, POOL_SHAPE, TPB, server_secret, shared_pool, wait_until

from lmcache.chunk_copy import EventStart
from lmcache.config import LMCacheEngineConfig
from lmcache.server import framing
from lmcache.server import protocol as P
from lmcache.server.client import BadPool, CacheServerClient, InvalidRequest, ServerUnavailable
from lmcache.server.client_lanes import LanePool
from lmcache.server.pool_sharing import PoolSharingError, choose_sharing
from lmcache.server.server import CacheServer, server_engine
from lmcache.server.shared_l1_worker import SharedL1Copier
from lmcache.transfer import BlockTransfer

TOKENS = list(range(3000, 3000 + 2 * CHUNK))
BLOCKS = list(range(2 * CHUNK // TPB))


@pytest.mark.parametrize(
    ("requested", "server", "mode"),
    [
        ("auto", "auto", "shared-l1"),  # a CPU pool: nothing to export but its memory, shared-l1 is cheaper
        ("export", "auto", "cpu-shm"),
        ("shared-l1", "auto", "shared-l1"),
        ("auto", "export", "cpu-shm"),  # a client in auto follows a server forcing a mode
        ("auto", "shared-l1", "shared-l1"),
        ("export", "shared-l1", "cpu-shm"),  # a forced client keeps its mode (the server refuses it)
    ],
)
def test_choice_for_a_cpu_pool(requested: str, server: str, mode: str) -> None:
    assert choose_sharing(torch.zeros(POOL_SHAPE), requested, server) == mode


def test_an_unknown_policy_is_refused_with_the_choices() -> None:
    with pytest.raises(PoolSharingError, match="auto, export, shared-l1"):
        choose_sharing(torch.zeros(POOL_SHAPE), "ipc")


@pytest.mark.parametrize(
    ("policy", "requested", "mode"),
    [
        ("auto", "auto", "shared-l1"),
        ("auto", "export", "cpu-shm"),
        ("export", "auto", "cpu-shm"),
        ("shared-l1", "auto", "shared-l1"),
    ],
)
def test_registered_mode_round_trips_and_shows_in_stats(
    serve, policy: str, requested: str, mode: str
) -> None:
    server = serve(policy)
    pool = shared_pool(seed=11)  # in shared memory, so either mode can take it
    src = pool[: len(BLOCKS)].clone()
    with client_of(server) as client:
        info = client.register(pool, 0, 1, MODEL, TPB, pool_sharing=requested)
        registration = server.service.instances.get(info.instance_id).registration
        assert info.sharing == mode and info.pool_sharing == policy
        assert client.store(BlockTransfer(TOKENS, None, BLOCKS, 0, len(TOKENS))) == len(TOKENS)
        assert client.lookup(TOKENS, pin_id="p") == len(TOKENS)
        pool[20:28].zero_()
        assert client.retrieve(BlockTransfer(TOKENS, None, list(range(20, 28)), 0, len(TOKENS)), "p") == 64
        assert torch.equal(pool[20:28], src)
        stats = client.stats()
        assert stats.pool_sharing == policy and [i.sharing for i in stats.instances] == [mode]
        assert stats.l1_memory == ("private" if policy == "export" else "fd-memfd")  # what workers copy into
    shared = server.service.shared_l1
    if policy == "export":  # no worker copies into L1: it stays private memory, no shared-L1 ops
        assert shared is None
    else:
        assert shared is not None and shared.open_tickets(registration) == 0


@pytest.mark.parametrize(("policy", "requested"), [("shared-l1", "export"), ("export", "shared-l1")])
def test_a_mode_the_server_does_not_take_is_refused_naming_both_settings(serve, policy, requested) -> None:
    server = serve(policy)
    with client_of(server) as client:
        with pytest.raises(BadPool, match=f"--pool-sharing {policy}.*LMCACHE_POOL_SHARING"):
            client.register(shared_pool(seed=12), 0, 1, MODEL, TPB, pool_sharing=requested)
        assert client.stats().refusals == {"pool_sharing": 1}


def test_the_server_never_copies_for_a_shared_l1_instance(serve) -> None:
    server = serve("auto")
    with client_of(server) as client:
        iid = client.register(torch.zeros(POOL_SHAPE), 0, 1, MODEL, TPB, pool_sharing="shared-l1").instance_id
        store = P.Store(instance_id=iid, tokens=TOKENS, block_ids=BLOCKS, end=len(TOKENS))
        with pytest.raises(InvalidRequest, match="shared-l1 mode: the server cannot reach its blocks"):
            client.call(store, int)


def test_a_copy_that_fails_gives_the_slots_back_and_raises(serve, monkeypatch) -> None:
    server = serve("auto")

    def fail(self):  # type: ignore[no-untyped-def]
        raise RuntimeError("the worker's copy failed (as a CUDA error would)")

    # Bad block ids are refused before anything is reserved: fail the copy itself instead.
    monkeypatch.setattr(SharedL1Copier, "wait_stored", fail)
    with client_of(server) as client:
        client.register(torch.zeros(POOL_SHAPE), 0, 1, MODEL, TPB, pool_sharing="shared-l1")
        with pytest.raises(RuntimeError, match="copy failed"):
            client.store(BlockTransfer(TOKENS, None, BLOCKS, 0, len(TOKENS)))
        stats = client.stats()
        (instance,) = stats.instances
        slot_bytes = CHUNK // TPB * math.prod(POOL_SHAPE[1:]) * torch.float32.itemsize
        # Nothing published, nothing held but the instance's lease (topped up again).
        assert stats.engine.l1.chunks == 0 and client.lookup(TOKENS) == 0
        assert stats.engine.l1.used_bytes == instance.leased_slots * slot_bytes > 0


def test_an_export_only_server_keeps_its_l1_out_of_shared_memory(tmp_path) -> None:
    config = LMCacheEngineConfig.from_defaults(chunk_size=CHUNK, max_local_cpu_size=0.05)
    engine = server_engine(config, "export", pinned=False, shm_dir=str(tmp_path))
    assert engine.l1.arena.pool(1 << 16).allocate() is not None
    assert list(tmp_path.iterdir()) == []  # no region: no worker ever copies into this L1
    shared = server_engine(config, "auto", pinned=False, shm_dir=str(tmp_path), l1_memory="shm")
    assert shared.l1.arena.pool(1 << 16).allocate() is not None
    assert len(list(tmp_path.iterdir())) >= 1
    shared.l1.arena.close()


def test_a_tmpfs_smaller_than_l1_is_named_at_start(tmp_path, monkeypatch, caplog) -> None:
    class Small:
        f_bavail, f_frsize = 1, 4096  # one free page

    monkeypatch.setattr("lmcache.server.server.os.statvfs", lambda path: Small())
    config = LMCacheEngineConfig.from_defaults(chunk_size=CHUNK, max_local_cpu_size=0.05)
    with caplog.at_level("WARNING", logger="lmcache"):
        engine = server_engine(config, "auto", pinned=False, shm_dir=str(tmp_path), l1_memory="shm")
    assert "--shm-size" in caplog.text and "--l1-size-gb" in caplog.text and "--l1-memory fd" in caplog.text
    engine.l1.arena.close()
    caplog.clear()
    with caplog.at_level("WARNING", logger="lmcache"):  # L1 passed by descriptor lives outside the tmpfs
        engine = server_engine(config, "auto", pinned=False, shm_dir=str(tmp_path), l1_memory="fd")
    assert "--shm-size" not in caplog.text
    engine.l1.arena.close()


def spy_reserve_starts(server: CacheServer, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The ``start`` of every ``store_reserve`` the server's shared-L1 service will handle."""
    shared = server.service.shared_l1
    assert shared is not None
    starts: list[int] = []
    real_reserve = shared.store_reserve

    def spy(scope, req):  # type: ignore[no-untyped-def]
        starts.append(req.start)
        return real_reserve(scope, req)

    monkeypatch.setattr(shared, "store_reserve", spy)
    return starts


def test_stores_fill_the_lease_first_and_a_lookup_right_after_sees_them(serve, monkeypatch) -> None:
    """The second store's chunks go into slots leased by the first store's reply, its reservation
    asks only for what the lease cannot hold, and its one-way report is served before the same
    thread's next lookup."""
    server = serve("auto")
    reserve_starts = spy_reserve_starts(server, monkeypatch)
    pool = shared_pool(seed=13)
    src, dst = pool[BLOCKS].clone(), list(range(20, 20 + len(BLOCKS)))
    with client_of(server) as client:
        client.register(pool, 0, 1, MODEL, TPB, pool_sharing="shared-l1")
        for round_ in range(20):
            tokens = list(range(round_ * 1000, round_ * 1000 + len(TOKENS)))
            assert client.store(BlockTransfer(tokens, None, BLOCKS, 0, len(tokens))) == len(tokens)
            assert client.lookup(tokens) == len(tokens)  # the one-way report came first
            pool[dst] = 0
            assert client.retrieve(BlockTransfer(tokens, None, dst, 0, len(tokens))) == len(tokens)
            assert torch.equal(pool[dst], src)
        (instance,) = client.stats().instances
        assert instance.leased_slots > 0
    assert reserve_starts[0] == 0 and set(reserve_starts[1:]) == {len(TOKENS)}  # later: top-ups only


def record_requests(monkeypatch) -> list[str]:
    """A list that gets the op of every request this process's clients send with a reply."""
    order: list[str] = []
    real_submit = LanePool.submit

    def submit(self, frame, rid, op, timeout):
        order.append(op)
        return real_submit(self, frame, rid, op, timeout)

    monkeypatch.setattr(LanePool, "submit", submit)
    return order


def test_a_leased_stores_first_copy_is_queued_before_its_reservation_is_sent(serve, monkeypatch) -> None:
    """A store whose chunks the lease holds queues its first copy before it sends its reservation (the
    copy engine starts while the request is framed and sent), and the rest after; bit-equal."""
    server = serve("auto")
    pool = shared_pool(seed=17)
    src, dst = pool[BLOCKS].clone(), list(range(20, 20 + len(BLOCKS)))
    order = record_requests(monkeypatch)
    real_add = SharedL1Copier.add

    def add(self, batch, slot, rows) -> None:
        order.append("copy")
        real_add(self, batch, slot, rows)

    monkeypatch.setattr(SharedL1Copier, "add", add)
    with client_of(server) as client:
        client.register(pool, 0, 1, MODEL, TPB, pool_sharing="shared-l1")
        for round_ in range(2):  # the first store's reply leases the second's slots
            order.clear()
            tokens = list(range(round_ * 1000, round_ * 1000 + len(TOKENS)))
            assert client.store(BlockTransfer(tokens, None, BLOCKS, 0, len(tokens))) == len(tokens)
        assert order == ["copy", "store_reserve", "copy"]
        assert client.retrieve(BlockTransfer(tokens, None, dst, 0, len(tokens))) == len(tokens)
        assert torch.equal(pool[dst], src)


@pytest.mark.parametrize(("sharing", "waits"), [("export", True), ("shared-l1", False)])
def test_a_store_after_an_event_waits_for_it_on_the_host_only_where_the_server_copies(
    serve, monkeypatch, sharing: str, waits: bool
) -> None:
    """``store(after=...)``: where the server copies (a CPU pool asked for ``export`` is shared as
    cpu-shm), the client waits for the event before it asks the server; where this process copies
    (shared-l1, ordered on the device for CUDA pools, synchronous for CPU ones) it never waits on it."""
    server = serve("auto")
    pool = shared_pool(seed=18)
    order = record_requests(monkeypatch)

    class ForwardDone:
        def synchronize(self) -> None:
            order.append("waited")

    with client_of(server) as client:
        client.register(pool, 0, 1, MODEL, TPB, pool_sharing=sharing)
        order.clear()
        after = EventStart(ForwardDone())
        assert client.store(BlockTransfer(TOKENS, None, BLOCKS, 0, len(TOKENS)), after=after) == len(TOKENS)
        assert client.lookup(TOKENS) == len(TOKENS)
    assert (order[:2] == ["waited", "store"]) == waits
    assert ("waited" in order) == waits


def test_a_transfers_report_is_framed_before_its_copies_are_waited_for(serve, monkeypatch) -> None:
    """A shared-L1 store frames its ``store_done`` (and a load its ``load_done``) while the copies
    still run: once they are done only the send is left; bit-equal."""
    server = serve("auto")
    pool = shared_pool(seed=19)
    src, dst = pool[BLOCKS].clone(), list(range(20, 20 + len(BLOCKS)))
    order: list[str] = []
    real_encode, real_send = framing.encode_request, LanePool.send
    real_wait, real_finish_load = SharedL1Copier.wait_stored, SharedL1Copier.finish_load

    def encode(req) -> bytes:
        order.append(f"framed {type(req).__struct_config__.tag}")
        return real_encode(req)

    def send(self, frame, op, timeout) -> None:
        order.append(f"sent {op}")
        real_send(self, frame, op, timeout)

    def wait_stored(self) -> None:
        order.append("copied")
        real_wait(self)

    def finish_load(self, *args, **kwargs):
        order.append("copied")
        return real_finish_load(self, *args, **kwargs)

    monkeypatch.setattr(framing, "encode_request", encode)
    monkeypatch.setattr(LanePool, "send", send)
    monkeypatch.setattr(SharedL1Copier, "wait_stored", wait_stored)
    monkeypatch.setattr(SharedL1Copier, "finish_load", finish_load)
    with client_of(server) as client:
        client.register(pool, 0, 1, MODEL, TPB, pool_sharing="shared-l1")
        order.clear()
        assert client.store(BlockTransfer(TOKENS, None, BLOCKS, 0, len(TOKENS))) == len(TOKENS)
        assert order[-3:] == ["framed store_done", "copied", "sent store_done"]
        order.clear()
        assert client.retrieve(BlockTransfer(TOKENS, None, dst, 0, len(TOKENS))) == len(TOKENS)
        assert order[-3:] == ["framed load_done", "copied", "sent load_done"]
    assert torch.equal(pool[dst], src)


def test_every_store_fills_a_lease_that_holds_exactly_one_store(serve, monkeypatch) -> None:
    """A store's reservation names the leases it fills, so its reply leases as many again: the next
    store needs no reservation before its copies, even when the lease holds no more than one store."""
    server = serve("auto")
    reserve_starts = spy_reserve_starts(server, monkeypatch)
    pool = shared_pool(seed=14)
    assert server.service.shared_l1 is not None
    server.service.shared_l1.max_lease_bytes = len(BLOCKS) * pool[0].numel() * pool.element_size()
    with client_of(server) as client:
        client.register(pool, 0, 1, MODEL, TPB, pool_sharing="shared-l1")
        for round_ in range(6):
            tokens = list(range(round_ * 1000, round_ * 1000 + len(TOKENS)))
            assert client.store(BlockTransfer(tokens, None, BLOCKS, 0, len(tokens))) == len(tokens)
            assert client.lookup(tokens) == len(tokens)
    assert reserve_starts == [0] + [len(TOKENS)] * 5


def test_the_pools_of_one_client_share_its_mappings_of_the_servers_slabs(serve, mapped) -> None:
    """Two pools (layer groups, regions) registered in the shared-L1 mode by one client map each of
    the server's slabs once between them, and both copy through them, bit-equal."""
    server = serve("auto")
    pools = [shared_pool(seed=15), shared_pool(seed=16)]
    with client_of(server) as client:
        infos = [client.register(pool, 0, 1, MODEL, TPB, pool_sharing="shared-l1") for pool in pools]
        ids = [info.instance_id for info in infos]
        copiers = [client.registrations.copier(iid) for iid in ids]
        assert copiers[0].slabs is copiers[1].slabs
        for round_, (iid, pool) in enumerate(zip(ids, pools, strict=True)):
            tokens = list(range(round_ * 1000, round_ * 1000 + len(TOKENS)))
            src, dst = pool[BLOCKS].clone(), list(range(20, 20 + len(BLOCKS)))
            stored = client.store(BlockTransfer(tokens, None, BLOCKS, 0, len(tokens)), instance_id=iid)
            assert stored == len(tokens)
            pool[dst] = 0
            loaded = client.retrieve(BlockTransfer(tokens, None, dst, 0, len(tokens)), instance_id=iid)
            assert loaded == len(tokens) and torch.equal(pool[dst], src)
        assert client.registrations.wait_slabs_mapped(30)
    assert mapped and len(mapped) == len(set(mapped))  # every slab mapped once, for both pools


def test_a_one_way_report_gets_no_reply_and_keeps_its_place_in_order(serve) -> None:
    server = serve("auto")
    url = f"tcp://127.0.0.1:{server.tcp_port}"
    bogus = P.StoreDone(instance_id=5, ticket=77, one_way=True, rid=1, auth=server_secret())
    stats = P.Stats(rid=2, auth=server_secret())
    errors = server.errors
    with connect(url) as sock:
        sock.sendall(framed(P.encode(bogus)) + framed(P.encode(stats)))
        reply = read_reply(sock)  # the first reply on the connection is the stats one
        assert reply.rid == 2 and reply.ok
        assert server.errors == errors + 1  # the failed report was counted (and logged), not answered


def test_a_shared_l1_load_runs_on_the_io_thread_without_lower_tiers(serve, monkeypatch) -> None:
    server = serve("auto")
    shared = server.service.shared_l1
    assert shared is not None
    threads: list[int] = []
    real_load = shared.load

    def load(scope, req, send_part=None):  # type: ignore[no-untyped-def]
        threads.append(threading.get_ident())
        return real_load(scope, req, send_part)

    monkeypatch.setattr(shared, "load", load)
    with client_of(server) as client:
        client.register(shared_pool(seed=14), 0, 1, MODEL, TPB, pool_sharing="shared-l1")
        assert client.store(BlockTransfer(TOKENS, None, BLOCKS, 0, len(TOKENS))) == len(TOKENS)
        # Answered after the store's one-way report (same connection): nothing of it is running now.
        assert client.lookup(TOKENS) == len(TOKENS)
        dst = list(range(20, 20 + len(BLOCKS)))
        assert client.retrieve(BlockTransfer(TOKENS, None, dst, 0, len(TOKENS))) == len(TOKENS)
    assert threads == [server.io_thread]  # no hand-off to a worker: pins and slot names only


def test_a_loads_first_part_leaves_before_the_server_names_the_rest(serve, monkeypatch) -> None:
    """Served on the I/O thread, the first part must still go out at once: the handler below waits
    until the client has read it."""
    server = serve("auto")
    shared = server.service.shared_l1
    assert shared is not None
    part_read = threading.Event()
    real_load = shared.load

    def load(scope, req, send_part=None):  # type: ignore[no-untyped-def]
        def send_then_wait(part):  # type: ignore[no-untyped-def]
            send_part(part)
            assert part_read.wait(20), "the first part did not reach the client while the load ran"

        return real_load(scope, req, send_then_wait)

    monkeypatch.setattr(shared, "load", load)
    with client_of(server) as client:
        cap = client.register(shared_pool(seed=15), 0, 1, MODEL, TPB, pool_sharing="shared-l1").cap
        assert client.store(BlockTransfer(TOKENS, None, BLOCKS, 0, len(TOKENS))) == len(TOKENS)
        assert client.lookup(TOKENS) == len(TOKENS)
        req = P.Load(
            rid=9, instance_id=client.instance_id, tokens=TOKENS, end=len(TOKENS), first=1, cap=cap,
            auth=server_secret(),
        )  # fmt: skip
        with connect(f"tcp://127.0.0.1:{server.tcp_port}") as sock:
            sock.sendall(framed(P.encode(req)))
            first = read_reply(sock)
            part_read.set()
            rest = read_reply(sock)
        assert first.more and not rest.more and first.rid == rest.rid == 9
        assert first.value["ticket"] == rest.value["ticket"] != 0


def test_a_plain_call_refuses_a_reply_in_parts_and_frees_its_lane(serve) -> None:
    server = serve("auto")
    with client_of(server) as client:
        client.register(shared_pool(seed=16), 0, 1, MODEL, TPB, pool_sharing="shared-l1")
        assert client.store(BlockTransfer(TOKENS, None, BLOCKS, 0, len(TOKENS))) == len(TOKENS)
        load = P.Load(instance_id=client.instance_id, tokens=TOKENS, end=len(TOKENS), first=1)
        with pytest.raises(ServerUnavailable, match="answered in parts"):
            client.call(load, P.LoadSlots)
        lanes = client.lanes.lanes
        assert client.lookup(TOKENS) == len(TOKENS)  # the client goes on, on a fresh lane
        assert client.lanes.lanes <= lanes + 1


def test_a_bad_block_list_is_refused_before_the_server_reserves_or_pins_anything(serve) -> None:
    server = serve("auto")
    with client_of(server) as client:
        client.register(shared_pool(seed=17), 0, 1, MODEL, TPB, pool_sharing="shared-l1")
        with pytest.raises(ValueError, match=f"{len(BLOCKS) - 1} block ids cannot hold {len(TOKENS)} tokens"):
            client.store(BlockTransfer(TOKENS, None, BLOCKS[:-1], 0, len(TOKENS)))
        with pytest.raises(IndexError, match="block ids must be in"):
            client.store(BlockTransfer(TOKENS, None, [-1, *BLOCKS[1:]], 0, len(TOKENS)))
        stats = client.stats()
        assert stats.engine.l1.used_bytes == 0  # no slot reserved, not even a lease
        assert client.store(BlockTransfer(TOKENS, None, BLOCKS, 0, len(TOKENS))) == len(TOKENS)
        with pytest.raises(ValueError, match="block ids cannot hold"):
            client.retrieve(BlockTransfer(TOKENS, None, BLOCKS[:2], 0, len(TOKENS)))
        assert client.stats().engine.l1.pinned_chunks == 0


def test_a_report_received_before_a_clean_stop_is_carried_out(workdir) -> None:
    """A store's one-way report that reached the server before it was asked to stop publishes the
    store (the worker counted it as saved): the stop serves what it received first."""
    ipc_path = str(workdir / "s.sock")  # a Unix socket: the report is in the server's buffer once sent
    server, thread = start_serving("shared-l1", ipc_path)
    pool = shared_pool(seed=17)
    try:
        with CacheServerClient(f"ipc://{ipc_path}", timeout_s=20.0) as client:
            client.register(pool, 0, 1, MODEL, TPB, pool_sharing="shared-l1")
            assert client.store(BlockTransfer(TOKENS, None, BLOCKS, 0, len(TOKENS))) == len(TOKENS)
            stop_serving(server, thread)  # the report may still be unread in the server's socket buffer
    finally:
        stop_serving(server, thread)
    assert server.service.engine.l1.snapshot().chunks == len(TOKENS) // CHUNK


def test_a_one_way_report_queued_at_a_stop_still_runs(monkeypatch) -> None:
    """Once the server stops, requests still queued are refused (``shutting_down``) but one-way
    reports, which finish what the client already did."""
    server, thread = start_serving("auto")
    url = f"tcp://127.0.0.1:{server.tcp_port}"
    engine = server.service.engine
    real_clear = engine.clear
    monkeypatch.setattr(engine, "clear", lambda: server.dispatcher.stopping.wait(30) and real_clear())
    executed: list[type] = []
    real_execute = server.dispatcher.execute

    def spy(req, received, call):  # type: ignore[no-untyped-def]
        executed.append(type(req))
        return real_execute(req, received, call)

    monkeypatch.setattr(server.dispatcher, "execute", spy)
    clear = P.Clear(rid=1, auth=server_secret())  # runs on a worker until the stop: the rest queues
    report = P.StoreDone(instance_id=5, ticket=77, one_way=True, rid=2, auth=server_secret())
    lookup = P.Lookup(rid=3, auth=server_secret(), instance_id=5, tokens=P.tokens_to_bytes(TOKENS))
    try:
        with connect(url) as sock:
            sock.sendall(framed(P.encode(clear)) + framed(P.encode(report)) + framed(P.encode(lookup)))
            wait_until(lambda: server.dispatcher.waiting() == 2, "the report and the lookup queued")
            stop_serving(server, thread)
    finally:
        stop_serving(server, thread)
    assert executed == [P.Clear, P.StoreDone]  # the lookup was refused, the report ran


def test_a_server_restarted_in_a_mode_the_pool_cannot_use_is_a_bad_pool_not_a_crash(tmp_path) -> None:
    """The scheduler's lookup re-registers after a restart; a pool the new server's forced mode cannot
    share (a CPU pool outside shared memory, where the server now exports) answers ``BadPool``, a
    ``ServerError`` the adapters take as "no cache", never a ``PoolSharingError`` out of TRT-LLM's call."""
    path = str(tmp_path / "s.sock")
    server, thread = start_serving("auto", ipc_path=path)
    client = CacheServerClient(f"ipc://{path}", timeout_s=5.0, heartbeat_interval_s=0)
    try:
        assert (
            client.register(torch.zeros(POOL_SHAPE), 0, 1, MODEL, TPB, pool_sharing="auto").sharing
            == "shared-l1"
        )
        stop_serving(server, thread)
        server, thread = start_serving("export", ipc_path=path)
        with pytest.raises(BadPool, match="--pool-sharing auto"):
            client.lookup(list(range(3000, 3000 + 2 * CHUNK)))
    finally:
        client.close(unregister=False)
        stop_serving(server, thread)
