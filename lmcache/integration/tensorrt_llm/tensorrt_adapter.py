"""In-process TRT-LLM connector (preset ``lmcache``): the cache engine lives inside the TRT-LLM process.

TRT-LLM resolves ``KvCacheConnectorConfig(connector="lmcache")`` to this module's
``LMCacheKvConnectorScheduler`` (rank 0) and ``LMCacheKvConnectorWorker`` (every rank): the shared
connector (:mod:`.connector`) bound to the process's one ``CacheEngine`` (:mod:`.engine_backend`).
"""

from __future__ import annotations

from typing import Any

from lmcache.integration.tensorrt_llm._trtllm import mpi_rank
from lmcache.integration.tensorrt_llm.connector import LMCacheScheduler, LMCacheWorker
from lmcache.integration.tensorrt_llm.engine_backend import (
    EngineIndex,
    EngineTransfers,
    process_engine,
    reset_process_engine,
)
from lmcache.integration.tensorrt_llm.planner import Planner
from lmcache.integration.tensorrt_llm.settings import ConnectorSettings

__all__ = [
    "SCHEDULER_LOG_PREFIX",
    "LMCacheKvConnectorScheduler",
    "LMCacheKvConnectorWorker",
    "process_engine",
    "reset_process_engine",
]

SCHEDULER_LOG_PREFIX = "LMCache TRT-LLM scheduler"


class LMCacheKvConnectorScheduler(LMCacheScheduler):
    """Rank 0: looks up prompts in the process's engine and plans loads and saves."""

    def __init__(self, llm_args: Any) -> None:
        shared = process_engine()
        config = shared.engine.config
        settings = ConnectorSettings.from_llm_args(llm_args, config)
        super().__init__(llm_args, Planner(settings, config, EngineIndex(shared), SCHEDULER_LOG_PREFIX))


class LMCacheKvConnectorWorker(LMCacheWorker):
    """Every rank: loads before the forward, saves after it on a side stream."""

    def __init__(self, llm_args: Any) -> None:
        shared = process_engine()
        settings = ConnectorSettings.from_llm_args(llm_args, shared.engine.config)
        super().__init__(llm_args, settings, EngineTransfers(shared, settings, mpi_rank()))
