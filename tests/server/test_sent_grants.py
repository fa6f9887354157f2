"""The server's record of what shared-L1 replies granted, for a client's ``abandon`` to give back."""

from __future__ import annotations

from lmcache.server.sent_grants import Grant, SentGrants


def test_an_abandoned_reply_gives_its_grant_back_once() -> None:
    sent = SentGrants()
    assert sent.note(1, 5, Grant(11, (3, 4)))
    assert sent.abandon(1, [5]) == [Grant(11, (3, 4))]
    assert sent.abandon(1, [5]) == []  # given back already: nothing twice


def test_an_id_abandoned_before_its_reply_was_ready_stops_that_reply() -> None:
    sent = SentGrants()
    assert sent.abandon(1, [9]) == []
    assert not sent.note(1, 9, Grant(12))  # the caller gives the grant back, sends nothing
    assert sent.note(1, 9, Grant(13))  # the early id is used up


def test_grants_are_per_registration() -> None:
    sent = SentGrants()
    sent.note(1, 5, Grant(11))
    assert sent.abandon(2, [5]) == []  # another registration's request 5 is not this one
    assert not sent.note(2, 5, Grant(12))
    assert sent.abandon(1, [5]) == [Grant(11)]


def test_an_unnumbered_request_is_never_noted() -> None:
    sent = SentGrants()
    assert sent.note(1, 0, Grant(11))
    assert sent.abandon(1, [0]) == []


def test_the_records_are_bounded_per_registration() -> None:
    sent = SentGrants(max_noted=3, max_early=2)
    for rid in range(1, 6):
        sent.note(1, rid, Grant(rid))
    assert sent.abandon(1, [1, 2]) == []  # the oldest went: read long ago
    assert sent.abandon(1, [3, 4, 5]) == [Grant(3), Grant(4), Grant(5)]
    # 1 and 2 were kept as early ids; 7 and 8 push them out
    sent.abandon(1, [7, 8])
    assert sent.note(1, 1, Grant(21)) and sent.note(1, 2, Grant(22))
    assert not sent.note(1, 7, Grant(23)) and not sent.note(1, 8, Grant(24))


def test_forgetting_a_registration_drops_its_records() -> None:
    sent = SentGrants()
    sent.note(1, 5, Grant(11))
    sent.abandon(1, [6])
    sent.forget(1)
    assert sent.abandon(1, [5]) == []
    sent.forget(1)
    assert sent.note(1, 6, Grant(12))
