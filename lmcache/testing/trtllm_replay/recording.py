"""A connector pair that records every call the executor makes, with configurable answers.

It plays the role of the MagicMock connectors in TRT-LLM's own connector tests: the scenario
tests assert call counts and ``SchedulerOutput`` contents on it, and a connector author can use it
to see exactly what their connector will be called with. Arguments are deep-copied at call time
(the executor mutates its requests and reuses nothing, but the copies make the log immutable).

The V2 calls are recorded too: the grouped forms, ``register_kv_cache_layout`` (recorded as a
``LayoutSummary``), ``cancel_load`` and ``request_reset``. The reservation trio is overridden only
when ``reserve=`` is given (or, when wrapping, where the wrapped class overrides it), so both the
legacy query path and the reservation path can be recorded. ``wrap=(scheduler_factory,
worker_factory)`` delegates every call to a real connector pair and records it on the way.
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
SaveAnswer = bool | Callable[[Any, Any], bool]  # fn(request, block ids (flat or per group))
ReserveAnswer = Any | Callable[[Any, int, int], Any]  # (n, async) or fn(request, computed, id)
Factory = Callable[[Any], Any]


@dataclass(frozen=True)
class LayoutSummary:
    """A ``KvCacheLayout`` as recorded: per group (id, layer ids, window, region shapes)."""

    tokens_per_block: int
    groups: tuple[tuple[int, tuple[int, ...], int | None, tuple[tuple[int, int, int], ...]], ...]
    dtype: Any

    @classmethod
    def of(cls, layout: Any) -> LayoutSummary:
        groups = tuple(
            (
                g.layer_group_id,
                tuple(g.layer_ids),
                g.window_size,
                tuple((r.size, r.stride, r.num_slots) for r in g.regions),
            )
            for g in layout.groups
        )
        return cls(layout.tokens_per_block, groups, getattr(layout, "dtype", None))


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
    py_num_connector_matched_tokens: int | None
    """What TRT-LLM's commit (or ``accept_prefix_load``) recorded; None on the C++ view the query gets."""

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
            py_num_connector_matched_tokens=getattr(request, "py_num_connector_matched_tokens", None),
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
    ``reserve``: override the reservation trio, answering ``reserve_prefix`` with ``(n, async)`` or
    ``fn(request, num_computed_tokens, reservation_id)`` (answers are not checked here, so
    malformed ones reach the executor); ``get_finished_prefix_loads`` echoes each dispatched
    reservation id after ``prefix_load_delay`` more polls (an int, or per rank; never without
    ``echo``). ``wrap``: a real ``(scheduler_factory, worker_factory)`` to delegate to; the answer
    options are then unused.
    """

    def __init__(
        self,
        *,
        match: MatchAnswer = (0, False),
        async_save: SaveAnswer = False,
        echo: bool = True,
        finished_delay: int | dict[int, int] = 0,
        forward_pass_callable: bool = False,
        reserve: ReserveAnswer | None = None,
        prefix_load_delay: int | dict[int, int] = 0,
        wrap: tuple[Factory, Factory] | None = None,
    ) -> None:
        self.match = match
        self.async_save = async_save
        self.echo = echo
        self.finished_delay = finished_delay
        self.forward_pass_callable = forward_pass_callable
        self.reserve = reserve
        self.prefix_load_delay = prefix_load_delay
        self.wrap = wrap
        self.calls: list[RecordedCall] = []
        self.scheduler: RecordingScheduler | None = None
        self.workers: dict[int, RecordingWorker] = {}
        self._lock = threading.Lock()

    def factories(self) -> tuple[Callable[[Any], RecordingScheduler], Callable[[Any], RecordingWorker]]:
        """``connector=`` argument for ``ReplayExecutor``."""
        return self._make_scheduler, self._make_worker

    def _make_scheduler(self, llm_args: Any) -> RecordingScheduler:
        inner = self.wrap[0](llm_args) if self.wrap is not None else None
        cls = _with_trio(RecordingScheduler, _SCHEDULER_TRIO, KvCacheConnectorScheduler, inner, self)
        return cls(llm_args, recorder=self, inner=inner)

    def _make_worker(self, llm_args: Any) -> RecordingWorker:
        inner = self.wrap[1](llm_args) if self.wrap is not None else None
        cls = _with_trio(RecordingWorker, _WORKER_TRIO, KvCacheConnectorWorker, inner, self)
        return cls(llm_args, recorder=self, inner=inner)

    def add_worker(self, rank: int, worker: RecordingWorker) -> None:
        """Register the recording worker of ``rank`` (each rank's worker is built on its own thread)."""
        with self._lock:
            self.workers[rank] = worker

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

    def delay_for(self, rank: int, delay: int | dict[int, int] | None = None) -> int:
        delay = self.finished_delay if delay is None else delay
        return delay.get(rank, 0) if isinstance(delay, dict) else delay


DEFAULT_RECORDER = RecordingConnector()  # used when the classes are loaded by name from a config


class RecordingScheduler(KvCacheConnectorScheduler):
    """Rank-0 scheduler that logs its calls and answers from its ``RecordingConnector``."""

    def __init__(
        self, llm_args: Any, recorder: RecordingConnector | None = None, inner: Any | None = None
    ) -> None:
        super().__init__(llm_args)
        self.recorder = recorder or DEFAULT_RECORDER
        self.inner = inner
        self.recorder.scheduler = self
        self.recorder.record("scheduler", "__init__")
        self._iteration = 0

    def _log(self, method: str, *args: Any) -> None:
        self.recorder.record("scheduler", method, *args)

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        self._log("get_num_new_matched_tokens", RequestSnapshot.of(request), num_computed_tokens)
        if self.inner is not None:
            return self.inner.get_num_new_matched_tokens(request, num_computed_tokens)
        match = self.recorder.match
        return match(request, num_computed_tokens) if callable(match) else match

    def update_state_after_alloc(self, request: Any, block_ids: list[int]) -> None:
        self._log("update_state_after_alloc", RequestSnapshot.of(request), block_ids)
        if self.inner is not None:
            self.inner.update_state_after_alloc(request, block_ids)

    def update_state_after_alloc_by_layer_group(
        self, request: Any, block_ids_by_layer_group: list[list[int]]
    ) -> None:
        self._log(
            "update_state_after_alloc_by_layer_group", RequestSnapshot.of(request), block_ids_by_layer_group
        )
        if self.inner is not None:
            self.inner.update_state_after_alloc_by_layer_group(request, block_ids_by_layer_group)

    def build_connector_meta(self, scheduler_output: Any) -> object:
        self._log("build_connector_meta", scheduler_output)
        if self.inner is not None:
            return self.inner.build_connector_meta(scheduler_output)
        self._iteration += 1
        return {
            "iteration": self._iteration,
            "new": [r.request_id for r in scheduler_output.new_requests],
            "cached": [r.request_id for r in scheduler_output.cached_requests],
            "prefix_loads": [load.reservation_id for load in getattr(scheduler_output, "prefix_loads", [])],
        }

    def request_finished(self, request: Any, cache_block_ids: list[int]) -> bool:
        self._log("request_finished", RequestSnapshot.of(request), cache_block_ids)
        if self.inner is not None:
            return self.inner.request_finished(request, cache_block_ids)
        answer = self.recorder.async_save
        return answer(request, cache_block_ids) if callable(answer) else answer

    def request_finished_by_layer_group(
        self, request: Any, cache_block_ids_by_layer_group: list[list[int]]
    ) -> bool:
        self._log(
            "request_finished_by_layer_group", RequestSnapshot.of(request), cache_block_ids_by_layer_group
        )
        if self.inner is not None:
            return self.inner.request_finished_by_layer_group(request, cache_block_ids_by_layer_group)
        answer = self.recorder.async_save
        return answer(request, cache_block_ids_by_layer_group) if callable(answer) else answer

    def cancel_load(self, request: Any, start: int, end: int) -> None:
        self._log("cancel_load", RequestSnapshot.of(request), start, end)
        if self.inner is not None:
            self.inner.cancel_load(request, start, end)

    def request_reset(self, request: Any) -> None:
        self._log("request_reset", RequestSnapshot.of(request))
        if self.inner is not None:
            self.inner.request_reset(request)

    def wait_for_initialization(self) -> None:
        self._log("wait_for_initialization")
        if self.inner is not None:
            self.inner.wait_for_initialization()


def _reserve_prefix(
    self: RecordingScheduler, request: Any, num_computed_tokens: int, reservation_id: int
) -> Any:
    self._log("reserve_prefix", RequestSnapshot.of(request), num_computed_tokens, reservation_id)
    if self.inner is not None:
        return self.inner.reserve_prefix(request, num_computed_tokens, reservation_id)
    answer = self.recorder.reserve
    return answer(request, num_computed_tokens, reservation_id) if callable(answer) else answer


def _release_prefix_reservation(
    self: RecordingScheduler, request: Any, reservation_id: int, start: int, end: int
) -> None:
    self._log("release_prefix_reservation", RequestSnapshot.of(request), reservation_id, start, end)
    if self.inner is not None:
        self.inner.release_prefix_reservation(request, reservation_id, start, end)


class RecordingWorker(KvCacheConnectorWorker):
    """Per-rank worker that logs its calls; ``get_finished`` echoes (optionally delayed)."""

    def __init__(
        self, llm_args: Any, recorder: RecordingConnector | None = None, inner: Any | None = None
    ) -> None:
        super().__init__(llm_args)
        self.recorder = recorder or DEFAULT_RECORDER
        self.inner = inner
        self.rank = mpi_rank()
        self.recorder.add_worker(self.rank, self)
        self.recorder.record("worker", "__init__")
        self.kv_cache: Any = None
        self.layout: Any = None
        self._polls = 0
        self._held: list[tuple[int, str, int]] = []  # (due poll, kind, request id)
        self._prefix_polls = 0
        self._held_prefix: list[tuple[int, int]] = []  # (due poll, reservation id)

    def _log(self, method: str, *args: Any) -> None:
        self.recorder.record("worker", method, *args)

    def register_forward_pass_callable(self) -> Callable[[], None] | None:
        if self.inner is not None:
            return self.inner.register_forward_pass_callable()
        if not self.recorder.forward_pass_callable:
            return None
        return lambda: self.recorder.record("worker", "forward_pass_callable")

    def register_kv_caches(self, kv_cache_tensor: Any) -> None:
        self.kv_cache = kv_cache_tensor
        self._log("register_kv_caches", tuple(kv_cache_tensor.shape), kv_cache_tensor.dtype)
        if self.inner is not None:
            self.inner.register_kv_caches(kv_cache_tensor)

    def register_kv_cache_layout(self, layout: Any) -> None:
        self.layout = layout
        self._log("register_kv_cache_layout", LayoutSummary.of(layout))
        if self.inner is not None:
            self.inner.register_kv_cache_layout(layout)

    def bind_connector_meta(self, metadata: object) -> None:
        super().bind_connector_meta(metadata)
        self._log("bind_connector_meta", metadata)
        if self.inner is not None:
            self.inner.bind_connector_meta(metadata)

    def start_load_kv(self, stream: Any) -> None:
        self._log("start_load_kv", _stream_name(stream))
        if self.inner is not None:
            self.inner.start_load_kv(stream)
            return
        meta = self._metadata if isinstance(self._metadata, dict) else {}
        due = self._prefix_polls + self.recorder.delay_for(self.rank, self.recorder.prefix_load_delay)
        self._held_prefix += [(due, rid) for rid in meta.get("prefix_loads", [])]

    def wait_for_layer_load(self, layer_idx: int, stream: Any) -> None:
        self._log("wait_for_layer_load", layer_idx, _stream_name(stream))
        if self.inner is not None:
            self.inner.wait_for_layer_load(layer_idx, stream)

    def save_kv_layer(self, layer_idx: int, stream: Any) -> None:
        self._log("save_kv_layer", layer_idx, _stream_name(stream))
        if self.inner is not None:
            self.inner.save_kv_layer(layer_idx, stream)

    def wait_for_save(self, stream: Any) -> None:
        self._log("wait_for_save", _stream_name(stream))
        if self.inner is not None:
            self.inner.wait_for_save(stream)

    def get_finished(
        self, finished_gen_req_ids: list[int], started_loading_req_ids: list[int]
    ) -> tuple[list[int], list[int]]:
        self._log("get_finished", finished_gen_req_ids, started_loading_req_ids)
        if self.inner is not None:
            return self.inner.get_finished(finished_gen_req_ids, started_loading_req_ids)
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


def worker_get_finished_prefix_loads(self: RecordingWorker) -> list[int]:
    if self.inner is not None:
        ids = list(self.inner.get_finished_prefix_loads())
    elif not self.recorder.echo:
        ids = []
    else:
        ids = [rid for due, rid in self._held_prefix if due <= self._prefix_polls]
        self._held_prefix = [(due, rid) for due, rid in self._held_prefix if due > self._prefix_polls]
        self._prefix_polls += 1
    self._log("get_finished_prefix_loads", ids)
    return ids


_SCHEDULER_TRIO = {
    "reserve_prefix": _reserve_prefix,
    "release_prefix_reservation": _release_prefix_reservation,
}
_WORKER_TRIO = {"get_finished_prefix_loads": worker_get_finished_prefix_loads}


def _with_trio(cls: type, trio: dict[str, Any], base: type, inner: Any, recorder: RecordingConnector) -> type:
    """``cls`` plus the trio methods that should be overridden: all of them when ``reserve`` is
    configured, else (wrapping) those the wrapped object's class overrides."""
    if inner is not None:
        chosen = {
            n: f for n, f in trio.items() if getattr(type(inner), n, None) is not getattr(base, n, None)
        }
    else:
        chosen = dict(trio) if recorder.reserve is not None else {}
    return type(f"Reserving{cls.__name__}", (cls,), chosen) if chosen else cls


def _stream_name(stream: Any) -> Any:
    """Streams are recorded as a label (CUDA streams cannot be deep-copied)."""
    if stream is None:
        return None
    return f"stream:{getattr(stream, 'cuda_stream', id(stream))}"
