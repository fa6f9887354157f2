"""A replay of TensorRT-LLM's PyTorch executor as a KV cache connector sees it.

TensorRT-LLM cannot be installed everywhere a connector is developed or tested; this package
drives a connector through the same call sequence (match inside allocation, alloc callback,
``SchedulerOutput`` deltas, metadata broadcast, loads, per-layer hooks, saves, async load/save
state machines, ``get_finished`` intersection across TP ranks) against a real paged KV pool in
TRT-LLM's block layout and a tiny deterministic model that reads its K/V from that pool.
See README.md in this folder.
"""

from .block_pool import BlockManager, KvPool, hash_chain
from .connector_manager import KvCacheConnectorManager
from .executor import ExecutorStats, GenerationResult, ReplayExecutor, RequestStats
from .llm_args import CONNECTOR_PRESETS, KvCacheConfig, KvCacheConnectorConfig, LlmArgs, TorchLlmArgs
from .model import ModelConfig, TinyDecoder
from .recording import RecordedCall, RecordingConnector, RecordingScheduler, RecordingWorker, RequestSnapshot
from .request import CppRequestView, LlmRequest, LlmRequestState

__all__ = [
    "CONNECTOR_PRESETS",
    "BlockManager",
    "CppRequestView",
    "ExecutorStats",
    "GenerationResult",
    "KvCacheConfig",
    "KvCacheConnectorConfig",
    "KvCacheConnectorManager",
    "KvPool",
    "LlmArgs",
    "LlmRequest",
    "LlmRequestState",
    "ModelConfig",
    "RecordedCall",
    "RecordingConnector",
    "RecordingScheduler",
    "RecordingWorker",
    "ReplayExecutor",
    "RequestSnapshot",
    "RequestStats",
    "TinyDecoder",
    "TorchLlmArgs",
    "hash_chain",
]
