"""Lookups claimed through the server's shared memory (:mod:`lmcache.server.claims`): the index follows
L1, a claimed chunk is never evicted until its claim is given back, claims stop at a missing chunk, at
a chunk of a rank missing, and at one being stored; slots name the chunks' bytes; the regions are
private; an instance's claims stop holding when it goes or holds more than its share. Through a
server: a pinned lookup claims its hit with no call, the load brings the bytes back, a save reported
done is seen by the next claimed lookup, a claimed lookup arriving after its load or its release
leaves no pin,
nobody without the instance's capability gives its claims back, and a lookup reported later goes out
before the client's next request (or gives its claims back when it cannot)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from in_process_server import client_of, start_serving, stop_serving
from raw_lane import exchange

from lmcache.keys import ChunkKey
from lmcache.memory import HostArena, SlabSource
from lmcache.server import claims as C
from lmcache.server import protocol as P
from lmcache.server.client import CacheServerClient, ServerUnavailable
from lmcache.server.client_lanes import LanePool
from lmcache.server.server import CacheServer
from lmcache.shm_slabs import ShmSlabInfo, ShmSlabSource, creator_alive, open_region
from lmcache.storage.cpu_store import CpuStore
from lmcache.transfer import BlockTransfer

pytestmark = pytest.mark.skipif(not C.available(), reason="lmcache._claims is not built")

ENTRIES = 1 << 8
DIGEST = 32


def digest(n: int) -> bytes:
    return n.to_bytes(8, "little") + bytes(DIGEST - 8)


def key(n: int, rank: int = 0, world: int = 1) -> ChunkKey:
    return ChunkKey(digest(n), world, rank)


class Rig:
    """An L1 of ``chunks`` 64-byte slots, its claim index in ``tmp_path``, and one instance's view."""

    def __init__(self, tmp_path: Path, chunks: int) -> None:
        self.store = CpuStore(HostArena(64 * chunks, source=SlabSource(False)), "LRU")
        self.index = C.ClaimIndex(ShmSlabSource(shm_dir=str(tmp_path)), ENTRIES)
        self.store.observe(self.index)
        self.store.guard(self.index)
        self.regions = self.index.regions(7)
        view = C.ClaimView.map(self.regions, shm_dir=str(tmp_path))
        assert view is not None
        self.view = view

    def put(self, k: ChunkKey) -> None:
        assert self.store.reserve(k, 64, 16) is not None
        self.store.commit(k)

    def claim(self, *ns: int, world: int = 1) -> tuple[int, bytes, bool]:
        return self.view.claim(b"".join(digest(n) for n in ns), DIGEST, world, range(world))


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    made = Rig(tmp_path, 2)
    yield made
    made.index.close()


def test_a_claimed_chunk_is_never_evicted_until_its_claim_is_given_back(rig: Rig) -> None:
    rig.put(key(1))
    rig.put(key(2))
    chunks, entries, pending = rig.claim(1)
    assert (chunks, pending) == (1, False)
    rig.put(key(3))  # L1 holds two: key(1), least recently used, is claimed, so key(2) goes
    assert key(1) in rig.store and key(2) not in rig.store
    assert rig.index.release(7, entries) == 1
    rig.put(key(4))  # key(3) is the least recently used now (a refused victim counts as used)
    rig.put(key(5))
    assert key(1) not in rig.store
    assert rig.claim(1)[0] == 0  # gone from the index with it


def test_claims_stop_at_a_missing_chunk_and_at_a_rank_missing(rig: Rig) -> None:
    rig.put(key(1, 0, 2))
    rig.put(key(1, 1, 2))
    chunks, entries, _ = rig.claim(1, 2, world=2)
    assert chunks == 1 and len(entries) == 2 * 4  # both ranks' keys of the first chunk
    rig.index.release(7, entries)
    rig.store.clear()
    rig.put(key(3, 0, 2))  # the second rank's key is missing: no whole chunk
    assert rig.claim(3, world=2)[:2] == (0, b"")


def test_a_chunk_being_stored_sends_the_lookup_to_the_server(rig: Rig) -> None:
    rig.put(key(1))
    rig.index.storing(7, digest(2), DIGEST, 1, 0, 0.0)
    assert rig.claim(1, 2)[::2] == (1, True)  # stopped at a chunk only the server can place in order
    rig.index.release(7, rig.claim(1)[1])
    rig.put(key(2))  # published: the mark becomes the chunk's entry
    chunks, entries, pending = rig.claim(1, 2)
    assert (chunks, pending) == (2, False)
    rig.index.release(7, entries)
    rig.index.storing(7, digest(9), DIGEST, 1, 0, 0.0)
    rig.index.expire(C.PENDING_S + 1)  # never published: the mark goes
    assert rig.claim(9)[::2] == (0, False)


def test_one_client_marks_at_most_its_share_of_the_index(rig: Rig) -> None:
    rig.index.max_marks = 2
    rig.index.storing("u7", digest(1) + digest(2) + digest(3), DIGEST, 1, 0, 0.0)
    assert rig.claim(2)[::2] == (0, True)  # marked
    assert rig.claim(3)[::2] == (0, False)  # past the client's marks: a plain miss
    rig.index.storing("u8", digest(3), DIGEST, 1, 0, 0.0)  # another client has room of its own
    assert rig.claim(3)[::2] == (0, True)
    rig.put(key(1))  # published: its mark goes, and with it one of client u7's
    rig.index.storing("u7", digest(4), DIGEST, 1, 0, 0.0)
    assert rig.claim(4)[::2] == (0, True)


def test_claimed_slots_name_the_chunks_bytes(rig: Rig) -> None:
    rig.put(key(1, 0, 2))
    rig.put(key(1, 1, 2))
    _, entries, _ = rig.claim(1, world=2)
    for rank in (0, 1):
        chunk = rig.store.get(key(1, rank, 2))
        assert chunk is not None
        ref = chunk.buffer.ref
        assert rig.view.slots(entries, 2, rank) == [
            P.SlotInfo(ref.slab, ref.offset, ref.nbytes, chunk.serial)
        ]


def test_the_regions_are_private_and_the_index_read_only(rig: Rig, tmp_path: Path) -> None:
    for region in (rig.regions.index, rig.regions.claims):
        assert stat.S_IMODE(os.stat(tmp_path / region.name).st_mode) == 0o600
    info = rig.regions.index
    mapping = open_region(ShmSlabInfo(0, info.name, info.nbytes), writable=False, shm_dir=str(tmp_path))
    with pytest.raises(TypeError):
        mapping[0] = 1
    bad = P.ClaimRegions(index=info, claims=P.RegionInfo(name=rig.regions.claims.name, nbytes=12))
    assert C.ClaimView.map(bad, shm_dir=str(tmp_path)) is None  # sizes that do not match: no claims


def test_the_index_of_a_server_gone_answers_nothing(rig: Rig, tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    name = rig.regions.index.name
    assert creator_alive(name)
    assert not creator_alive(name.replace(f"-{os.getpid()}-", f"-{dead.pid}-", 1))
    rig.put(key(1))
    index, claims = (
        np.frombuffer(
            open_region(ShmSlabInfo(0, r.name, r.nbytes), writable=w, shm_dir=str(tmp_path)), dtype=t
        )
        for r, w, t in ((rig.regions.index, False, "<u8"), (rig.regions.claims, True, "<u4"))
    )
    gone = C.ClaimView(rig.regions, index, claims, lambda: False)  # as mapped after its server died
    assert gone.claim(digest(1), DIGEST, 1, [0]) == (0, b"", True)  # the lookup asks the (new) server
    assert rig.claim(1)[::2] == (1, False)


def test_claims_of_a_gone_or_greedy_instance_hold_nothing(rig: Rig) -> None:
    rig.put(key(1))
    rig.put(key(2))
    rig.claim(1, 2)
    rig.index.check_shares({7: 64}, share_bytes=64)  # two chunks claimed, one chunk's share
    rig.put(key(3))
    assert key(1) not in rig.store
    other = rig.index.regions(8)
    assert other.claims != rig.regions.claims
    rig.index.forget(7)
    rig.index.forget(8)
    assert rig.index.release(7, b"\0\0\0\0") == 0


# ---- through a server ---------------------------------------------------------------------------

TPB = 8
MODEL = "test/claims"


Served = tuple[CacheServer, CacheServerClient, str]


@pytest.fixture(params=["shared-l1", "export"])
def served(request: pytest.FixtureRequest) -> Iterator[Served]:
    server, thread = start_serving(request.param)
    client = client_of(server)
    try:
        yield server, client, request.param
    finally:
        client.close()
        stop_serving(server, thread)


def pool(seed: int) -> torch.Tensor:
    made = torch.randn(64, 2, 2, 16 * TPB, generator=torch.Generator().manual_seed(seed))
    return made.share_memory_()


def test_a_pinned_lookup_claims_its_hit_with_no_call_and_loads_it(served: Served) -> None:
    _, client, mode = served
    source = pool(1)
    client.register(source, 0, 1, MODEL, TPB, pool_sharing=mode)
    tokens = list(range(1000, 1000 + 16 * TPB))
    assert client.store(BlockTransfer(tokens, None, list(range(16)), 0, len(tokens))) == len(tokens)
    hashes = client.chunk_hashes(tokens)
    # A shared-L1 store is published once the server reads its report (a claim meanwhile asks the
    # server): a plain lookup, a call, is answered after that.
    assert client.lookup(tokens) == len(tokens)
    before = client.lanes.calls
    assert client.lookup(tokens, pin_id="r", chunk_hashes=hashes) == len(tokens)
    assert client.lanes.calls == before  # answered here: no call waited for the server
    target = list(range(40, 56))
    assert client.retrieve(BlockTransfer(hashes, None, target, 0, len(tokens)), pin_id="r") == len(tokens)
    assert torch.equal(source[target], source[:16])


def test_a_save_reported_done_is_seen_by_the_next_claimed_lookup(served: Served) -> None:
    _, client, mode = served
    client.register(pool(2), 0, 1, MODEL, TPB, pool_sharing=mode)
    for i in range(20):
        tokens = list(range(10_000 * (i + 1), 10_000 * (i + 1) + 8 * TPB))
        assert client.store(BlockTransfer(tokens, None, list(range(8)), 0, len(tokens))) == len(tokens)
        assert client.lookup(tokens, pin_id=f"p{i}", chunk_hashes=client.chunk_hashes(tokens)) == len(tokens)
        client.release(f"p{i}")


class Stored:
    """A prompt of four chunks stored and published through ``served``'s client, and its hashes."""

    def __init__(self, served: Served, seed: int) -> None:
        self.server, self.client, mode = served
        self.iid = self.client.register(pool(seed), 0, 1, MODEL, TPB, pool_sharing=mode).instance_id
        self.tokens = list(range(1000 * seed, 1000 * seed + 4 * TPB))
        self.client.store(BlockTransfer(self.tokens, None, list(range(4)), 0, len(self.tokens)))
        assert self.client.lookup(self.tokens) == len(self.tokens)  # published (see above)
        hashes = self.client.chunk_hashes(self.tokens)
        assert hashes is not None and self.server.claims is not None
        self.hashes = hashes

    def claim(self, pin_id: str) -> bytes:
        """Claim the whole prompt here, as a lookup would; the entries claimed."""
        claimed = self.client.registrations.claim(self.iid, self.hashes.digests, pin_id=pin_id)
        assert claimed is not None and claimed.tokens == len(self.tokens)
        return claimed.entries

    def send_lookup(self, entries: bytes, **fields: Any) -> P.Reply:
        """The claimed lookup of the prompt sent on a connection of its own; the server's reply."""
        req = P.LookupHashes(
            rid=1,
            auth=self.client.credentials.secret(),
            instance_id=self.iid,
            chunk_hashes=self.hashes.digests,
            num_tokens=len(self.tokens),
            claims=entries,
            **fields,
        )
        return exchange(f"tcp://127.0.0.1:{self.server.tcp_port}", P.encode(req))


def test_nobody_without_the_capability_gives_an_instances_claims_back(served: Served) -> None:
    stored = Stored(served, 7)
    server, iid = stored.server, stored.iid
    entries = stored.claim("x")
    reply = stored.send_lookup(entries, cap=b"x" * 32)
    assert not reply.ok and reply.error is not None and reply.error.code == P.ErrorCode.UNKNOWN_INSTANCE
    assert server.claims is not None
    held = len(entries) // 4
    registration = server.service.instances.get(iid).registration
    assert held and server.claims.release(registration, entries) == held  # every claim was still held


def test_a_claimed_lookup_arriving_after_its_load_leaves_no_pin(served: Served) -> None:
    """The one-way lookup can reach the server after the load it answered (another connection served
    first): its pins go at once instead of lingering until the TTL; a later lookup under the same pin
    id (claimed after that load) pins as usual."""
    stored = Stored(served, 8)
    server, client, iid, key = stored.server, stored.client, stored.iid, (stored.iid, "late")
    assert server.claims is not None
    cap = client.registrations.cap(iid)
    claimed_at = time.monotonic()
    entries = stored.claim("late")
    transfer = BlockTransfer(stored.hashes, None, list(range(20, 24)), 0, len(stored.tokens))
    assert client.retrieve(transfer, pin_id="late") == len(stored.tokens)
    # The load counts once its after-reply work ran: a call on its lane (not a ping, which skips the
    # queue) is served after that.
    client.stats()
    reply = stored.send_lookup(entries, pin_id="late", claimed_at=claimed_at, cap=cap)
    assert reply.ok and reply.value == len(stored.tokens)
    assert server.service.pins.get(key) is None and key not in server.engine.pinned_ids()
    registration = server.service.instances.get(iid).registration
    assert server.claims.release(registration, entries) == 0  # the lookup gave its claims back

    again = stored.claim("late")
    reply = stored.send_lookup(again, pin_id="late", claimed_at=time.monotonic(), cap=cap)
    assert reply.ok and reply.value == len(stored.tokens)  # claimed after the load: a lookup of its own
    assert server.service.pins.get(key) is not None and key in server.engine.pinned_ids()
    assert client.release("late")


def test_one_client_marks_at_most_its_share_however_many_instances_it_registers() -> None:
    """The marks of stores in flight are charged to the client (its uid or TCP address), not to each
    instance: registering more instances cannot fill the index and make other tenants' claims miss."""
    server, thread = start_serving("shared-l1")
    client = client_of(server)
    try:
        assert server.claims is not None
        first = client.register(pool(11), 0, 1, MODEL, TPB, pool_sharing="shared-l1").instance_id
        second = client.register(pool(12), 0, 1, MODEL, TPB, pool_sharing="shared-l1").instance_id
        server.claims.max_marks = 2
        chunk = server.engine.config.chunk_size

        def reserve(iid: int, digests: bytes) -> None:
            req = P.StoreReserve(
                rid=1,
                auth=client.credentials.secret(),
                instance_id=iid,
                tokens=b"",
                chunk_hashes=digests,
                end=len(digests) // DIGEST * chunk,
                cap=client.registrations.cap(iid),
            )
            assert exchange(f"tcp://127.0.0.1:{server.tcp_port}", P.encode(req)).ok

        reserve(first, digest(101) + digest(102))  # the client's two marks
        reserve(second, digest(103))  # another instance of the same client: no mark left
        marked = client.registrations.claim(first, digest(102), pin_id="a")
        assert marked is None  # being stored: the lookup asks the server
        unmarked = client.registrations.claim(second, digest(103), pin_id="b")
        assert unmarked is not None and unmarked.tokens == 0  # a plain miss: not marked
    finally:
        client.close()
        stop_serving(server, thread)


def test_a_registration_made_while_the_reaper_retires_its_ids_last_one_keeps_its_claim_table(
    served: Served,
) -> None:
    """The reaper takes an instance out of the table, the client registers the id again at once (told
    it is unknown), then the reaper retires the old registration: the new one's claim table, which the
    client has mapped and claims in, stays the index's (else its claims would hold nothing)."""
    server, client, mode = served
    source = pool(9)
    info = client.register(source, 0, 1, MODEL, TPB, pool_sharing=mode)
    [old] = server.service.instances.pop_silent(time.monotonic() + 10_000, 1.0)  # the reaper's first step
    again = client.register(source, 0, 1, MODEL, TPB, pool_sharing=mode, instance_id=info.instance_id)
    server.service.instances.retire(old, "reaped")  # its second
    assert server.claims is not None and again.claims is not None
    registration = server.service.instances.get(info.instance_id).registration
    assert server.claims.regions(registration).claims == again.claims.claims


def test_a_claimed_lookup_arriving_after_its_release_leaves_no_pin(served: Served) -> None:
    """The report may go out on the heartbeat's connection while the scheduler's release goes on its
    own, and be served after it: its pins go at once instead of lingering until the TTL."""
    stored = Stored(served, 9)
    server, client, iid, key = stored.server, stored.client, stored.iid, (stored.iid, "gone")
    assert server.claims is not None
    cap = client.registrations.cap(iid)
    claimed_at = time.monotonic()
    entries = stored.claim("gone")
    release = P.Release(rid=1, auth=client.credentials.secret(), instance_id=iid, cap=cap, pin_id="gone")
    released = exchange(f"tcp://127.0.0.1:{server.tcp_port}", P.encode(release))
    assert released.ok and released.value is False  # nothing to release yet
    reply = stored.send_lookup(entries, pin_id="gone", claimed_at=claimed_at, cap=cap)
    assert reply.ok and reply.value == len(stored.tokens)
    assert server.service.pins.get(key) is None and key not in server.engine.pinned_ids()
    registration = server.service.instances.get(iid).registration
    assert server.claims.release(registration, entries) == 0  # the lookup gave its claims back


# ---- lookups reported later ---------------------------------------------------------------------


class Recorded:
    """A client of ``served``'s server (no heartbeat, which would report on its own), a prompt of eight
    chunks stored through it, and the ops its lanes send in order: ``("one-way", op)`` or ``("call", op)``."""

    def __init__(self, served: Served, seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
        self.server, _, mode = served
        url = f"tcp://127.0.0.1:{self.server.tcp_port}"
        self.client = CacheServerClient(url, timeout_s=20.0, heartbeat_interval_s=0)
        self.source = pool(seed)
        self.iid = self.client.register(self.source, 0, 1, MODEL, TPB, pool_sharing=mode).instance_id
        self.tokens = list(range(1000 * seed, 1000 * seed + 8 * TPB))
        stored = self.client.store(BlockTransfer(self.tokens, None, list(range(8)), 0, len(self.tokens)))
        assert stored == len(self.tokens)
        assert self.client.lookup(self.tokens) == len(self.tokens)  # published (see above)
        hashes = self.client.chunk_hashes(self.tokens)
        assert hashes is not None
        self.hashes = hashes
        self.sent: list[tuple[str, str]] = []
        lanes = self.client.lanes
        send_all, submit = LanePool.send_all, lanes.submit

        def one_way(pool: LanePool, frames: Sequence[bytes], op: str, timeout: float) -> None:
            if pool is lanes:
                self.sent.extend([("one-way", op)] * len(frames))
            send_all(pool, frames, op, timeout)

        def call(payload: Any, rid: int, op: str, timeout: float) -> Any:
            self.sent.append(("call", op))
            return submit(payload, rid, op, timeout)

        monkeypatch.setattr(LanePool, "send_all", one_way)
        monkeypatch.setattr(lanes, "submit", call)

    def look_up_later(self, pin_id: str) -> None:
        found = self.client.lookup(self.tokens, pin_id=pin_id, chunk_hashes=self.hashes, report_later=True)
        assert found == len(self.tokens)

    def pinned(self, pin_id: str) -> bool:
        return self.server.service.pins.get((self.iid, pin_id)) is not None


def test_a_lookup_reported_later_is_sent_by_claimed_report_or_before_the_next_request(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``report_later``: the hit is claimed and nothing is sent; the report goes out at
    ``claimed.report()``, or before the client's next request, which the server then serves after it."""
    rec = Recorded(served, 21, monkeypatch)
    rec.look_up_later("a")
    rec.look_up_later("b")
    assert rec.sent == []  # claimed here, reported later
    rec.client.claimed.report()
    assert rec.sent == [("one-way", "lookup_hashes")] * 2
    rec.client.claimed.report()  # nothing left to report
    assert len(rec.sent) == 2

    rec.look_up_later("c")
    rec.client.stats()  # the next request: the report goes first, on this thread's lane
    assert rec.sent[2:] == [("one-way", "lookup_hashes"), ("call", "stats")]
    assert rec.pinned("a") and rec.pinned("b") and rec.pinned("c")

    rec.look_up_later("d")
    assert rec.client.release("d")  # released after its report: no pin left behind
    assert rec.sent[4:] == [("one-way", "lookup_hashes"), ("call", "release")]
    rec.client.stats()
    assert not rec.pinned("d")

    target = list(range(40, 48))  # a hit reported later loads as any other
    transfer = BlockTransfer(rec.hashes, None, target, 0, len(rec.tokens))
    assert rec.client.retrieve(transfer, pin_id="a") == len(rec.tokens)
    assert torch.equal(rec.source[target], rec.source[:8])
    rec.client.close()


def test_a_report_the_server_cannot_take_gives_its_claims_back_and_raises_nothing(
    served: Served, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    rec = Recorded(served, 22, monkeypatch)
    registrations = rec.client.registrations
    unclaim, given_back = registrations.unclaim, []

    def recorded_unclaim(instance_id: int, entries: bytes) -> None:
        given_back.append(entries)
        unclaim(instance_id, entries)

    monkeypatch.setattr(registrations, "unclaim", recorded_unclaim)

    def refused(pool: LanePool, frames: Sequence[bytes], op: str, timeout: float) -> None:
        raise ServerUnavailable(f"{op}: the server is gone")

    rec.look_up_later("a")
    with monkeypatch.context() as patched:
        patched.setattr(LanePool, "send_all", refused)
        rec.client.claimed.report()  # inside TRT-LLM's scheduler: never raises
    assert "could not be reported" in caplog.text
    [entries] = given_back
    assert rec.server.claims is not None
    registration = rec.server.service.instances.get(rec.iid).registration
    assert entries and rec.server.claims.release(registration, entries) == 0  # none still held
    rec.client.stats()
    assert not rec.pinned("a")
    rec.client.close()
