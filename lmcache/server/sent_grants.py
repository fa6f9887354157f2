"""What the shared-L1 replies to an instance granted, by request id, for as long as its client may
still say it never read them.

A worker whose ``store_reserve`` or ``load`` call fails before it reads the reply (the call timed
out, its connection broke) never reports that reply's ticket or leased slots done: it never learned
them. It names the request in an ``abandon`` instead, and what the reply granted goes back at once,
not with the registration (64 such tickets would refuse every later store and load of the instance).

A reply is noted just before it is sent. An ``abandon`` may come first (the client gave up while its
request was still served): its id is kept, and the reply, once ready, is given back unsent. Both are
bounded per registration: the :data:`MAX_NOTED` latest grants and the :data:`MAX_EARLY` latest early
ids. A grant older than that was read long ago (a client abandons within its timeout); if not, it is
held until the registration goes, within the ticket and lease caps, as before.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

__all__ = ["Grant", "MAX_EARLY", "MAX_NOTED", "SentGrants"]

MAX_NOTED = 256
"""Grants kept per registration: several times the open tickets it may hold (64)."""
MAX_EARLY = 64
"""Ids abandoned before their reply was ready, kept per registration."""


@dataclass(frozen=True)
class Grant:
    """What one reply granted: a ticket (0: none) and leased slots, by id."""

    ticket: int
    leases: tuple[int, ...] = ()


class SentGrants:
    """The grants of replies sent, and the ids abandoned early, per registration; thread-safe."""

    def __init__(self, max_noted: int = MAX_NOTED, max_early: int = MAX_EARLY) -> None:
        self.max_noted = max_noted
        self.max_early = max_early
        self._noted: dict[int, OrderedDict[int, Grant]] = {}
        self._early: dict[int, OrderedDict[int, None]] = {}
        self._lock = threading.Lock()

    def note(self, registration: int, rid: int, grant: Grant) -> bool:
        """Note that the reply to request ``rid`` (0: not numbered, not noted) grants ``grant``; False if
        the client abandoned ``rid`` already: the caller gives the grant back and sends nothing."""
        if not rid:
            return True
        with self._lock:
            early = self._early.get(registration)
            if early is not None and rid in early:
                del early[rid]
                return False
            noted = self._noted.setdefault(registration, OrderedDict())
            noted[rid] = grant
            noted.move_to_end(rid)
            if len(noted) > self.max_noted:
                noted.popitem(last=False)
            return True

    def abandon(self, registration: int, rids: list[int]) -> list[Grant]:
        """The grants of the replies to ``rids`` the client never read, to give back; an id whose reply
        is not noted yet is kept, so that reply is not sent."""
        found: list[Grant] = []
        with self._lock:
            noted = self._noted.get(registration)
            for rid in rids:
                grant = None if noted is None else noted.pop(rid, None)
                if grant is not None:
                    found.append(grant)
                    continue
                early = self._early.setdefault(registration, OrderedDict())
                early[rid] = None
                if len(early) > self.max_early:
                    early.popitem(last=False)
        return found

    def forget(self, registration: int) -> None:
        """The registration is gone, and its tickets and leases with it."""
        with self._lock:
            self._noted.pop(registration, None)
            self._early.pop(registration, None)
