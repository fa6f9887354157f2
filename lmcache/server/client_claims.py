"""A client's pinned lookups answered through the server's claim regions (:mod:`lmcache.server.claims`):
the hit claimed here, the lookup then sent one-way for the server to pin it and give the claims back."""

from __future__ import annotations

import time
from collections.abc import Callable

from lmcache.server import protocol as P
from lmcache.server.client_registrations import Registrations
from lmcache.server.client_shared_l1 import OneWayFn, SharedL1Transfers

__all__ = ["ClaimedLookups"]


class ClaimedLookups:
    """Claims the hits of a client's pinned lookups (see the module)."""

    def __init__(
        self,
        registrations: Registrations,
        shared_l1: SharedL1Transfers,
        one_way: OneWayFn,
        server_down: Callable[[], bool],
    ) -> None:
        """``server_down``: whether the server failed to answer since its last reply (stopped, wedged):
        its claim index is then no promise that it will serve the loads."""
        self._registrations = registrations
        self._shared_l1 = shared_l1
        self._one_way = one_way
        self._server_down = server_down

    def lookup(self, req: P.LookupHashes, timeout_s: float | None) -> int | None:
        """``req``'s hit, claimed, and ``req`` sent one-way to pin it; None when it must ask the server
        (:meth:`Registrations.claim` says when). A shared-L1 instance's load then copies from the
        claimed slots before the server answers it."""
        assert req.pin_id is not None
        if self._server_down():
            return None
        req.claimed_at = time.monotonic()  # a load the server serves after this used this hit
        claimed = self._registrations.claim(req.instance_id, req.chunk_hashes, req.pin_id)
        if claimed is None:
            return None
        if self._registrations.copies_itself(req.instance_id):
            self._shared_l1.remember_slots(req.instance_id, req.pin_id, claimed.slots)
        if claimed.tokens == 0:
            self._registrations.count_miss(req.num_tokens)  # for the server's hit rate
            return 0
        req.claims = claimed.entries
        try:
            self._one_way(req, timeout_s)()
        except BaseException:
            self._registrations.unclaim(req.instance_id, req.claims)
            raise
        self._registrations.pinned(req.instance_id, req.pin_id, claimed)
        return claimed.tokens
