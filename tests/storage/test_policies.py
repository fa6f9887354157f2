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


@pytest.mark.parametrize("name", ["LRU", "FIFO", "LFU"])
def test_victims_lists_the_eviction_order_and_changes_nothing(name: str) -> None:
    """``victims`` is the order ``victim`` + ``discard`` would drain, ``victim`` first; walking it
    (as a store does past pinned keys) moves no key and counts no use."""
    policy, twin = make_policy(name), make_policy(name)
    for p in (policy, twin):
        for key in "abcde":
            p.add(key)
        for key in "dbdd":
            p.touch(key)
    assert next(policy.victims()) == policy.victim()
    listed = list(policy.victims())
    assert sorted(listed) == list("abcde")
    assert listed == _drain(policy) == _drain(twin)


@pytest.mark.parametrize("name", ["LRU", "FIFO", "LFU"])
def test_adding_a_key_again_keeps_it_once(name: str) -> None:
    policy = make_policy(name)
    for key in "ab":
        policy.add(key)
    for _ in range(3):
        policy.touch("a")
    policy.add("a")
    assert len(policy) == 2 and sorted(_drain(policy)) == ["a", "b"]


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
def test_touch_all_equals_touching_key_by_key(name: str) -> None:
    """What an unpin does to a batch of keys equals ``touch`` of each in order; keys not in the
    order are ignored."""
    batch, by_key = make_policy(name), make_policy(name)
    for policy in (batch, by_key):
        for key in "abcdef":
            policy.add(key)
        policy.touch("b")
        policy.touch("e")
    batch.touch_all(["e", "b", "f", "zz"])
    for key in ["e", "b", "f"]:
        by_key.touch(key)
    assert _drain(batch) == _drain(by_key)


@pytest.mark.parametrize("name", ["LRU", "FIFO", "LFU"])
def test_put_first_moves_keys_ahead_of_their_use_count_in_the_given_order(name: str) -> None:
    """The disk scan puts the chunks it found, oldest first, ahead of those written or used since."""
    policy = make_policy(name)
    for key in "abcd":
        policy.add(key)
    policy.touch("a")
    policy.put_first(["d", "c", "z"])  # "z" is not in the order: ignored
    expected = {"LRU": "dcba", "FIFO": "dcab", "LFU": "dcba"}[name]
    assert list(policy.victims()) == list(expected)
