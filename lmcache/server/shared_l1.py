"""Server side of the shared-L1 mode: the server hands out L1 slots, the worker copies.

The L1 of the server lives in shared-memory slabs (:class:`lmcache.shm_slabs.ShmSlabSource`); a
worker maps them (:mod:`lmcache.server.shared_l1_worker`) and copies between its own pool and the
slots named here, so the server never maps a pool nor needs a GPU.

A store is two requests: ``store_reserve`` reserves a slot per new chunk (invisible to lookups) and
answers with a ticket; ``store_done`` publishes them once the worker's copies are complete, or
gives them back. A load is ``load`` (its chunks pinned, a ticket) then ``load_done`` (unpinned).
Tickets are per registration and bounded (:class:`TicketLimitExceeded`); a ticket one registration
did not get is refused (:class:`BadTicket`). :meth:`SharedL1Service.forget` (reaping, unregistering)
aborts a registration's reservations, leases and loads, so nothing half-written is ever published.
What a reply the worker never read granted (its call failed first) goes back with the worker's
``abandon`` (:mod:`lmcache.server.sent_grants`).

The lease: each instance may hold a few reserved full-chunk slots not yet tied to a chunk
(``store_reserve``'s ``lease``, capped at :attr:`SharedL1Service.max_lease_bytes`, all instances'
together at :attr:`SharedL1Service.max_total_lease_bytes`; the leases a store names as ``filling``
leave the instance's cap until its ``store_done``, at most one cap of them). A worker copies
the first chunks of a store into them at once, while its ``store_reserve`` for the rest is on its
way, so its copies never wait for a round trip; ``store_done`` then names which chunk each holds.
A leased slot is published only by its instance's ``store_done`` after the copy, and one whose
chunk is already cached is freed.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field

from lmcache.chunk_copy import StoreSlot
from lmcache.engine import CacheEngine, KeySpace, LoadHold
from lmcache.fd_slabs import FdSlabSource
from lmcache.memory import SlotRef
from lmcache.server import protocol as P
from lmcache.server.prompts import InvalidPrompt, RequestPrompt, request_prompt
from lmcache.server.reserved_shares import ReservedShares
from lmcache.server.sent_grants import Grant, SentGrants
from lmcache.server.slab_news import SlabAnnouncements
from lmcache.shm_slabs import ShmSlabSource
from lmcache.storage.cpu_store import CachedChunk

SHARED_SOURCES = (ShmSlabSource, FdSlabSource)
"""The slab sources whose slabs workers map: by name in ``/dev/shm``, or by descriptor."""
DEFAULT_MAX_TICKETS = 64
"""Open tickets (stores plus loads) one instance may hold: a worker has a few requests in flight."""
DEFAULT_MAX_LEASE_BYTES = 512 << 20
"""Leased L1 bytes one instance may hold: a whole long prompt's store (16k tokens of a small model),
so its copies never wait for the server, even one busy publishing and evicting for the store before
(benchmarks/RESULTS.md, D22, D59)."""
LEASE_SHARE_OF_L1 = 16
"""An instance's lease is also at most 1/16 of L1, so small caches stay caches."""
LEASES_SHARE_OF_L1 = 4
"""All instances' leases together hold at most 1/4 of L1, however many workers register."""


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
    """Whose request this is: the registered instance's id, key space and rank, and its registration
    (the key of its tickets and leases: an earlier registration of the same id has its own)."""

    instance_id: int
    space: KeySpace
    rank: int
    registration: int


@dataclass(frozen=True)
class LeaseKey:
    """The L1 key a leased slot is reserved under until its chunk is known (never a chunk key)."""

    instance_id: int
    lease_id: int
    nbytes: int


@dataclass(eq=False)
class _StoreTicket:
    space: KeySpace
    slots: list[StoreSlot]
    nbytes: int
    """Of the slots reserved, counted in the registration's :class:`ReservedShares`."""


@dataclass(eq=False)
class _LoadTicket:
    hold: LoadHold


@dataclass
class _InstanceState:
    tickets: dict[int, _StoreTicket | _LoadTicket] = field(default_factory=dict)
    opening: int = 0
    """Places among the open tickets taken by requests still running (:meth:`SharedL1Service._room`),
    counted against the cap with ``tickets``."""
    leases: dict[int, LeaseKey] = field(default_factory=dict)
    filling: set[int] = field(default_factory=set)
    """Ids of leases a store is filling (a ``store_reserve`` named them): out of the lease's cap."""

    def take_place(self, cap: int) -> bool:
        """Take a place among at most ``cap`` open tickets for a running request; False if none is free."""
        if len(self.tickets) + self.opening >= cap:
            return False
        self.opening += 1
        return True


@dataclass
class _Room:
    """A request's place among its instance's open tickets (:meth:`SharedL1Service._room`)."""

    registration: int
    used: bool = False
    """A ticket was opened in it."""


class SharedL1Service:
    """The shared-L1 handlers over ``engine``, whose L1 slabs must be in shared memory."""

    def __init__(
        self,
        engine: CacheEngine,
        *,
        max_tickets: int = DEFAULT_MAX_TICKETS,
        max_lease_bytes: int = DEFAULT_MAX_LEASE_BYTES,
    ) -> None:
        source = engine.l1.arena.source
        if not isinstance(source, SHARED_SOURCES):
            raise ValueError(
                "the shared-L1 mode needs an engine built with slab_source=ShmSlabSource(...) or "
                "FdSlabSource(...)"
            )
        self.engine = engine
        self.source = source
        self.max_tickets = max_tickets
        capacity = engine.l1.arena.capacity_bytes
        self.max_lease_bytes = min(max_lease_bytes, capacity // LEASE_SHARE_OF_L1)
        self.max_total_lease_bytes = capacity // LEASES_SHARE_OF_L1
        self._leased_bytes = 0
        """Bytes of every instance's leased slots (and of those being reserved)."""
        self._reserved = ReservedShares(capacity)
        self.sent = SentGrants()
        """What the replies sent granted, until an ``abandon`` may name them."""
        self.announced = SlabAnnouncements(source)
        """The slabs each registration was told of."""
        self._ids = itertools.count(1)
        self._states: dict[int, _InstanceState] = {}
        """Per registration (:attr:`InstanceScope.registration`)."""
        self._lock = threading.Lock()

    # ---- store ----------------------------------------------------------------------------------

    def store_reserve(self, scope: InstanceScope, req: P.StoreReserve) -> P.StoreSlots:
        """Reserve slots for the chunks of the request's range not cached yet, and top the lease up."""
        prompt = request_prompt(self.engine, scope.space, req)
        with self._room(scope) as room:
            return self._reserve(scope, req, prompt, room)

    def _reserve(
        self, scope: InstanceScope, req: P.StoreReserve, prompt: RequestPrompt, room: _Room
    ) -> P.StoreSlots:
        row_bytes = scope.space.layout.row_bytes
        slots: list[StoreSlot] = []
        nbytes = 0
        try:
            for slot in self.engine.reserve_store(
                scope.space, scope.rank, prompt, req.cache_salt, req.start, req.end
            ):  # reserved one by one: a store reaching its share stops there
                if slot.chunk is not None:
                    if not self._reserved.take(scope.registration, slot.rows * row_bytes):
                        self.engine.abort_store([slot])
                        break
                    nbytes += slot.rows * row_bytes
                slots.append(slot)
        except BaseException:
            self.engine.abort_store(slots)
            self._reserved.give_back(scope.registration, nbytes)
            raise
        reserved = [s for s in slots if s.chunk is not None]
        chunks = [
            P.StoreChunk(s.first_block, s.rows, self._slot_info(s) if s.chunk is not None else None)
            for s in slots
        ]
        leased = self._lease(scope, req.lease, req.filling)
        ticket = self._open(room, _StoreTicket(scope.space, slots, nbytes)) if reserved else 0
        slab_ids = [c.slot.slab for c in chunks if c.slot is not None] + [x.slot.slab for x in leased]
        news = self.announced.news(scope.registration, slab_ids)
        return P.StoreSlots(
            ticket=ticket,
            chunks=chunks,
            tokens=sum(s.end - s.start for s in reserved),
            leased=leased,
            slabs=news.slabs,
            forget=news.forget,
            ahead=news.ahead,
        )

    def undo_reserve(self, scope: InstanceScope, reply: P.StoreSlots) -> None:
        """Give back what ``reply`` granted (its reservation, the slots it leased), never sent: the
        client gave up waiting for it. The leases the request named as filling stay the client's."""
        self._give_back(scope, Grant(reply.ticket, tuple(lease.id for lease in reply.leased)))

    def store_done(self, scope: InstanceScope, req: P.StoreDone) -> int:
        """Publish the ticket's chunks and the leased slots named (``ok``), or give them all back;
        returns the tokens published."""
        leases, unknown = self._take_leases(scope.registration, req.leases)
        try:
            ticket = self._close(scope, req.ticket, _StoreTicket) if req.ticket else None
        except BadTicket:
            self._release(leases)  # the worker gave them up with this report
            raise
        if unknown:
            # Each lease stands for one chunk, by its place in the list: with one missing or repeated,
            # the others would be published as chunks they do not hold. Nothing of the report stands.
            self._release(leases)
            if isinstance(ticket, _StoreTicket):
                self.engine.abort_store(ticket.slots)
            raise BadTicket(
                f"leases {unknown[:8]} are not held by instance {scope.instance_id} (or are named twice); "
                "name each leased slot its store_reserve reply gave, once"
            )
        published = 0
        if isinstance(ticket, _StoreTicket):
            if req.ok:
                self.engine.publish(ticket.space, ticket.slots)
                published += sum(s.end - s.start for s in ticket.slots if s.chunk is not None)
            else:
                self.engine.abort_store(ticket.slots)
        if leases:
            published += self._publish_leases(scope, req, leases)
        return published

    def _publish_leases(self, scope: InstanceScope, req: P.StoreDone, leases: list[LeaseKey]) -> int:
        """Publish (``req.ok``) or free the leased slots ``leases``, in ``req``'s order."""
        if not req.ok:  # the copies failed: none is published
            self._release(leases)
            return 0
        try:
            size = self.engine.config.chunk_size
            if req.start % size or req.end != req.start + len(req.leases) * size:
                raise InvalidPrompt(
                    f"leased chunks [{req.start}, {req.end}) must start on a chunk boundary and span "
                    f"{len(req.leases)} chunks of {size} tokens, one per lease named"
                )
            prompt = request_prompt(self.engine, scope.space, req)
        except ValueError:
            self._release(leases)
            raise
        return self.engine.publish_leased(scope.space, scope.rank, prompt, req.cache_salt, req.start, leases)

    def _release(self, leases: list[LeaseKey]) -> None:
        for lease in leases:
            self.engine.release_lease(lease)

    # ---- load -----------------------------------------------------------------------------------

    def load(
        self, scope: InstanceScope, req: P.Load, send_part: Callable[[P.LoadSlots], None] | None = None
    ) -> P.LoadSlots:
        """Pin the chunks of the request's range, up to the first not cached. With ``send_part`` and
        more than ``req.first`` chunks in the range, the first ``req.first`` go ahead in a part of
        the reply (the ticket opened with it), the rest in the reply itself."""
        prompt = request_prompt(self.engine, scope.space, req)
        with self._room(scope) as room:
            return self._load(scope, req, prompt, room, send_part)

    def _load(
        self,
        scope: InstanceScope,
        req: P.Load,
        prompt: RequestPrompt,
        room: _Room,
        send_part: Callable[[P.LoadSlots], None] | None,
    ) -> P.LoadSlots:
        hold = self.engine.hold_load(scope.space, scope.rank, prompt, req.cache_salt, req.start, req.end)
        size = self.engine.config.chunk_size
        in_range = -(-req.end // size) - req.start // size
        split = req.first if send_part is not None and 0 < req.first < in_range else 0
        ticket = 0
        chunks: list[P.LoadChunk] = []
        try:
            for slot in self.engine.hold_chunks(hold):
                info = _chunk_info(slot.chunk)
                chunks.append(P.LoadChunk(slot.first_block, slot.rows, slot.skip, slot.stop, info))
                if len(chunks) == split and not ticket:
                    assert send_part is not None
                    opened = self._open(room, _LoadTicket(hold))
                    try:
                        send_part(self._load_slots(scope, opened, hold, chunks))
                    except BaseException:  # not sent: no one else would close it
                        self._close(scope, opened, _LoadTicket)
                        raise
                    ticket, chunks = opened, []
        except BaseException:
            if not ticket:  # else the ticket holds the pins until load_done or reaping
                self.engine.finish_load(hold)
            raise
        if not ticket:
            if not chunks:
                self.engine.finish_load(hold)
                return P.LoadSlots(ticket=0, loaded=0)
            ticket = self._open(room, _LoadTicket(hold))
        elif hold.finished:  # the instance was retired after the first part: its pins are gone
            raise BadTicket(
                f"instance {scope.instance_id} was unregistered during this load; its slots are no longer "
                "pinned: register again and load again"
            )
        return self._load_slots(scope, ticket, hold, chunks)

    def _load_slots(
        self, scope: InstanceScope, ticket: int, hold: LoadHold, chunks: list[P.LoadChunk]
    ) -> P.LoadSlots:
        news = self.announced.news(scope.registration, [c.slot.slab for c in chunks])
        return P.LoadSlots(
            ticket=ticket,
            loaded=hold.loaded_end - hold.start,
            chunks=chunks,
            slabs=news.slabs,
            forget=news.forget,
            ahead=news.ahead,
        )

    def pinned_slots(self, pin_key: Hashable, rank: int) -> list[P.SlotInfo]:
        """The slots of the chunks the lookup ``pin_key`` pinned for ``rank``, in prompt order."""
        return [_chunk_info(chunk) for chunk in self.engine.pinned_chunks(pin_key, rank)]

    def undo_load(self, scope: InstanceScope, reply: P.LoadSlots) -> None:
        """Unpin what ``reply`` pinned, never sent: the client gave up waiting for it."""
        self._give_back(scope, Grant(reply.ticket))

    def abandon(self, scope: InstanceScope, rids: list[int]) -> int:
        """Give back what the replies to ``rids`` granted, which the client never read (see
        :mod:`lmcache.server.sent_grants`); returns how many replies' grants went back."""
        grants = self.sent.abandon(scope.registration, rids)
        for grant in grants:
            self._give_back(scope, grant)
        return len(grants)

    def _give_back(self, scope: InstanceScope, grant: Grant) -> None:
        """Close the grant's ticket if still open (a store's slots aborted, a load's unpinned) and free
        its leased slots still held."""
        leases, _ = self._take_leases(scope.registration, list(grant.leases))
        self._release(leases)
        ticket = self._close_if_open(scope, grant.ticket)
        if isinstance(ticket, _StoreTicket):
            self.engine.abort_store(ticket.slots)
        elif isinstance(ticket, _LoadTicket):
            self.engine.finish_load(ticket.hold)

    def load_done(self, scope: InstanceScope, req: P.LoadDone) -> bool:
        """Unpin the ticket's chunks: the worker has copied out of them."""
        ticket = self._close(scope, req.ticket, _LoadTicket)
        assert isinstance(ticket, _LoadTicket)
        self.engine.finish_load(ticket.hold)
        return True

    # ---- instances ------------------------------------------------------------------------------

    def forget(self, registration: int) -> int:
        """The registration is gone (reaped, unregistered, registered again): abort its reservations and
        release its loads; returns how many tickets were open."""
        self._reserved.forget(registration)
        self.sent.forget(registration)
        self.announced.forget(registration)
        with self._lock:
            state = self._states.pop(registration, None)
            if state is not None:
                self._leased_bytes -= sum(key.nbytes for key in state.leases.values())
        if state is None:
            return 0
        for ticket in state.tickets.values():
            if isinstance(ticket, _StoreTicket):
                self.engine.abort_store(ticket.slots)
            else:
                self.engine.finish_load(ticket.hold)
        self._release(list(state.leases.values()))
        return len(state.tickets)

    def leased(self, registration: int) -> int:
        """Leased slots the registration holds."""
        with self._lock:
            state = self._states.get(registration)
            return 0 if state is None else len(state.leases)

    def ticket_chunks(self, registration: int, ticket_id: int) -> int:
        """Chunks the registration's open ticket holds (a load's: pinned in L1 and in the lower tiers;
        0: no such ticket): what closing it costs."""
        with self._lock:
            state = self._states.get(registration)
            ticket = None if state is None else state.tickets.get(ticket_id)
        if isinstance(ticket, _StoreTicket):
            return len(ticket.slots)
        return 0 if ticket is None else len(ticket.hold.slots) + len(ticket.hold.tier_pins)

    def open_tickets(self, registration: int) -> int:
        with self._lock:
            state = self._states.get(registration)
            return 0 if state is None else len(state.tickets)

    # ---- helpers --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _room(self, scope: InstanceScope) -> Iterator[_Room]:
        """A place among the instance's open tickets for a request that may open one, taken at once
        (TicketLimitExceeded if none is free, counting those other running requests took): concurrent
        requests cannot pass the cap together. A ticket opened in it (:meth:`_open`) keeps it; else
        it is given back when the request ends."""
        with self._lock:
            if not self._states.setdefault(scope.registration, _InstanceState()).take_place(self.max_tickets):
                raise TicketLimitExceeded(
                    f"instance {scope.instance_id} holds its maximum of {self.max_tickets} open shared-L1 "
                    "tickets; send store_done / load_done for the copies it finished"
                )
        room = _Room(scope.registration)
        try:
            yield room
        finally:
            if not room.used:
                with self._lock:
                    if (state := self._states.get(scope.registration)) is not None:
                        state.opening -= 1

    def _slot_bytes(self, scope: InstanceScope) -> int:
        layout = scope.space.layout
        return self.engine.config.chunk_size // layout.tokens_per_block * layout.row_bytes

    def _open(self, room: _Room, ticket: _StoreTicket | _LoadTicket) -> int:
        """Open ``ticket`` in the place ``room`` holds; its id."""
        assert not room.used, "one ticket a request"
        with self._lock:
            ticket_id = next(self._ids)
            state = self._states.setdefault(room.registration, _InstanceState())
            state.tickets[ticket_id] = ticket
            state.opening = max(0, state.opening - 1)  # 0 if the instance was retired meanwhile
            room.used = True
            return ticket_id

    def _lease(self, scope: InstanceScope, wanted: int, filling: list[int]) -> list[P.LeasedSlot]:
        """Reserve up to ``wanted`` more leased slots for the instance, within its cap and the cap of
        all leases together. The leases ``filling`` names (held by the instance, up to one cap of them)
        leave the cap first: a store that fills its whole lease still leaves one for the next."""
        slot_bytes = self._slot_bytes(scope)
        cap = self.max_lease_bytes // slot_bytes
        with self._lock:
            state = self._states.setdefault(scope.registration, _InstanceState())
            for lease_id in filling:
                if len(state.filling) >= cap:
                    break
                if lease_id in state.leases:
                    state.filling.add(lease_id)
            own_room = cap - (len(state.leases) - len(state.filling))
            total_room = (self.max_total_lease_bytes - self._leased_bytes) // slot_bytes
            count = max(0, min(wanted, own_room, total_room))
            self._leased_bytes += count * slot_bytes  # counted now: concurrent requests cannot overshoot
        granted = []
        for _ in range(count):
            key = LeaseKey(scope.instance_id, next(self._ids), slot_bytes)
            chunk = self.engine.lease_slot(scope.space, key)
            if chunk is None:  # L1 is full of pinned chunks: the store path reports it
                break
            with self._lock:  # the instance's state now: retiring it meanwhile dropped the one above
                self._states.setdefault(scope.registration, _InstanceState()).leases[key.lease_id] = key
            granted.append(P.LeasedSlot(key.lease_id, _ref_info(chunk.buffer.ref)))
        with self._lock:
            self._leased_bytes -= (count - len(granted)) * slot_bytes
        return granted

    def _take_leases(self, registration: int, lease_ids: list[int]) -> tuple[list[LeaseKey], list[int]]:
        """Remove the named leases from the registration's; returns their keys and the ids it did not
        hold."""
        with self._lock:
            state = self._states.get(registration)
            held = {} if state is None else state.leases
            keys, unknown = [], []
            for lease_id in lease_ids:
                key = held.pop(lease_id, None)
                if state is not None:
                    state.filling.discard(lease_id)
                if key is None:
                    unknown.append(lease_id)
                else:
                    keys.append(key)
                    self._leased_bytes -= key.nbytes
            return keys, unknown

    def _close(self, scope: InstanceScope, ticket_id: int, kind: type) -> _StoreTicket | _LoadTicket:
        """Take an open ticket of ``kind`` issued to the registration of ``scope``, or refuse."""
        with self._lock:
            state = self._states.get(scope.registration)
            ticket = None if state is None else state.tickets.get(ticket_id)
            if ticket is None or not isinstance(ticket, kind):
                what = "store_reserve" if kind is _StoreTicket else "load"
                raise BadTicket(
                    f"ticket {ticket_id} is not an open {what} ticket of instance {scope.instance_id}; send "
                    f"the ticket its {what} reply gave, once"
                )
            assert state is not None
            del state.tickets[ticket_id]
            if isinstance(ticket, _StoreTicket):
                self._reserved.give_back(scope.registration, ticket.nbytes)
            return ticket

    def _close_if_open(self, scope: InstanceScope, ticket_id: int) -> _StoreTicket | _LoadTicket | None:
        """Take the registration's ticket if it is still open (forgetting the registration closed it)."""
        with self._lock:
            state = self._states.get(scope.registration)
            ticket = None if state is None else state.tickets.pop(ticket_id, None)
            if isinstance(ticket, _StoreTicket):
                assert state is not None
                self._reserved.give_back(scope.registration, ticket.nbytes)
            return ticket

    def _slot_info(self, slot: StoreSlot) -> P.SlotInfo:
        assert slot.chunk is not None
        return _ref_info(slot.chunk.buffer.ref)


def _ref_info(ref: SlotRef) -> P.SlotInfo:
    return P.SlotInfo(ref.slab, ref.offset, ref.nbytes)


def _chunk_info(chunk: CachedChunk) -> P.SlotInfo:
    """A cached chunk's slot, once its bytes are there (a chunk stored over CUDA IPC: once the copy
    that fills it is done)."""
    chunk.wait_ready_on_host()
    ref = chunk.buffer.ref
    return P.SlotInfo(ref.slab, ref.offset, ref.nbytes, chunk.serial)
