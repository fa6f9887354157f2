"""The forward gate: saves keep off the GIL while the executor thread launches a forward."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import torch

from lmcache.config import LMCacheEngineConfig
from lmcache.engine import CacheEngine, KeySpace
from lmcache.forward_gate import FORWARD, ForwardGate
from lmcache.integration.tensorrt_llm.connector import OVERLAP_MIN_TOKENS
from lmcache.integration.tensorrt_llm.plan import ConnectorMetadata, LoadPlan, PinKey
from lmcache.integration.tensorrt_llm.save_fence import SaveFence
from lmcache.integration.tensorrt_llm.save_queue import SaveQueue
from lmcache.integration.tensorrt_llm.tensorrt_adapter import LMCacheKvConnectorWorker, reset_process_engine
from lmcache.layout import PoolLayout
from lmcache.testing.trtllm_replay import KvCacheConfig, KvCacheConnectorConfig, TorchLlmArgs
from lmcache.transfer import BlockTransfer

TPB, CHUNK = 16, 64


@pytest.fixture(autouse=True)
def gate_opened_after() -> Iterator[None]:
    yield
    FORWARD.open()


def make() -> tuple[CacheEngine, KeySpace, torch.Tensor]:
    pool = torch.randn(32, 2, 2, TPB * 8)
    config = LMCacheEngineConfig.from_defaults(chunk_size=CHUNK, max_local_cpu_size=0.05)
    return CacheEngine(config, pinned=False), KeySpace("model", PoolLayout.of_pool(pool, TPB)), pool


def test_a_save_waits_at_a_closed_gate_and_lands_whole_once_it_opens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FORWARD, "max_hold_s", 60.0)  # held until opened, however slow this host
    engine, space, pool = make()
    toks = list(range(4 * CHUNK))
    blocks = list(range(16))
    queue = SaveQueue(torch.device("cpu"), "gate-test")
    FORWARD.close()  # this thread launches a forward
    fence = SaveFence(None, torch.device("cpu"))
    fence.release()
    future = queue.submit(
        lambda stream, start: engine.store(space, 0, pool, BlockTransfer(toks, None, blocks, 0, 256)),
        fence,
    )
    assert FORWARD.wait_for_waiter(timeout=10), "the saver did not stop at the closed gate"
    assert not future.done()
    assert engine.lookup(space, toks) == 0  # nothing of the save happened yet
    FORWARD.open()
    future.result(timeout=10)
    assert engine.lookup(space, toks) == 256
    dst = list(range(16, 32))
    assert engine.retrieve(space, 0, pool, BlockTransfer(toks, None, dst, 0, 256)) == 256
    assert torch.equal(pool[16:32], pool[0:16])


def test_the_launching_thread_is_never_held() -> None:
    engine, space, pool = make()
    toks = list(range(2 * CHUNK))
    FORWARD.close()
    holds = FORWARD.holds
    assert engine.store(space, 0, pool, BlockTransfer(toks, None, list(range(8)), 0, 128)) == 128
    assert FORWARD.holds == holds


def test_a_gate_left_closed_only_delays_other_threads() -> None:
    gate = ForwardGate(max_hold_s=0.001)
    gate.close()
    waiter = threading.Thread(target=lambda: [gate.wait() for _ in range(3)])
    waiter.start()
    waiter.join(timeout=10)
    assert not waiter.is_alive()
    assert gate.holds == 3
    gate.open()
    gate.wait()
    assert gate.holds == 3 and gate.is_open


def gated_worker(monkeypatch: pytest.MonkeyPatch) -> LMCacheKvConnectorWorker:
    monkeypatch.setenv("LMCACHE_MAX_LOCAL_CPU_SIZE", "0.05")
    reset_process_engine()
    args = TorchLlmArgs(
        model="test/gate",
        kv_cache_config=KvCacheConfig(tokens_per_block=TPB, max_tokens=32 * TPB),
        kv_connector_config=KvCacheConnectorConfig(connector="lmcache"),
    )
    worker = LMCacheKvConnectorWorker(args)
    worker.register_kv_caches(torch.randn(32, 2, 2, TPB * 8))
    return worker


def test_the_worker_closes_the_gate_for_the_forward_and_opens_it_after(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """TRT-LLM enqueues the forward between ``start_load_kv`` and ``wait_for_save``."""
    worker = gated_worker(monkeypatch)
    try:
        worker.start_load_kv(None)
        assert not FORWARD.is_open
        worker.wait_for_save(None)
        assert FORWARD.is_open
        worker.start_load_kv(None)
        worker.get_finished([], [])  # a forward that failed before wait_for_save: reopened here
        assert FORWARD.is_open
    finally:
        reset_process_engine()


def test_saves_go_on_while_long_whole_loads_are_enqueued_not_short_or_layer_wise_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A long whole load's forward waits for its copies anyway: the gate closes once they are
    enqueued. A short load's forward, or a layer-wise one's (it starts after the first layers), is
    guarded from the start."""
    worker = gated_worker(monkeypatch)
    gate_open_during_load: list[bool] = []
    monkeypatch.setattr(
        worker.backend, "load", lambda *args: gate_open_during_load.append(FORWARD.is_open) or (lambda: True)
    )

    def plan(tokens: int) -> LoadPlan:
        return LoadPlan(
            1, PinKey("req", 1), transfers=[], start=0, end=tokens, is_async=False, required=tokens
        )

    long, short = plan(OVERLAP_MIN_TOKENS), plan(OVERLAP_MIN_TOKENS - CHUNK)
    try:
        worker.bind_connector_meta(ConnectorMetadata(loads=[short]))
        worker.start_load_kv(None)  # no forward has called every layer's hook yet: whole loads
        worker.wait_for_save(None)
        worker.bind_connector_meta(ConnectorMetadata(loads=[long]))
        worker.start_load_kv(None)
        assert gate_open_during_load == [False, True] and not FORWARD.is_open
        for layer in range(2):  # this forward calls every hook: loads may go layer-wise from now on
            worker.wait_for_layer_load(layer, None)
        worker.wait_for_save(None)
        worker.bind_connector_meta(ConnectorMetadata(loads=[long]))
        worker.start_load_kv(None)
        assert gate_open_during_load == [False, True, False] and not FORWARD.is_open
    finally:
        reset_process_engine()
