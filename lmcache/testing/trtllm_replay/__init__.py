"""A replay of TensorRT-LLM's PyTorch executor as a KV cache connector sees it.

TensorRT-LLM cannot be installed everywhere a connector is developed or tested; this package
drives a connector through the same call sequence (match inside allocation, alloc callback,
``SchedulerOutput`` deltas, metadata broadcast, loads, per-layer hooks, saves, async load/save
state machines, ``get_finished`` intersection across TP ranks) against a real paged KV pool in
TRT-LLM's block layout and a tiny deterministic model that reads its K/V from that pool. With
``KvCacheConfig(use_kv_cache_manager_v2=True)`` it replays KVCacheManagerV2 instead: layer groups
(sliding windows), ``register_kv_cache_layout``, per-chunk pages and prefix reservations.
See README.md in this folder.
"""

from .block_pool import BlockManager, KvPool, PoolAllocator, hash_chain, zeros_pool
from .connector_manager import KvCacheConnectorManager
from .executor import ReplayExecutor, factories_from_config
from .kv_manager import BAD_PAGE_INDEX, GroupedBlockManager
from .layer_groups import GroupedKvPool, LayerGroup
from .layout import KvCacheBufferRef, KvCacheLayerGroupLayout, KvCacheLayout, KvCacheRegion
from .llm_args import (
    CONNECTOR_PRESETS,
    KV_MANAGER_MODES,
    KvCacheConfig,
    KvCacheConnectorConfig,
    LlmArgs,
    SchedulerConfig,
    TorchLlmArgs,
    llm_args_for,
)
from .model import ModelConfig, TinyDecoder
from .ranks import AttentionDPOwner, LocalRanks, ProcessGroupRanks, Ranks, simulated_process, simulated_rank
from .recording import (
    LayoutSummary,
    RecordedCall,
    RecordingConnector,
    RecordingScheduler,
    RecordingWorker,
    RequestSnapshot,
)
from .request import CppRequestView, LlmRequest, LlmRequestState
from .reservations import PrefixReservations, Reservation, wants_prefix_reservations
from .stats import DispatchedLoad, ExecutorStats, GenerationResult, RequestStats

__all__ = [
    "llm_args_for",
    "AttentionDPOwner",
    "BAD_PAGE_INDEX",
    "CONNECTOR_PRESETS",
    "BlockManager",
    "CppRequestView",
    "DispatchedLoad",
    "ExecutorStats",
    "GenerationResult",
    "GroupedBlockManager",
    "GroupedKvPool",
    "KvCacheBufferRef",
    "KV_MANAGER_MODES",
    "KvCacheConfig",
    "KvCacheConnectorConfig",
    "KvCacheConnectorManager",
    "KvCacheLayerGroupLayout",
    "KvCacheLayout",
    "KvCacheRegion",
    "KvPool",
    "LayerGroup",
    "LayoutSummary",
    "LlmArgs",
    "LlmRequest",
    "LlmRequestState",
    "LocalRanks",
    "ModelConfig",
    "PoolAllocator",
    "PrefixReservations",
    "ProcessGroupRanks",
    "Ranks",
    "RecordedCall",
    "RecordingConnector",
    "RecordingScheduler",
    "RecordingWorker",
    "ReplayExecutor",
    "RequestSnapshot",
    "RequestStats",
    "Reservation",
    "SchedulerConfig",
    "TinyDecoder",
    "TorchLlmArgs",
    "factories_from_config",
    "hash_chain",
    "simulated_process",
    "simulated_rank",
    "wants_prefix_reservations",
    "zeros_pool",
]
