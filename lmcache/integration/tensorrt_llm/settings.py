"""What the adapters read from TensorRT-LLM's ``llm_args``, checked once at construction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmcache.config import LMCacheEngineConfig
from lmcache.integration.tensorrt_llm import _trtllm

DEFAULT_TOKENS_PER_BLOCK = 32


@dataclass(frozen=True)
class ConnectorSettings:
    model_name: str
    world_size: int
    """The ranks a request's KV is split across: TRT-LLM's tensor-parallel size, or 1 under attention
    DP, where every rank holds all KV heads of its own requests."""
    tokens_per_block: int
    chunk_size: int
    layerwise: bool = True
    """Loads may go layer-wise (``use_layerwise``; :mod:`lmcache.integration.tensorrt_llm.layerwise`)."""
    kv_manager_v2: bool = False
    """TRT-LLM's KVCacheManagerV2 (``kv_cache_config.use_kv_cache_manager_v2``): pools CUDA IPC cannot
    export."""
    iteration_tokens: int = 8192
    """TRT-LLM's ``max_num_tokens``: the most tokens one iteration computes (and saves)."""
    chunked_prefill: bool = False
    """``enable_chunked_prefill``: a context step may compute only part of the prompt."""
    window: int | None = None
    """The attention window of every layer of a V1 pool (``kv_cache_config.max_attention_window``, one
    value below ``max_seq_len``); None: full attention. V2 describes its layer groups' windows itself."""
    attention_dp: bool = False
    """``enable_attention_dp``: each rank schedules its own requests (its own scheduler and worker) and
    keeps their whole KV; chunks are keyed as one world of one rank, so every rank finds every
    other rank's saves (content keys are not partitioned by rank)."""

    def shard_rank(self, rank: int) -> int:
        """Which part of a request's KV rank ``rank`` holds: its TP rank, or 0 under attention DP."""
        return 0 if self.attention_dp else rank

    @classmethod
    def from_llm_args(cls, llm_args: Any, config: LMCacheEngineConfig) -> ConnectorSettings:
        """Refuse what we cannot serve correctly, with a message that says what to change."""
        pp = int(getattr(llm_args, "pipeline_parallel_size", 1) or 1)
        if pp > 1:
            raise ValueError(
                f"LMCache's TRT-LLM connector does not support pipeline parallelism "
                f"(pipeline_parallel_size={pp}); TRT-LLM rejects KV connectors with PP > 1. Use "
                f"tensor parallelism instead."
            )
        kv_cache_config = getattr(llm_args, "kv_cache_config", None)
        tpb = getattr(kv_cache_config, "tokens_per_block", None) or DEFAULT_TOKENS_PER_BLOCK
        if config.chunk_size % tpb:
            raise ValueError(
                f"LMCACHE_CHUNK_SIZE / chunk_size={config.chunk_size} is not a multiple of TRT-LLM's "
                f"kv_cache_config.tokens_per_block={tpb}; chunks are whole KV blocks. Set chunk_size to "
                f"a multiple of {tpb} (e.g. {tpb * max(1, 256 // tpb)})."
            )
        v2 = bool(getattr(kv_cache_config, "use_kv_cache_manager_v2", False))
        host_cache = int(getattr(kv_cache_config, "host_cache_size", None) or 0)
        if host_cache > 0 and not v2:
            raise ValueError(
                f"kv_cache_config.host_cache_size={host_cache} gives TRT-LLM's V1 KV cache manager a host "
                "(secondary) block pool, whose onboarding and offloading move blocks between pool rows: "
                "block ids then no longer name the rows the connector copies, and it would save and load "
                "the wrong KV. Set host_cache_size=0 (LMCache's L1 is the host tier)."
            )
        model = config.model_name or str(getattr(llm_args, "model", None) or "unknown-model")
        attention_dp = bool(getattr(llm_args, "enable_attention_dp", False))
        if attention_dp and not _trtllm.ATTENTION_DP_API:
            raise ValueError(
                "enable_attention_dp=True needs a TensorRT-LLM whose KV connector API runs one connector "
                "scheduler per attention-DP rank (1.4.0rc4 or newer); this one broadcasts rank 0's "
                "scheduler to ranks that hold other requests. Upgrade TensorRT-LLM or set "
                "enable_attention_dp=False."
            )
        world = 1 if attention_dp else int(getattr(llm_args, "tensor_parallel_size", 1) or 1)
        window = None if v2 else _v1_window(kv_cache_config, getattr(llm_args, "max_seq_len", None))
        return cls(
            model_name=model,
            world_size=world,
            tokens_per_block=int(tpb),
            chunk_size=config.chunk_size,
            layerwise=config.use_layerwise,
            kv_manager_v2=v2,
            chunked_prefill=bool(getattr(llm_args, "enable_chunked_prefill", False)),
            window=window,
            attention_dp=attention_dp,
            iteration_tokens=int(getattr(llm_args, "max_num_tokens", None) or 8192),
        )


def _v1_window(kv_cache_config: Any, max_seq_len: Any) -> int | None:
    """The one attention window a V1 pool's layers share (``max_attention_window``); None for full
    attention. Several windows on V1 share one pool tensor whose pages the connector cannot tell
    apart: refused, naming V2 (which gives each window its own layer group)."""
    windows = getattr(kv_cache_config, "max_attention_window", None)
    if not windows:
        return None
    limit = int(max_seq_len) if max_seq_len else None
    sliding = {int(w) for w in windows if limit is None or int(w) < limit}
    if not sliding:
        return None
    if len(sliding) > 1 or len(sliding) < len({int(w) for w in windows}):
        raise ValueError(
            f"kv_cache_config.max_attention_window={list(windows)} gives the layers of TRT-LLM's V1 KV "
            "cache manager several attention windows in one pool, whose pages the connector cannot tell "
            "apart; set kv_cache_config.use_kv_cache_manager_v2=True (a layer group per window) or use one "
            "window for every layer"
        )
    return sliding.pop()


def request_salt(obj: Any) -> str | int | None:
    """The tenant salt of a request or ``RequestData`` (``cache_salt`` or ``cache_salt_id``)."""
    salt = getattr(obj, "cache_salt", None)
    if salt is None:
        salt = getattr(obj, "cache_salt_id", None)
    return salt
