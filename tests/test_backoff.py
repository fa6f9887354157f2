"""The one back-off: doubles from initial to max, resets on success, says when to retry."""

from __future__ import annotations

import pytest

from lmcache.backoff import Backoff, BackoffState


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_backoff_doubles_up_to_the_cap_and_resets_on_success() -> None:
    clock = Clock()
    backoff = Backoff(1.0, 5.0, clock=clock)
    assert backoff.ready() and backoff.state() == BackoffState(False, 0.0, 0.0, 0)
    assert [backoff.failed() for _ in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert not backoff.ready()
    assert backoff.state() == BackoffState(True, 5.0, 5.0, 5)
    clock.now += 5.0
    assert backoff.ready() and backoff.state().failing  # the probe may go; still failing until it works
    assert backoff.succeeded() is True
    assert backoff.succeeded() is False  # the recovery is reported once
    assert backoff.state() == BackoffState(False, 0.0, 0.0, 5)
    assert backoff.failed() == 1.0  # starts over after a success


@pytest.mark.parametrize(("initial", "most"), [(0.0, 1.0), (2.0, 1.0), (-1.0, 1.0)])
def test_backoff_refuses_bad_bounds(initial: float, most: float) -> None:
    with pytest.raises(ValueError, match="expected 0 < initial_s <= max_s"):
        Backoff(initial, most)
