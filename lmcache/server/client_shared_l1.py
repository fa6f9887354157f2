"""A client's stores and loads for a pool registered in the shared-L1 mode: the server hands out L1
slots, this process copies (:class:`~lmcache.server.shared_l1_worker.SharedL1Copier`), then reports.

* store: the first full chunks are copied at once into leased slots (reserved ahead, see
  :mod:`lmcache.server.shared_l1`), while a ``store_reserve`` for the rest, which also tops the lease
  up, is on its way; the rest's copies follow as its reply arrives. Once every copy is complete one
  ``store_done`` publishes them all; if a copy raised, it goes with ``ok=False`` (every slot given
  back, nothing published) and the copy's exception propagates;
* load: ``load`` -> scatter the slots into the blocks -> ``load_done``, sent once the copy completed
  (or failed: once every copy already enqueued completed), so the chunks stay pinned exactly as long
  as the copy reads them. Given the stream
  that reads the blocks next, a load returns once its copies are enqueued (that stream waits for
  them on the device, as after an in-process load) and a background thread sends ``load_done`` when
  they complete: the forward's launch overlaps the copy instead of following it.

Both reports are one-way: the worker does not wait for an answer, and the server serves every
request sent after the report, on this connection or another (the scheduler's lookup once the save
is reported done), after it (see :mod:`lmcache.server.dispatch`). A report that
cannot reach the server is not retried: a server that restarted has no ticket or lease to close,
and one that stays up reaps the instance's with the instance. A store whose report could not be
sent fails (nothing was published); a load whose copy completed counts. A ``store_reserve`` or
``load`` whose reply this client never read (the call timed out, its lane broke) is named in a
one-way ``abandon``, sent the same way, so the server gives back what that reply granted.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from lmcache.server import protocol as P
from lmcache.server.client_errors import ServerError, ServerUnavailable, UnknownInstance
from lmcache.server.client_registrations import Registration, Registrations
from lmcache.transfer import BlockTransfer

if TYPE_CHECKING:  # the client imports no torch until a shared-L1 pool is registered
    from lmcache.chunk_copy import CopyBatcher, CopyStart
    from lmcache.layered_load import LayerReady
    from lmcache.server.client_lanes import Submitted
    from lmcache.server.shared_l1_worker import SharedL1Copier

__all__ = ["SharedL1Transfers", "CallFn", "SubmitFn", "OneWayFn"]

CallFn = Callable[..., Any]
"""The client's call: ``(request, result_type, timeout_s, *, retry_unknown=True, deadline=False)``."""
SubmitFn = Callable[..., "Submitted[Any]"]
"""The client's submit: ``(request, result_type, timeout_s, *, deadline=False)`` -> the reply to read."""
OneWayFn = Callable[[Any, float | None], Callable[[], None]]
"""The client's one-way request: ``(request, timeout_s)`` framed now, sent by the call returned."""


MAX_REMEMBERED_LOOKUPS = 256
"""Lookups whose pinned slots this client keeps for a load (the oldest are forgotten first)."""

FIRST_CHUNKS = 4
"""Chunks of a load the server names ahead of the rest: their copies keep the DMA engine busy while it
pins the rest (benchmarks/RESULTS.md, D22)."""


class _LeaseVoid(Exception):
    """The registration changed while a store used its lease: the leased slots are gone."""


@dataclass
class _StoreReport:
    """What a store's ``store_done`` reports: the reserve reply's ticket and the leased slots that
    hold the chunks ``[start, end)``, under ``cap``, the capability they were granted to (a server
    that no longer knows it, restarted or registered again since, refuses the report)."""

    instance_id: int
    start: int
    end: int
    leases: list[P.LeasedSlot]
    fields: dict[str, Any]
    reply: P.StoreSlots | None = None
    cap: bytes | None = None

    @property
    def empty(self) -> bool:
        """Nothing to report: no ticket, no leased slot."""
        return not self.leases and (self.reply is None or not self.reply.ticket)

    def done(self, *, ok: bool) -> P.StoreDone:
        leases = bool(self.leases)
        return P.StoreDone(
            instance_id=self.instance_id,
            ticket=self.reply.ticket if self.reply is not None else 0,
            ok=ok,
            leases=[lease.id for lease in self.leases],
            start=self.start if leases else 0,
            end=self.end if leases else 0,
            cap=self.cap,
            **(self.fields if leases and ok else {}),
        )

    def tokens(self, chunk_size: int) -> int:
        return len(self.leases) * chunk_size + (self.reply.tokens if self.reply is not None else 0)


REPLY_TYPES = (P.LookupSlots, P.StoreSlots, P.LoadSlots)
"""The replies of shared-L1 calls. msgspec resolves a reply type's annotations at its first decode, work
that would otherwise land in the first lookup's, save's or load's host time (benchmarks/RESULTS.md, D73)."""


class SharedL1Transfers:
    """The store and retrieve of shared-L1 registrations, over the client's calls."""

    def __init__(
        self, call: CallFn, submit: SubmitFn, one_way: OneWayFn, registrations: Registrations
    ) -> None:
        self._call = call
        self._submit = submit
        self._one_way = one_way
        self._registrations = registrations
        self._reports: ThreadPoolExecutor | None = None
        """Sends the ``load_done`` of loads that returned before their copies completed."""
        self._looked_up: OrderedDict[tuple[int, int | str], tuple[str, list[P.SlotInfo]]] = OrderedDict()
        """Per (instance, pin id), the server and the slots its lookup pinned for the instance's rank."""
        self._lock = threading.Lock()
        for reply_type in REPLY_TYPES:
            msgspec.msgpack.Decoder(reply_type)  # resolves the type's annotations once, here

    def copier_for(self, reg: Registration, current: SharedL1Copier | None = None) -> SharedL1Copier | None:
        """The copier a registration needs: ``current`` if it has one, a new one in the shared-L1 mode
        (over the slab mappings of the client's other copiers). For a CUDA pool the thread that sends
        the reports of loads returning before their copies complete starts now: started by the first
        load, it took that load's host time."""
        if reg.mode != "shared-l1" or not hasattr(reg.keep_alive, "is_cuda"):  # no tensor: nothing to copy
            if current is not None:
                current.close()  # the mode changed: its streams go back
            return None
        if current is not None:
            return current
        from lmcache.server.shared_l1_worker import SharedL1Copier

        pool = reg.keep_alive
        if pool.is_cuda:
            with self._lock:
                self._report_sender(pool.device.index)
        return SharedL1Copier(pool, slabs=self._registrations.slab_mappings(pin=pool.is_cuda))

    def map_l1_ahead(self, *, pin: bool, certain: bool, timeout_s: float | None) -> P.SlabList | None:
        """Before this process registers a pool: map the server's L1 slabs (``pin``: and page-lock them)
        in the background, so its first shared-L1 copies do not wait for that (TRT-LLM builds the
        worker before the model's warm-up and registers its pools only after it). Done only where the
        mode will be shared-L1: ``certain`` (the client forces it, or its pools cannot be exported), or
        the server forces it. Returns the server's answer, None where nothing is mapped for that reason;
        may be called again for the slabs the server created since (:attr:`P.SlabList.more`). A server
        error or an unreachable server raises, as for every call."""
        found = self._call(P.L1Slabs(), P.SlabList, timeout_s)
        if not (certain or found.pool_sharing == "shared-l1"):
            return None
        slabs = self._registrations.slab_mappings(pin)
        slabs.on_server(found.server_id)
        slabs.map_ahead(found.slabs)
        return found

    def lookup(self, iid: int, req: P.Lookup | P.LookupHashes, timeout_s: float | None) -> int:
        """``req``'s hit, its pinned slots kept for the load with its pins (``req.pin_id`` set)."""
        assert req.pin_id is not None
        req.slots = True
        found = self._call(req, P.LookupSlots, timeout_s)
        self.remember_slots(iid, req.pin_id, found.slots)
        return found.hit

    def remember_slots(self, iid: int, pin_id: int | str, slots: list[P.SlotInfo]) -> None:
        """Keep a lookup's pinned slots for the load with its pins (a new lookup replaces them), with
        the server that named them (another one numbers its slots anew)."""
        server_id = self._registrations.copier(iid).server_id
        with self._lock:
            self._looked_up.pop((iid, pin_id), None)
            if slots and server_id is not None:
                self._looked_up[iid, pin_id] = (server_id, slots)
                while len(self._looked_up) > MAX_REMEMBERED_LOOKUPS:
                    self._looked_up.popitem(last=False)

    def forget_slots(self, iid: int, pin_id: int | str) -> None:
        """The lookup's pins are released: its slots may be reused."""
        with self._lock:
            self._looked_up.pop((iid, pin_id), None)

    def _looked_up_slots(
        self, iid: int, pin_id: int | str | None, pin_owner: int | None, server_id: str | None
    ) -> list[P.SlotInfo]:
        """The slots a lookup of this instance pinned under ``pin_id`` on the server ``server_id``
        (taken: one load uses them)."""
        if pin_id is None or pin_owner not in (None, iid):
            return []
        with self._lock:
            named_by, slots = self._looked_up.pop((iid, pin_id), (None, []))
        return slots if named_by == server_id else []

    def store(
        self, iid: int, transfer: BlockTransfer[Any], timeout_s: float | None, after: CopyStart | None = None
    ) -> int:
        """Tokens copied to the server from ``transfer``'s blocks, after ``after`` (see
        :meth:`CacheServerClient.store`; a leased chunk the server already held counts, though the
        server keeps its own copy)."""
        try:
            return self._store(iid, transfer, timeout_s, after, use_lease=True)
        except (UnknownInstance, _LeaseVoid):
            # The server restarted or forgot this instance, and its lease with it: register again (the
            # plain call does) and store without one.
            self._registrations.copier(iid).drop_leases()
            return self._store(iid, transfer, timeout_s, after, use_lease=False)

    def _store(
        self,
        iid: int,
        transfer: BlockTransfer[Any],
        timeout_s: float | None,
        after: CopyStart | None,
        *,
        use_lease: bool,
    ) -> int:
        copier = self._registrations.copier(iid)
        fields = self._registrations.prompt_fields(iid, transfer)
        size, tpb = self._registrations.geometry(iid)
        end = min(transfer.end, self._registrations.prompt_length(iid, fields))
        if end > transfer.start:  # a bad block list reserves nothing
            copier.check_blocks(transfer.block_ids, transfer.start, end, tpb)
        # Leased slots hold full chunks of a range that starts on one (else the server refuses it).
        leasable = use_lease and transfer.start % size == 0 and end > transfer.start
        count = (end - transfer.start) // size if leasable else 0
        if count and self._registrations.may_be_reaped(iid):
            # Silent long enough to be forgotten (a stopped process resuming): its leased slots may be
            # another chunk's now. The store_reserve below proves the registration or registers again.
            self._give_back_leases(iid, copier, timeout_s)
        leases, lease_cap = copier.take_leases(count)
        report = _StoreReport(iid, transfer.start, transfer.start + len(leases) * size, leases, fields)
        # Always asked, even when the lease holds the whole store: the reply tops the lease up (the
        # leases this store fills no longer count against it) and proves the server still knows this
        # registration (the report that follows is one-way).
        req = P.StoreReserve(
            instance_id=iid,
            start=report.end,
            end=transfer.end,
            lease=P.MAX_LEASE,
            filling=[lease.id for lease in leases],
            **fields,
        )
        wait_reply: Submitted[Any] | None = None
        rows = size // tpb
        leased = [(transfer.start // tpb + i * rows, lease.slot) for i, lease in enumerate(leases)]
        batch: CopyBatcher[None] | None = None
        try:
            # Leased slots were granted with the lease, the others with the reply (a retry after
            # registering again stamps the request with the new registration's capability).
            guard = self._registrations.slots_guard(
                iid, lambda: req.cap if report.reply is not None else lease_cap
            )
            batch = copier.begin_store(transfer.block_ids, after, guard)
            for first, slot in leased[:1]:  # the first copy starts before the request is even sent
                copier.add(batch, slot, transfer.block_ids[first : first + rows])
            sent_at = self._registrations.clock()
            if use_lease:
                wait_reply = self._submit(req, P.StoreSlots, timeout_s, deadline=True)
            else:
                report.reply = self._call(req, P.StoreSlots, timeout_s, deadline=True)
            for first, slot in leased[1:]:  # copying while the reservation of the rest travels
                copier.add(batch, slot, transfer.block_ids[first : first + rows])
            if wait_reply is not None:
                pending, wait_reply = wait_reply, None  # taken once, even if it raises
                report.reply = pending.next()[0]
            assert report.reply is not None
            self._registrations.heard([iid], sent_at)
            copier.add_leases(report.reply)
            report.cap = req.cap
            if leases and req.cap != lease_cap:  # registered again meanwhile: the leases went with the old
                report.leases = []
                raise _LeaseVoid
            copier.add_chunks(batch, report.reply, transfer.block_ids)
            copier.finish_store(batch)
            # framed while the last copies run
            publish = None if report.empty else self._one_way(report.done(ok=True), timeout_s)
            copier.wait_stored()
        except BaseException as e:
            if batch is not None:
                copier.abandon(batch)  # no copy may still write into a slot once it is given back
            reply_lost = report.reply is None and isinstance(e, ServerUnavailable)
            if wait_reply is not None:  # its reservation must be given back too
                try:
                    report.reply = wait_reply.next()[0]
                    copier.add_leases(report.reply)
                except ServerUnavailable:
                    reply_lost = True
                except ServerError:
                    pass
            report.cap = req.cap or lease_cap  # unsent reservation: the leases' own
            if not report.empty and not isinstance(e, UnknownInstance):  # else nothing to give back
                with contextlib.suppress(ServerUnavailable, ServerError):
                    self._one_way(report.done(ok=False), timeout_s)()
            if reply_lost:
                self._abandon(req, timeout_s)
            raise
        if publish is not None:  # unsent, nothing is published: the store fails
            if transfer.start == 0:
                self._registrations.published_first_chunk(iid, fields)
            publish()
        return report.tokens(size)

    def _give_back_leases(self, iid: int, copier: SharedL1Copier, timeout_s: float | None) -> None:
        """Drop every leased slot unused and give them back, to a server that still holds them (one that
        reaped the instance refuses the report: it holds none of them)."""
        stale, cap = copier.take_leases(copier.leased)
        for first in range(0, len(stale), P.MAX_LEASE):
            report = _StoreReport(iid, 0, 0, stale[first : first + P.MAX_LEASE], {}, cap=cap)
            with contextlib.suppress(ServerUnavailable, ServerError):
                self._one_way(report.done(ok=False), timeout_s)()

    def retrieve(
        self,
        iid: int,
        transfer: BlockTransfer[Any],
        pin_id: int | str | None,
        pin_owner: int | None,
        timeout_s: float | None,
        stream: Any = None,
        layers: LayerReady | None = None,
    ) -> int:
        """Tokens loaded into ``transfer``'s blocks, a prefix (see :meth:`CacheServerClient.retrieve`;
        with ``stream`` the copies may still be running on return, ``stream`` ordered after them, or,
        given ``layers``, after each layer as it waits on ``layers``).

        The server answers in two parts when the load has more than :data:`FIRST_CHUNKS` chunks: the
        first chunks' copies start while it pins and names the rest. When this client's lookup took the
        pins, the copies from the slots it named start before any reply (before the request when it
        named every chunk's slot); the reply names the slots to use, and a chunk named otherwise (its
        pin had lapsed, its slot was filled again) is copied again from the reply's slot, after the
        first copy. Rows past the loaded prefix may then have been written. A layer-wise load
        (``layers``) enqueues its copies in one pass, each layer group of every chunk after the other:
        before the reply when the lookup named every chunk's slot, else once the whole reply is in
        (see :meth:`SharedL1Copier.add_looked_up`). A load that fails (a part refused, a copy raised)
        raises once every copy it enqueued is done; its slots stay pinned until then."""
        copier: SharedL1Copier = self._registrations.copier(iid)
        _, tpb = self._registrations.geometry(iid)
        if transfer.end > transfer.start:  # a bad block list pins nothing
            copier.check_blocks(transfer.block_ids, transfer.start, transfer.end, tpb)
        req = P.Load(
            instance_id=iid,
            start=transfer.start,
            end=transfer.end,
            pin_id=pin_id,
            pin_owner=pin_owner,
            first=FIRST_CHUNKS,
            **self._registrations.prompt_fields(iid, transfer),
        )
        looked_up = self._looked_up_slots(iid, pin_id, pin_owner, copier.server_id)
        if self._registrations.may_be_reaped(iid):  # the lookup's pins may be gone: the reply names slots
            looked_up = []
        sent_at = self._registrations.clock()
        batch, early, parts, reply, more = self._first_part(
            copier, req, transfer, looked_up, timeout_s, stream, layers
        )
        self._registrations.heard([iid], sent_at)
        if reply.ticket == 0:
            if early:
                copier.abandon(batch)  # nothing is pinned for them: no copy may outlive this call
            return reply.loaded
        done = P.LoadDone(instance_id=iid, ticket=reply.ticket, cap=req.cap)
        report: Callable[[], None] | None = None
        reported_later = False
        try:
            copier.add_load(batch, reply, transfer.block_ids, early)
            while more:
                assert parts is not None
                reply, more = parts.next()
                copier.add_load(batch, reply, transfer.block_ids, early)
            report = self._report_of(done, timeout_s)  # framed while the copies run
            copied = copier.finish_load(batch, stream, ordered=layers is None)
            if copied is not None:  # the copies are running: their report goes once they are done
                self._report_when_done(copied, copier.pool.device.index, report)
                reported_later = True
            return reply.loaded
        except BaseException:
            # A later part refused or a copy failed: the copies of the parts before may still be running.
            # The slots stay pinned until none reads them, and the failed load writes no block after it.
            copier.abandon(batch)
            raise
        finally:
            if parts is not None:
                parts.cancel()  # parts not read (a copy failed): their lane goes
            if not reported_later:  # the copy completed or failed: the pins may go
                (report or self._report_of(done, timeout_s))()

    def _first_part(
        self,
        copier: SharedL1Copier,
        req: P.Load,
        transfer: BlockTransfer[Any],
        looked_up: list[P.SlotInfo],
        timeout_s: float | None,
        stream: Any,
        layers: LayerReady | None,
    ) -> tuple[CopyBatcher[None], dict[int, P.LoadChunk], Submitted[P.LoadSlots] | None, P.LoadSlots, bool]:
        """Send the load ``req`` and read its reply's first part, the copies from the lookup's slots
        ``looked_up`` enqueued meanwhile: the load's batch, those copies by first block, the parts to
        read, the first part and whether more follow. If it raises, every copy it enqueued is done."""
        size, tpb = self._registrations.geometry(req.instance_id)
        chunks = transfer.chunks_touched(size)
        guard = self._registrations.slots_guard(req.instance_id)
        batch: CopyBatcher[None] | None = None
        parts: Submitted[P.LoadSlots] | None = None
        replied = False
        try:
            if copier.names_every_chunk(looked_up, transfer, size):
                # The reply will only confirm the lookup's slots: the copies go first.
                batch = copier.begin_load(transfer.block_ids, stream, layers, chunks, guard)
                early = copier.add_looked_up(batch, looked_up, transfer, size, tpb)
                parts = self._submit(req, P.LoadSlots, timeout_s, deadline=True)
            else:
                parts = self._submit(req, P.LoadSlots, timeout_s, deadline=True)
                # set up while the first part travels
                batch = copier.begin_load(transfer.block_ids, stream, layers, chunks, guard)
                early = copier.add_looked_up(batch, looked_up, transfer, size, tpb)
            replied = True  # the reply is read (or failed) by now
            reply, more = parts.next()
            return batch, early, parts, reply, more
        except BaseException as e:
            unused: P.LoadSlots | None = None
            reply_lost = replied and isinstance(e, ServerUnavailable)
            if parts is not None and not replied:  # a copy failed while the reply was on its way
                unused, reply_lost = _read_first_part(parts)
            elif parts is not None:
                parts.cancel()  # not read: its lane goes
            if batch is not None:  # the copies from the lookup's slots, whose pins may go with the error
                copier.abandon(batch)
            # Once no copy reads a slot the reply's ticket pins, its pins go.
            if unused is not None and unused.ticket:
                self._report_of(
                    P.LoadDone(instance_id=req.instance_id, ticket=unused.ticket, cap=req.cap), timeout_s
                )()
            elif reply_lost:
                self._abandon(req, timeout_s)
            if not isinstance(e, UnknownInstance):
                raise
        # The server restarted or forgot us: the plain call registers again; all from the new server.
        req.first = 0
        try:
            reply = self._call(req, P.LoadSlots, timeout_s, deadline=True)
        except ServerUnavailable:
            self._abandon(req, timeout_s)
            raise
        guard = self._registrations.slots_guard(req.instance_id)  # the new registration's slots
        return copier.begin_load(transfer.block_ids, stream, layers, chunks, guard), {}, None, reply, False

    def _abandon(self, req: P.StoreReserve | P.Load, timeout_s: float | None) -> None:
        """Tell the server this client never read the reply to ``req`` (its call failed first), so what
        the reply granted goes back now, not with the registration (see
        :mod:`lmcache.server.sent_grants`). Not retried, as reports are: a server that restarted holds
        nothing of it, and one that stays up gives it back when it retires the instance."""
        if not req.rid:  # never framed, never sent
            return
        abandon = P.Abandon(instance_id=req.instance_id, rids=[req.rid], cap=req.cap)
        with contextlib.suppress(ServerUnavailable, ServerError):
            self._one_way(abandon, timeout_s)()

    def _report_of(self, done: P.LoadDone, timeout_s: float | None) -> Callable[[], None]:
        """A load's ``load_done``, framed now (while its copies run); the call returned sends it. A
        server that cannot take it (gone, restarted) releases the pins itself (reaping, or a fresh
        L1), so the load still counts."""
        try:
            send = self._one_way(done, timeout_s)
        except (ServerUnavailable, ServerError):  # the client closed: nothing can be sent
            return lambda: None

        def report() -> None:
            with contextlib.suppress(ServerUnavailable, ServerError):
                send()

        return report

    def _report_when_done(self, copied: Any, device: int | None, done: Callable[[], None]) -> None:
        """Send the report ``done`` from the background once the event ``copied`` (after the load's
        copies on ``device``, the pool's) is."""

        def report() -> None:
            copied.synchronize()
            done()

        with self._lock:  # loads of several threads: one sender thread
            self._report_sender(device).submit(report)

    def _report_sender(self, device: int | None) -> ThreadPoolExecutor:
        """The reports' thread, started now if it is not running (lock held)."""
        if self._reports is None:
            from lmcache import cudart  # torch: only for CUDA pools

            # Not a daemon: exit waits for the last reports (their copies are running on the device).
            self._reports = cudart.background_thread("lmcache-load-done", device)
        return self._reports

    def close(self) -> None:
        """Send the reports still waiting for their copies, stop the thread that sends them, then drop
        the client's slab mappings."""
        with self._lock:
            reports, self._reports = self._reports, None
        if reports is not None:
            reports.shutdown(wait=True)
        self._registrations.close()


def _read_first_part(parts: Submitted[P.LoadSlots]) -> tuple[P.LoadSlots | None, bool]:
    """Read the first part of a load's reply that no copy will use (its ticket's pins are to go back),
    then close its lane: the part (None if none could be read), and whether the reply was lost (not
    read: the request is to be abandoned)."""
    try:
        return parts.next()[0], False
    except ServerUnavailable:
        return None, True
    except ServerError:  # refused: nothing granted
        return None, False
    finally:
        parts.cancel()
