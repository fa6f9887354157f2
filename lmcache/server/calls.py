"""One request's call as the service's handlers see it: who sent it, by when its reply must leave,
whether its connection is gone, and the work that waits until its reply is out.

The dispatcher (:mod:`lmcache.server.dispatch`) makes a :class:`Call` for every request it runs and
hands it to the :data:`Handler` its message type maps to (:meth:`CacheService.handle
<lmcache.server.service.CacheService.handle>`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lmcache.server.security import Peer

__all__ = ["Call", "Handler", "REPLY_MARGIN_S"]


REPLY_MARGIN_S = 1.0
"""At most this much of a request's timeout is kept for its reply's way back (see :meth:`Call.expiring`)."""


@dataclass
class Call:
    """The context of one request: who sent it, and the cleanups to run once its reply is out."""

    peer: Peer
    cleanups: list[Callable[[], None]] | None = None
    """None: no reply is pending elsewhere, cleanups run at once."""
    send_part: Callable[[Any], None] | None = None
    """Sends a first part of the reply's value now (a reply with ``more``); None: parts are not
    supported where the request runs, the handler answers whole."""
    deadline: float | None = None
    """When a reply must leave for the client to have it before it gives up (``time.monotonic()``:
    the request's ``timeout_ms`` from its arrival, less a tenth of it, at most
    :data:`REPLY_MARGIN_S`, for the way back), or None: the client waits as long as it takes."""
    gone: Callable[[], bool] | None = None
    """Whether the request's connection has closed (its reply would be dropped); None: not told."""

    def set_timeout(self, received: float, timeout_ms: int | None) -> None:
        """The request arrived at ``received`` with ``timeout_ms`` (0 or None: no timeout)."""
        if timeout_ms:
            timeout = timeout_ms / 1000
            self.deadline = received + timeout - min(REPLY_MARGIN_S, timeout / 10)

    def expiring(self) -> bool:
        """Whether the reply, sent now, may come after the client gave up (or its connection closed):
        what it grants (a reservation, pins) would then be held for nobody."""
        if self.gone is not None and self.gone():
            return True
        return self.deadline is not None and time.monotonic() > self.deadline

    def after_reply(self, cleanup: Callable[[], None]) -> None:
        """Run ``cleanup`` once the reply is out: work the client need not wait for, still done
        before the client's next request runs."""
        if self.cleanups is None:
            cleanup()
        else:
            self.cleanups.append(cleanup)


Handler = Callable[[Any, Call], Any]
"""A request handler: (decoded request, its call) -> the reply's value."""
