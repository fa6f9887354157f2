"""Server side of the shared-L1 mode: the server hands out L1 slots, the worker copies.

The L1 of the server lives in shared-memory slabs (:class:`lmcache.shm_slabs.ShmSlabSource`); a
worker maps them (:mod:`lmcache.server.shared_l1_worker`) and copies between its own pool and the
slots named here, so the server never maps a pool nor needs a GPU.

A store is two requests: ``store_reserve`` reserves a slot per new chunk (invisible to lookups) and
answers with a ticket; ``store_done`` publishes them once the worker's copies are complete, or
gives them back. A load is ``load`` (its chunks pinned, a ticket) then ``load_done`` (unpinned).
Tickets are per instance and bounded (:class:`TicketLimitExceeded`); a ticket one instance did not
get is refused (:class:`BadTicket`). :meth:`SharedL1Service.forget` (reaping, unregistering) aborts
an instance's reservations and releases its loads, so nothing half-written is ever published.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field

from lmcache.chunk_copy import StoreSlot
from lmcache.engine import CacheEngine, KeySpace, LoadHold
from lmcache.memory import SlotRef
from lmcache.server import protocol as P
from lmcache.server.prompts import request_prompt
from lmcache.shm_slabs import ShmSlabSource

DEFAULT_MAX_TICKETS = 64
"""Open tickets (stores plus loads) one instance may hold: a worker has a few requests in flight."""


class SharedL1Error(ValueError):
    """A shared-L1 request the server refuses; ``code`` is the reply's error code."""

    code = P.ErrorCode.INVALID


class BadTicket(SharedL1Error):
    """A ticket this instance was not given, already closed, or of the other kind."""


class TicketLimitExceeded(SharedL1Error):
    """The instance holds its maximum of open tickets."""

    code = P.ErrorCode.LIMIT


@dataclass(frozen=True)
class InstanceScope:
    """Whose request this is: the registered instance's id, key space and rank."""

    instance_id: int
    space: KeySpace
    rank: int


@dataclass(eq=False)
class _StoreTicket:
    space: KeySpace
    slots: list[StoreSlot]


@dataclass(eq=False)
class _LoadTicket:
    hold: LoadHold


@dataclass
class _InstanceState:
    tickets: dict[int, _StoreTicket | _LoadTicket] = field(default_factory=dict)
    slabs: set[int] = field(default_factory=set)
    """Ids of the slabs this instance was told of."""


class SharedL1Service:
    """The shared-L1 handlers over ``engine``, whose L1 slabs must be in shared memory."""

    def __init__(self, engine: CacheEngine, *, max_tickets: int = DEFAULT_MAX_TICKETS) -> None:
        source = engine.l1.arena.source
        if not isinstance(source, ShmSlabSource):
            raise ValueError("the shared-L1 mode needs an engine built with slab_source=ShmSlabSource(...)")
        self.engine = engine
        self.source = source
        self.max_tickets = max_tickets
        self._ids = itertools.count(1)
        self._states: dict[int, _InstanceState] = {}
        self._lock = threading.Lock()

    # ---- store ----------------------------------------------------------------------------------

    def store_reserve(self, scope: InstanceScope, req: P.StoreReserve) -> P.StoreSlots:
        """Reserve slots for the chunks of the request's range not cached yet."""
        prompt = request_prompt(self.engine, scope.space, req)
        self._check_room(scope.instance_id)
        slots = list(
            self.engine.reserve_store(scope.space, scope.rank, prompt, req.cache_salt, req.start, req.end)
        )
        chunks = [
            P.StoreChunk(s.first_block, s.rows, self._slot_info(s) if s.chunk is not None else None)
            for s in slots
        ]
        if all(s.chunk is None for s in slots):
            return P.StoreSlots(ticket=0, chunks=chunks)
        ticket = self._open(scope.instance_id, _StoreTicket(scope.space, slots))
        slabs, forget = self._slab_news(
            scope.instance_id, [c.slot.slab for c in chunks if c.slot is not None]
        )
        return P.StoreSlots(ticket=ticket, chunks=chunks, slabs=slabs, forget=forget)

    def store_done(self, scope: InstanceScope, req: P.StoreDone) -> int:
        """Publish the ticket's chunks (``ok``) or give their slots back; returns the tokens published."""
        ticket = self._close(scope.instance_id, req.ticket, _StoreTicket)
        assert isinstance(ticket, _StoreTicket)
        if not req.ok:
            self.engine.abort_store(ticket.slots)
            return 0
        self.engine.publish(ticket.space, ticket.slots)
        return sum(s.end - s.start for s in ticket.slots if s.chunk is not None)

    # ---- load -----------------------------------------------------------------------------------

    def load(self, scope: InstanceScope, req: P.Load) -> P.LoadSlots:
        """Pin the chunks of the request's range, up to the first not cached."""
        prompt = request_prompt(self.engine, scope.space, req)
        self._check_room(scope.instance_id)
        hold = self.engine.hold_load(scope.space, scope.rank, prompt, req.cache_salt, req.start, req.end)
        try:
            slots = list(self.engine.hold_chunks(hold))
            for slot in slots:  # a chunk stored over CUDA IPC is read once its copy is complete
                slot.chunk.wait_ready_on_host()
        except BaseException:
            self.engine.finish_load(hold)
            raise
        if not slots:
            self.engine.finish_load(hold)
            return P.LoadSlots(ticket=0, loaded=0)
        chunks = [
            P.LoadChunk(s.first_block, s.rows, s.skip, s.stop, self._ref_info(s.chunk.buffer.ref))
            for s in slots
        ]
        ticket = self._open(scope.instance_id, _LoadTicket(hold))
        slabs, forget = self._slab_news(scope.instance_id, [c.slot.slab for c in chunks])
        return P.LoadSlots(
            ticket=ticket, loaded=hold.loaded_end - hold.start, chunks=chunks, slabs=slabs, forget=forget
        )

    def load_done(self, scope: InstanceScope, req: P.LoadDone) -> bool:
        """Unpin the ticket's chunks: the worker has copied out of them."""
        ticket = self._close(scope.instance_id, req.ticket, _LoadTicket)
        assert isinstance(ticket, _LoadTicket)
        self.engine.finish_load(ticket.hold)
        return True

    # ---- instances ------------------------------------------------------------------------------

    def forget(self, instance_id: int) -> int:
        """The instance is gone (reaped, unregistered, registered again): abort its reservations and
        release its loads; returns how many tickets were open."""
        with self._lock:
            state = self._states.pop(instance_id, None)
        if state is None:
            return 0
        for ticket in state.tickets.values():
            if isinstance(ticket, _StoreTicket):
                self.engine.abort_store(ticket.slots)
            else:
                self.engine.finish_load(ticket.hold)
        return len(state.tickets)

    def open_tickets(self, instance_id: int) -> int:
        with self._lock:
            state = self._states.get(instance_id)
            return 0 if state is None else len(state.tickets)

    # ---- helpers --------------------------------------------------------------------------------

    def _check_room(self, instance_id: int) -> None:
        if self.open_tickets(instance_id) >= self.max_tickets:
            raise TicketLimitExceeded(
                f"instance {instance_id} holds its maximum of {self.max_tickets} open shared-L1 tickets; "
                "send store_done / load_done for the copies it finished"
            )

    def _open(self, instance_id: int, ticket: _StoreTicket | _LoadTicket) -> int:
        with self._lock:
            ticket_id = next(self._ids)
            self._states.setdefault(instance_id, _InstanceState()).tickets[ticket_id] = ticket
            return ticket_id

    def _close(self, instance_id: int, ticket_id: int, kind: type) -> _StoreTicket | _LoadTicket:
        """Take an open ticket of ``kind`` issued to ``instance_id``, or refuse."""
        with self._lock:
            state = self._states.get(instance_id)
            ticket = None if state is None else state.tickets.get(ticket_id)
            if ticket is None or not isinstance(ticket, kind):
                what = "store_reserve" if kind is _StoreTicket else "load"
                raise BadTicket(
                    f"ticket {ticket_id} is not an open {what} ticket of instance {instance_id}; send the "
                    f"ticket its {what} reply gave, once"
                )
            assert state is not None
            del state.tickets[ticket_id]
            return ticket

    def _slot_info(self, slot: StoreSlot) -> P.SlotInfo:
        assert slot.chunk is not None
        return self._ref_info(slot.chunk.buffer.ref)

    @staticmethod
    def _ref_info(ref: SlotRef) -> P.SlotInfo:
        return P.SlotInfo(ref.slab, ref.offset, ref.nbytes)

    def _slab_news(self, instance_id: int, slab_ids: list[int]) -> tuple[list[P.SlabInfo], list[int]]:
        """Descriptors of every slab the reply's slots lie in, and ids of the slabs the instance was told
        of that are gone since. Every reply describes its own slabs: a worker's concurrent requests (a
        save and a load) may apply their replies in any order, and each copy needs its slabs mapped."""
        live = self.source.live_ids()
        named = sorted(set(slab_ids))
        with self._lock:
            state = self._states.setdefault(instance_id, _InstanceState())
            forget = sorted(state.slabs - live)
            state.slabs -= set(forget)
            state.slabs |= set(named)
        infos = []
        for slab_id in named:
            info = self.source.describe(slab_id)
            assert info is not None  # the slot is reserved or pinned: its slab is alive
            infos.append(P.SlabInfo(id=info.id, name=info.name, nbytes=info.nbytes))
        return infos, forget
