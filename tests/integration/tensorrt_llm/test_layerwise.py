"""Layer-wise loads through the connector: armed only once TRT-LLM's per-layer hooks are proven, a
forward that skips them fails loudly, and both presets serve the same tokens with them."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from support.e2e import DEVICES, MODEL, assert_same_output, baseline, llm_args, prompt
from support.server_process import ServerProcess

from lmcache import chunk_copy, layered_load
from lmcache.integration.tensorrt_llm import layerwise
from lmcache.integration.tensorrt_llm.connector import LMCacheWorker
from lmcache.integration.tensorrt_llm.inflight import Done
from lmcache.integration.tensorrt_llm.plan import ConnectorMetadata, LoadPlan, PinKey, Prompt, Transfer
from lmcache.integration.tensorrt_llm.planner import PromisedLoadError
from lmcache.integration.tensorrt_llm.save_fence import SaveFence
from lmcache.integration.tensorrt_llm.settings import ConnectorSettings
from lmcache.integration.tensorrt_llm.targets import PoolTarget
from lmcache.integration.tensorrt_llm.tensorrt_mp_adapter import reset_process_connections
from lmcache.integration.tensorrt_llm.window_fence import SaveCopies
from lmcache.layered_load import LayerReady
from lmcache.testing.trtllm_replay import ReplayExecutor

LAYERS = 3


class _Backend:
    """Records what each load was given; a layer-wise load marks itself as one."""

    def __init__(self, layers: int | None = LAYERS) -> None:
        self.layers = layers
        self.given: list[LayerReady | None] = []

    def register(self, targets: list[PoolTarget]) -> None:
        return None

    def begin_iteration(self, context: Any) -> None:
        return None

    def layerwise_layers(self) -> int | None:
        return self.layers

    def load(self, plan: LoadPlan, context: Any, stream: Any, layers: LayerReady | None = None) -> Done:
        self.given.append(layers)
        if layers is not None:
            layers.went_layerwise = True
        return lambda: True

    def save(self, saves: list[Transfer], fence: SaveFence) -> list[SaveCopies]:
        return [[] for _ in saves]


def _worker(backend: _Backend, layerwise: bool = True) -> LMCacheWorker:
    settings = ConnectorSettings("m", 1, tokens_per_block=4, chunk_size=8, layerwise=layerwise)
    worker = LMCacheWorker(None, settings, backend)  # type: ignore[arg-type]
    worker.register_kv_caches(torch.zeros(6, LAYERS, 2, 8))
    return worker


def _plan(request_id: int, *, is_async: bool = False, reservation: int | None = None) -> LoadPlan:
    transfer = Transfer(request_id, Prompt(list(range(8)), None), 0, [0, 1], 0, 8)
    return LoadPlan(request_id, PinKey("req", request_id), [transfer], 0, 8, is_async, 8, reservation)


def _forward(worker: LMCacheWorker, plans: list[LoadPlan], hooked: list[int]) -> None:
    worker.bind_connector_meta(ConnectorMetadata(loads=plans))
    worker.start_load_kv(None)
    for layer in hooked:
        worker.wait_for_layer_load(layer, None)
    worker.wait_for_save(None)


def test_loads_go_layer_wise_only_after_a_forward_hooked_every_layer() -> None:
    backend = _Backend()
    worker = _worker(backend)
    _forward(worker, [_plan(1)], hooked=[0, 1])  # one layer short (a CUDA-graph replay would skip all)
    _forward(worker, [_plan(2)], hooked=[0, 1, 2])
    _forward(worker, [_plan(3), _plan(4, is_async=True), _plan(5, reservation=9)], hooked=[0, 1, 2])
    assert [layers is not None for layers in backend.given] == [False, False, True, False, False]


def test_a_plan_with_several_runs_in_one_group_loads_whole() -> None:
    """A sliding window's sink run and window run are two retrieves of one group: layer-wise, each
    would set the layers' events on its own, so such a plan loads whole."""
    backend = _Backend()
    worker = _worker(backend)
    _forward(worker, [], hooked=[0, 1, 2])
    sink, window = (
        Transfer(1, Prompt(list(range(16)), None), 0, [0, -1, -1, 3], s, e) for s, e in [(0, 4), (12, 16)]
    )
    _forward(
        worker, [LoadPlan(1, PinKey("req", 1), [sink, window], 0, 16, False, 16), _plan(2)], hooked=[0, 1, 2]
    )
    assert [layers is not None for layers in backend.given] == [False, True]


@pytest.mark.parametrize(("layerwise", "pool_layers"), [(False, LAYERS), (True, None), (True, 1)])
def test_whole_loads_when_off_or_when_the_pool_cannot_load_by_layer(layerwise: bool, pool_layers) -> None:
    backend = _Backend(pool_layers)
    worker = _worker(backend, layerwise)
    for request_id in range(3):
        _forward(worker, [_plan(request_id)], hooked=[0, 1, 2])
    assert backend.given == [None, None, None]


def test_a_layer_wise_forward_that_skips_a_hook_fails_and_turns_layer_wise_loads_off(caplog) -> None:
    caplog.set_level(logging.INFO, logger="lmcache")
    backend = _Backend()
    worker = _worker(backend)
    _forward(worker, [], hooked=[0, 1, 2])
    assert "layer hooks seen for all 3 layers" in caplog.text
    _forward(worker, [], hooked=[])  # no load: nothing could be read early
    with pytest.raises(PromisedLoadError, match=r"did not call wait_for_layer_load for layers \[2\]"):
        _forward(worker, [_plan(1)], hooked=[0, 1])
    _forward(worker, [_plan(2)], hooked=[0, 1, 2])
    assert [layers is not None for layers in backend.given] == [True, False]


def test_a_cuda_pool_loads_whole_without_the_runtimes_2d_copy(monkeypatch, caplog) -> None:
    monkeypatch.setattr(layerwise.dma_batch, "available_2d", lambda: False)
    loads = layerwise.LayerwiseLoads(enabled=True)
    loads.set_pool_layers(LAYERS, cuda=True)
    assert loads.num_layers is None and "cudaMemcpy2DAsync not found" in caplog.text
    loads.set_pool_layers(LAYERS, cuda=False)  # host copies need no runtime
    assert loads.num_layers == LAYERS


class _Counting:
    """Counts the layer-wise scatters the connector's loads make."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, *args: Any) -> None:
        self.calls += 1
        layered_load.scatter_layers(*args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("layerwise", [True, False])
def test_the_seed_scenario_in_process_with_layer_wise_loads(
    lmcache_env, monkeypatch, tp: int, device: str, layerwise: bool
) -> None:
    lmcache_env.setenv("LMCACHE_USE_LAYERWISE", str(layerwise))
    monkeypatch.setattr(layered_load, "MIN_GROUP_BYTES", 1)  # a group per layer
    monkeypatch.setattr(layered_load, "MIN_COPY_BYTES", 1)
    counting = _Counting()
    monkeypatch.setattr(chunk_copy, "scatter_layers", counting)
    a, b = prompt(520, start=1), prompt(520, start=2)
    executor = ReplayExecutor(llm_args(tp=tp, max_tokens=640), MODEL, device=device)
    first = executor.generate([a], 8)[0]
    executor.generate([b], 8)
    third = executor.generate([a], 8)[0]
    assert third.num_connector_matched_tokens > 0
    assert counting.calls == (tp if layerwise else 0)  # one load per rank, layer-wise when on
    want = baseline([a], 8, device, tp=tp, max_tokens=640)[0]
    assert_same_output(first, want)
    assert_same_output(third, want)


@pytest.mark.parametrize("device", DEVICES)
def test_the_seed_scenario_through_a_shared_l1_server_with_layer_wise_loads(
    lmcache_env, monkeypatch, tmp_path, device: str
) -> None:
    lmcache_env.setenv("LMCACHE_POOL_SHARING", "shared-l1")
    monkeypatch.setattr(layered_load, "MIN_GROUP_BYTES", 1)
    monkeypatch.setattr(layered_load, "MIN_COPY_BYTES", 1)
    counting = _Counting()
    monkeypatch.setattr(chunk_copy, "scatter_layers", counting)
    server = ServerProcess(tmp_path, None, "--chunk-size", "64").start()
    reset_process_connections()
    try:
        a, b = prompt(520, start=1), prompt(520, start=2)
        args = llm_args("lmcache-mp", tp=2, max_tokens=640, server_url=server.ipc_url)
        executor = ReplayExecutor(args, MODEL, device=device)
        first = executor.generate([a], 8)[0]
        executor.generate([b], 8)
        third = executor.generate([a], 8)[0]
    finally:
        reset_process_connections()
        server.stop()
    assert third.num_connector_matched_tokens > 0
    assert counting.calls == 2  # one layer-wise load per rank
    want = baseline([a], 8, device, tp=2, max_tokens=640)[0]
    assert_same_output(first, want)
    assert_same_output(third, want)
