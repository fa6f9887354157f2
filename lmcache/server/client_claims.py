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
from lmcache.server.client_lanes import LanePool
from lmcache.server.client_registrations import Registrations
from lmcache.server.client_shared_l1 import SharedL1Transfers

logger = init_logger(__name__)

__all__ = ["ClaimedLookups"]

FrameFn = Callable[..., tuple[bytes, int, str, float]]
"""The client's ``_frame(req, timeout_s, report_first=False)``: (frame, request id, op name, timeout)."""


class ClaimedLookups:
    """Claims the hits of a client's pinned lookups (see the module)."""

    def __init__(
        self,
        registrations: Registrations,
        shared_l1: SharedL1Transfers,
        frame: FrameFn,
        lanes: LanePool,
    ) -> None:
        """``lanes``: the client's connections, which the reports go on; while they say the server is
        down (it failed to answer since its last reply: stopped, wedged), its claim index is no promise
        that it will serve the loads."""
        self._registrations = registrations
        self._shared_l1 = shared_l1
        self._frame = frame
        self._lanes = lanes
        self._unreported: collections.deque[tuple[P.LookupHashes, float | None]] = collections.deque()
        self._reporting = threading.Lock()
        """Held while reports go out: a request framed after :meth:`report` returned is sent after them."""
        self._warn = RateLimitedLog(logger)

    def lookup(self, req: P.LookupHashes, timeout_s: float | None, report_later: bool = False) -> int | None:
        """``req``'s hit, claimed, and ``req`` sent one-way to pin it (``report_later``: queued for
        :meth:`report`); None when it must ask the server (:meth:`Registrations.claim` says when). A
        shared-L1 instance's load then copies from the claimed slots before the server answers it."""
        assert req.pin_id is not None
        if self._lanes.down:
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
        self._send_reports([(req, timeout_s)])
        return claimed.tokens

    def report(self) -> None:
        """Send the lookups queued by ``report_later``, oldest first, in one write; never raises for a
        server that cannot take them: their claims are given back and their loads then ask the server."""
        with self._reporting:
            reports = []
            while self._unreported:
                reports.append(self._unreported.popleft())
            if not reports:
                return
            try:
                self._send_reports(reports)
            except (ServerUnavailable, ServerError) as e:
                self._warn.warning(
                    "report",
                    "LMCache MP: %d claimed lookups could not be reported (%s): their hits are not pinned",
                    len(reports),
                    e,
                )

    def _send_reports(self, reports: list[tuple[P.LookupHashes, float | None]]) -> None:
        """Frame and send ``reports``; if they cannot all be sent, every one's claims go back."""
        try:
            framed = []
            for req, timeout_s in reports:
                req.one_way = True
                framed.append(self._frame(req, timeout_s, report_first=False))
            frames, op, timeout = [f[0] for f in framed], framed[0][2], min(f[3] for f in framed)
            self._lanes.send_all(frames, op, timeout)
        except BaseException:
            for req, _ in reports:
                self._forget(req)
            raise

    def _forget(self, req: P.LookupHashes) -> None:
        """A claimed lookup that was not sent: its claims, its pins' share and its slots go."""
        assert req.claims is not None and req.pin_id is not None
        self._registrations.unclaim(req.instance_id, req.claims)
        self._registrations.unpinned(req.instance_id, req.pin_id)
        self._shared_l1.forget_slots(req.instance_id, req.pin_id)
