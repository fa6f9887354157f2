"""A client's stores and loads for a pool registered in the shared-L1 mode: the server hands out L1
slots, this process copies (:class:`~lmcache.server.shared_l1_worker.SharedL1Copier`), then reports.

* store: ``store_reserve`` -> gather the blocks into the reserved slots -> ``store_done``; if the
  copy raised, ``store_done`` goes with ``ok=False`` (the slots are given back, nothing is
  published) and the copy's exception propagates;
* load: ``load`` -> scatter the slots into the blocks -> ``load_done``, sent after the copy completed
  (or failed) and waited for like any call, so the chunks stay pinned exactly as long as the copy
  reads them.

A ``*_done`` that cannot reach the server is not retried: a server that restarted has no ticket to
close, and one that stays up reaps the instance's tickets with the instance.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from lmcache.server import protocol as P
from lmcache.server.client_errors import ServerError, ServerUnavailable
from lmcache.server.client_registrations import Registrations
from lmcache.transfer import BlockTransfer

__all__ = ["SharedL1Transfers", "CallFn"]

CallFn = Callable[..., Any]
"""The client's call: ``(request, result_type, timeout_s, *, retry_unknown=True, deadline=False)``."""


class SharedL1Transfers:
    """The store and retrieve of shared-L1 registrations, over the client's ``call``."""

    def __init__(self, call: CallFn, registrations: Registrations) -> None:
        self._call = call
        self._registrations = registrations

    def store(self, iid: int, transfer: BlockTransfer[Any], timeout_s: float | None) -> int:
        """Tokens newly stored from ``transfer``'s blocks (see :meth:`CacheServerClient.store`)."""
        req = P.StoreReserve(
            instance_id=iid,
            start=transfer.start,
            end=transfer.end,
            **self._registrations.prompt_fields(iid, transfer),
        )
        reply = self._call(req, P.StoreSlots, timeout_s, deadline=True)
        if reply.ticket == 0:
            return 0  # every chunk already cached (or none in the range)
        try:
            self._registrations.copier(iid).store(reply, transfer.block_ids)
        except BaseException:  # give the slots back; the copy's exception is what the caller must see
            with contextlib.suppress(ServerUnavailable, ServerError):
                aborted = P.StoreDone(instance_id=iid, ticket=reply.ticket, ok=False)
                self._call(aborted, int, timeout_s, retry_unknown=False)
            raise
        done = P.StoreDone(instance_id=iid, ticket=reply.ticket)
        return self._call(done, int, timeout_s, retry_unknown=False)

    def retrieve(
        self,
        iid: int,
        transfer: BlockTransfer[Any],
        pin_id: int | str | None,
        pin_owner: int | None,
        timeout_s: float | None,
    ) -> int:
        """Tokens loaded into ``transfer``'s blocks, a prefix (see :meth:`CacheServerClient.retrieve`)."""
        req = P.Load(
            instance_id=iid,
            start=transfer.start,
            end=transfer.end,
            pin_id=pin_id,
            pin_owner=pin_owner,
            **self._registrations.prompt_fields(iid, transfer),
        )
        reply = self._call(req, P.LoadSlots, timeout_s, deadline=True)
        if reply.ticket == 0:
            return reply.loaded
        done = P.LoadDone(instance_id=iid, ticket=reply.ticket)
        try:
            loaded = self._registrations.copier(iid).load(reply, transfer.block_ids)
        except BaseException:
            with contextlib.suppress(ServerUnavailable, ServerError):
                self._call(done, bool, timeout_s, retry_unknown=False)
            raise
        # The blocks hold the chunks now: a server that cannot take the report (gone, restarted)
        # releases the pins itself (reaping, or a fresh L1), so the load still counts.
        with contextlib.suppress(ServerUnavailable, ServerError):
            self._call(done, bool, timeout_s, retry_unknown=False)
        return loaded
