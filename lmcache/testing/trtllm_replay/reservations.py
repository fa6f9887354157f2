"""Prefix reservations (TRT-LLM main: V2 + prefix-aware scheduling + a connector overriding the
trio ``reserve_prefix`` / ``release_prefix_reservation`` / worker ``get_finished_prefix_loads``).

Each attempt gets a fresh, increasing reservation id. A reservation protects ``[start, offered_end)``
until every piece is released exactly once: a rejected attempt releases everything, an accepted
one first releases its clipped tail, then (after dispatch as a ``PrefixLoad``) the loaded range
once every rank's worker has reported the id. Ids a worker reports that are unknown or stale are
ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmcache.integration.tensorrt_llm._trtllm import (
    KvCacheConnectorScheduler,
    KvCacheConnectorWorker,
    PrefixLoad,
)

from .ranks import Ranks
from .request import LlmRequest

TRIO = ("reserve_prefix", "release_prefix_reservation", "get_finished_prefix_loads")


def overrides(obj: Any, base: type, name: str) -> bool:
    """``obj``'s class attribute ``name`` differs from ``base``'s (the connector overrides it)."""
    return getattr(type(obj), name, None) is not getattr(base, name, None)


def wants_prefix_reservations(scheduler: Any, workers: list[Any]) -> bool:
    """True if the connector overrides all three trio methods, False if none; a partial trio
    raises ValueError ("overridden" = the class attribute differs from the ``_trtllm`` base's)."""
    flags = {
        "reserve_prefix": overrides(scheduler, KvCacheConnectorScheduler, "reserve_prefix"),
        "release_prefix_reservation": overrides(
            scheduler, KvCacheConnectorScheduler, "release_prefix_reservation"
        ),
        "get_finished_prefix_loads": all(
            overrides(w, KvCacheConnectorWorker, "get_finished_prefix_loads") for w in workers
        ),
    }
    if all(flags.values()):
        return True
    if any(flags.values()):
        have = [name for name, on in flags.items() if on]
        raise ValueError(
            f"prefix reservations require {', '.join(TRIO)} to be overridden together; "
            f"the connector overrides only {', '.join(have)}"
        )
    return False


def validate_answer(answer: Any) -> tuple[int, bool]:
    """``reserve_prefix``'s answer: a non-negative int (not a bool) and a bool, never ``(0, True)``."""
    ok = isinstance(answer, tuple | list) and len(answer) == 2
    count, flag = answer if ok else (None, None)
    ok = ok and isinstance(count, int) and not isinstance(count, bool) and count >= 0
    ok = ok and isinstance(flag, bool) and not (count == 0 and flag)
    if not ok:
        raise ValueError(
            f"reserve_prefix returned {answer!r}; expected (count >= 0, is_async), not (0, True)"
        )
    return count, flag


@dataclass
class Reservation:
    """One attempt: offered ``[start, offered_end)``, accepted ``[start, accepted_end)`` (block
    aligned, at most ``prompt_len - 1``), ``live`` = the part not released yet."""

    reservation_id: int
    request: LlmRequest
    start: int
    offered_end: int
    accepted_end: int
    is_async: bool
    live: tuple[int, int]
    accepted: bool = False
    dispatched: bool = False


class PrefixReservations:
    """The runtime's side of the reservation protocol for one scheduler and its workers."""

    def __init__(self, scheduler: Any, workers: list[Any], tokens_per_block: int, ranks: Ranks) -> None:
        """``workers``: those of ``ranks.local``; ``scheduler``: None where rank 0 does not live."""
        self.scheduler = scheduler
        self.workers = workers
        self.ranks = ranks
        self.tokens_per_block = tokens_per_block
        self._next_id = 1
        self.by_request: dict[int, Reservation] = {}  # the current attempt of each request
        self._to_dispatch: list[tuple[Reservation, PrefixLoad]] = []
        self._dispatched: dict[int, Reservation] = {}  # reservation id -> dispatched, not retired
        self._reported: list[set[int]] = [set() for _ in range(ranks.size)]

    def reserve(self, req: LlmRequest, local_end: int) -> Reservation:
        """Ask ``reserve_prefix`` under a fresh id and clip the offer (the clip is released later)."""
        rid = self._next_id
        self._next_id += 1
        answer = None
        if self.scheduler is not None:
            with self.ranks.acting_as(0):
                answer = self.scheduler.reserve_prefix(req, local_end, rid)
        count, is_async = validate_answer(self.ranks.broadcast(answer))
        tpb = self.tokens_per_block
        end = local_end + count
        accepted = max(local_end, min(end, req.prompt_len - 1) // tpb * tpb)
        res = Reservation(rid, req, local_end, end, accepted, is_async, (local_end, end))
        self.by_request[req.request_id] = res
        return res

    def _release(self, res: Reservation, start: int, end: int) -> None:
        if start < end and self.scheduler is not None:
            with self.ranks.acting_as(0):
                self.scheduler.release_prefix_reservation(res.request, res.reservation_id, start, end)

    def drop(self, res: Reservation) -> None:
        """Release what is still protected and forget the attempt (rejected or torn down)."""
        if res.dispatched:
            raise RuntimeError(
                f"reservation {res.reservation_id} has a dispatched load; it owns the allocation"
            )
        self._release(res, *res.live)
        self._to_dispatch = [(r, load) for r, load in self._to_dispatch if r is not res]
        if self.by_request.get(res.request.request_id) is res:
            del self.by_request[res.request.request_id]

    def accept(self, res: Reservation, pages: list[list[int]]) -> PrefixLoad | None:
        """Release the clipped tail, then queue the load of ``[start, accepted_end)`` into the
        complete destination lists ``pages`` (``-1`` in place); None if nothing is left."""
        self._release(res, res.accepted_end, res.offered_end)
        res.live = (res.start, res.accepted_end)
        if res.accepted_end == res.start:
            self.drop(res)
            return None
        res.accepted = True
        req = res.request
        load = PrefixLoad(
            reservation_id=res.reservation_id,
            request_id=req.request_id,
            start=res.start,
            end=res.accepted_end,
            is_async=res.is_async,
            block_ids_by_layer_group=[list(ids) for ids in pages],
            tokens=req.get_tokens(0),
            cache_salt=req.cache_salt,
        )
        self._to_dispatch.append((res, load))
        return load

    def take_prefix_loads(self) -> list[PrefixLoad]:
        """The accepted loads not dispatched yet, each exactly once."""
        taken, self._to_dispatch = self._to_dispatch, []
        for res, _ in taken:
            res.dispatched = True
            self._dispatched[res.reservation_id] = res
        return [load for _, load in taken]

    def poll(self) -> None:
        """``get_finished_prefix_loads`` on every rank; unknown or stale ids are ignored."""
        local = {}
        for rank, worker in zip(self.ranks.local, self.workers, strict=True):
            with self.ranks.acting_as(rank):
                local[rank] = worker.get_finished_prefix_loads()
        for rank, ids in enumerate(self.ranks.gather(local)):
            self._reported[rank].update(i for i in ids if i in self._dispatched)

    def retire(self) -> list[Reservation]:
        """Loads every rank reported: release their loaded range and forget them."""
        done = [res for rid, res in self._dispatched.items() if all(rid in s for s in self._reported)]
        for res in done:
            del self._dispatched[res.reservation_id]
            for reported in self._reported:
                reported.discard(res.reservation_id)
            self._release(res, *res.live)
            res.live = (res.start, res.start)
            if self.by_request.get(res.request.request_id) is res:
                del self.by_request[res.request.request_id]
        return done

    def has_pending_load(self, request_id: int) -> bool:
        """An accepted load of that request is not retired yet."""
        res = self.by_request.get(request_id)
        return res is not None and res.accepted

    @property
    def pending(self) -> bool:
        return bool(self._dispatched or self._to_dispatch)
