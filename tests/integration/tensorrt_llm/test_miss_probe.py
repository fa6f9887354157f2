"""How the scheduler finds a miss through the cache server without hashing the whole prompt.

A server with L1 alone offers its presence counts (``lmcache.server.presence``): a miss costs one
chunk's hashing and no round trip. A server with lower tiers offers none; the scheduler then probes
(``miss_probe``): a miss of a long prompt costs one chunk's hashing and a one-chunk lookup, and once
lookups mostly hit, they go straight to the full lookup. Either way a miss's saves, sent as tokens,
serve later hits bit-equal."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pytest
from support.mp_rig import BLOCKS, CHUNK, CHUNKS, TOKENS, TPB, Request, Rig, serve
from support.server_process import ServerProcess, wait_until

from lmcache.integration.tensorrt_llm.miss_probe import PROBE_MIN_CHUNKS, MissProbe
from lmcache.server.client import CacheServerClient
from lmcache.server.presence import PresenceView


@pytest.fixture
def server(lmcache_env: pytest.MonkeyPatch) -> Iterator[ServerProcess]:
    """A server with a disk tier: lookups probe."""
    lmcache_env.setenv("LMCACHE_CHUNK_SIZE", str(CHUNK))
    yield from serve(with_disk=True)


@pytest.fixture
def l1_server(lmcache_env: pytest.MonkeyPatch) -> Iterator[ServerProcess]:
    """A server with L1 alone: lookups read its presence counts."""
    lmcache_env.setenv("LMCACHE_CHUNK_SIZE", str(CHUNK))
    yield from serve(with_disk=False)


def lookups_made(client: CacheServerClient, action: Callable[[], object]) -> tuple[int, int]:
    """(lookups, tokens looked up) the server counted while ``action()`` ran."""
    before = client.stats().engine.counters
    action()
    after = client.stats().engine.counters
    return after.lookups - before.lookups, after.lookup_tokens - before.lookup_tokens


def test_a_miss_probes_one_chunk_and_its_tokens_saved_serve_a_bit_equal_hit(server: ServerProcess) -> None:
    rig = Rig(server.ipc_url)
    tokens = list(range(7, 7 + TOKENS))
    with CacheServerClient(server.ipc_url, timeout_s=20) as observer:
        found: list[tuple[Request, int]] = []
        assert lookups_made(observer, lambda: found.append(rig.lookup(tokens))) == (1, CHUNK)
        request, matched = found[0]
        assert matched == 0
        source = list(range(BLOCKS))
        rig.prefill_and_save(request, source)  # the prompt was never hashed here: saved by its tokens

        # Recent lookups missed: the next one probes, then looks up the whole prompt and pins it.
        assert lookups_made(observer, lambda: found.append(rig.lookup(tokens))) == (2, CHUNK + TOKENS)
        request, matched = found[1]
        assert matched == TOKENS - TPB  # never the last prompt token
        rig.load_matches(request, matched, source)


def lookups_served(client: CacheServerClient) -> int:
    """Lookups the server ran itself (its lookup latency histogram; misses clients report do not count)."""
    return client.stats().engine.latency.lookup.count


def test_a_miss_costs_no_round_trip_where_the_server_offers_its_counts(l1_server: ServerProcess) -> None:
    rig = Rig(l1_server.ipc_url)
    tokens = list(range(11, 11 + TOKENS))
    with CacheServerClient(l1_server.ipc_url, timeout_s=20) as observer:
        found: list[tuple[Request, int]] = []
        before, served = observer.stats().engine.counters, lookups_served(observer)
        found.append(rig.lookup(tokens))
        request, matched = found[0]
        assert matched == 0 and lookups_served(observer) == served  # the server never saw it
        # ... but counts it once the client's heartbeat reports it: the server's hit rate stays true.
        wait_until(
            lambda: observer.stats().engine.counters.lookup_tokens == before.lookup_tokens + TOKENS,
            "the miss reported by heartbeat",
        )
        assert observer.stats().engine.counters.lookups == before.lookups + 1
        source = list(range(BLOCKS))
        rig.prefill_and_save(request, source)

        # The counts now say "ask": the full lookup, no probe, pins (reported with the pass's metadata)
        # and loads the prompt bit-equal.
        looked_up = lookups_made(observer, lambda: (found.append(rig.lookup(tokens)), rig.end_pass()))
        assert looked_up == (1, TOKENS)
        request, matched = found[1]
        assert matched == TOKENS - TPB
        rig.load_matches(request, matched, source)

        assert observer.clear() == CHUNKS
        served = lookups_served(observer)
        found.append(rig.lookup(tokens))
        assert found[2][1] == 0 and lookups_served(observer) == served


def test_a_save_reported_done_is_found_before_the_server_counts_it(
    l1_server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shared-L1 save is published by a one-way report: the counts may not show it yet when TRT-LLM
    learns the save landed. Here they never do (a view of counts the server does not write), so only
    what the client remembers of its own reports makes the next lookup ask the server."""
    original = PresenceView.map

    def unwritten(info, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        view = original(info, *args, **kwargs)
        return None if view is None else PresenceView(info, np.zeros(info.nbytes // 4, dtype="<u4"))

    monkeypatch.setattr(PresenceView, "map", unwritten)
    rig = Rig(l1_server.ipc_url)
    tokens = list(range(17, 17 + TOKENS))
    request, matched = rig.lookup(tokens)
    assert matched == 0
    source = list(range(BLOCKS))
    rig.prefill_and_save(request, source)

    request, matched = rig.lookup(tokens)
    assert matched == TOKENS - TPB
    rig.load_matches(request, matched, source)
    with CacheServerClient(l1_server.ipc_url, timeout_s=20) as observer:
        served = lookups_served(observer)
        assert rig.lookup(list(range(60_000, 60_000 + TOKENS)))[1] == 0
        assert lookups_served(observer) == served  # another prompt still misses without a round trip


def test_lookups_that_mostly_hit_stop_probing(server: ServerProcess) -> None:
    rig = Rig(server.ipc_url)
    tokens = list(range(3, 3 + TOKENS))
    request, _ = rig.lookup(tokens)
    rig.prefill_and_save(request, list(range(BLOCKS)))
    with CacheServerClient(server.ipc_url, timeout_s=20) as observer:
        counts = [lookups_made(observer, lambda: rig.lookup(tokens)) for _ in range(40)]
        stray: list[tuple[Request, int]] = []
        fresh = list(range(50_000, 50_000 + TOKENS))
        miss = lookups_made(observer, lambda: stray.append(rig.lookup(fresh)))
    assert counts[0] == (2, CHUNK + TOKENS)  # right after a miss: probe, then the full lookup
    assert counts[-1] == (1, TOKENS)  # after a run of hits: the full lookup alone
    assert miss == (1, TOKENS) and stray[0][1] == 0  # still no probe: one miss does not turn it back


def test_the_probe_is_wanted_for_long_prompts_while_lookups_mostly_miss() -> None:
    probe = MissProbe()
    assert probe.wanted(PROBE_MIN_CHUNKS) and not probe.wanted(PROBE_MIN_CHUNKS - 1)
    for _ in range(40):
        probe.record(True)
    assert not probe.wanted(PROBE_MIN_CHUNKS)
    for _ in range(40):
        probe.record(False)
    assert probe.wanted(PROBE_MIN_CHUNKS)


def test_lookups_that_mostly_hit_skip_the_presence_counts(
    l1_server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading the counts hashes the first chunk alone, which the full lookup then hashes again: once
    lookups mostly hit, each hit hashes its prompt once; a run of misses brings the counts back."""
    rig = Rig(l1_server.ipc_url)
    tokens = list(range(13, 13 + TOKENS))
    request, _ = rig.lookup(tokens)
    with CacheServerClient(l1_server.ipc_url, timeout_s=20) as observer:
        chunks = observer.stats().engine.l1.chunks
        rig.prefill_and_save(request, list(range(BLOCKS)))
        # The save's report is one-way: the counts show its chunks once the server has read it.
        wait_until(lambda: observer.stats().engine.l1.chunks >= chunks + CHUNKS, "the save published")
    hashed: list[int] = []
    original = CacheServerClient.chunk_hashes

    def recording(self, prompt, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        hashed.append(len(prompt))
        return original(self, prompt, *args, **kwargs)

    monkeypatch.setattr(CacheServerClient, "chunk_hashes", recording)

    def hashing_of(lookup: Callable[[], tuple[Request, int]]) -> tuple[int, list[int]]:
        hashed.clear()
        return lookup()[1], list(hashed)

    hits = [hashing_of(lambda: rig.lookup(tokens)) for _ in range(40)]
    assert hits[0] == (TOKENS - TPB, [CHUNK, TOKENS])  # right after a miss: the counts read first
    assert hits[-1] == (TOKENS - TPB, [TOKENS])  # after a run of hits: hashed once
    misses = [
        hashing_of(lambda i=i: rig.lookup(list(range(90_000 + i, 90_000 + i + TOKENS)))) for i in range(40)
    ]
    assert misses[0] == (0, [TOKENS]) and misses[-1] == (0, [CHUNK])
