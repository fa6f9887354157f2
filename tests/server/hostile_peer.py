"""Another local user's attempts on a cache server: run as root, drops to ``nobody`` after its imports.

``python hostile_peer.py ACTION ARG`` prints one JSON line, the outcome:

* ``send URL``: connect to ``ipc:///path`` or ``tcp://host:port`` and send ``heartbeat`` then
  ``stats`` on that connection, without the server secret; ``{"errno": N}`` if the connect fails,
  else the error codes (or ``ok``) of the replies, ``null`` where the server closed the connection
  instead of answering;
* ``read PATH``: read a file; ``{"errno": N}`` or ``{"read": true}``.
"""

from __future__ import annotations

import contextlib
import encodings.idna  # noqa: F401 (socket.create_connection needs it; nobody may not read it later)
import json
import os
import sys

from raw_lane import connect, framed, read_frame

from lmcache.server import protocol as P

NOBODY = 65534


def _send(url: str) -> dict[str, object]:
    try:
        sock = connect(url, timeout_s=10)
    except OSError as e:
        return {"errno": e.errno}
    codes: list[str | None] = []
    with sock:
        for rid, req in enumerate((P.Heartbeat(instance_ids=[1]), P.Stats()), start=1):
            req.rid = rid
            with contextlib.suppress(OSError):  # closed by the server: its reason may still be readable
                sock.sendall(framed(P.encode(req)))
            try:
                frame = read_frame(sock)
            except OSError:
                frame = None
            if frame is None:
                codes.append(None)
                continue
            reply = P.decode_reply(frame)
            codes.append("ok" if reply.ok else reply.error.code if reply.error else "?")
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
    result = {"send": _send, "read": _read}[action](arg)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
