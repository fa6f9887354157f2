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
