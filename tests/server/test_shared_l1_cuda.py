"""The shared-memory L1 mode on CUDA pools (issue 13's GPU acceptance); they run on a GPU machine.

- A pool from ``cuMemCreate`` with no shareable handle (KVCacheManagerV2's kind of memory), in
  TRT-LLM's layout, runs the MP replay end to end in the shared-L1 mode under the V1 and V2 KV
  cache managers: outputs bit-equal to a run without a connector, the hit served by the cache.
- The ``export`` mode refuses such a pool with an error naming the shared-L1 mode and how to ask
  for it.
- ``auto`` exports a raw ``cudaMalloc`` pool (CUDA IPC) and serves a VMM pool through shared L1.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import torch
from support.e2e import MODEL, TPB, assert_same_output, prompt
from support.server_process import MODEL as MODEL_NAME
from support.server_process import POOL_SHAPE, ServerProcess, wait_until
from support.server_process import TPB as SERVER_TPB

from lmcache.chunk_copy import EventStart
from lmcache.integration.tensorrt_llm.tensorrt_mp_adapter import reset_process_connections
from lmcache.server.client import CacheServerClient
from lmcache.server.client_errors import ServerError
from lmcache.server.pool_sharing import PoolSharingError
from lmcache.server.shared_l1_worker import SharedL1Copier
from lmcache.testing import pool_modes
from lmcache.testing.cuda_pools import allocate_cudamalloc_pool
from lmcache.testing.trtllm_replay import (
    KV_MANAGER_MODES,
    KvCacheConnectorConfig,
    ReplayExecutor,
    TorchLlmArgs,
    llm_args_for,
)
from lmcache.testing.vmm_pool import allocate_vmm_pool, legacy_ipc_capable
from lmcache.transfer import BlockTransfer

pytestmark = pytest.mark.gpu

StartServer = Callable[..., ServerProcess]


def replay_args(mode: str, server_url: str | None) -> TorchLlmArgs:
    connector = (
        None if server_url is None else KvCacheConnectorConfig(connector="lmcache-mp", server_url=server_url)
    )
    return llm_args_for(mode, connector, model="replay/qwen-like", tokens_per_block=TPB)


@pytest.fixture
def shared_l1_server(start_server: StartServer, lmcache_env: pytest.MonkeyPatch) -> Iterator[ServerProcess]:
    """A server in the shared-L1 mode, and the MP adapter of this process asking for that mode."""
    lmcache_env.setenv(pool_modes.ENV, pool_modes.SHARED_L1)
    reset_process_connections()
    yield start_server("--chunk-size", "64", *pool_modes.server_args(pool_modes.SHARED_L1))
    reset_process_connections()


@pytest.fixture
def enqueued(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Set each time a shared-L1 store has enqueued every copy (it begins to wait for them)."""
    event = threading.Event()
    real_wait = SharedL1Copier.wait_stored

    def wait_stored(copier: SharedL1Copier) -> None:
        event.set()
        real_wait(copier)

    monkeypatch.setattr(SharedL1Copier, "wait_stored", wait_stored)
    return event


@pytest.mark.parametrize("mode", KV_MANAGER_MODES)
def test_vmm_pool_runs_the_mp_replay_bit_equal(shared_l1_server: ServerProcess, mode: str) -> None:
    p = prompt(300, start=11)
    url = shared_l1_server.ipc_url
    cold = ReplayExecutor(replay_args(mode, url), MODEL, device="cuda", pool_allocator=allocate_vmm_pool)
    first = cold.generate([p], 6)[0]
    assert not legacy_ipc_capable(cold.kv_caches[0])  # the memory cannot be exported: shared L1 serves it
    warm = ReplayExecutor(replay_args(mode, url), MODEL, device="cuda", pool_allocator=allocate_vmm_pool)
    again = warm.generate([p], 6)[0]
    assert again.num_device_matched_tokens == 0
    assert again.num_connector_matched_tokens == 256  # every full chunk but the one with the last token
    want = ReplayExecutor(replay_args(mode, None), MODEL, device="cuda").generate([p], 6)[0]
    assert_same_output(first, want)
    assert_same_output(again, want)
    with CacheServerClient(url, timeout_s=20) as client:
        stats = client.stats()
    assert {pool_modes.sharing_of_pool_kind(i.pool_kind) for i in stats.instances} == {pool_modes.SHARED_L1}
    assert stats.pinned_lookups == 0


def test_export_refuses_a_vmm_pool_naming_the_shared_l1_mode(start_server: StartServer) -> None:
    server = start_server(*pool_modes.server_args(pool_modes.AUTO))
    pool = allocate_vmm_pool(POOL_SHAPE, torch.float32, 0)
    with (
        CacheServerClient(server.ipc_url, timeout_s=20) as client,
        pytest.raises((PoolSharingError, ServerError)) as refused,
    ):
        pool_modes.register(client, pool, pool_modes.EXPORT, MODEL_NAME, SERVER_TPB)
    message = str(refused.value)
    assert pool_modes.SHARED_L1 in message
    # ... and how to select it: the client's argument, the adapter's variable or the server's flag.
    assert any(way in message for way in (pool_modes.CLIENT_KWARG, pool_modes.ENV, pool_modes.SERVER_FLAG))


@pytest.mark.parametrize(
    ("allocate", "expected"),
    [(allocate_cudamalloc_pool, pool_modes.CUDA_IPC), (allocate_vmm_pool, pool_modes.SHARED_L1)],
    ids=["cudamalloc", "vmm"],
)
def test_auto_picks_the_mode_the_pool_allows(
    start_server: StartServer, allocate: Callable[..., torch.Tensor], expected: str
) -> None:
    server = start_server(*pool_modes.server_args(pool_modes.AUTO))
    pool = allocate(POOL_SHAPE, torch.float32, 0)
    assert legacy_ipc_capable(pool) == (expected == pool_modes.CUDA_IPC)
    pool[:8].normal_()
    torch.cuda.synchronize()
    tokens = list(range(1000, 1032))  # one chunk: four blocks of eight tokens
    with CacheServerClient(server.ipc_url, timeout_s=20) as client:
        info = pool_modes.register(client, pool, pool_modes.AUTO, MODEL_NAME, SERVER_TPB)
        assert info.sharing == expected
        assert client.store(BlockTransfer(tokens, None, [0, 1, 2, 3], 0, 32)) == 32
        assert client.retrieve(BlockTransfer(tokens, None, [40, 9, 33, 20], 0, 32)) == 32
    assert torch.equal(pool[[40, 9, 33, 20]], pool[[0, 1, 2, 3]])


def slow_work(seconds: float) -> Callable[[], None]:
    """A function that enqueues about ``seconds`` of matmuls on the current stream (timed here once,
    so the margin over the host's work does not depend on the card; large ones, so that a few
    launches fill it and none waits for room in the launch queue)."""
    busy = torch.randn(8192, 8192, device="cuda")
    torch.mm(busy, busy)  # the library's set-up, outside the timing
    torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(5):
        torch.mm(busy, busy)
    torch.cuda.synchronize()
    count = math.ceil(seconds / ((time.perf_counter() - began) / 5))

    def enqueue() -> None:
        out = busy
        for _ in range(count):
            out = torch.mm(out, busy).clamp_(-1, 1)

    return enqueue


def forward_writing_saved_rows(pool: torch.Tensor) -> Callable[[], torch.cuda.Event]:
    """Zero the rows saved (``pool[:8]``); each call of the result enqueues, on a stream of its own, a
    forward of about 2 s that writes them last, and returns the event recorded after it."""
    pool[:8].zero_()
    forward = torch.cuda.Stream()
    with torch.cuda.stream(forward):
        enqueue_slow_work = slow_work(seconds=2.0)

    def run() -> torch.cuda.Event:
        torch.cuda.synchronize()
        with torch.cuda.stream(forward):
            enqueue_slow_work()
            pool[:8].fill_(7.0)
            forward_done = torch.cuda.Event()
            forward_done.record()
        return forward_done

    return run


def test_a_load_given_the_stream_is_ordered_on_the_device_and_unpins_once_copied(
    shared_l1_server: ServerProcess,
) -> None:
    """With the stream that reads the blocks next, a shared-L1 load returns without waiting for that
    stream; its copies come after the stream's earlier work (seconds of it, then writing the target
    blocks) and before its later work; its chunks stay pinned until the copies are done."""
    pool = allocate_vmm_pool(POOL_SHAPE, torch.float32, 0)
    pool[:8].normal_()
    tokens = list(range(2000, 2064))  # one chunk of 64 tokens: eight blocks of eight
    source, target = list(range(8)), [40, 9, 33, 20, 41, 12, 30, 25]
    target_index = torch.tensor(target, device="cuda")  # uploaded now: no host copy on the stream later
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        enqueue_slow_work = slow_work(seconds=2.0)
    with CacheServerClient(shared_l1_server.ipc_url, timeout_s=20) as client:
        pool_modes.register(client, pool, pool_modes.SHARED_L1, MODEL_NAME, SERVER_TPB)
        # Registration warmed the copier (kernels, staging and page-locked memory, each a device-wide
        # barrier the first time): this first load into scattered blocks must not wait either.
        assert client.store(BlockTransfer(tokens, None, source, 0, 64)) == 64
        with torch.cuda.stream(stream):
            enqueue_slow_work()
            pool.index_fill_(0, target_index, 0.0)  # the earlier work writes the target blocks last
            earlier_done = torch.cuda.Event()
            earlier_done.record(stream)
        assert client.lookup(tokens, pin_id="req") == 64
        loaded = client.retrieve(BlockTransfer(tokens, None, target, 0, 64), pin_id="req", stream=stream)
        assert not earlier_done.query(), "the load waited on the host for the stream's earlier work"
        assert client.stats().engine.l1.pinned_chunks == 1  # its copies wait behind that work
        with torch.cuda.stream(stream):
            copied = pool[target_index].clone()  # the stream's later work sees the loaded rows
        stream.synchronize()
        client.shared_l1.close()  # the load's report has been sent
        wait_until(lambda: client.stats().engine.l1.pinned_chunks == 0, "the load's chunks unpinned")
    assert loaded == 64
    assert torch.equal(copied, pool[source])
    assert torch.equal(pool[target], pool[source])


def test_a_cuda_pools_registration_starts_the_load_reports_thread(shared_l1_server: ServerProcess) -> None:
    """The thread that reports loads returning before their copies runs from the registration of a CUDA
    pool: started by the first load, its start was that load's host time."""
    pool = allocate_vmm_pool(POOL_SHAPE, torch.float32, 0)

    def report_threads() -> list[str]:
        return [t.name for t in threading.enumerate() if t.name.startswith("lmcache-load-done")]

    before = report_threads()
    with CacheServerClient(shared_l1_server.ipc_url, timeout_s=20) as client:
        pool_modes.register(client, pool, pool_modes.SHARED_L1, MODEL_NAME, SERVER_TPB)
        assert len(report_threads()) == len(before) + 1


def test_a_load_does_not_wait_for_a_save_in_flight(
    shared_l1_server: ServerProcess, enqueued: threading.Event
) -> None:
    """A worker's save and load move on streams of their own: a load issued while a save's copies wait
    (here behind seconds of the forward that computed the saved rows, on a stream the load does not
    follow) lands before them; on one stream it would wait for the whole save (RESULTS.md, D57)."""
    pool = allocate_cudamalloc_pool(POOL_SHAPE, torch.float32, 0)
    pool[:16].normal_()
    saved, fresh = list(range(3000, 3064)), list(range(4000, 4064))
    forward = torch.cuda.Stream()
    with torch.cuda.stream(forward):
        enqueue_slow_work = slow_work(seconds=2.0)

    def save_after_forward(client: CacheServerClient) -> None:
        with torch.cuda.stream(forward):  # the save waits for the forward, as after TRT-LLM's
            client.store(BlockTransfer(fresh, None, list(range(8, 16)), 0, 64))

    with CacheServerClient(shared_l1_server.ipc_url, timeout_s=20) as client:
        pool_modes.register(client, pool, pool_modes.SHARED_L1, MODEL_NAME, SERVER_TPB)
        assert client.store(BlockTransfer(saved, None, list(range(8)), 0, 64)) == 64
        torch.cuda.synchronize()
        enqueued.clear()
        with torch.cuda.stream(forward):
            enqueue_slow_work()
            forward_done = torch.cuda.Event()
            forward_done.record()
        save = threading.Thread(target=save_after_forward, args=(client,))
        save.start()
        assert enqueued.wait(30)
        reader = torch.cuda.Stream()
        assert client.lookup(saved, pin_id="req") == 64
        target = [40, 9, 33, 20, 41, 12, 30, 25]
        assert client.retrieve(BlockTransfer(saved, None, target, 0, 64), pin_id="req", stream=reader) == 64
        reader.synchronize()
        assert not forward_done.query(), "the load waited for the save's copies"
        save.join(30)
    assert torch.equal(pool[target], pool[:8])


def test_a_save_given_the_forwards_event_waits_for_it_on_the_device(
    shared_l1_server: ServerProcess, enqueued: threading.Event
) -> None:
    """A store given the event after the forward that writes its rows (as the MP adapter's saver
    thread passes it) enqueues every copy while that forward still runs, never waiting for it on the
    host, and saves the rows the forward wrote last."""
    pool = allocate_cudamalloc_pool(POOL_SHAPE, torch.float32, 0)
    tokens, source, target = list(range(5000, 5064)), list(range(8)), [40, 9, 33, 20, 41, 12, 30, 25]
    run_forward = forward_writing_saved_rows(pool)
    stored: list[int] = []
    with CacheServerClient(shared_l1_server.ipc_url, timeout_s=20) as client:
        pool_modes.register(client, pool, pool_modes.SHARED_L1, MODEL_NAME, SERVER_TPB)
        forward_done = run_forward()
        save = threading.Thread(
            target=lambda: stored.append(
                client.store(BlockTransfer(tokens, None, source, 0, 64), after=EventStart(forward_done))
            )
        )
        save.start()
        assert enqueued.wait(30)
        assert not forward_done.query(), "the save waited on the host for the forward"
        save.join(30)
        assert stored == [64]
        assert client.lookup(tokens, pin_id="req") == 64
        assert client.retrieve(BlockTransfer(tokens, None, target, 0, 64), pin_id="req") == 64
    assert torch.all(pool[target] == 7.0)


def test_an_exported_pools_save_names_the_forward_and_the_server_copies_after_it(
    start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The export mode: a store given the forward's event sends its request at once, naming a forward
    event the server polls (the worker never waits for the forward itself), and the server saves the
    rows the forward wrote last."""
    server = start_server("--chunk-size", "64", *pool_modes.server_args(pool_modes.EXPORT))
    pool = allocate_cudamalloc_pool(POOL_SHAPE, torch.float32, 0)
    tokens, source, target = list(range(6000, 6064)), list(range(8)), [40, 9, 33, 20, 41, 12, 30, 25]
    run_forward = forward_writing_saved_rows(pool)
    waited: list[object] = []
    event_wait = torch.cuda.Event.synchronize

    def recorded(event: torch.cuda.Event) -> None:
        waited.append(event)
        event_wait(event)

    monkeypatch.setattr(torch.cuda.Event, "synchronize", recorded)
    with CacheServerClient(server.ipc_url, timeout_s=20) as client:
        info = pool_modes.register(client, pool, pool_modes.EXPORT, MODEL_NAME, SERVER_TPB)
        assert info.sharing == "cuda-ipc" and info.forward_events == 4
        forward_done = run_forward()
        assert client.store(BlockTransfer(tokens, None, source, 0, 64), after=EventStart(forward_done)) == 64
        assert forward_done not in waited, "the worker waited on the host for the forward"
        assert client.lookup(tokens, pin_id="req") == 64
        assert client.retrieve(BlockTransfer(tokens, None, target, 0, 64), pin_id="req") == 64
    assert torch.all(pool[target] == 7.0)
