"""The shares of L1 that shared-L1 store reservations may hold: per registration and in all."""

from __future__ import annotations

from lmcache.server.reserved_shares import ReservedShares


def test_each_registration_holds_half_all_three_quarters_and_a_forgotten_one_nothing() -> None:
    shares = ReservedShares(capacity_bytes=100)
    assert shares.take(1, 50) and not shares.take(1, 1)  # its half
    assert shares.take(2, 25) and not shares.take(3, 1)  # three quarters in all
    shares.give_back(1, 10)
    assert shares.take(3, 10) and shares.held() == 75
    shares.forget(1)
    assert shares.held(1) == 0 and shares.held() == 35
    shares.give_back(1, 40)  # a ticket closed after its registration went: nothing to give back
    assert shares.held() == 35 and shares.take(4, 40)
