"""The scheduler's hits through the cache server are claimed in shared memory inside
``get_num_new_matched_tokens`` and reported to the server once per pass, by ``build_connector_meta``:
before any rank gets the metadata naming their loads, which then load them bit-equal."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import torch
from support.mp_rig import BLOCKS, CHUNK, TOKENS, TPB, Rig, serve
from support.server_process import ServerProcess

from lmcache.config import LMCacheEngineConfig
from lmcache.integration.tensorrt_llm._trtllm import RequestData, SchedulerOutput
from lmcache.integration.tensorrt_llm.server_backend import process_connection
from lmcache.server import claims
from lmcache.server.client_lanes import LanePool


@pytest.fixture
def l1_server(lmcache_env: pytest.MonkeyPatch) -> Iterator[ServerProcess]:
    """A server with L1 alone: it offers its claim index."""
    lmcache_env.setenv("LMCACHE_CHUNK_SIZE", str(CHUNK))
    yield from serve(with_disk=False)


@pytest.mark.skipif(not claims.available(), reason="lmcache._claims is not built")
def test_a_pass_reports_its_claimed_hits_when_it_builds_its_metadata(
    l1_server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = Rig(l1_server.ipc_url)
    client = process_connection(l1_server.ipc_url, LMCacheEngineConfig.from_defaults()).client
    prompts = [list(range(s, s + TOKENS)) for s in (5, 50_000)]
    saved = []
    for tokens in prompts:
        request, matched = rig.lookup(tokens)
        assert matched == 0
        saved.append(list(range(BLOCKS)) if not saved else list(range(BLOCKS, 2 * BLOCKS)))
        rig.prefill_and_save(request, saved[-1])

    monkeypatch.setattr(client, "heartbeat", lambda **_: None)  # it would report on its own thread
    reports: list[str] = []
    send_all = LanePool.send_all

    def recorded(lanes: LanePool, frames: Sequence[bytes], op: str, timeout: float) -> Any:
        if lanes is client.lanes and op == "lookup_hashes":
            reports.extend([threading.current_thread().name] * len(frames))
        return send_all(lanes, frames, op, timeout)

    monkeypatch.setattr(LanePool, "send_all", recorded)
    found = [rig.lookup(tokens) for tokens in prompts]
    assert [matched for _, matched in found] == [TOKENS - TPB] * 2
    assert reports == []  # two hits claimed, nothing sent yet
    request, matched = found[0]
    target = saved[1]  # its save landed: its pages are free for the load
    rig.scheduler.update_state_after_alloc(request, target)
    data = RequestData(
        request_id=request.request_id,
        new_tokens=list(request.tokens),
        new_block_ids=target,
        computed_position=0,
    )
    data.num_scheduled_tokens = TOKENS - matched
    meta = rig.scheduler.build_connector_meta(SchedulerOutput(new_requests=[data]))
    assert len(reports) == 2  # both of the pass's hits, before the metadata left the scheduler
    rig.worker.bind_connector_meta(meta)
    rig.worker.start_load_kv(None)
    rig.worker.wait_for_save(None)
    rows = matched // TPB
    assert torch.equal(rig.pool[target[:rows]], rig.pool[saved[0][:rows]])
    rig.scheduler.request_finished(request, target)
    assert client.stats().pinned_lookups == 1  # the second hit stays pinned for its own load
    request, matched = found[1]
    assert rig.scheduler.request_finished(request, []) is False
    assert client.stats().pinned_lookups == 0
