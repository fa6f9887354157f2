"""The shared-L1 ops (``store_reserve``, ``store_done``, ``load``, ``load_done``, ``abandon``) plugged into a
:class:`~lmcache.server.service.CacheService`: each names a registered instance with its capability,
which gives the key space and rank :class:`~lmcache.server.shared_l1.SharedL1Service` works in.

An instance's open tickets go with it: retiring it (reaped, unregistered, registered again with
another pool, server shutdown) aborts its reservations, so nothing half-written is published, and
releases its loads' pins. A ``load`` that names a lookup's pins (``pin_id``) lets them go once the
reply is out, as ``retrieve`` does: the load holds its own until ``load_done``.
"""

from __future__ import annotations

import functools

from lmcache.logging import init_logger
from lmcache.server import protocol as P
from lmcache.server.calls import Call
from lmcache.server.failures import ServiceFailure
from lmcache.server.instances import Instance
from lmcache.server.sent_grants import Grant
from lmcache.server.service import CacheService
from lmcache.server.shared_l1 import InstanceScope, SharedL1Error, SharedL1Service

logger = init_logger(__name__)

__all__ = ["SharedL1Handlers"]


class SharedL1Handlers:
    """Serves the shared-L1 ops of ``service`` through ``shared`` (see :meth:`install`)."""

    def __init__(self, service: CacheService, shared: SharedL1Service) -> None:
        self.service = service
        self.shared = shared

    @classmethod
    def install(cls, service: CacheService, shared: SharedL1Service) -> SharedL1Handlers:
        """Serve the five ops, accept ``shared_l1`` pools, forget an instance's tickets on retire."""
        handlers = cls(service, shared)
        service.shared_l1 = shared
        service.add_handlers(
            {
                P.StoreReserve: handlers.store_reserve,
                P.StoreDone: handlers.store_done,
                P.Load: handlers.load,
                P.LoadDone: handlers.load_done,
                P.Abandon: handlers.abandon,
            }
        )
        service.instances.on_retire.append(handlers.forget)
        return handlers

    def store_reserve(self, req: P.StoreReserve, call: Call) -> P.StoreSlots:
        with self.service.instances.use(req.instance_id, req.cap) as inst:
            scope = _scope(inst, "store_reserve")
            reply = self.shared.store_reserve(scope, req)
            self._forget_if_retired(inst)
            grant = Grant(reply.ticket, tuple(lease.id for lease in reply.leased))
            if call.expiring() or not self._sending(scope, req.rid, grant):
                self.shared.undo_reserve(scope, reply)
                raise _too_late("store_reserve", "nothing was reserved or leased")
            return reply

    def store_done(self, req: P.StoreDone, call: Call) -> int:
        with self.service.instances.use(req.instance_id, req.cap) as inst:
            return self.shared.store_done(_scope(inst, "store_done"), req)

    def load(self, req: P.Load, call: Call) -> P.LoadSlots:
        with self.service.instances.use(req.instance_id, req.cap) as inst:
            scope = _scope(inst, "load")
            key = None if req.pin_id is None else self.service.pin_key(inst, req.pin_owner, req.pin_id)
            parts_sent: list[P.LoadSlots] = []

            def send_part(part: P.LoadSlots) -> None:
                if call.expiring() or not self._sending(scope, req.rid, Grant(part.ticket)):
                    raise _too_late("load", "nothing was pinned")
                assert call.send_part is not None
                call.send_part(part)
                parts_sent.append(part)

            try:
                reply = self.shared.load(scope, req, send_part if call.send_part is not None else None)
                self._forget_if_retired(inst)
                if (
                    not parts_sent  # a part sent: the client closes the ticket, or abandons the request
                    and reply.ticket
                    and (call.expiring() or not self._sending(scope, req.rid, Grant(reply.ticket)))
                ):
                    self.shared.undo_load(scope, reply)
                    raise _too_late("load", "nothing was pinned")
                return reply
            finally:
                if key is not None:  # the load holds its own pins now (or failed): the lookup's may go
                    call.after_reply(functools.partial(self.service.pins.rank_done, key, inst.rank))

    def load_done(self, req: P.LoadDone, call: Call) -> bool:
        with self.service.instances.use(req.instance_id, req.cap) as inst:
            return self.shared.load_done(_scope(inst, "load_done"), req)

    def abandon(self, req: P.Abandon, call: Call) -> int:
        with self.service.instances.use(req.instance_id, req.cap) as inst:
            given_back = self.shared.abandon(_scope(inst, "abandon"), req.rids)
        if given_back:
            logger.info(
                "instance %d: %d shared-L1 repl(ies) its worker never read given back (its calls failed "
                "first: timed out or disconnected)",
                req.instance_id,
                given_back,
            )
        return given_back

    def _sending(self, scope: InstanceScope, rid: int, grant: Grant) -> bool:
        """Note what the reply to ``rid`` grants, about to be sent; False if its client abandoned it
        already (the caller gives the grant back)."""
        return not (grant.ticket or grant.leases) or self.shared.sent.note(scope.registration, rid, grant)

    def forget(self, inst: Instance) -> None:
        """Abort the retired instance's reservations and release its loads."""
        count = self.shared.forget(inst.registration)
        if count:
            logger.info(
                "instance %d: %d open shared-L1 ticket(s) dropped (reservations aborted, loads unpinned)",
                inst.instance_id,
                count,
            )

    def _forget_if_retired(self, inst: Instance) -> None:
        """A ticket opened while the instance was being retired would outlive it: drop it now."""
        if inst.retired:
            self.forget(inst)


def _too_late(op: str, undone: str) -> ServiceFailure:
    """The failure of a request finished after its client gave up, what it granted given back."""
    return ServiceFailure(
        P.ErrorCode.EXPIRED,
        f"{op} finished after the client's timeout_ms had passed, {undone}; the server is slow: retry, "
        "or raise the client's timeout",
    )


def _scope(inst: Instance, op: str) -> InstanceScope:
    """The instance's scope for ``op``; refused unless it registered its pool in the shared-L1 mode:
    an instance whose pool the server maps would otherwise publish slots it never wrote (an L1 slot
    keeps the bytes of the chunk evicted from it)."""
    mode = P.sharing_mode(inst.request.pool)
    if mode != "shared-l1":
        raise SharedL1Error(
            f"{op} serves only instances registered in the shared-l1 mode; instance {inst.instance_id} "
            f"registered its pool as {mode}: use store / retrieve for it"
        )
    return InstanceScope(inst.instance_id, inst.space, inst.rank, inst.registration)
