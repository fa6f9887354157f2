"""Another local user's attempts on a cache server: run as root, drops to ``nobody`` after its imports.

``python hostile_peer.py ACTION ARG`` prints one JSON line, the outcome:

* ``connect PATH``: connect to a Unix socket; ``{"errno": N}`` or ``{"connected": true, "eof": bool}``
  (``eof``: the server closed the connection when sent a direct-lane ping);
* ``zmq URL``: send ``heartbeat`` then ``stats`` over ZMQ, without the server secret; the error codes
  (or ``ok``) of the replies, ``null`` for no reply;
* ``read PATH``: read a file; ``{"errno": N}`` or ``{"read": true}``.
"""

from __future__ import annotations

import json
import os
import socket
import sys

import zmq

from lmcache.server import protocol as P

NOBODY = 65534


def _connect(path: str) -> dict[str, object]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    try:
        sock.connect(path)
    except OSError as e:
        return {"errno": e.errno}
    frame = P.encode(P.Ping(rid=1))
    try:
        sock.sendall(P.DIRECT_HEADER.pack(len(frame)) + frame)
        data = sock.recv(1 << 16)
    except OSError:
        data = b""
    return {"connected": True, "eof": not data}


def _zmq(url: str) -> dict[str, object]:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(url)
    codes: list[str | None] = []
    for rid, req in enumerate((P.Heartbeat(instance_ids=[1]), P.Stats()), start=1):
        req.rid = rid
        sock.send(P.encode(req))
        if not sock.poll(10_000):
            codes.append(None)
            continue
        reply = P.decode_reply(sock.recv())
        codes.append("ok" if reply.ok else reply.error.code if reply.error else "?")
    sock.close(0)
    ctx.term()
    return {"codes": codes}


def _read(path: str) -> dict[str, object]:
    try:
        with open(path, "rb") as f:
            f.read()
    except OSError as e:
        return {"errno": e.errno}
    return {"read": True}


def main() -> None:
    action, arg = sys.argv[1], sys.argv[2]
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    result = {"connect": _connect, "zmq": _zmq, "read": _read}[action](arg)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
