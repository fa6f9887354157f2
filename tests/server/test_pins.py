"""The server's pin table: a claimed lookup arriving after a rank's load counts that rank as done, a
lookup claimed after the load does not; one arriving after its release is not entered; the loads and
releases remembered are bounded and expire."""

from __future__ import annotations

import pytest

from lmcache.server import pins as pins_module
from lmcache.server.pins import PinRecord, PinTable

SHARE = 1 << 30


def test_a_late_claimed_lookup_counts_the_ranks_that_loaded_since_its_claim() -> None:
    table = PinTable()
    assert not table.rank_done((1, "r"), 0, now=10.0)  # rank 0 loaded before the lookup arrived
    record = PinRecord(world_size=2, created=11.0, nbytes=100)
    assert table.replace((1, "r"), record, SHARE, claimed_at=9.0) == (0, False)
    assert record.done == {0} and table.get((1, "r")) is record  # rank 1 has yet to load
    assert table.rank_done((1, "r"), 1, now=12.0)  # the last rank: the record goes
    assert table.get((1, "r")) is None


def test_a_record_every_rank_is_done_with_is_not_entered() -> None:
    table = PinTable()
    table.rank_done((1, "r"), 0, now=10.0)
    record = PinRecord(world_size=1, created=11.0, nbytes=100)
    table.replace((1, "r"), record, SHARE, claimed_at=9.0)
    assert record.done == {0} and table.get((1, "r")) is None and len(table) == 0


def test_loads_before_the_claim_or_for_an_unclaimed_lookup_count_nothing() -> None:
    table = PinTable()
    table.rank_done((1, "r"), 0, now=10.0)
    record = PinRecord(world_size=1, created=11.0, nbytes=100)
    table.replace((1, "r"), record, SHARE, claimed_at=10.5)  # claimed after that load: its own
    assert record.done == set() and table.get((1, "r")) is record
    table.pop((1, "r"), now=12.0)
    table.rank_done((1, "s"), 0, now=10.0)
    plain = PinRecord(world_size=1, created=11.0, nbytes=100)
    table.replace((1, "s"), plain, SHARE)  # a round-trip lookup: answered before any of its loads
    assert plain.done == set() and table.get((1, "s")) is plain


def test_a_claimed_lookup_released_before_it_arrived_is_not_entered() -> None:
    """The report may travel on the heartbeat's connection while the release goes on the scheduler's:
    a release served first must not leave the late lookup's pins for the TTL to drop."""
    table = PinTable()
    assert not table.pop((1, "r"), now=10.0)  # released before its lookup arrived
    record = PinRecord(world_size=2, created=11.0, nbytes=100)
    assert table.replace((1, "r"), record, SHARE, claimed_at=9.0) == (0, False)
    assert record.done == {0, 1} and table.get((1, "r")) is None and len(table) == 0
    assert table.replace((1, "probe"), None, SHARE)[0] == 0  # it holds no bytes either
    table.pop((1, "s"), now=10.0)
    again = PinRecord(world_size=1, created=11.0, nbytes=100)
    table.replace((1, "s"), again, SHARE, claimed_at=10.5)  # claimed after the release: a new lookup
    assert again.done == set() and table.get((1, "s")) is again
    table.pop((1, "t"), now=10.0)
    plain = PinRecord(world_size=1, created=11.0, nbytes=100)
    table.replace((1, "t"), plain, SHARE)  # a round-trip lookup: answered before its release was sent
    assert table.get((1, "t")) is plain


def test_releases_remembered_are_bounded_expire_and_go_with_their_owner(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pins_module, "MAX_EARLY", 2)
    table = PinTable()
    for i in range(3):
        table.pop((1, i), now=float(i))
    table.pop((2, 0), now=3.0)
    pushed_out = PinRecord(world_size=1, created=7.0, nbytes=1)
    table.replace((1, 1), pushed_out, SHARE, claimed_at=-1.0)
    assert table.get((1, 1)) is pushed_out
    table.pop_owner(2)
    retired = PinRecord(world_size=1, created=7.0, nbytes=1)
    table.replace((2, 0), retired, SHARE, claimed_at=-1.0)
    assert table.get((2, 0)) is retired
    table.pop_stale(now=100.0, ttl=10.0)
    expired = PinRecord(world_size=1, created=100.0, nbytes=1)
    table.replace((1, 2), expired, SHARE, claimed_at=-1.0)
    assert table.get((1, 2)) is expired


def test_loads_remembered_are_bounded_and_expire(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pins_module, "MAX_EARLY", 4)
    table = PinTable()
    for i in range(6):
        table.rank_done((1, i), 0, now=float(i))
    oldest = PinRecord(world_size=1, created=7.0, nbytes=1)
    table.replace((1, 0), oldest, SHARE, claimed_at=-1.0)
    assert oldest.done == set()  # pushed out by the newer ones
    newest = PinRecord(world_size=1, created=7.0, nbytes=1)
    table.replace((1, 5), newest, SHARE, claimed_at=-1.0)
    assert newest.done == {0}
    table.pop_stale(now=100.0, ttl=10.0)  # every remembered load is older than the TTL
    late = PinRecord(world_size=1, created=100.0, nbytes=1)
    table.replace((1, 4), late, SHARE, claimed_at=-1.0)
    assert late.done == set()


def test_each_owners_pinned_bytes_follow_every_way_a_record_goes() -> None:
    """A lookup is refused once its owner's records would hold more than the share: the bytes counted
    must follow each record entered, replaced, loaded by every rank, released, expired or retired."""
    table = PinTable()

    def held(owner: int) -> int:
        return table.replace((owner, "probe"), None, SHARE)[0]

    table.replace((1, "a"), PinRecord(world_size=2, created=0.0, nbytes=100), SHARE)
    table.replace((1, "b"), PinRecord(world_size=1, created=5.0, nbytes=30), SHARE)
    table.replace((2, "a"), PinRecord(world_size=1, created=0.0, nbytes=7), SHARE)
    assert (held(1), held(2)) == (130, 7)
    table.replace((1, "b"), PinRecord(world_size=1, created=5.0, nbytes=40), SHARE)  # the same id again
    assert held(1) == 140
    assert table.replace((1, "c"), PinRecord(world_size=1, created=5.0, nbytes=SHARE), SHARE) == (140, True)
    assert held(1) == 140  # refused: not counted
    assert not table.rank_done((1, "a"), 0, now=1.0) and held(1) == 140
    assert table.rank_done((1, "a"), 1, now=1.0) and held(1) == 40
    assert table.pop_stale(now=4.0, ttl=3.0) == [(2, "a")] and held(2) == 0
    assert table.pop((1, "b"), now=6.0) and held(1) == 0
    table.replace((1, "d"), PinRecord(world_size=1, created=5.0, nbytes=9), SHARE)
    assert table.pop_owner(1) == [(1, "d")] and held(1) == 0
    assert table.replace((1, "e"), PinRecord(world_size=1, created=5.0, nbytes=SHARE), SHARE) == (0, False)


def test_the_instances_of_one_client_share_one_cap() -> None:
    """Registering more instances does not multiply a client's pins: their records together stay within
    the client's share, whoever else pins, and the bytes counted go with every record."""
    table = PinTable()
    client_share = 250

    def enter(owner: int, pin: str, nbytes: int, client: str) -> bool:
        record = PinRecord(world_size=1, created=0.0, nbytes=nbytes, client=client)
        return not table.replace((owner, pin), record, SHARE, client_share=client_share)[1]

    assert enter(1, "a", 100, "alice") and enter(2, "a", 100, "alice")
    assert not enter(3, "a", 100, "alice")  # a third instance: over the client's share
    assert enter(4, "a", 100, "bob")  # another client's share is its own
    assert table.client_held("alice") == 200 and table.client_held("bob") == 100
    assert table.pop((1, "a"), now=1.0) and table.client_held("alice") == 100
    assert enter(3, "a", 100, "alice")
    assert table.pop_owner(2) == [(2, "a")] and sorted(table.pop_stale(now=9.0, ttl=1.0)) == [
        (3, "a"),
        (4, "a"),
    ]
    assert table.client_held("alice") == table.client_held("bob") == 0
