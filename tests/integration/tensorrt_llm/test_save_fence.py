"""A save's copies start after TRT-LLM's sampling, released by the worker's next hook (D67)."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from typing import Any

import pytest
import torch

from lmcache.integration.tensorrt_llm import save_fence
from lmcache.integration.tensorrt_llm.connector import LMCacheWorker
from lmcache.integration.tensorrt_llm.inflight import Done
from lmcache.integration.tensorrt_llm.plan import ConnectorMetadata, LoadPlan, Prompt, Transfer
from lmcache.integration.tensorrt_llm.save_fence import SaveFence
from lmcache.integration.tensorrt_llm.settings import ConnectorSettings
from lmcache.integration.tensorrt_llm.targets import PoolTarget
from lmcache.integration.tensorrt_llm.window_fence import SaveCopies
from lmcache.rate_limit import RateLimitedLog

CPU = torch.device("cpu")


class _Stream:
    """Stands in for a CUDA stream: each recorded event is a new marker."""

    def __init__(self) -> None:
        self.events: list[object] = []

    def record_event(self) -> object:
        self.events.append(object())
        return self.events[-1]


class _Backend:
    """Keeps the fence each save was given; a save lands at once."""

    def __init__(self) -> None:
        self.fences: list[SaveFence] = []

    def register(self, targets: list[PoolTarget]) -> None:
        return None

    def begin_iteration(self, context: Any) -> None:
        return None

    def layerwise_layers(self) -> int | None:
        return None

    def load(self, plan: LoadPlan, context: Any, stream: Any, layers: Any = None) -> Done:
        return lambda: True

    def save(self, saves: list[Transfer], fence: SaveFence) -> list[SaveCopies]:
        self.fences.append(fence)
        landed: Future[Any] = Future()
        landed.set_result(None)
        return [[landed] for _ in saves]


def _worker(backend: _Backend, saves: list[Transfer]) -> LMCacheWorker:
    settings = ConnectorSettings("m", 1, tokens_per_block=4, chunk_size=8)
    worker = LMCacheWorker(None, settings, backend)  # type: ignore[arg-type]
    worker.register_kv_caches(torch.zeros(6, 2, 2, 8))
    worker.bind_connector_meta(ConnectorMetadata(saves=saves))
    return worker


def _save(request_id: int) -> Transfer:
    return Transfer(request_id, Prompt(list(range(8)), None), 0, [0, 1], 0, 8)


def _waiter(fence: SaveFence) -> tuple[threading.Thread, list[Any]]:
    got: list[Any] = []
    thread = threading.Thread(target=lambda: got.append(fence.wait()))
    thread.start()
    return thread, got


def test_a_save_waits_until_released_then_follows_the_stream_as_it_was_then() -> None:
    stream = _Stream()
    fence = SaveFence(stream, CPU)
    thread, got = _waiter(fence)
    thread.join(timeout=0.05)
    assert thread.is_alive(), "the save started before its release"
    fence.release(stream)
    thread.join(timeout=10)
    assert got == [stream.events[1]]  # the event recorded at the release, after sampling


def test_released_from_another_stream_a_save_follows_the_forward_only() -> None:
    forward, other = _Stream(), _Stream()
    fence = SaveFence(forward, CPU)
    fence.release(other)
    fence.release(forward)  # a second release changes nothing
    assert fence.wait() is forward.events[0]
    assert other.events == [] and len(forward.events) == 1


def test_an_unreleased_save_starts_after_the_forward_once_the_timeout_passes(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(save_fence, "RELEASE_TIMEOUT_S", 0.01)
    monkeypatch.setattr(save_fence, "_late", RateLimitedLog(save_fence.logger))
    stream = _Stream()
    fence = SaveFence(stream, CPU)
    with caplog.at_level(logging.WARNING, logger=save_fence.logger.name):
        assert fence.wait() is stream.events[0]
    assert not fence.released
    assert "a save waited 0.0 s for the worker's next hook" in caplog.text


def test_get_finished_releases_the_iterations_saves() -> None:
    backend = _Backend()
    worker = _worker(backend, [_save(1), _save(2)])
    worker.start_load_kv(None)
    worker.wait_for_save(None)
    (fence,) = backend.fences
    assert not fence.released
    assert worker.get_finished([1], []) == ([1], [])
    assert fence.released


def test_without_get_finished_the_next_iteration_releases_them() -> None:
    backend = _Backend()
    worker = _worker(backend, [_save(1)])
    worker.wait_for_save(None)
    first = backend.fences[0]
    worker.start_load_kv(None)
    assert first.released
    worker.bind_connector_meta(ConnectorMetadata(saves=[_save(2)]))
    worker.wait_for_save(None)
    second = backend.fences[1]
    worker.bind_connector_meta(ConnectorMetadata(saves=[_save(3)]))
    worker.wait_for_save(None)  # a forward with no start_load_kv before it
    assert second.released and not backend.fences[2].released


def test_an_iteration_without_saves_makes_no_fence() -> None:
    backend = _Backend()
    worker = _worker(backend, [])
    worker.wait_for_save(None)
    worker.get_finished([], [])
    assert backend.fences == []


@pytest.mark.gpu
def test_on_the_device_a_save_reads_what_sampling_wrote_before_its_release() -> None:
    """A "forward", then "sampling" that writes a flag after a long kernel; a save stream ordered by
    the fence released after sampling reads the flag set."""
    device = torch.device("cuda", torch.cuda.current_device())
    current = torch.cuda.Stream(device)
    side = torch.cuda.Stream(device)
    flag = torch.zeros(1, dtype=torch.int32, device=device)
    seen = torch.full((1,), -1, dtype=torch.int32, device=device)
    work = torch.full((4096, 4096), 1 / 4096, device=device)  # a product of it is itself
    product = torch.empty_like(work)
    with torch.cuda.stream(current):
        torch.mm(work, work, out=product)  # the forward
        fence = SaveFence(current, device)
        for _ in range(25):  # sampling, far longer than the save's wait below
            torch.mm(work, work, out=product)
        flag.fill_(1)
        fence.release_after_current()
    side.wait_event(fence.wait())
    with torch.cuda.stream(side):
        seen.copy_(flag)
    side.synchronize()
    assert int(seen.item()) == 1
