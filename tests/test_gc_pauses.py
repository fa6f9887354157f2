"""lmcache.gc_pauses: the cache server's collector, frozen past its imports and timed.

Both act on a whole process, so each case runs in a fresh interpreter (never in pytest's own)."""

from __future__ import annotations

from support.fresh_python import run_python

from lmcache import gc_pauses


def test_before_watch_nothing_is_timed() -> None:
    out = run_python(
        """
        import gc, json
        from lmcache import gc_pauses
        gc.collect()
        s = gc_pauses.snapshot()
        line = gc_pauses.summary_line(s)
        print(json.dumps({"watched": s.watched, "collections": s.collections, "line": line}))
        """
    )
    assert out["watched"] is False and out["collections"] == [0, 0, 0]
    assert "pauses not timed" in out["line"]


def test_watch_times_each_collection_by_generation_once_however_often_called() -> None:
    out = run_python(
        """
        import gc, json
        from lmcache import gc_pauses
        before = len(gc.callbacks)
        gc_pauses.watch()
        gc_pauses.watch()
        hooks = len(gc.callbacks) - before
        gc.collect(0)
        gc.collect(2)
        gc.collect(2)
        s = gc_pauses.snapshot()
        print(json.dumps({"hooks": hooks, "collections": s.collections, "pause_s": s.pause_s,
                          "longest_pause_s": s.longest_pause_s, "line": gc_pauses.summary_line(s)}))
        """
    )
    assert out["hooks"] == 1
    assert out["collections"][0] >= 1 and out["collections"][2] >= 2
    assert out["pause_s"][2] > 0
    assert 0 < out["longest_pause_s"][2] <= out["pause_s"][2]
    assert "collections (generation 0/1/2)" in out["line"]


def test_freeze_imports_hides_the_modules_and_leaves_later_cycles_collectable() -> None:
    out = run_python(
        """
        import gc, json
        import torch  # what the server imports: the bulk of a full collection's walk
        from lmcache import gc_pauses
        tracked = len(gc.get_objects())
        frozen = gc_pauses.freeze_imports()
        left = len(gc.get_objects())

        class Node:
            pass

        a, b = Node(), Node()
        a.other, b.other = b, a
        del a, b
        freed = gc.collect()
        print(json.dumps({"tracked": tracked, "frozen": frozen, "left": left, "freed": freed,
                          "reported": gc_pauses.snapshot().frozen_objects}))
        """
    )
    assert out["frozen"] > 50_000 and out["frozen"] > 0.9 * out["tracked"]
    assert out["left"] < 1_000  # what a full collection still walks
    assert out["reported"] == out["frozen"]
    assert out["freed"] >= 2  # a cycle made after the freeze is still collected


def test_gc_stats_an_older_server_does_not_send_decode_as_nothing_timed() -> None:
    import msgspec

    stats = msgspec.msgpack.decode(msgspec.msgpack.encode({}), type=gc_pauses.GcStats)
    assert stats == gc_pauses.GcStats()
