"""A client's pinned lookups answered through the server's claim regions (:mod:`lmcache.server.claims`):
the hit claimed here, the lookup then sent one-way for the server to pin it and give the claims back.

A caller may have that report wait (``report_later``): its claims keep the chunks from eviction until it
goes out, with this client's next request (so before any load or release that follows it here), at
:meth:`ClaimedLookups.report` or with the next heartbeat. TRT-LLM's scheduler reports its pass's lookups
once, when it builds the pass's metadata, rather than in each ``get_num_new_matched_tokens``."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable

from lmcache.logging import init_logger
from lmcache.rate_limit import RateLimitedLog
from lmcache.server import protocol as P
from lmcache.server.client_errors import ServerError, ServerUnavailable
from lmcache.server.client_registrations import Registrations
from lmcache.server.client_shared_l1 import OneWayFn, SharedL1Transfers

logger = init_logger(__name__)

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
        """``one_way``: frames a request one-way without reporting first (this object's own sends);
        ``server_down``: whether the server failed to answer since its last reply (stopped, wedged):
        its claim index is then no promise that it will serve the loads."""
        self._registrations = registrations
        self._shared_l1 = shared_l1
        self._one_way = one_way
        self._server_down = server_down
        self._unreported: collections.deque[tuple[P.LookupHashes, float | None]] = collections.deque()
        self._reporting = threading.Lock()
        """Held while reports go out: a request framed after :meth:`report` returned is sent after them."""
        self._warn = RateLimitedLog(logger)

    def lookup(self, req: P.LookupHashes, timeout_s: float | None, report_later: bool = False) -> int | None:
        """``req``'s hit, claimed, and ``req`` sent one-way to pin it (``report_later``: queued for
        :meth:`report`); None when it must ask the server (:meth:`Registrations.claim` says when). A
        shared-L1 instance's load then copies from the claimed slots before the server answers it."""
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
        self._registrations.pinned(req.instance_id, req.pin_id, claimed)
        if report_later:
            self._unreported.append((req, timeout_s))
            return claimed.tokens
        try:
            self._one_way(req, timeout_s)()
        except BaseException:
            self._forget(req)
            raise
        return claimed.tokens

    def report(self) -> None:
        """Send the lookups queued by ``report_later``, oldest first; never raises for a server that
        cannot take them: their claims are given back and their loads then fail as the server's."""
        with self._reporting:
            while self._unreported:
                req, timeout_s = self._unreported.popleft()
                try:
                    self._one_way(req, timeout_s)()
                except (ServerUnavailable, ServerError) as e:
                    self._forget(req)
                    self._warn.warning(
                        "report",
                        "LMCache MP: a claimed lookup could not be reported (%s): its hit is not pinned",
                        e,
                    )
                except BaseException:
                    self._forget(req)
                    raise

    def _forget(self, req: P.LookupHashes) -> None:
        """A claimed lookup that was not sent: its claims, its pins' share and its slots go."""
        assert req.claims is not None and req.pin_id is not None
        self._registrations.unclaim(req.instance_id, req.claims)
        self._registrations.unpinned(req.instance_id, req.pin_id)
        self._shared_l1.forget_slots(req.instance_id, req.pin_id)
