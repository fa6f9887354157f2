"""Which of the server's L1 slabs each shared-L1 registration was told of, so that every reply tells
its worker what changed: the slabs its slots lie in, those gone, those to map ahead."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from lmcache.fd_slabs import FdSlabSource
from lmcache.server import protocol as P
from lmcache.shm_slabs import ShmSlabSource

__all__ = ["SlabNews", "SlabAnnouncements"]


@dataclass(frozen=True)
class SlabNews:
    """What a reply tells an instance of the L1 slabs: ``slabs``, those its slots lie in (map before
    copying); ``forget``, those it was told of that are gone; ``ahead``, those it was not told of yet
    (map them when convenient: later slots will lie in them)."""

    slabs: list[P.SlabInfo]
    forget: list[int]
    ahead: list[P.SlabInfo]


class SlabAnnouncements:
    """The slabs of ``source`` each registration was told of; thread-safe."""

    def __init__(self, source: ShmSlabSource | FdSlabSource) -> None:
        self.source = source
        self._told: dict[int, set[int]] = {}
        self._lock = threading.Lock()

    def every_slab(self) -> list[P.SlabInfo]:
        """Every live L1 slab (``l1_slabs``: a worker maps them before it registers)."""
        return self._describe(sorted(self.source.live_ids()))

    def ahead(self, registration: int) -> list[P.SlabInfo]:
        """The L1 slabs the registration was not told of yet, from now on told: its reply hands them to
        the worker to map ahead (``RegisterInfo.slabs_ahead``)."""
        return self.news(registration, []).ahead

    def news(self, registration: int, slab_ids: list[int]) -> SlabNews:
        """What a reply naming slots in ``slab_ids`` tells the registration (see :class:`SlabNews`).
        Every reply describes its own slabs: a worker's concurrent requests (a save and a load) may
        apply their replies in any order, and each copy needs its slabs mapped."""
        live = self.source.live_ids()
        named = sorted(set(slab_ids))
        with self._lock:
            told = self._told.setdefault(registration, set())
            forget = sorted(told - live)
            told -= set(forget)
            ahead = sorted(live - told - set(named))
            told |= set(named) | set(ahead)
        return SlabNews(self._describe(named), forget, self._describe(ahead))

    def forget(self, registration: int) -> None:
        """The registration is gone."""
        with self._lock:
            self._told.pop(registration, None)

    def _describe(self, slab_ids: list[int]) -> list[P.SlabInfo]:
        infos = []
        for slab_id in slab_ids:
            info = self.source.describe(slab_id)
            if info is not None:  # a slab named by a slot is alive: the slot holds it
                infos.append(
                    P.SlabInfo(
                        id=info.id, name=info.name, nbytes=info.nbytes, kind=info.kind, channel=info.channel
                    )
                )
        return infos
