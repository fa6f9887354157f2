"""A registering client's process, watched through a pidfd: whether it still runs. The pidfd is opened at
registration from the pid the connection's peer credentials gave when it connected, and kept only if the
process it names started when the connecting one did (the pid may be another process's by then); once
open it never names a later process given the same pid.

The server keeps the registration of a shared-L1 worker whose process runs however long it is silent:
a stopped process (``SIGSTOP``, a debugger, a frozen container) still holds L1 slots it copies into when
it resumes, so they must not be handed to another chunk. Only a Unix-socket peer's pid is known (its
``SO_PEERCRED``, in the server's pid namespace); a TCP peer's is not, and it is reaped on silence.
"""

from __future__ import annotations

import os
import select

from lmcache.logging import init_logger
from lmcache.server.security import Peer, process_started

logger = init_logger(__name__)

__all__ = ["PeerProcess"]


class PeerProcess:
    """A process held by a pidfd (Linux 5.3+): :meth:`alive` until it exits."""

    def __init__(self, pidfd: int, pid: int) -> None:
        self.pidfd = pidfd
        self.pid = pid

    @classmethod
    def of(cls, peer: Peer) -> PeerProcess | None:
        """The process of a Unix-socket peer; None for a TCP peer, a pid outside this namespace (0), a
        kernel without pidfds, or a pid that names another process than the one that connected."""
        if not peer.is_unix or not peer.pid:
            return None
        try:
            pidfd = os.pidfd_open(peer.pid)
        except (AttributeError, OSError) as e:  # no pidfd_open, or the process is gone already
            logger.debug("cannot watch process %d: %s", peer.pid, e)
            return None
        # read after the pidfd is open: if its process has exited since, the pid shows another start
        if peer.started is not None and process_started(peer.pid) != peer.started:
            os.close(pidfd)
            logger.debug("not watching pid %d: it is not the process that connected", peer.pid)
            return None
        return cls(pidfd, peer.pid)

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
