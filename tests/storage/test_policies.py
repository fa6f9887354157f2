import pytest

from lmcache.storage.policies import FIFOPolicy, LFUPolicy, LRUPolicy, make_policy


def test_policy_orders() -> None:
    lru, fifo, lfu = LRUPolicy(), FIFOPolicy(), LFUPolicy()
    for p in (lru, fifo, lfu):
        for k in "abc":
            p.add(k)
        p.touch("a")
        p.touch("a")
        p.touch("b")
    assert lru.victim() == "c"
    assert fifo.victim() == "a"
    assert lfu.victim() == "c"
    lfu.touch("c")
    lfu.touch("c")
    lfu.touch("c")
    assert lfu.victim() == "b"  # b: 2 uses, a: 3, c: 4


def test_lfu_remembers_frequency_across_pin() -> None:
    lfu = LFUPolicy()
    lfu.add("hot")
    for _ in range(5):
        lfu.touch("hot")
    lfu.add("cold")
    lfu.discard("hot", forget=False)
    assert lfu.victim() == "cold"
    lfu.add("hot")
    assert lfu.victim() == "cold"


def test_unknown_policy() -> None:
    with pytest.raises(ValueError, match="LRU"):
        make_policy("MRU")


def _drain(policy: object) -> list[str]:
    """Every key in eviction order."""
    order = []
    while (key := policy.victim()) is not None:  # type: ignore[attr-defined]
        order.append(key)
        policy.discard(key)  # type: ignore[attr-defined]
    return order


@pytest.mark.parametrize("name", ["LRU", "FIFO", "LFU"])
def test_withdraw_and_restore_equal_discarding_and_adding_key_by_key(name: str) -> None:
    """What a pin and an unpin do to a batch of keys equals the key-by-key steps they replace:
    ``discard(key, forget=False)`` while pinned, then ``add`` and ``touch`` in order. Keys not in
    the order (pinned already) are left alone."""
    batch, by_key = make_policy(name), make_policy(name)
    for policy in (batch, by_key):
        for key in "abcdef":
            policy.add(key)
        policy.touch("b")
        policy.touch("e")
        policy.discard("f", forget=False)  # pinned before
    batch.withdraw(["e", "b", "f", "zz"])
    for key in ["e", "b"]:
        by_key.discard(key, forget=False)
    assert batch.victim() == by_key.victim() and len(batch) == len(by_key) == 3
    batch.restore(["b", "e", "f"])
    for key in ["b", "e", "f"]:
        by_key.add(key)
        by_key.touch(key)
    assert _drain(batch) == _drain(by_key)
