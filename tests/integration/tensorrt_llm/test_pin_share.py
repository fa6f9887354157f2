"""A lookup the cache server refuses because the engine's pins would pass ``--pin-share`` is that
request's miss, said as such at WARNING; the engine's other lookups go on hitting."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import torch
from support.mp_rig import BLOCKS, CHUNK, TOKENS, TPB, Rig, serve
from support.server_process import ServerProcess

PROMPT_BYTES = BLOCKS * 2 * 2 * TPB * 8 * 4
"""What one prompt's hit pins (the rig's float32 pool rows)."""
L1_BYTES = 0.25 * (1 << 30)
"""The rig's server's L1 (``--l1-size-gb 0.25``)."""


@pytest.fixture(params=[True, False], ids=["disk", "l1-only"])
def tight_server(request: pytest.FixtureRequest, lmcache_env: pytest.MonkeyPatch) -> Iterator[ServerProcess]:
    """Pins for one prompt's hit, not two; with a disk tier (every lookup asks the server) or L1 alone
    (lookups claimed in shared memory, which asks the server once the share is held)."""
    lmcache_env.setenv("LMCACHE_CHUNK_SIZE", str(CHUNK))
    yield from serve(request.param, "--pin-share", f"{1.5 * PROMPT_BYTES / L1_BYTES:.6f}")


def test_a_lookup_past_the_pin_share_is_a_miss_and_the_next_ones_hit(
    tight_server: ServerProcess, caplog: pytest.LogCaptureFixture
) -> None:
    rig = Rig(tight_server.ipc_url)
    prompts = [list(range(s, s + TOKENS)) for s in (5, 50_000)]
    pages = [list(range(BLOCKS)), list(range(BLOCKS, 2 * BLOCKS))]
    for tokens, saved in zip(prompts, pages, strict=True):
        request, _ = rig.lookup(tokens)
        rig.prefill_and_save(request, saved)

    first, matched = rig.lookup(prompts[0])
    assert matched == TOKENS - TPB  # pinned for its load
    with caplog.at_level(logging.WARNING, logger="lmcache"):
        refused, refused_matched = rig.lookup(prompts[1])
    assert refused_matched == 0  # its pins would pass the share: computed, not loaded
    said = caplog.text
    assert "refused a lookup" in said and "--pin-share" in said and "computes its prefill" in said
    assert "not answering" not in said  # the server is up and serves the engine's other lookups
    rig.scheduler.request_finished(refused, [])
    second_rows = rig.pool[pages[1]].clone()
    rig.load_matches(first, matched, pages[0])  # into pages[1]; its load releases its pins
    again, matched = rig.lookup(prompts[1])
    assert matched == TOKENS - TPB
    rig.load(again, matched, pages[0])
    rows = matched // TPB
    assert torch.equal(rig.pool[pages[0][:rows]], second_rows[:rows])
