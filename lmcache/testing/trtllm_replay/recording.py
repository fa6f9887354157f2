"""A connector pair that records every call the executor makes, with configurable answers.

It plays the role of the MagicMock connectors in TRT-LLM's own connector tests: the scenario
tests assert call counts and ``SchedulerOutput`` contents on it, and a connector author can use it
to see exactly what their connector will be called with. Arguments are deep-copied at call time
(the executor mutates its requests and reuses nothing, but the copies make the log immutable).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lmcache.integration.tensorrt_llm._trtllm import (
    KvCacheConnectorScheduler,
    KvCacheConnectorWorker,
    mpi_rank,
)

MatchAnswer = tuple[int, bool] | Callable[[Any, int], tuple[int, bool]]
SaveAnswer = bool | Callable[[Any, list[int]], bool]


@dataclass(frozen=True)
class RequestSnapshot:
    """The request members connectors read, frozen at call time."""

    request_id: int
    tokens: tuple[int, ...]
    prompt_len: int
    context_current_position: int
    context_chunk_size: int
    cache_salt: str | None
    state: str

    @classmethod
    def of(cls, request: Any) -> RequestSnapshot:
        state = getattr(request, "state", None)
        return cls(
            request_id=request.request_id,
            tokens=tuple(request.get_tokens(0)),
            prompt_len=request.prompt_len,
            context_current_position=request.context_current_position,
            context_chunk_size=request.context_chunk_size,
            cache_salt=getattr(request, "cache_salt", None),
            state=getattr(state, "name", str(state)),
        )


@dataclass(frozen=True)
class RecordedCall:
    role: str  # "scheduler" or "worker"
    rank: int
    method: str
    args: tuple[Any, ...]


class RecordingConnector:
    """Shared log and answers for one ``RecordingScheduler`` and one ``RecordingWorker`` per rank.

    ``match``: ``(n, async)`` or ``fn(request, num_computed_tokens)``; ``async_save``: the
    ``request_finished`` answer (bool or ``fn(request, block_ids)``); ``echo``: ``get_finished``
    returns the IDs it was given (else never returns any); ``finished_delay``: how many later
    ``get_finished`` calls an echoed ID is held back (an int, or per rank);
    ``forward_pass_callable``: register a callable that records ``forward_pass_callable`` calls.
    """

    def __init__(
        self,
        *,
        match: MatchAnswer = (0, False),
        async_save: SaveAnswer = False,
        echo: bool = True,
        finished_delay: int | dict[int, int] = 0,
        forward_pass_callable: bool = False,
    ) -> None:
        self.match = match
        self.async_save = async_save
        self.echo = echo
        self.finished_delay = finished_delay
        self.forward_pass_callable = forward_pass_callable
        self.calls: list[RecordedCall] = []
        self.scheduler: RecordingScheduler | None = None
        self.workers: dict[int, RecordingWorker] = {}
        self._lock = threading.Lock()

    def factories(self) -> tuple[Callable[[Any], RecordingScheduler], Callable[[Any], RecordingWorker]]:
        """``connector=`` argument for ``ReplayExecutor``."""
        return (lambda args: RecordingScheduler(args, recorder=self)), (
            lambda args: RecordingWorker(args, recorder=self)
        )

    def record(self, role: str, method: str, *args: Any) -> None:
        with self._lock:
            self.calls.append(RecordedCall(role, mpi_rank(), method, copy.deepcopy(args)))

    def calls_of(self, method: str, rank: int | None = None) -> list[RecordedCall]:
        return [c for c in self.calls if c.method == method and (rank is None or c.rank == rank)]

    def count(self, method: str, rank: int | None = None) -> int:
        return len(self.calls_of(method, rank))

    @property
    def scheduler_outputs(self) -> list[Any]:
        """Every ``SchedulerOutput`` passed to ``build_connector_meta``, in order."""
        return [c.args[0] for c in self.calls_of("build_connector_meta")]

    def delay_for(self, rank: int) -> int:
        if isinstance(self.finished_delay, dict):
            return self.finished_delay.get(rank, 0)
        return self.finished_delay


DEFAULT_RECORDER = RecordingConnector()  # used when the classes are loaded by name from a config


class RecordingScheduler(KvCacheConnectorScheduler):
    """Rank-0 scheduler that logs its calls and answers from its ``RecordingConnector``."""

    def __init__(self, llm_args: Any, recorder: RecordingConnector | None = None) -> None:
        super().__init__(llm_args)
        self.recorder = recorder or DEFAULT_RECORDER
        self.recorder.scheduler = self
        self.recorder.record("scheduler", "__init__")
        self._iteration = 0

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        self.recorder.record(
            "scheduler", "get_num_new_matched_tokens", RequestSnapshot.of(request), num_computed_tokens
        )
        match = self.recorder.match
        return match(request, num_computed_tokens) if callable(match) else match

    def update_state_after_alloc(self, request: Any, block_ids: list[int]) -> None:
        self.recorder.record("scheduler", "update_state_after_alloc", RequestSnapshot.of(request), block_ids)

    def build_connector_meta(self, scheduler_output: Any) -> object:
        self.recorder.record("scheduler", "build_connector_meta", scheduler_output)
        self._iteration += 1
        return {
            "iteration": self._iteration,
            "new": [r.request_id for r in scheduler_output.new_requests],
            "cached": [r.request_id for r in scheduler_output.cached_requests],
        }

    def request_finished(self, request: Any, cache_block_ids: list[int]) -> bool:
        self.recorder.record("scheduler", "request_finished", RequestSnapshot.of(request), cache_block_ids)
        answer = self.recorder.async_save
        return answer(request, cache_block_ids) if callable(answer) else answer

    def wait_for_initialization(self) -> None:
        self.recorder.record("scheduler", "wait_for_initialization")


class RecordingWorker(KvCacheConnectorWorker):
    """Per-rank worker that logs its calls; ``get_finished`` echoes (optionally delayed)."""

    def __init__(self, llm_args: Any, recorder: RecordingConnector | None = None) -> None:
        super().__init__(llm_args)
        self.recorder = recorder or DEFAULT_RECORDER
        self.rank = mpi_rank()
        with self.recorder._lock:
            self.recorder.workers[self.rank] = self
        self.recorder.record("worker", "__init__")
        self.kv_cache: Any = None
        self._polls = 0
        self._held: list[tuple[int, str, int]] = []  # (due poll, kind, request id)

    def register_forward_pass_callable(self) -> Callable[[], None] | None:
        if not self.recorder.forward_pass_callable:
            return None
        return lambda: self.recorder.record("worker", "forward_pass_callable")

    def register_kv_caches(self, kv_cache_tensor: Any) -> None:
        self.kv_cache = kv_cache_tensor
        self.recorder.record(
            "worker", "register_kv_caches", tuple(kv_cache_tensor.shape), kv_cache_tensor.dtype
        )

    def bind_connector_meta(self, metadata: object) -> None:
        super().bind_connector_meta(metadata)
        self.recorder.record("worker", "bind_connector_meta", metadata)

    def start_load_kv(self, stream: Any) -> None:
        self.recorder.record("worker", "start_load_kv", _stream_name(stream))

    def wait_for_layer_load(self, layer_idx: int, stream: Any) -> None:
        self.recorder.record("worker", "wait_for_layer_load", layer_idx, _stream_name(stream))

    def save_kv_layer(self, layer_idx: int, stream: Any) -> None:
        self.recorder.record("worker", "save_kv_layer", layer_idx, _stream_name(stream))

    def wait_for_save(self, stream: Any) -> None:
        self.recorder.record("worker", "wait_for_save", _stream_name(stream))

    def get_finished(
        self, finished_gen_req_ids: list[int], started_loading_req_ids: list[int]
    ) -> tuple[list[int], list[int]]:
        self.recorder.record("worker", "get_finished", finished_gen_req_ids, started_loading_req_ids)
        if not self.recorder.echo:
            return [], []
        due = self._polls + self.recorder.delay_for(self.rank)
        self._held += [(due, "save", rid) for rid in finished_gen_req_ids]
        self._held += [(due, "load", rid) for rid in started_loading_req_ids]
        ready = [h for h in self._held if h[0] <= self._polls]
        self._held = [h for h in self._held if h[0] > self._polls]
        self._polls += 1
        return [rid for _, kind, rid in ready if kind == "save"], [
            rid for _, kind, rid in ready if kind == "load"
        ]


def _stream_name(stream: Any) -> Any:
    """Streams are recorded as a label (CUDA streams cannot be deep-copied)."""
    if stream is None:
        return None
    return f"stream:{getattr(stream, 'cuda_stream', id(stream))}"
