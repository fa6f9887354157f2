"""An MP preset's scheduler and worker over one CPU pool, driven as TRT-LLM's executor does, and a
cache server for it."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from lmcache.integration.tensorrt_llm._trtllm import RequestData, SchedulerOutput
from lmcache.integration.tensorrt_llm.tensorrt_mp_adapter import (
    LMCacheMPKvConnectorScheduler,
    LMCacheMPKvConnectorWorker,
    reset_process_connections,
)
from lmcache.testing.trtllm_replay import KvCacheConfig, KvCacheConnectorConfig, TorchLlmArgs
from support.server_process import ServerProcess, wait_until

CHUNK, TPB, CHUNKS = 64, 16, 16
TOKENS = CHUNK * CHUNKS
BLOCKS = TOKENS // TPB


@dataclass
class Request:
    """The members of TRT-LLM's request the scheduler reads."""

    request_id: int
    tokens: list[int]

    @property
    def prompt_len(self) -> int:
        return len(self.tokens)

    def get_tokens(self, beam: int) -> list[int]:
        return self.tokens


class Rig:
    """The MP preset's scheduler and worker over one CPU pool, driven as TRT-LLM's executor does."""

    def __init__(self, url: str) -> None:
        self.pool = torch.randn(2 * BLOCKS + 4, 2, 2, TPB * 8)
        args = TorchLlmArgs(
            model="test/probe",
            kv_cache_config=KvCacheConfig(tokens_per_block=TPB, max_tokens=self.pool.shape[0] * TPB),
            kv_connector_config=KvCacheConnectorConfig(connector="lmcache-mp", server_url=url),
        )
        self.worker = LMCacheMPKvConnectorWorker(args)
        self.worker.register_kv_caches(self.pool)
        self.scheduler = LMCacheMPKvConnectorScheduler(args)
        self.next_id = 1

    def lookup(self, tokens: list[int]) -> tuple[Request, int]:
        request = Request(self.next_id, tokens)
        self.next_id += 1
        matched, _ = self.scheduler.get_num_new_matched_tokens(request, 0)
        return request, matched

    def end_pass(self) -> None:
        """``build_connector_meta`` of a pass that scheduled nothing: its hits are reported to the server."""
        self.scheduler.build_connector_meta(SchedulerOutput())

    def _iteration(self, request: Request, pages: list[int], scheduled: int) -> None:
        data = RequestData(
            request_id=request.request_id,
            new_tokens=list(request.tokens),
            new_block_ids=pages,
            computed_position=0,
        )
        data.num_scheduled_tokens = scheduled
        self.worker.bind_connector_meta(
            self.scheduler.build_connector_meta(SchedulerOutput(new_requests=[data]))
        )

    def prefill_and_save(self, request: Request, pages: list[int]) -> None:
        self.prefill(request, pages)
        self.wait_saved(request)

    def prefill(self, request: Request, pages: list[int]) -> None:
        """The prompt's iteration, its save handed off; the request finished (its save in flight)."""
        self.scheduler.update_state_after_alloc(request, pages)
        self._iteration(request, pages, len(request.tokens))
        self.worker.start_load_kv(None)
        self.worker.wait_for_save(None)
        assert self.scheduler.request_finished(request, pages)

    def saved(self, request: Request) -> bool:
        """Whether the request's save has landed (asks ``get_finished`` once)."""
        saved, _ = self.worker.get_finished([request.request_id], [])
        return request.request_id in saved

    def wait_saved(self, request: Request) -> None:
        asked = [request.request_id]

        def landed() -> bool:
            nonlocal asked
            saved, _ = self.worker.get_finished(asked, [])
            asked = []
            return request.request_id in saved

        wait_until(landed, "the save landing")

    def load(self, request: Request, matched: int, pages: list[int]) -> None:
        self.scheduler.update_state_after_alloc(request, pages)
        self._iteration(request, pages, len(request.tokens) - matched)
        self.worker.start_load_kv(None)
        self.worker.wait_for_save(None)
        self.scheduler.request_finished(request, pages)

    def load_matches(self, request: Request, matched: int, source: list[int]) -> None:
        """Load ``matched`` tokens into fresh pages and check them bit-equal to the ``source`` pages
        the prompt was saved from."""
        target = list(range(BLOCKS, 2 * BLOCKS))
        self.load(request, matched, target)
        rows = matched // TPB
        assert torch.equal(self.pool[target[:rows]], self.pool[source[:rows]])


def serve(with_disk: bool, *flags: str) -> Iterator[ServerProcess]:
    """A cache server for a :class:`Rig` (``flags``: more of its command line's)."""
    workdir = Path(tempfile.mkdtemp(prefix="lmrig-", dir="/tmp"))
    # A disk tier holds chunks the server's presence counts never see: it offers none, clients probe.
    disk = {"LMCACHE_LOCAL_DISK": f"file://{workdir}/disk", "LMCACHE_MAX_LOCAL_DISK_SIZE": "0.1"}
    env = disk if with_disk else {}
    proc = ServerProcess(workdir, None, "--chunk-size", str(CHUNK), *flags, env=env).start()
    reset_process_connections()
    yield proc
    reset_process_connections()
    proc.stop()
    shutil.rmtree(workdir, ignore_errors=True)
