"""Multi-process TRT-LLM connector (preset ``lmcache-mp``): the cache lives in a separate server.

TRT-LLM resolves ``KvCacheConnectorConfig(connector="lmcache-mp", server_url=...)`` to this
module's ``LMCacheMPKvConnectorScheduler`` (rank 0) and ``LMCacheMPKvConnectorWorker`` (every
rank): the shared connector (:mod:`.connector`) bound to the cache server (:mod:`.server_backend`).
"""

from __future__ import annotations

from typing import Any

from lmcache.config import load_engine_config
from lmcache.integration.tensorrt_llm._trtllm import mpi_rank
from lmcache.integration.tensorrt_llm.connector import LMCacheScheduler, LMCacheWorker
from lmcache.integration.tensorrt_llm.planner import Planner
from lmcache.integration.tensorrt_llm.server_backend import (
    ServerIndex,
    ServerTransfers,
    process_connection,
    reset_process_connections,
    server_url,
)
from lmcache.integration.tensorrt_llm.settings import ConnectorSettings

__all__ = [
    "SCHEDULER_LOG_PREFIX",
    "LMCacheMPKvConnectorScheduler",
    "LMCacheMPKvConnectorWorker",
    "reset_process_connections",
    "server_url",
]

SCHEDULER_LOG_PREFIX = "LMCache MP scheduler"


class LMCacheMPKvConnectorScheduler(LMCacheScheduler):
    """Rank 0: plans loads and saves; lookups are answered by the cache server for all ranks."""

    def __init__(self, llm_args: Any) -> None:
        config = load_engine_config()
        settings = ConnectorSettings.from_llm_args(llm_args, config)
        index = ServerIndex(process_connection(server_url(llm_args), config), config)
        super().__init__(llm_args, Planner(settings, config, index, SCHEDULER_LOG_PREFIX))


class LMCacheMPKvConnectorWorker(LMCacheWorker):
    """Every rank: registers its pools with the server, asks it to load before and save after the forward."""

    def __init__(self, llm_args: Any) -> None:
        config = load_engine_config()
        settings = ConnectorSettings.from_llm_args(llm_args, config)
        connection = process_connection(server_url(llm_args), config)
        super().__init__(llm_args, settings, ServerTransfers(connection, settings, mpi_rank()))
