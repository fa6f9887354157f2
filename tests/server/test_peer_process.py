"""PeerProcess: a registering process watched by pidfd, for Unix-socket peers only."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lmcache.server.peer_process import PeerProcess
from lmcache.server.security import Peer


def test_a_process_is_alive_until_it_exits_and_its_pid_is_not_looked_up_again() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    process = PeerProcess.of(Peer(uid=os.getuid(), gid=os.getgid(), pid=child.pid))
    try:
        assert process is not None and process.alive()
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=30)
        assert not process.alive()  # exited (and reaped by us: its pid may be anyone's now)
    finally:
        if process is not None:
            process.close()
    assert not process.alive()  # closed: not watched any more


def test_no_process_is_watched_for_a_tcp_peer_or_a_pid_outside_this_namespace() -> None:
    assert PeerProcess.of(Peer(address="127.0.0.1")) is None
    assert PeerProcess.of(Peer(uid=os.getuid(), gid=os.getgid(), pid=0)) is None


def test_a_pidfd_numbered_past_1024_is_watched() -> None:
    """A server with an fd L1 holds a descriptor per slab and raises its limit: its pidfds are often
    numbered past what select() takes."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1100:
        pytest.skip(f"this process may open only {hard} descriptors")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1100), hard))
    process = PeerProcess.of(Peer(uid=os.getuid(), gid=os.getgid(), pid=os.getpid()))
    assert process is not None
    high = os.dup2(process.pidfd, 1050)
    try:
        assert PeerProcess(high, os.getpid()).alive()
    finally:
        os.close(high)
        process.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
