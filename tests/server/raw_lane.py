"""Hand-made frames on a raw connection to a cache server (what a foreign or broken client sends)."""

from __future__ import annotations

import socket

from lmcache.server import protocol as P


def connect(url: str, timeout_s: float = 20.0) -> socket.socket:
    """A blocking connection to ``tcp://host:port`` or ``ipc:///path`` with ``timeout_s`` on reads."""
    scheme, rest = url.split("://", 1)
    if scheme == "ipc":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout_s)
        sock.connect(rest)
        return sock
    host, _, port = rest.rpartition(":")
    sock = socket.create_connection((host.strip("[]"), int(port)), timeout_s)
    sock.settimeout(timeout_s)
    return sock


def framed(payload: bytes) -> bytes:
    return P.FRAME_HEADER.pack(len(payload)) + payload


def read_frame(sock: socket.socket) -> bytes | None:
    """One frame (blocking), or None once the peer closed the connection."""
    header = sock.recv(P.FRAME_HEADER.size, socket.MSG_WAITALL)
    if len(header) < P.FRAME_HEADER.size:
        return None
    (size,) = P.FRAME_HEADER.unpack(header)
    return sock.recv(size, socket.MSG_WAITALL) if size else b""


def read_reply(sock: socket.socket) -> P.Reply:
    frame = read_frame(sock)
    assert frame is not None, "the server closed the connection instead of replying"
    return P.decode_reply(frame)


def exchange(url: str, payload: bytes) -> P.Reply:
    """Send one frame on a new connection and return the reply to it."""
    with connect(url) as sock:
        sock.sendall(framed(payload))
        return read_reply(sock)
