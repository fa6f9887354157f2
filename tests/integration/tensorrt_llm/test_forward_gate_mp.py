"""The forward gate through the cache server: a worker's save (shared-L1 mode, the worker copies)
waits while the executor enqueues a forward, then lands whole."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from support.mp_rig import BLOCKS, CHUNK, TOKENS, TPB, Rig, serve
from support.server_process import ServerProcess, wait_until

from lmcache.forward_gate import FORWARD


@pytest.fixture
def l1_server(lmcache_env: pytest.MonkeyPatch) -> Iterator[ServerProcess]:
    lmcache_env.setenv("LMCACHE_CHUNK_SIZE", str(CHUNK))
    yield from serve(with_disk=False)


def test_a_save_through_the_server_waits_for_the_forwards_launch(
    l1_server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = Rig(l1_server.ipc_url)
    tokens = list(range(5, 5 + TOKENS))
    request, matched = rig.lookup(tokens)
    assert matched == 0
    source = list(range(BLOCKS))
    # The next iteration's forward is being enqueued while this save runs: the gate stays closed.
    monkeypatch.setattr(FORWARD, "open", lambda: None)
    monkeypatch.setattr(FORWARD, "max_hold_s", 60.0)  # held until opened, however slow this host
    try:
        rig.prefill(request, source)  # start_load_kv closed the gate; wait_for_save handed the save off
        assert FORWARD.wait_for_waiter(timeout=20), "the worker's saver did not stop at the closed gate"
        assert not rig.saved(request)
    finally:
        monkeypatch.undo()
        FORWARD.open()
    wait_until(lambda: rig.saved(request), "the save landing once the gate opened")

    request, matched = rig.lookup(tokens)
    assert matched == TOKENS - TPB
    rig.load_matches(request, matched, source)
