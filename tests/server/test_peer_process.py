"""PeerProcess: a registering process watched by pidfd, for Unix-socket peers only."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from lmcache.server.peer_process import PeerProcess
from lmcache.server.security import Peer, peer_of_socket, process_started


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


def test_a_connecting_process_is_named_by_its_pid_and_start_and_watched() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX)
    with ours, theirs:
        peer = peer_of_socket(ours)
    assert peer.pid == os.getpid()
    assert peer.started is not None and peer.started == process_started(os.getpid())
    process = PeerProcess.of(peer)
    assert process is not None and process.alive()
    process.close()


def test_a_pid_given_to_another_process_since_it_connected_is_not_watched() -> None:
    """The pid of a connection's peer may be another process's by the time it registers (the one that
    connected exited, or forked and exited): keeping that process's registration while the other runs
    would hold its slots for nobody, so it is reaped on silence as a TCP peer's is."""
    started = process_started(os.getpid())
    assert started is not None
    other = Peer(uid=os.getuid(), gid=os.getgid(), pid=os.getpid(), started=started - 1)
    assert PeerProcess.of(other) is None
    unknown = Peer(uid=os.getuid(), gid=os.getgid(), pid=os.getpid(), started=None)  # /proc did not say
    process = PeerProcess.of(unknown)
    assert process is not None
    process.close()


def test_a_later_process_started_later_and_an_exited_one_has_no_start() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    assert child.stdin is not None
    started = process_started(child.pid)
    ours = process_started(os.getpid())
    child.stdin.close()
    child.wait(timeout=30)
    assert started is not None and ours is not None and started >= ours
    assert process_started(child.pid) != started  # reaped: no such process (or, rarely, a new one)
    assert process_started(-1) is None
