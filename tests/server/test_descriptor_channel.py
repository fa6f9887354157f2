"""The server's L1 descriptor channel and the slabs passed by descriptor, on CPU (memfds; the CUDA
driver's imports through a stand-in)."""

from __future__ import annotations

import errno
import os
import socket
import stat
import threading

import msgspec
import pytest
import torch
from support.process_state import dead_pid, open_descriptors
from support.server_process import wait_until

from lmcache import fd_slabs
from lmcache.fd_slabs import KIND_CUDA, KIND_MEMFD, FdSlabSource, map_descriptor
from lmcache.server import descriptor_channel
from lmcache.server.descriptor_channel import (
    DIR_PREFIX,
    MAX_SLABS_PER_REQUEST,
    Answer,
    DescriptorChannel,
    DescriptorChannelError,
    fetch_descriptors,
)
from lmcache.server.security import Peer
from lmcache.shm_slabs import ShmSlabError, ShmSlabInfo

SLAB = 1 << 20


@pytest.fixture
def source():
    made = FdSlabSource(device=None)
    yield made
    made.close()


@pytest.fixture
def channel(source):
    served = DescriptorChannel(source.descriptor)
    source.channel = served.path
    yield served
    served.close()


def test_a_worker_maps_the_very_memory_of_each_live_slab(source, channel) -> None:
    assert not source.driver_made  # memfds: made side by side, not in the driver's turns
    slabs = [source.allocate(SLAB) for _ in range(3)]
    for i, slab in enumerate(slabs):
        slab.tensor[:8] = i + 1
    del slabs[1]  # freed: its descriptor is closed, and it is left out of the answer
    fds = fetch_descriptors(channel.path, [2, 0, 1, 2])
    assert sorted(fds) == [0, 2]
    try:
        for slab in slabs:
            info = source.describe(slab.id)
            assert info is not None and (info.kind, info.channel, info.nbytes) == (
                KIND_MEMFD,
                channel.path,
                SLAB,
            )
            mapped = map_descriptor(info, fds[slab.id], pin=False, device=None)
            assert mapped.tensor[:8].tolist() == [slab.id + 1] * 8
            mapped.tensor[8] = 77  # the worker's write is the server's
            assert slab.tensor[8].item() == 77
    finally:
        for fd in fds.values():
            os.close(fd)
    assert source.describe(1) is None and source.descriptor(1) is None


def test_the_socket_is_its_owners_alone_and_goes_with_the_channel(source) -> None:
    served = DescriptorChannel(source.descriptor)
    assert stat.S_IMODE(os.stat(served.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(served.path)).st_mode) == 0o700
    served.close()
    assert not os.path.exists(os.path.dirname(served.path))
    with pytest.raises(DescriptorChannelError, match="cannot reach"):
        fetch_descriptors(served.path, [0])


def test_a_request_too_large_or_malformed_is_refused_and_others_are_still_served(source, channel) -> None:
    slab = source.allocate(SLAB)
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.connect(channel.path)
        sock.sendall(msgspec.msgpack.encode(list(range(MAX_SLABS_PER_REQUEST + 1))))
        message, fds, _, _ = socket.recv_fds(sock, 4096, 8)
        answer = msgspec.msgpack.decode(message, type=Answer)
        assert fds == [] and answer.ids == [] and f"at most {MAX_SLABS_PER_REQUEST}" in answer.error
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.connect(channel.path)
        sock.sendall(b"\xc1not msgpack")
        message, fds, _, _ = socket.recv_fds(sock, 4096, 8)
        assert fds == [] and b"malformed" in message
    fds = fetch_descriptors(channel.path, [slab.id])
    assert list(fds) == [slab.id]
    os.close(fds[slab.id])


def test_a_peer_of_another_uid_gets_no_descriptor(source, channel, monkeypatch) -> None:
    source.allocate(SLAB)
    real = descriptor_channel.peer_of_socket

    def other_uid_when_accepted(sock: socket.socket) -> Peer:
        if threading.current_thread().name == "lmcache-slab-fds":
            return Peer(uid=os.geteuid() + 12345, gid=0, pid=1)
        return real(sock)

    monkeypatch.setattr(descriptor_channel, "peer_of_socket", other_uid_when_accepted)
    with pytest.raises(DescriptorChannelError, match=f"serves only uid {os.geteuid()}, not uid"):
        fetch_descriptors(channel.path, [0])


def test_a_descriptor_that_is_not_the_announced_region_is_refused(source) -> None:
    slab = source.allocate(SLAB)
    fd = source.descriptor(slab.id)
    assert fd is not None
    try:
        with pytest.raises(ShmSlabError, match="not a region of the"):
            map_descriptor(ShmSlabInfo(slab.id, "", 2 * SLAB, kind=KIND_MEMFD), fd, pin=False, device=None)
        with pytest.raises(ShmSlabError, match="kind 'shm'"):
            map_descriptor(ShmSlabInfo(slab.id, "", SLAB), fd, pin=False, device=None)
    finally:
        os.close(fd)


def test_a_closed_source_makes_no_slab_and_holds_no_descriptor(source) -> None:
    slab = source.allocate(SLAB)
    fd = source.descriptor(slab.id)
    assert fd is not None
    os.close(fd)
    source.close()
    assert source.descriptor(slab.id) is None
    with pytest.raises(ShmSlabError, match="closed"):
        source.allocate(SLAB)
    slab.tensor[0] = 5  # the slab's own mapping outlives its descriptor
    assert slab.tensor[0].item() == 5


class _CountingMaker:
    """Stands in for the CUDA driver's maker: counts the imports running at once."""

    def __init__(self) -> None:
        self.running = 0
        self.most = 0
        self.lock = threading.Lock()
        self.overlap = threading.Event()

    def import_shared(self, fd: int, nbytes: int, *, cpu_access: bool = True) -> torch.Tensor:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        self.overlap.wait(0.05)  # long enough for another thread's import to start beside it
        with self.lock:
            self.running -= 1
        return torch.zeros(nbytes, dtype=torch.uint8)


def test_driver_made_slabs_are_imported_one_at_a_time(monkeypatch) -> None:
    """Granting access to an import holds the driver as a registration does: the map-ahead threads
    take turns (with page-locking too), so a copy enqueued meanwhile waits for one grant at most."""
    maker = _CountingMaker()
    monkeypatch.setattr(fd_slabs.driver_host_memory, "maker", lambda device: maker)
    read, write = os.pipe()
    try:
        info = ShmSlabInfo(3, "", SLAB, kind=KIND_CUDA)
        results: list[int] = []
        threads = [
            threading.Thread(
                target=lambda: results.append(map_descriptor(info, read, pin=True, device=0).tensor.numel())
            )
            for _ in range(4)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    finally:
        os.close(read)
        os.close(write)
    assert results == [SLAB] * 4 and maker.most == 1


def test_a_slab_named_many_times_is_sent_once_and_the_server_keeps_no_descriptor(source, channel) -> None:
    """A request may repeat an id; the answer carries one descriptor of it, and the server holds no
    descriptor more after answering (a client must not be able to make it leak)."""
    slab = source.allocate(SLAB)
    for fd in fetch_descriptors(channel.path, [slab.id]).values():  # the channel's paths warmed up
        os.close(fd)
    before = open_descriptors()
    fds = fetch_descriptors(channel.path, [slab.id] * MAX_SLABS_PER_REQUEST)
    assert list(fds) == [slab.id]
    os.close(fds[slab.id])
    # The server's side of a connection closes once it sees ours closed (the warm-up's may still be
    # open when ``before`` is counted): then the answer's descriptors are all gone, the 64 dups were one.
    wait_until(lambda: open_descriptors() <= before, "the server's descriptors closed", limit_s=10)


def test_a_peer_whose_credentials_cannot_be_read_is_closed_and_the_channel_keeps_serving(
    source, channel, monkeypatch
) -> None:
    slab = source.allocate(SLAB)
    real = descriptor_channel.peer_of_socket
    failures = [OSError(107, "Transport endpoint is not connected")]

    def failing_once_when_accepted(sock: socket.socket) -> Peer:
        if threading.current_thread().name == "lmcache-slab-fds" and failures:
            raise failures.pop()
        return real(sock)

    monkeypatch.setattr(descriptor_channel, "peer_of_socket", failing_once_when_accepted)
    with pytest.raises(DescriptorChannelError, match="descriptor channel"):  # reset, or closed unanswered
        fetch_descriptors(channel.path, [slab.id])
    fds = fetch_descriptors(channel.path, [slab.id])
    assert list(fds) == [slab.id]
    os.close(fds[slab.id])


def test_a_failed_accept_is_retried_and_the_channel_keeps_serving(source, monkeypatch) -> None:
    """Out of descriptors for a moment, ``accept`` fails: the channel accepts again afterwards (giving
    up would leave every worker's request unanswered)."""
    slab = source.allocate(SLAB)
    real = socket.socket.accept
    failures = [OSError(errno.EMFILE, os.strerror(errno.EMFILE))]

    def failing_once(sock: socket.socket):  # type: ignore[no-untyped-def]
        if threading.current_thread().name == "lmcache-slab-fds" and failures:
            raise failures.pop()
        return real(sock)

    monkeypatch.setattr(socket.socket, "accept", failing_once)
    served = DescriptorChannel(source.descriptor)
    try:
        fds = fetch_descriptors(served.path, [slab.id])
        assert list(fds) == [slab.id] and failures == []
        os.close(fds[slab.id])
    finally:
        served.close()


def test_a_channel_that_never_answers_fails_the_request_instead_of_blocking(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(descriptor_channel, "FETCH_TIMEOUT_S", 0.2)
    path = str(tmp_path / "slabs.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as wedged:
        wedged.bind(path)
        wedged.listen(1)  # connections wait in its backlog, never accepted, never answered
        with pytest.raises(DescriptorChannelError, match="failed"):
            fetch_descriptors(path, [0])


def test_a_channel_out_of_reach_says_what_to_do(tmp_path) -> None:
    """A worker in another container, say, that does not see the server's channel directory."""
    path = str(tmp_path / "elsewhere" / "slabs.sock")
    with pytest.raises(DescriptorChannelError, match="cannot reach") as raised:
        fetch_descriptors(path, [0])
    assert f"mount {tmp_path / 'elsewhere'}" in str(raised.value) and "--l1-memory shm" in str(raised.value)


def test_a_memfd_slab_holds_one_descriptor_in_the_server_and_none_in_a_worker(source) -> None:
    before = open_descriptors()
    slabs = [source.allocate(SLAB) for _ in range(8)]
    assert open_descriptors() == before + len(slabs)  # the memfd, to hand out
    mapped = []
    for slab in slabs:
        info = source.describe(slab.id)
        fd = source.descriptor(slab.id)
        assert info is not None and fd is not None
        mapped.append(map_descriptor(info, fd, pin=False, device=None))
        os.close(fd)
    assert open_descriptors() == before + len(slabs)
    mapped[5].tensor[:4] = 7
    assert slabs[5].tensor[:4].tolist() == [7] * 4


def test_the_directories_of_channels_whose_server_is_gone_are_removed(source, tmp_path) -> None:
    """A killed server cannot remove its channel's directory: the next one removes those of servers
    that are gone, and leaves live servers' and others' alone."""
    stale = tmp_path / f"{DIR_PREFIX}{dead_pid()}-abc123"
    live = tmp_path / f"{DIR_PREFIX}{os.getpid()}-def456"
    other = tmp_path / "lmcache-slabs-notapid"
    for directory in (stale, live, other):
        directory.mkdir()
        (directory / "slabs.sock").write_bytes(b"")
    served = DescriptorChannel(source.descriptor, directory=str(tmp_path))
    try:
        assert not stale.exists() and live.exists() and other.exists()
        assert os.path.basename(os.path.dirname(served.path)).startswith(f"{DIR_PREFIX}{os.getpid()}-")
    finally:
        served.close()
