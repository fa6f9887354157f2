"""A worker's background threads run from the registration of its pools: started by the first save or
load, a thread's start was that transfer's host time."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import torch
from support.e2e import TPB, llm_args
from support.mp_rig import CHUNK, Rig, serve
from support.server_process import ServerProcess

from lmcache import cudart
from lmcache.integration.tensorrt_llm.tensorrt_adapter import LMCacheKvConnectorWorker


def threads_named(prefix: str) -> int:
    return sum(1 for thread in threading.enumerate() if thread.name.startswith(prefix))


def test_a_background_thread_is_running_when_returned() -> None:
    before = threads_named("lmcache-test-bg")
    executor = cudart.background_thread("lmcache-test-bg", None)
    try:
        assert threads_named("lmcache-test-bg") == before + 1
        assert executor.submit(threading.current_thread).result().name.startswith("lmcache-test-bg")
    finally:
        executor.shutdown(wait=True)
    assert threads_named("lmcache-test-bg") == before


def test_the_in_process_workers_saver_runs_from_registration(lmcache_env: pytest.MonkeyPatch) -> None:
    worker = LMCacheKvConnectorWorker(llm_args())
    before = threads_named("lmcache-save-r0")
    worker.register_kv_caches(torch.zeros(8, 2, 2, 4 * TPB))
    assert threads_named("lmcache-save-r0") == before + 1


@pytest.fixture
def server(lmcache_env: pytest.MonkeyPatch) -> Iterator[ServerProcess]:
    lmcache_env.setenv("LMCACHE_CHUNK_SIZE", str(CHUNK))
    yield from serve(with_disk=False)


def test_the_mp_workers_saver_and_loader_run_from_registration(server: ServerProcess) -> None:
    saving, loading = threads_named("lmcache-mp-save-r0"), threads_named("lmcache-mp-load-r0")
    Rig(server.ipc_url)  # builds the MP worker and registers its pool
    assert threads_named("lmcache-mp-save-r0") == saving + 1
    assert threads_named("lmcache-mp-load-r0") == loading + 1
