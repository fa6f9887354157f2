"""Plain stand-ins for the parts of TRT-LLM's ``TorchLlmArgs`` that a KV cache connector reads.

Connectors receive ``llm_args`` in their constructors and read ``model``, the parallel sizes,
``kv_cache_config.tokens_per_block`` and ``kv_connector_config`` (incl. ``server_url``); these
dataclasses carry exactly those attribute names so the same connector code runs unchanged here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_MAX_TOKENS = 4096

# TRT-LLM's preset registry (connectors/registry.py on main): preset -> (module, scheduler, worker).
CONNECTOR_PRESETS: dict[str, tuple[str, str, str]] = {
    "lmcache": (
        "lmcache.integration.tensorrt_llm.tensorrt_adapter",
        "LMCacheKvConnectorScheduler",
        "LMCacheKvConnectorWorker",
    ),
    "lmcache-mp": (
        "lmcache.integration.tensorrt_llm.tensorrt_mp_adapter",
        "LMCacheMPKvConnectorScheduler",
        "LMCacheMPKvConnectorWorker",
    ),
    "kvbm": (
        "kvbm.trtllm_integration.connector",
        "DynamoKVBMConnectorLeader",
        "DynamoKVBMConnectorWorker",
    ),
}


@dataclass
class KvCacheConfig:
    """KV cache sizing and reuse; ``max_tokens // tokens_per_block`` blocks per rank."""

    tokens_per_block: int = 32
    max_tokens: int | None = None
    enable_block_reuse: bool = True
    free_gpu_memory_fraction: float | None = None  # accepted for source compatibility, ignored
    host_cache_size: int | None = None  # a secondary pool breaks block-id == pool-row; rejected
    use_kv_cache_manager_v2: bool = False  # TRT-LLM main: KVCacheManagerV2 (layer groups, layouts)

    def __post_init__(self) -> None:
        if self.tokens_per_block <= 0:
            raise ValueError("tokens_per_block must be positive")
        if self.max_tokens is not None and self.max_tokens < self.tokens_per_block:
            raise ValueError("max_tokens must hold at least one block")

    @property
    def num_blocks(self) -> int:
        """Blocks in each rank's primary pool."""
        return (self.max_tokens or DEFAULT_MAX_TOKENS) // self.tokens_per_block


@dataclass
class KvCacheConnectorConfig:
    """Which connector classes to load; a ``connector`` preset fills the fields left None (main)."""

    connector_module: str | None = None
    connector_scheduler_class: str | None = None
    connector_worker_class: str | None = None
    connector: str | None = None
    server_url: str | None = None

    def __post_init__(self) -> None:
        if self.connector is not None:
            if self.connector not in CONNECTOR_PRESETS:
                known = ", ".join(sorted(CONNECTOR_PRESETS))
                raise ValueError(f"unknown connector preset {self.connector!r}; known presets: {known}")
            module, scheduler, worker = CONNECTOR_PRESETS[self.connector]
            if self.connector_module is None:
                self.connector_module = module
            if self.connector_scheduler_class is None:
                self.connector_scheduler_class = scheduler
            if self.connector_worker_class is None:
                self.connector_worker_class = worker
        missing = [
            name
            for name in ("connector_module", "connector_scheduler_class", "connector_worker_class")
            if getattr(self, name) is None
        ]
        if missing:
            raise ValueError(f"KvCacheConnectorConfig needs {', '.join(missing)} (or a connector preset)")


@dataclass
class SchedulerConfig:
    """TRT-LLM's ``SchedulerConfig``; only the flag the V2 connector path reads."""

    enable_prefix_aware_scheduling: bool = True  # V2 + a reservation trio -> prefix reservations


@dataclass
class TorchLlmArgs:
    """The ``llm_args`` handed to connector constructors (PyTorch backend)."""

    model: str = "replay-tiny-llm"
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    enable_attention_dp: bool = False
    """Each of the ``tensor_parallel_size`` ranks schedules its own requests (the replay: one
    executor per rank, ``AttentionDPOwner``)."""
    kv_cache_config: KvCacheConfig = field(default_factory=KvCacheConfig)
    kv_connector_config: KvCacheConnectorConfig | None = None
    scheduler_config: SchedulerConfig = field(default_factory=SchedulerConfig)
    enable_chunked_prefill: bool = False
    max_num_tokens: int = 8192  # per-iteration token budget, also the context chunk size
    backend: str = "pytorch"

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError("tensor_parallel_size must be >= 1")
        if self.pipeline_parallel_size < 1:
            raise ValueError("pipeline_parallel_size must be >= 1")
        if self.max_num_tokens < 1:
            raise ValueError("max_num_tokens must be >= 1")


LlmArgs = TorchLlmArgs

KV_MANAGER_MODES = ("v1", "v2", "v2-res")
"""V1; V2 with the legacy query (prefix-aware scheduling off); V2 with prefix reservations."""


def llm_args_for(
    mode: str,
    connector: KvCacheConnectorConfig | None = None,
    *,
    model: str = "replay-tiny-llm",
    tensor_parallel_size: int = 1,
    tokens_per_block: int = 32,
    max_tokens: int | None = None,
    chunk: int | None = None,
) -> TorchLlmArgs:
    """``llm_args`` for one of :data:`KV_MANAGER_MODES`, with block reuse on (V2 needs it under a
    connector) and chunked prefill of ``chunk`` tokens per step when given."""
    if mode not in KV_MANAGER_MODES:
        raise ValueError(f"unknown KV cache manager mode {mode!r}; one of {', '.join(KV_MANAGER_MODES)}")
    return TorchLlmArgs(
        model=model,
        tensor_parallel_size=tensor_parallel_size,
        kv_cache_config=KvCacheConfig(
            tokens_per_block=tokens_per_block,
            max_tokens=max_tokens,
            enable_block_reuse=True,
            use_kv_cache_manager_v2=mode != "v1",
        ),
        kv_connector_config=connector,
        scheduler_config=SchedulerConfig(enable_prefix_aware_scheduling=mode == "v2-res"),
        enable_chunked_prefill=chunk is not None,
        max_num_tokens=chunk or 8192,
    )
