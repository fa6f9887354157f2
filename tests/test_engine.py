import threading

import pytest
import torch

from lmcache.chunk_copy import CopyBatcher
from lmcache.config import LMCacheEngineConfig
from lmcache.engine import CacheEngine, KeySpace
from lmcache.keys import ChunkHashes, ChunkKey
from lmcache.layout import PoolLayout
from lmcache.transfer import BlockTransfer

TPB = 16
CHUNK = 64  # 4 blocks per chunk


def make(
    num_blocks: int = 64, cpu_gib: float = 0.05, **cfg: object
) -> tuple[CacheEngine, KeySpace, torch.Tensor]:
    pool = torch.randn(num_blocks, 2, 2, 2 * TPB * 8)
    config = LMCacheEngineConfig.from_defaults(chunk_size=CHUNK, max_local_cpu_size=cpu_gib, **cfg)
    engine = CacheEngine(config, pinned=False)
    return engine, KeySpace("model", PoolLayout.of_pool(pool, TPB)), pool


def tokens(n: int, offset: int = 0) -> list[int]:
    return [offset + i for i in range(n)]


def test_store_lookup_retrieve_round_trip() -> None:
    engine, space, pool = make()
    toks = tokens(200)  # 3 full chunks + 8 tokens
    src = list(range(13))
    assert engine.store(space, 0, pool, BlockTransfer(toks, None, src, 0, 200)) == 192
    assert engine.lookup(space, toks) == 192
    dst = list(range(30, 43))
    assert engine.retrieve(space, 0, pool, BlockTransfer(toks, None, dst, 0, 192)) == 192
    assert torch.equal(pool[dst[:12]], pool[src[:12]])
    assert engine.stats.stored_chunks == 3 and engine.stats.retrieved_chunks == 3


def test_store_skips_chunks_already_cached_and_respects_start() -> None:
    engine, space, pool = make()
    toks = tokens(256)
    assert engine.store(space, 0, pool, BlockTransfer(toks, None, list(range(16)), 0, 128)) == 128
    assert engine.store(space, 0, pool, BlockTransfer(toks, None, list(range(16)), 0, 256)) == 128
    assert engine.stats.stored_chunks == 4
    with pytest.raises(ValueError, match="multiple of chunk_size"):
        engine.store(space, 0, pool, BlockTransfer(toks, None, list(range(16)), 16, 256))


def test_retrieve_never_writes_blocks_before_start() -> None:
    engine, space, pool = make()
    toks = tokens(128)
    engine.store(space, 0, pool, BlockTransfer(toks, None, list(range(8)), 0, 128))
    dst = list(range(40, 48))
    sentinel = pool[dst].clone()
    pool[dst] = 0.0
    pool[dst[:3]] = sentinel[:3]  # TRT-LLM already holds the first 3 blocks (48 tokens)
    marker = pool[dst[:3]].clone()
    assert engine.retrieve(space, 0, pool, BlockTransfer(toks, None, dst, 48, 128)) == 80
    assert torch.equal(pool[dst[:3]], marker)
    assert torch.equal(pool[dst[3:]], pool[list(range(3, 8))])


def test_retrieve_reports_exactly_what_it_loaded_and_leaves_the_rest_untouched() -> None:
    engine, space, pool = make()
    toks = tokens(256)
    engine.store(space, 0, pool, BlockTransfer(toks, None, list(range(16)), 0, 256))
    third = engine.chunk_spans(space, 0, toks, None)[2].key
    assert engine.l1.remove(third)
    dst = list(range(40, 56))
    pool[dst] = 0.0
    assert engine.retrieve(space, 0, pool, BlockTransfer(toks, None, dst, 0, 256)) == 128
    assert torch.equal(pool[dst[:8]], pool[list(range(8))])
    assert torch.count_nonzero(pool[dst[8:]]) == 0
    assert engine.stats.failed_retrieves == 1


def test_pinned_hit_survives_eviction_pressure_until_retrieved() -> None:
    # Room for 4 chunks of 4 blocks x 2 KiB.
    engine, space, pool = make(num_blocks=80, cpu_gib=4 * 4 * 2048 / 2**30)
    a = tokens(128)
    engine.store(space, 0, pool, BlockTransfer(a, None, list(range(8)), 0, 128))
    assert engine.lookup(space, a, pin_id="req-a") == 128
    for i in range(4):  # would evict a's chunks without the pins
        engine.store(
            space,
            0,
            pool,
            BlockTransfer(tokens(64, 10_000 * (i + 1)), None, list(range(8 + 4 * i, 12 + 4 * i)), 0, 64),
        )
    assert engine.l1.skipped_stores >= 2
    dst = list(range(60, 68))
    assert engine.retrieve(space, 0, pool, BlockTransfer(a, None, dst, 0, 128), pin_id="req-a") == 128
    assert torch.equal(pool[dst], pool[list(range(8))])
    assert engine.pinned_ids() == [] and engine.l1.pinned_keys() == []


def test_release_unpins_and_relookup_replaces_pins() -> None:
    engine, space, pool = make()
    a = tokens(128)
    engine.store(space, 0, pool, BlockTransfer(a, None, list(range(8)), 0, 128))
    engine.lookup(space, a, pin_id=1)
    engine.lookup(space, a, pin_id=1)
    assert len(engine.l1.pinned_keys()) == 2
    assert all(engine.l1.get(k).pins == 1 for k in engine.l1.pinned_keys())
    engine.release(1)
    assert engine.l1.pinned_keys() == []


def test_two_lookups_of_one_pin_id_at_once_leave_only_the_last_ones_pins(monkeypatch) -> None:
    """Both release the id's old pins, then pin: the one that records second replaces the first's
    record, whose chunks must be unpinned then (else pinned for good, counted nowhere)."""
    engine, space, pool = make()
    a, b = tokens(128), tokens(128, 5000)
    engine.store(space, 0, pool, BlockTransfer(a, None, list(range(8)), 0, 128))
    engine.store(space, 0, pool, BlockTransfer(b, None, list(range(8)), 0, 128))
    both_pinned = threading.Barrier(2)
    pin_prefix = engine.l1.pin_prefix

    def pin_then_wait(groups):  # type: ignore[no-untyped-def]
        taken = pin_prefix(groups)
        both_pinned.wait(10)
        return taken

    monkeypatch.setattr(engine.l1, "pin_prefix", pin_then_wait)
    lookups = [
        threading.Thread(target=engine.lookup, args=(space, p), kwargs={"pin_id": "r"}) for p in (a, b)
    ]
    for lookup in lookups:
        lookup.start()
    for lookup in lookups:
        lookup.join(10)
    assert len(engine.l1.pinned_keys()) == 2  # one prompt's two chunks: the record kept
    engine.release("r")
    assert engine.l1.pinned_keys() == []


def test_salt_model_layout_and_rank_separate_keys() -> None:
    engine, space, pool = make()
    toks = tokens(128)
    engine.store(space, 0, pool, BlockTransfer(toks, "tenant-a", list(range(8)), 0, 128))
    assert engine.lookup(space, toks, "tenant-a") == 128
    assert engine.lookup(space, toks, "tenant-b") == 0
    assert engine.lookup(space, toks) == 0
    assert engine.lookup(KeySpace("other", space.layout), toks, "tenant-a") == 0
    half = pool.to(torch.float16)
    assert engine.lookup(KeySpace("model", PoolLayout.of_pool(half, TPB)), toks, "tenant-a") == 0
    assert engine.lookup(space, toks, "tenant-a", ranks=(0, 1)) == 0


def test_lookup_for_all_ranks_is_the_shortest_prefix() -> None:
    engine, _, pool = make()
    space = KeySpace("model", PoolLayout.of_pool(pool, TPB), world_size=2)
    toks = tokens(256)
    engine.store(space, 0, pool, BlockTransfer(toks, None, list(range(16)), 0, 256))
    engine.store(space, 1, pool, BlockTransfer(toks, None, list(range(16)), 0, 128))
    assert engine.lookup(space, toks, ranks=(0,)) == 256
    assert engine.lookup(space, toks, ranks=(0, 1), pin_id="r") == 128
    assert len(engine.l1.pinned_keys()) == 4


def test_lookup_by_chunk_hashes_matches_lookup_by_tokens() -> None:
    engine, _, pool = make()
    space = KeySpace("model", PoolLayout.of_pool(pool, TPB), world_size=2)
    toks = tokens(300)  # 4 full chunks + 44 tokens
    engine.store(space, 0, pool, BlockTransfer(toks, "salt", list(range(19)), 0, 300))
    engine.store(space, 1, pool, BlockTransfer(toks, "salt", list(range(19)), 0, 128))
    hasher = engine.hasher(space)
    for salt in ("salt", None, 7):
        hashes = hasher.chunk_hashes(toks, salt)
        for ranks in ((0,), (1,), (0, 1)):
            expected = engine.lookup(space, toks, salt, ranks=ranks)
            assert engine.lookup_hashes(space, hashes, len(toks), ranks=ranks) == expected
    assert engine.lookup_hashes(space, hasher.chunk_hashes(toks, "salt"), 300, ranks=(0,)) == 256
    assert (
        engine.lookup_hashes(space, hasher.chunk_hashes(toks, "salt"), 300, ranks=(0, 1), pin_id="r") == 128
    )
    assert sorted(engine.l1.pinned_keys()) == sorted(
        ChunkKey(h, 2, rank) for h in hasher.chunk_hashes(toks[:128], "salt") for rank in (0, 1)
    )
    engine.release("r")
    assert engine.l1.pinned_keys() == []
    assert engine.stats.lookups == 20 and engine.stats.lookup_tokens == 20 * 300


def test_a_lookup_returns_the_hashes_it_computed_for_the_prompts_transfers() -> None:
    engine, space, pool = make()
    toks = tokens(300)
    engine.store(space, 0, pool, BlockTransfer(toks, "salt", list(range(19)), 0, 128))
    hit, hashes = engine.lookup_prompt(space, toks, "salt", pin_id="r")
    assert hit == 128 and engine.lookup(space, toks, "salt") == 128
    assert hashes is not None and hashes.hashes == engine.hasher(space).chunk_hashes(toks, "salt")
    assert len(hashes) == 256  # the full chunks, the hit's and the rest's
    # The prompt's load and save by those hashes: no tokens needed, the same bytes back.
    targets = list(range(32, 51))
    assert engine.retrieve(space, 0, pool, BlockTransfer(hashes, None, targets, 0, 128), pin_id="r") == 128
    assert torch.equal(pool[targets[:8]], pool[:8])
    assert engine.store(space, 0, pool, BlockTransfer(hashes, None, list(range(19)), 128, 256)) == 128
    assert engine.lookup(space, toks, "salt") == 256
    # A miss found from the first chunk alone hashes nothing more.
    assert engine.lookup_prompt(space, tokens(300, offset=9), "salt") == (0, None)
    # Asked not to probe first (recent lookups mostly hit), a miss hashes the whole prompt, for its saves.
    other = tokens(300, offset=9)
    hit, hashes = engine.lookup_prompt(space, other, "salt", probe_first=False)
    assert (
        hit == 0 and hashes is not None and hashes.hashes == engine.hasher(space).chunk_hashes(other, "salt")
    )


def test_a_lookup_of_a_cache_saving_partial_chunks_returns_no_hashes() -> None:
    engine, space, pool = make(save_unfull_chunk=True)
    toks = tokens(100)
    engine.store(space, 0, pool, BlockTransfer(toks, None, list(range(7)), 0, 100))
    assert engine.lookup_prompt(space, toks) == (96, None)  # partial chunks are keyed by their tokens


def test_lookup_by_chunk_hashes_refuses_what_it_cannot_check() -> None:
    engine, space, _ = make()
    hashes = engine.hasher(space).chunk_hashes(tokens(128))
    with pytest.raises(
        ValueError, match=r"2 chunk hashes for 200 tokens; expected one per full chunk .* \(3\)"
    ):
        engine.lookup_hashes(space, hashes, 200)
    with pytest.raises(ValueError, match="32-byte digests"):
        engine.lookup_hashes(space, [hashes[0], hashes[1][:16]], 128)
    unfull, space, _ = make(save_unfull_chunk=True)
    with pytest.raises(ValueError, match="save_unfull_chunk"):
        unfull.lookup_hashes(space, hashes, 128)
    assert engine.stats.lookups == 0 and engine.l1.pinned_keys() == []


def test_store_and_retrieve_by_chunk_hashes_are_interchangeable_with_tokens() -> None:
    engine, space, pool = make()
    toks = tokens(300)  # 4 full chunks + 44 tokens
    hashes = ChunkHashes(engine.hasher(space).chunk_hashes(toks, "salt"), CHUNK)
    assert len(hashes) == 256
    src = list(range(19))
    # Stored by hashes (only the first two chunks), found and loaded by tokens; then the reverse.
    assert engine.store(space, 0, pool, BlockTransfer(hashes, None, src, 0, 150)) == 128
    assert engine.lookup(space, toks, "salt") == 128
    assert engine.store(space, 0, pool, BlockTransfer(toks, "salt", src, 128, 300)) == 128
    dst = list(range(40, 59))
    assert engine.retrieve(space, 0, pool, BlockTransfer(hashes, None, dst, 0, 240)) == 240
    assert torch.equal(pool[dst[:15]], pool[src[:15]])
    assert torch.count_nonzero(pool[dst[15:]] - pool[src[15:]]) > 0  # the block holding 240.. untouched


def test_chunk_hashes_that_cannot_name_the_range_are_refused_before_any_copy() -> None:
    engine, space, pool = make()
    toks = tokens(256)
    hashes = engine.hasher(space).chunk_hashes(toks)
    engine.store(space, 0, pool, BlockTransfer(toks, None, list(range(16)), 0, 256))
    before = pool.clone()
    with pytest.raises(ValueError, match=r"2 chunk hashes cover 128 tokens; .* up to token 192"):
        engine.retrieve(
            space, 0, pool, BlockTransfer(ChunkHashes(hashes[:2], CHUNK), None, list(range(30, 42)), 0, 176)
        )
    with pytest.raises(ValueError, match="32-byte digests"):
        engine.retrieve(
            space,
            0,
            pool,
            BlockTransfer(ChunkHashes([hashes[0][:8]], CHUNK), None, list(range(30, 34)), 0, 64),
        )
    with pytest.raises(ValueError, match="of 32-token chunks; this cache uses 64"):
        engine.store(space, 0, pool, BlockTransfer(ChunkHashes(hashes, 32), None, list(range(16)), 0, 128))
    unfull, space2, _ = make(save_unfull_chunk=True)
    with pytest.raises(ValueError, match="save_unfull_chunk"):
        unfull.store(
            space2, 0, pool, BlockTransfer(ChunkHashes(hashes, CHUNK), None, list(range(16)), 0, 256)
        )
    assert torch.equal(pool, before) and engine.l1.pinned_keys() == []
    assert len(unfull.l1) == 0
    with pytest.raises(ValueError, match="whole number of 32-byte digests"):
        ChunkHashes.from_bytes(b"x" * 40, 32, CHUNK)


def test_save_unfull_chunk_stores_block_aligned_tail() -> None:
    engine, space, pool = make(save_unfull_chunk=True)
    toks = tokens(100)  # 1 chunk + 36 tokens -> tail of 2 blocks (32 tokens)
    assert engine.store(space, 0, pool, BlockTransfer(toks, None, list(range(7)), 0, 100)) == 96
    assert engine.lookup(space, toks) == 96
    dst = list(range(20, 27))
    assert engine.retrieve(space, 0, pool, BlockTransfer(toks, None, dst, 0, 96)) == 96
    assert torch.equal(pool[dst[:6]], pool[list(range(6))])
    plain, space2, pool2 = make()
    assert plain.store(space2, 0, pool2, BlockTransfer(toks, None, list(range(7)), 0, 100)) == 64


def test_bad_arguments_are_refused_without_side_effects() -> None:
    engine, space, pool = make()
    toks = tokens(128)
    with pytest.raises(ValueError, match="block ids cannot hold"):
        engine.store(space, 0, pool, BlockTransfer(toks, None, [0, 1], 0, 128))
    with pytest.raises(IndexError):
        engine.store(space, 0, pool, BlockTransfer(toks, None, [0, 1, 2, 3, 4, 5, 6, 999], 0, 128))
    assert len(engine.l1) == 0
    with pytest.raises(ValueError, match="block-aligned"):
        engine.retrieve(space, 0, pool, BlockTransfer(toks, None, list(range(8)), 5, 128))
    with pytest.raises(ValueError, match="does not match the registered layout"):
        engine.store(space, 0, torch.zeros(8, 2, 2, 8), BlockTransfer(toks, None, list(range(8)), 0, 128))
    with pytest.raises(ValueError, match="multiple of tokens_per_block"):
        bad = CacheEngine(
            LMCacheEngineConfig.from_defaults(chunk_size=40, max_local_cpu_size=0.01), pinned=False
        )
        bad.lookup(space, toks)


def test_concurrent_stores_and_lookups_stay_consistent() -> None:
    engine, space, pool = make(num_blocks=256, cpu_gib=0.01)
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for i in range(20):
                toks = tokens(128, worker * 100_000 + i * 1000)
                blocks = list(range(worker * 32, worker * 32 + 8))
                engine.store(space, 0, pool, BlockTransfer(toks, None, blocks, 0, 128))
                hit = engine.lookup(space, toks, pin_id=(worker, i))
                dst = list(range(worker * 32 + 8, worker * 32 + 16))
                assert (
                    engine.retrieve(
                        space, 0, pool, BlockTransfer(toks, None, dst, 0, hit), pin_id=(worker, i)
                    )
                    == hit
                )
                assert torch.equal(pool[dst[: hit // TPB]], pool[blocks[: hit // TPB]])
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert engine.l1.pinned_keys() == []


def test_save_unfull_chunk_tail_hits_a_longer_prompt() -> None:
    engine, space, pool = make(save_unfull_chunk=True)
    first = tokens(100)
    engine.store(space, 0, pool, BlockTransfer(first, None, list(range(7)), 0, 100))
    longer = first + tokens(200, 50_000)
    assert engine.lookup(space, longer, pin_id="r") == 96
    dst = list(range(30, 49))
    assert engine.retrieve(space, 0, pool, BlockTransfer(longer, None, dst, 0, 96), pin_id="r") == 96
    assert torch.equal(pool[dst[:6]], pool[list(range(6))])
    assert engine.l1.pinned_keys() == []


def test_retrieve_ending_inside_a_chunk_copies_only_rows_before_end() -> None:
    engine, space, pool = make()
    toks = tokens(128)
    engine.store(space, 0, pool, BlockTransfer(toks, None, list(range(8)), 0, 128))
    dst = list(range(40, 48))
    pool[dst] = 0.0
    assert engine.retrieve(space, 0, pool, BlockTransfer(toks, None, dst, 0, 112)) == 112
    assert torch.equal(pool[dst[:7]], pool[list(range(7))])
    assert torch.count_nonzero(pool[dst[7]]) == 0


def test_save_unfull_chunk_tail_loads_after_a_device_prefix() -> None:
    engine, space, pool = make(save_unfull_chunk=True)
    first = tokens(100)  # chunk [0, 64) + tail [64, 96)
    engine.store(space, 0, pool, BlockTransfer(first, None, list(range(7)), 0, 100))
    longer = first + tokens(100, 50_000)
    dst = list(range(30, 43))
    # TRT-LLM holds the first chunk's blocks itself; the tail chunk chains after that chunk's hash.
    assert engine.retrieve(space, 0, pool, BlockTransfer(longer, None, dst, 64, 96)) == 32
    assert torch.equal(pool[dst[4:6]], pool[[4, 5]])


def test_store_failing_midway_keeps_what_it_published_and_leaks_no_slot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine, space, pool = make()
    good = tokens(192)
    flush = CopyBatcher.flush
    calls = []

    def failing_second_flush(self: CopyBatcher[object]) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("copy failed")
        flush(self)

    monkeypatch.setattr(CopyBatcher, "flush", failing_second_flush)
    with pytest.raises(RuntimeError, match="copy failed"):
        engine.store(space, 0, pool, BlockTransfer(good, None, list(range(12)), 0, 192))
    monkeypatch.undo()
    assert engine.lookup(space, good) == 64  # the first chunk was published before the error
    # The later chunks' slots were reserved when the error came: they must be free to store again.
    assert engine.store(space, 0, pool, BlockTransfer(good, None, list(range(12)), 0, 192)) == 128
    assert engine.lookup(space, good) == 192


def test_a_store_failing_inside_a_batch_of_reservations_gives_back_the_batchs_other_slots(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Slots are reserved a batch at a time (1, 2, 4, ... chunks): when the second chunk's copy fails,
    the third chunk's slot, reserved with it but never handed to the copies, goes back too."""
    engine, space, pool = make()
    control, _, _ = make()
    good = tokens(256)
    add = CopyBatcher.add
    calls = []

    def failing_second_add(self: CopyBatcher[object], *args: object) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("copy failed")
        add(self, *args)

    monkeypatch.setattr(CopyBatcher, "add", failing_second_add)
    # The error's traceback (kept here, as a caller logging it would) holds the failed store's frame:
    # the slots must go back before the error leaves it, not when the frame is collected.
    with pytest.raises(RuntimeError, match="copy failed") as failed:
        engine.store(space, 0, pool, BlockTransfer(good, None, list(range(16)), 0, 256))
    monkeypatch.undo()
    assert engine.store(space, 0, pool, BlockTransfer(good, None, list(range(16)), 0, 256)) == 256 - CHUNK
    control.store(space, 0, pool, BlockTransfer(good, None, list(range(16)), 0, 256))
    assert engine.l1.used_bytes == control.l1.used_bytes  # no slot left reserved by the failed store
    assert failed.traceback


def test_a_store_takes_l1s_lock_once_per_batch_of_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Threads storing at once (the server's, one per rank) queue for L1's lock: a store reserves and
    publishes its chunks a batch at a time, in CopyBatcher's batches (D101)."""
    engine, space, pool = make(num_blocks=128)
    reserve_many, commit_many = engine.l1.reserve_many, engine.l1.commit_many
    reserved: list[int] = []
    committed: list[int] = []

    def counted_reserve(wanted: list[tuple[object, int, int]]) -> list[object]:
        reserved.append(len(wanted))
        return reserve_many(wanted)  # type: ignore[arg-type, return-value]

    def counted_commit(keys: list[object], ready: object = None) -> None:
        committed.append(len(keys))
        commit_many(keys, ready)

    monkeypatch.setattr(engine.l1, "reserve_many", counted_reserve)
    monkeypatch.setattr(engine.l1, "commit_many", counted_commit)
    monkeypatch.setattr(engine.l1, "reserve", None)  # one chunk at a time would fail here
    monkeypatch.setattr(engine.l1, "commit", None)
    toks = tokens(20 * CHUNK)
    assert engine.store(space, 0, pool, BlockTransfer(toks, None, list(range(80)), 0, len(toks))) == len(toks)
    assert reserved == [1, 2, 4, 8, 5] and committed == [1, 2, 4, 8, 5]
    assert engine.lookup(space, toks) == len(toks)


def test_reserve_store_reserves_in_growing_batches_and_a_closed_one_gives_back_the_rest() -> None:
    engine, space, _ = make()
    toks = tokens(5 * CHUNK)
    keys = [span.key for span in engine.chunk_spans(space, 0, toks, None)]
    slots = engine.reserve_store(space, 0, toks, None, 0, len(toks), most=2)
    first = next(slots)
    assert first.key == keys[0] and [engine.l1.reserved(k) for k in keys] == [True] + [False] * 4
    second = next(slots)  # the batch of two is reserved at once
    assert [engine.l1.reserved(k) for k in keys] == [True, True, True, False, False]
    slots.close()
    assert [engine.l1.reserved(k) for k in keys] == [True, True, False, False, False]
    engine.abort_store([first, second])
    assert engine.l1.used_bytes == 0


def test_a_store_of_tokens_out_of_range_is_refused_and_leaks_no_slot() -> None:
    engine, space, pool = make()
    control, _, _ = make()
    good = tokens(192)
    bad = good[:128] + [2**70] + good[129:]  # the third chunk cannot be converted
    with pytest.raises(ValueError, match="int64"):
        engine.store(space, 0, pool, BlockTransfer(bad, None, list(range(12)), 0, 192))
    engine.store(space, 0, pool, BlockTransfer(good, None, list(range(12)), 0, 192))
    control.store(space, 0, pool, BlockTransfer(good, None, list(range(12)), 0, 192))
    assert engine.lookup(space, good) == 192
    assert engine.l1.used_bytes == control.l1.used_bytes  # no slot left reserved by the refused store


def test_a_miss_on_the_first_chunk_still_replaces_the_pins_of_its_id() -> None:
    engine, space, pool = make()
    toks = tokens(128)
    engine.store(space, 0, pool, BlockTransfer(toks, None, list(range(8)), 0, 128))
    assert engine.lookup(space, toks, pin_id="r") == 128
    assert len(engine.l1.pinned_keys()) == 2
    assert engine.lookup(space, tokens(128, 9999), pin_id="r") == 0  # early out: chunk 0 is not cached
    assert engine.l1.pinned_keys() == [] and engine.pinned_ids() == []  # nothing to release
    assert engine.stats.lookups == 2 and engine.stats.lookup_tokens == 256 and engine.stats.hit_tokens == 128
    assert engine.lookup(space, toks, ranks=(0, 1)) == 0  # rank 1 never stored


def test_a_whole_load_copying_a_row_again_flushes_what_came_before() -> None:
    """Copies of one batch keep no order on the device; a row a load copies twice (a chunk the
    server's reply names from another slot than the lookup did) must land from the later copy."""
    pool = torch.zeros(8, 1, 2, 4)
    flushed: list[list[str]] = []
    copier: CopyBatcher[str] = CopyBatcher(pool, store=False, on_flush=lambda items, _: flushed.append(items))
    copier.FLUSH_CHUNKS = 8
    first, again = torch.full((2, 1, 2, 4), 1.0), torch.full((1, 1, 2, 4), 2.0)
    copier.add([0], torch.zeros(1, 1, 2, 4), "a")  # the ramp's first batch: one chunk
    copier.add([5, 2], first, "b")  # the second batch would take two chunks
    copier.add([2], again, "b again")  # row 2 again: "b" goes alone first
    copier.add([3], torch.zeros(1, 1, 2, 4), "c")
    copier.finish()
    assert flushed == [["a"], ["b"], ["b again", "c"]]
    assert torch.equal(pool[2], again[0]) and torch.equal(pool[5], first[0])


def test_an_l1_that_cannot_hold_one_chunk_of_a_layout_is_refused_when_the_layout_is_first_seen() -> None:
    """It would cache nothing and say so only as skipped stores: refused at registration instead."""
    config = LMCacheEngineConfig.from_defaults(chunk_size=64, max_local_cpu_size=1e-4)  # about 105 KB
    engine = CacheEngine(config, pinned=False)
    pool = torch.zeros(8, 2, 2, 16 * 1024)  # 256 KiB rows: a chunk of 4 blocks is 1 MiB
    with pytest.raises(ValueError, match="max_local_cpu_size / LMCACHE_MAX_LOCAL_CPU_SIZE"):
        engine.hasher(KeySpace("model", PoolLayout.of_pool(pool, 16)))
    small = torch.zeros(8, 2, 2, 16)  # 256-byte rows: a chunk is 1 KiB
    assert engine.hasher(KeySpace("model", PoolLayout.of_pool(small, 16))).chunk_size == 64


class Expired(Exception):
    pass


def test_a_guarded_store_publishes_each_batch_once_copied_and_none_after_its_guard_fails() -> None:
    """A guarded store (an exported pool's, through the server) publishes batch by batch as their copies
    end, each after its guard passes; once the guard fails, no later batch is published, and what was
    published holds the rows copied before."""
    engine, space, pool = make()
    toks = tokens(4 * CHUNK)  # batches of 1, 2, then 1 chunk
    calls: list[int] = []

    def guard() -> None:  # before each batch's copies, and before each batch is published
        calls.append(1)
        if len(calls) == 4:  # the second batch is copied, not yet published: the client gave up
            raise Expired

    with pytest.raises(Expired):
        engine.store(space, 0, pool, BlockTransfer(toks, None, list(range(16)), 0, 4 * CHUNK), guard=guard)
    assert engine.lookup(space, toks) == CHUNK  # the first batch only
    dst = list(range(40, 44))
    assert engine.retrieve(space, 0, pool, BlockTransfer(toks, None, dst, 0, CHUNK)) == CHUNK
    assert torch.equal(pool[dst], pool[0:4])
    assert engine.store(space, 0, pool, BlockTransfer(toks, None, list(range(16)), 0, 4 * CHUNK)) == 3 * CHUNK
