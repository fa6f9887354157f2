"""A tiny RESP server on a loopback port, for replies a real Redis cannot be made to send.

It answers redis-py's connection handshake itself (``HELLO 3`` with a RESP3 map, counted in
``resp3``; ``CLIENT ...`` with ``+OK``) and hands every other command, parsed into its arguments,
to ``handler(conn, args)``, which writes whatever reply the test wants to the socket.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

Handler = Callable[[socket.socket, list[bytes]], None]


class FakeResp:
    """Accepts any number of connections, one thread each; ``connections`` counts them."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.resp3 = 0
        """Connections that asked for RESP3 (``HELLO 3``): a real server may send them push frames."""
        self.stopped = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.stopped.set()
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:  # closed
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        reader = conn.makefile("rb")
        with conn:
            try:
                while line := reader.readline():
                    args = []
                    for _ in range(int(line[1:])):
                        size = int(reader.readline()[1:])
                        args.append(reader.read(size + 2)[:-2])
                    if args[0].upper() == b"HELLO" and args[1:2] == [b"3"]:
                        self.resp3 += 1
                        conn.sendall(b"%1\r\n$5\r\nproto\r\n:3\r\n")
                    elif args[0].upper() == b"HELLO":
                        conn.sendall(b"*2\r\n$5\r\nproto\r\n:2\r\n")
                    elif args[0].upper() == b"CLIENT":
                        conn.sendall(b"+OK\r\n")
                    else:
                        self.handler(conn, args)
            except OSError:  # the client dropped the connection
                return
