"""A registering client's process, watched through a pidfd: whether it still runs. Once the pidfd is
open it never names a later process given the same pid (it is opened at registration, from the pid the
connection's peer credentials gave when it connected).

The server keeps the registration of a shared-L1 worker whose process runs however long it is silent:
a stopped process (``SIGSTOP``, a debugger, a frozen container) still holds L1 slots it copies into when
it resumes, so they must not be handed to another chunk. Only a Unix-socket peer's pid is known (its
``SO_PEERCRED``, in the server's pid namespace); a TCP peer's is not, and it is reaped on silence.
"""

from __future__ import annotations

import os
import select

from lmcache.logging import init_logger
from lmcache.server.security import Peer

logger = init_logger(__name__)

__all__ = ["PeerProcess"]


class PeerProcess:
    """A process held by a pidfd (Linux 5.3+): :meth:`alive` until it exits."""

    def __init__(self, pidfd: int, pid: int) -> None:
        self.pidfd = pidfd
        self.pid = pid

    @classmethod
    def of(cls, peer: Peer) -> PeerProcess | None:
        """The process of a Unix-socket peer; None for a TCP peer, a pid outside this namespace (0) or a
        kernel without pidfds."""
        if not peer.is_unix or not peer.pid:
            return None
        try:
            return cls(os.pidfd_open(peer.pid), peer.pid)
        except (AttributeError, OSError) as e:  # no pidfd_open, or the process is gone already
            logger.debug("cannot watch process %d: %s", peer.pid, e)
            return None

    def alive(self) -> bool:
        """Whether the process has not exited (a pidfd turns readable when it does); False once closed
        or if the pidfd cannot be polled (the instance is then reaped on silence, as a TCP peer)."""
        if self.pidfd < 0:
            return False
        poller = select.poll()  # not select(): descriptors past 1024 are common in a server with an fd L1
        poller.register(self.pidfd, select.POLLIN)
        try:
            return not poller.poll(0)
        except OSError as e:
            logger.warning("cannot watch process %d: %s", self.pid, e)
            return False

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
