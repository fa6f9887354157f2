"""How a worker whose pool the server copies (the export mode) lets the server start a store's copies as
soon as the forward that wrote the blocks ends, and a load's as soon as the work before it on TRT-LLM's
stream ends, without waiting for that work itself first.

The worker makes a few interprocess CUDA events per device (:class:`ForwardEvents`) and sends their
handles with its pool's descriptor. For a store it records a free one after the forward (for a load,
after the stream's work so far), on a relay stream of its own (nothing is added to TRT-LLM's
streams), and names it in the request; the server prepares the transfer meanwhile and polls that
event on the host before the first copy (:class:`WorkerForward`), giving up at the request's deadline
or once the worker's connection closed (a worker that died).
A load's worker still waits for the reply before its stream goes on: the blocks are written then.
Neither process waits for the other's events on the device: an event whose process died never
completes (benchmarks/RESULTS.md, D92), so a device wait on a crashed worker's event would stall the
server's stream for good.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

import torch

from lmcache import cudart
from lmcache.logging import init_logger
from lmcache.server import protocol as P
from lmcache.server.failures import ServiceFailure

if TYPE_CHECKING:
    from lmcache.server.pool_sharing import MappedPool

logger = init_logger(__name__)

__all__ = ["ForwardEvents", "WorkerForward", "open_forward_events", "worker_forward", "EVENT_POLL_S"]

EVENT_POLL_S = 50e-6
"""How often the server asks whether a worker's forward ended (a sleep between ``cudaEventQuery``s)."""
MAX_FORWARD_WAIT_S = 600.0
"""The longest the server waits for one forward, whatever the request's ``timeout_ms``."""


class ForwardEvents:
    """The worker's interprocess events of one device, shared by its exported pools there; each names
    the forward of one request (a store, or a load) at a time."""

    def __init__(self, device: int) -> None:
        with torch.cuda.device(device):
            self._events = [torch.cuda.Event(interprocess=True) for _ in range(P.MAX_FORWARD_EVENTS)]
        self._relay = cudart.new_stream(device)
        self._free = list(range(len(self._events)))
        self._lock = threading.Lock()
        self.handles = [bytes(event.ipc_handle()) for event in self._events]
        """What the pool's descriptor carries: each event's ``cudaIpcEventHandle_t``."""

    @staticmethod
    @functools.cache
    def of_device(device: int) -> ForwardEvents:
        """The process's events on ``device`` (made once: the server opens their handles per pool)."""
        events = ForwardEvents(device)
        _by_handles[tuple(events.handles)] = events
        return events

    @staticmethod
    def named(handles: list[bytes]) -> ForwardEvents | None:
        """This process's events whose handles a descriptor carries, if any."""
        return _by_handles.get(tuple(handles))

    @contextlib.contextmanager
    def after(self, forward: Any) -> Iterator[int | None]:
        """The index of a free event recorded after ``forward`` (a CUDA event), for the request;
        None when every one is in use, after waiting for ``forward`` on the host instead. The event is
        free again once the block exits (the request was answered or given up on)."""
        with self._lock:
            index = self._free.pop() if self._free else None
        if index is None:
            forward.synchronize()
            yield None
            return
        try:
            self._relay.wait_event(forward)
            self._events[index].record(self._relay)
            yield index
        finally:
            with self._lock:
                self._free.append(index)


def open_forward_events(handles: list[bytes], device: int) -> list[Any]:
    """The server's side of a worker's forward events on ``device``; none when one cannot be opened (the
    worker then waits for its forwards itself, as the registration's reply tells it)."""
    try:
        return [torch.cuda.Event.from_ipc_handle(device, handle) for handle in handles]
    except RuntimeError as e:
        logger.warning("cannot open a worker's forward events (%s): its stores wait for its forwards", e)
        return []


class WorkerForward:
    """A transfer's start (:class:`lmcache.chunk_copy.CopyStart`) at the end of a worker's forward (a
    load's: of the work on its stream before the load): the transfer prepares until then, and its
    copies begin once ``event`` completes, polled on the host; ``expiring`` tells when the request's
    client gives up, and then nothing is copied. Entered, it claims event ``index`` in ``awaited``
    (the pool's events being waited for): one request per event."""

    def __init__(
        self, event: Any, expiring: Callable[[], bool], awaited: set[int], index: int, op: str
    ) -> None:
        self._event = event
        self._expiring = expiring
        self._awaited = awaited
        self._index = index
        self._op = op
        self._began = time.monotonic()

    def __enter__(self) -> WorkerForward:
        with _awaited_lock:
            if self._index in self._awaited:
                raise ServiceFailure(
                    P.ErrorCode.LIMIT,
                    f"{self._op}: another request of this instance is waiting for forward event "
                    f"{self._index}; name each event in one request at a time",
                )
            self._awaited.add(self._index)
        return self

    def __exit__(self, *exc: object) -> None:
        with _awaited_lock:
            self._awaited.discard(self._index)

    @property
    def released(self) -> bool:
        return bool(self._event.query())

    def wait(self) -> None:
        """Return once the forward ended (no device order is needed then); raise past the deadline.
        Each waiting request polls on its own thread: one thread polling for all of them would wake
        the others later than they notice themselves (benchmarks/RESULTS.md, D96)."""
        while not self._event.query():
            if self._expiring() or time.monotonic() - self._began > MAX_FORWARD_WAIT_S:
                raise ServiceFailure(
                    P.ErrorCode.EXPIRED,
                    f"{self._op}: the worker's forward did not end within the request's timeout_ms (its "
                    "process may have died), so nothing was copied; retry, or raise the client's timeout",
                )
            time.sleep(EVENT_POLL_S)


_awaited_lock = threading.Lock()
_by_handles: dict[tuple[bytes, ...], ForwardEvents] = {}


class _Timed(Protocol):
    """A request's call (:class:`lmcache.server.calls.Call`): when its client gives up."""

    deadline: float | None

    def expiring(self) -> bool: ...


def worker_forward(
    pool: MappedPool, instance_id: int, req: P.Store | P.Retrieve, call: _Timed
) -> contextlib.AbstractContextManager[WorkerForward | None]:
    """The start of ``req``'s copies: after the worker's work its ``after_event`` names, else at once."""
    index = req.after_event
    if index is None:
        return contextlib.nullcontext()
    events = pool.forward_events
    if index >= len(events) or call.deadline is None:
        raise ServiceFailure(
            P.ErrorCode.INVALID,
            f"after_event {index} names none of the {len(events)} forward events the server opened for "
            f"instance {instance_id}, or came without timeout_ms; wait for the forward, then send the "
            "request without after_event",
        )
    op = "store" if isinstance(req, P.Store) else "retrieve"
    return WorkerForward(events[index], call.expiring, pool.awaited, index, op)
