"""TensorRT-LLM's connector ABCs, or faithful stand-ins when TRT-LLM is not installed.

The adapters subclass whatever this module exports, so the same classes run inside a real
TRT-LLM (new ``connectors/`` path, then the 1.2.x/1.3.x path) and inside our executor replay.
The stand-ins mirror the names, fields, defaults and signatures of TRT-LLM's own module.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

_TRTLLM_MODULES = (
    "tensorrt_llm._torch.pyexecutor.connectors.kv_cache_connector",
    "tensorrt_llm._torch.pyexecutor.kv_cache_connector",
)


def _import_trtllm_connector_module() -> Any | None:
    for name in _TRTLLM_MODULES:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


_trt = _import_trtllm_connector_module()
USING_TRTLLM = _trt is not None


@dataclass
class _RequestData:
    """Per-request delta reported to ``build_connector_meta`` (TRT-LLM's ``RequestData``)."""

    request_id: int
    new_tokens: list[int]
    new_block_ids: list[int]
    computed_position: int
    num_scheduled_tokens: int = 0
    priorities: list[int] | None = None
    block_hashes: list[int] = field(default_factory=list)
    cache_salt: str | None = None
    cache_salt_id: int | None = None
    new_block_ids_by_layer_group: list[list[int]] = field(default_factory=list)


@dataclass
class _PrefixLoad:
    """One accepted prefix reservation to load this iteration (TRT-LLM main, V2 + reservations).

    ``block_ids_by_layer_group[g][i]`` is the destination page of block ordinal ``i`` in layer
    group ``g``, ``-1`` where that group has no page; ``[start, end)`` are absolute token positions.
    """

    reservation_id: int
    request_id: int
    start: int
    end: int
    is_async: bool
    block_ids_by_layer_group: list[list[int]]
    tokens: list[int]
    cache_salt: str | None = None


@dataclass
class _SchedulerOutput:
    """What the executor scheduled this iteration (TRT-LLM's ``SchedulerOutput``)."""

    new_requests: list[_RequestData] = field(default_factory=list)
    cached_requests: list[_RequestData] = field(default_factory=list)
    attention_dp_rank: int | None = None
    prefix_loads: list[_PrefixLoad] = field(default_factory=list)


class _KvCacheConnectorWorker(ABC):
    """Runs on every rank: moves KV between the pool and the cache."""

    supports_attention_dp: bool = False

    def __init__(self, llm_args: Any) -> None:
        self._llm_args = llm_args
        self._metadata: object = None

    def bind_connector_meta(self, metadata: object) -> None:
        self._metadata = metadata

    def get_connector_meta(self) -> object:
        return self._metadata

    def _clear_connector_meta(self) -> None:
        self._metadata = None

    def register_forward_pass_callable(self) -> Callable[[], None] | None:
        return None

    @abstractmethod
    def register_kv_caches(self, kv_cache_tensor: Any) -> None: ...

    def register_kv_cache_layout(self, layout: Any) -> None:
        tensor = layout.as_single_pool_tensor()
        if tensor is None:
            raise NotImplementedError("this connector supports a single KV pool only")
        self.register_kv_caches(tensor)

    @abstractmethod
    def start_load_kv(self, stream: Any) -> None: ...

    @abstractmethod
    def wait_for_layer_load(self, layer_idx: int, stream: Any) -> None: ...

    @abstractmethod
    def save_kv_layer(self, layer_idx: int, stream: Any) -> None: ...

    @abstractmethod
    def wait_for_save(self, stream: Any) -> None: ...

    @abstractmethod
    def get_finished(
        self, finished_gen_req_ids: list[int], started_loading_req_ids: list[int]
    ) -> tuple[list[int], list[int]]: ...

    def get_finished_prefix_loads(self) -> list[int]:
        """Reservation ids whose load this worker finished (V2 prefix reservations)."""
        return []


class _KvCacheConnectorScheduler(ABC):
    """Runs on rank 0: decides what to load and save per request."""

    supports_attention_dp: bool = False

    def __init__(self, llm_args: Any) -> None:
        self._llm_args = llm_args

    @abstractmethod
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]: ...

    @abstractmethod
    def update_state_after_alloc(self, request: Any, block_ids: list[int]) -> None: ...

    def update_state_after_alloc_by_layer_group(
        self, request: Any, block_ids_by_layer_group: list[list[int]]
    ) -> None:
        if len(block_ids_by_layer_group) != 1:
            raise NotImplementedError("this connector supports a single layer group only")
        self.update_state_after_alloc(request, block_ids_by_layer_group[0])

    @abstractmethod
    def build_connector_meta(self, scheduler_output: Any) -> object: ...

    @abstractmethod
    def request_finished(self, request: Any, cache_block_ids: list[int]) -> bool: ...

    def request_finished_by_layer_group(
        self, request: Any, cache_block_ids_by_layer_group: list[list[int]]
    ) -> bool:
        if len(cache_block_ids_by_layer_group) != 1:
            raise NotImplementedError("this connector supports a single layer group only")
        return self.request_finished(request, cache_block_ids_by_layer_group[0])

    def wait_for_initialization(self) -> None:
        return None

    # V2 (TRT-LLM main): optional; the runtime enables reservations only when a connector
    # overrides all three of reserve_prefix, release_prefix_reservation and the worker's
    # get_finished_prefix_loads.
    def reserve_prefix(self, request: Any, num_computed_tokens: int, reservation_id: int) -> tuple[int, bool]:
        return 0, False

    def release_prefix_reservation(self, request: Any, reservation_id: int, start: int, end: int) -> None:
        return None

    def cancel_load(self, request: Any, start: int, end: int) -> None:
        return None

    def request_reset(self, request: Any) -> None:
        return None


if _trt is not None:
    KvCacheConnectorWorker = _trt.KvCacheConnectorWorker
    KvCacheConnectorScheduler = _trt.KvCacheConnectorScheduler
    SchedulerOutput = _trt.SchedulerOutput
    RequestData = _trt.RequestData
    PrefixLoad = getattr(_trt, "PrefixLoad", _PrefixLoad)
else:
    KvCacheConnectorWorker = _KvCacheConnectorWorker
    KvCacheConnectorScheduler = _KvCacheConnectorScheduler
    SchedulerOutput = _SchedulerOutput
    RequestData = _RequestData
    PrefixLoad = _PrefixLoad

ATTENTION_DP_API = hasattr(KvCacheConnectorScheduler, "supports_attention_dp")
"""This TRT-LLM gives every attention-DP rank its own scheduler and worker, and runs them only when
both classes opt in (``supports_attention_dp``). Older ones broadcast rank 0's scheduler answers to
every rank, which under attention DP hold other requests."""


RankProvider = Callable[[], int | None]
"""Answers this thread's TRT-LLM rank, or None to defer to TRT-LLM's own ``mpi_rank()``."""

_rank_provider: RankProvider | None = None


def set_rank_provider(provider: RankProvider | None) -> None:
    """Install where ``mpi_rank()`` looks first (None removes it).

    For hosts that run several TRT-LLM ranks in one process, where MPI cannot tell them apart:
    the executor replay installs one that answers the rank it is simulating in the calling
    thread. Production TRT-LLM runs one rank per process and installs none.
    """
    global _rank_provider
    _rank_provider = provider


def mpi_rank() -> int:
    """This thread's TRT-LLM rank: the installed rank provider's answer, else TRT-LLM's
    ``mpi_rank()``, else 0 (no TRT-LLM installed)."""
    provider = _rank_provider
    rank = provider() if provider is not None else None
    if rank is not None:
        return rank
    try:
        from tensorrt_llm import mpi_rank as trt_mpi_rank  # type: ignore[import-not-found]
    except ImportError:
        return 0
    return int(trt_mpi_rank())


ProcessProvider = Callable[[], Hashable | None]
"""Answers which simulated TRT-LLM process this thread acts in, or None (this OS process)."""

_process_provider: ProcessProvider | None = None


def set_process_provider(provider: ProcessProvider | None) -> None:
    """Install where ``process_key()`` looks (None removes it).

    For hosts that run, in one OS process, TRT-LLM ranks that would each be a process of their own
    and share nothing: the executor replay's attention-DP owners. Production installs none.
    """
    global _process_provider
    _process_provider = provider


def process_key() -> Hashable | None:
    """Which TRT-LLM process this thread acts in, for what is one per process (the in-process
    engine, the connection to a cache server): None in production, where that is this OS process."""
    provider = _process_provider
    return provider() if provider is not None else None
