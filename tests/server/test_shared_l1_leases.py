"""The shared-L1 lease at handler level: slots reserved ahead, filled before the worker knows which
chunk each holds, published by ``store_done``, never visible or leaked otherwise."""

from __future__ import annotations

import pytest
import torch
from shared_l1_support import (
    CHUNK,
    TOKENS,
    SharedL1Env,
    copy_load,
    copy_store,
    shared_l1_env,
    shuffled_blocks,
)

from lmcache.server import protocol as P
from lmcache.server.prompts import InvalidPrompt
from lmcache.server.shared_l1 import BadTicket


@pytest.fixture
def env(tmp_path):
    env = shared_l1_env(tmp_path)
    yield env
    env.close()


def slot_bytes(env: SharedL1Env) -> int:
    return CHUNK // env.scope.space.layout.tokens_per_block * env.scope.space.layout.row_bytes


def lease(env: SharedL1Env, count: int) -> list[P.LeasedSlot]:
    """Top the lease up by ``count`` (a reserve of nothing) and hand the copier the slots."""
    reply = env.service.store_reserve(
        env.scope, P.StoreReserve(instance_id=7, tokens=TOKENS, start=0, end=0, lease=count)
    )
    assert reply.ticket == 0 and reply.chunks == []
    env.copier.add_leases(reply)
    return env.copier.take_leases(count)[0]


def fill(env: SharedL1Env, leases: list[P.LeasedSlot], blocks: list[int], first_chunk: int = 0) -> None:
    """Copy chunk ``first_chunk + i`` of the prompt's blocks into ``leases[i]``."""
    rows = CHUNK // env.scope.space.layout.tokens_per_block
    batch = env.copier.begin_store(blocks)
    for i, slot in enumerate(leases):
        first = (first_chunk + i) * rows
        env.copier.add(batch, slot.slot, blocks[first : first + rows])
    env.copier.finish_store(batch)
    env.copier.wait_stored()


def done(leases: list[P.LeasedSlot], start: int = 0, ok: bool = True, **kw) -> P.StoreDone:
    ids = [s.id for s in leases]
    return P.StoreDone(
        instance_id=7, leases=ids, start=start, end=start + len(ids) * CHUNK, tokens=TOKENS, ok=ok, **kw
    )


def test_leased_slots_publish_as_the_chunks_they_hold_and_load_bit_equal(env) -> None:
    src = shuffled_blocks(18, seed=1)
    slots = lease(env, 3)
    assert len(slots) == 3 and env.service.leased(7) == 3
    fill(env, slots, src)
    assert env.engine.lookup(env.scope.space, TOKENS) == 0  # filled but not reported: invisible
    assert env.service.store_done(env.scope, done(slots)) == 3 * CHUNK
    assert env.service.leased(7) == 0 and env.engine.lookup(env.scope.space, TOKENS) == 3 * CHUNK

    dst = shuffled_blocks(12, seed=2, base=32)
    load = env.service.load(env.scope, P.Load(instance_id=7, tokens=TOKENS, end=3 * CHUNK))
    assert copy_load(env.copier, load, dst) == 3 * CHUNK
    assert torch.equal(env.pool[dst], env.pool[src[:12]])


def test_a_store_mixes_leased_chunks_and_reserved_ones_in_one_report(env) -> None:
    src = shuffled_blocks(18, seed=3)
    slots = lease(env, 2)
    fill(env, slots, src)
    rest = env.service.store_reserve(
        env.scope, P.StoreReserve(instance_id=7, tokens=TOKENS, start=2 * CHUNK, end=4 * CHUNK)
    )
    assert rest.tokens == 2 * CHUNK
    copy_store(env.copier, rest, src)
    assert env.service.store_done(env.scope, done(slots, ticket=rest.ticket)) == 4 * CHUNK
    assert env.engine.lookup(env.scope.space, TOKENS) == 4 * CHUNK


def test_a_leased_chunk_already_cached_frees_its_slot_and_keeps_the_cached_bytes(env) -> None:
    first = shuffled_blocks(18, seed=4)
    slots = lease(env, 2)
    fill(env, slots, first)
    env.service.store_done(env.scope, done(slots))
    used = env.engine.l1.used_bytes
    again = lease(env, 2)
    fill(env, again, shuffled_blocks(18, seed=5, base=32))  # other bytes under the same prompt
    assert env.engine.l1.used_bytes == used + 2 * slot_bytes(env)
    assert env.service.store_done(env.scope, done(again)) == 0
    assert env.engine.l1.used_bytes == used
    dst = shuffled_blocks(8, seed=6, base=32)
    load = env.service.load(env.scope, P.Load(instance_id=7, tokens=TOKENS, end=2 * CHUNK))
    copy_load(env.copier, load, dst)
    assert torch.equal(env.pool[dst], env.pool[first[:8]])  # the first copy stayed


@pytest.mark.parametrize("how", ["failed copy", "reaped", "bad range"])
def test_leased_slots_given_up_are_freed_and_never_visible(env, how) -> None:
    slots = lease(env, 3)
    fill(env, slots, shuffled_blocks(18, seed=7))
    assert env.engine.l1.used_bytes == 3 * slot_bytes(env)
    if how == "failed copy":
        assert env.service.store_done(env.scope, done(slots, ok=False)) == 0
    elif how == "reaped":
        env.service.forget(7)
    else:
        with pytest.raises(InvalidPrompt, match="span 3 chunks"):
            env.service.store_done(env.scope, done(slots, start=CHUNK // 2))
    assert env.engine.l1.used_bytes == 0 and len(env.engine.l1) == 0
    assert env.engine.lookup(env.scope.space, TOKENS) == 0 and env.service.leased(7) == 0


def test_leases_past_the_prompts_full_chunks_are_freed(env) -> None:
    slots = lease(env, 3)
    fill(env, slots, shuffled_blocks(18, seed=8))
    digests = env.engine.hasher(env.scope.space).chunk_hashes(TOKENS)
    # The prompt as two chunk hashes: the third leased slot holds no chunk of it.
    ids = [s.id for s in slots]
    two = P.StoreDone(instance_id=7, leases=ids, end=3 * CHUNK, chunk_hashes=b"".join(digests[:2]))
    assert env.service.store_done(env.scope, two) == 2 * CHUNK
    assert env.engine.l1.used_bytes == 2 * slot_bytes(env) and env.service.leased(7) == 0
    assert env.engine.lookup(env.scope.space, TOKENS) == 2 * CHUNK

    short = lease(env, 1)
    with pytest.raises(InvalidPrompt, match="not within the request's"):  # tokens: checked first
        env.service.store_done(
            env.scope, P.StoreDone(instance_id=7, leases=[short[0].id], end=CHUNK, tokens=TOKENS[: CHUNK - 1])
        )
    assert env.engine.l1.used_bytes == 2 * slot_bytes(env)


def test_leases_are_per_instance_and_named_once(env) -> None:
    slots = lease(env, 2)
    fill(env, slots, shuffled_blocks(18, seed=9))
    other = type(env.scope)(8, env.scope.space, 0, 8)
    with pytest.raises(BadTicket, match="not held by instance 8"):
        claim = P.StoreDone(instance_id=8, leases=[slots[0].id], end=CHUNK, tokens=TOKENS)
        env.service.store_done(other, claim)
    assert env.service.leased(7) == 2  # untouched by another instance's claim
    assert env.service.store_done(env.scope, done(slots)) == 2 * CHUNK
    with pytest.raises(BadTicket, match="not held by instance 7"):
        env.service.store_done(env.scope, done(slots))
    assert env.engine.lookup(env.scope.space, TOKENS) == 2 * CHUNK  # the published chunks stay


def test_the_lease_is_capped_by_bytes(env) -> None:
    env.service.max_lease_bytes = 5 * slot_bytes(env)
    assert len(lease(env, P.MAX_LEASE)) == 5
    assert lease(env, 1) == []  # none handed back yet: no room
    assert env.engine.l1.used_bytes == 5 * slot_bytes(env)


def test_leases_a_store_is_filling_leave_the_cap_so_the_next_store_has_a_lease(env) -> None:
    env.service.max_lease_bytes = 3 * slot_bytes(env)
    filling = lease(env, P.MAX_LEASE)
    ids = [s.id for s in filling]

    def reserve(names: list[int], instance: int = 7) -> list[int]:
        scope = env.scope if instance == 7 else type(env.scope)(instance, env.scope.space, 0, instance)
        req = P.StoreReserve(instance_id=instance, tokens=TOKENS, end=0, lease=P.MAX_LEASE, filling=names)
        return [s.id for s in env.service.store_reserve(scope, req).leased]

    assert reserve([424242]) == []  # an id the instance does not hold frees no room
    assert len(reserve(ids, instance=8)) == 3 and env.service.leased(7) == 3  # 8's own lease only
    topped = reserve(ids)
    assert len(topped) == 3 and env.service.leased(7) == 6  # the next store's lease
    assert reserve(topped) == []  # at most one cap of leases filling at once
    fill(env, filling, shuffled_blocks(18, seed=12))
    assert env.service.store_done(env.scope, done(filling)) == 3 * CHUNK
    assert env.service.leased(7) == 3 and reserve([]) == []  # reported: the cap holds 3 unused again
    assert len(reserve(topped)) == 3 and env.service.leased(7) == 6


def test_a_report_with_a_bad_ticket_still_gives_its_leased_slots_back(env) -> None:
    slots = lease(env, 2)
    fill(env, slots, shuffled_blocks(18, seed=10))
    with pytest.raises(BadTicket, match="not an open store_reserve ticket"):
        env.service.store_done(env.scope, done(slots, ticket=424242))
    assert env.service.leased(7) == 0 and env.engine.l1.used_bytes == 0
    assert env.engine.lookup(env.scope.space, TOKENS) == 0


def test_all_leases_together_are_capped_however_many_instances_register(env) -> None:
    slot = slot_bytes(env)
    env.service.max_lease_bytes = 4 * slot
    env.service.max_total_lease_bytes = 6 * slot
    assert len(lease(env, P.MAX_LEASE)) == 4  # instance 7: its own cap
    other = type(env.scope)(8, env.scope.space, 0, 8)
    reply = env.service.store_reserve(other, P.StoreReserve(instance_id=8, tokens=TOKENS, end=0, lease=99))
    assert len(reply.leased) == 2  # what is left of the total
    env.service.forget(7)  # instance 7's lease goes back to the total
    again = env.service.store_reserve(other, P.StoreReserve(instance_id=8, tokens=TOKENS, end=0, lease=99))
    assert len(again.leased) == 2 and env.service.leased(8) == 4
    assert env.engine.l1.used_bytes == 4 * slot
