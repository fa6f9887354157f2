"""The cache server's listening sockets: the ZMQ ROUTER (``tcp://host:port`` and, with an ipc
path, ``ipc://path``) and the direct lane's listeners (TCP on the same host, and a Unix socket at
``<ipc_path>.direct``). Unix socket files are created 0600 (0660 with ``socket_group``), a stale
one left by a dead server is replaced, one owned by another user or served by a live process is
refused; :meth:`Listeners.close` removes the files this server created (not a successor's).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from collections.abc import Iterator

import zmq

from lmcache.logging import init_logger
from lmcache.server import protocol as P
from lmcache.server.security import group_id
from lmcache.server.settings import DIRECT_SUFFIX, ServerConfig

logger = init_logger(__name__)

__all__ = ["Listeners", "ServerStartError"]


class ServerStartError(RuntimeError):
    """The server cannot start (address in use, bad ipc path...); the message says what to do."""


class Listeners:
    """Binds and owns the server's listening sockets."""

    def __init__(self, config: ServerConfig, context: zmq.Context) -> None:
        self.config = config
        self.context = context
        self.endpoints: list[str] = []
        """The ROUTER's endpoints: ``tcp://...`` first, then ``ipc://...`` if bound."""
        self.direct: P.DirectLane | None = None
        """Where the direct lane listens (None: disabled)."""
        self.direct_listeners: list[socket.socket] = []
        self._unix_sockets: list[tuple[str, tuple[int, int]]] = []
        """Socket files this server created, with their (st_dev, st_ino): removed on close."""

    def bind(self, max_message_bytes: int) -> zmq.Socket:
        """Bind everything; the ROUTER socket. Raises :class:`ServerStartError` with what to do."""
        sock = self.context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        host = self.config.host
        try:
            if ":" in host:
                sock.setsockopt(zmq.IPV6, 1)
                host = f"[{host}]"
            port = "*" if self.config.port == 0 else str(self.config.port)
            sock.bind(f"tcp://{host}:{port}")
            self.endpoints = [sock.getsockopt_string(zmq.LAST_ENDPOINT)]
            if self.config.ipc_path:
                self._prepare_ipc_path(self.config.ipc_path)
                with self._socket_umask():
                    sock.bind(f"ipc://{self.config.ipc_path}")
                self._created(self.config.ipc_path)
                self.endpoints.append(f"ipc://{self.config.ipc_path}")
            if self.config.direct_port is not None:
                self._listen_direct(self.config.direct_port)
        except zmq.ZMQError as e:
            sock.close(0)
            if e.errno == errno.EADDRINUSE:
                raise ServerStartError(
                    f"tcp port {self.config.port} on {self.config.host} is already in use (another lmcache "
                    "server?); stop it or pass another --port"
                ) from None
            raise ServerStartError(f"cannot bind the server's sockets: {e}") from None
        except BaseException:
            sock.close(0)
            self.close()
            raise
        return sock

    @property
    def tcp_port(self) -> int:
        return int(self.endpoints[0].rsplit(":", 1)[1])

    def _listen_direct(self, port: int) -> None:
        """Bind the direct lane: TCP on the ZMQ socket's host, and a Unix socket next to its ipc one."""
        host = self.config.host
        try:
            tcp = socket.create_server(
                (host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET
            )
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ServerStartError(
                    f"direct lane tcp port {port} on {host} is already in use; pass another --direct-port "
                    "(0: any free port)"
                ) from None
            raise ServerStartError(f"cannot bind the direct lane on {host}:{port}: {e}") from None
        self.direct_listeners.append(tcp)
        self.direct = P.DirectLane(port=tcp.getsockname()[1])
        path = f"{self.config.ipc_path}{DIRECT_SUFFIX}" if self.config.ipc_path else ""
        if path and len(os.fsencode(path)) > 107:
            logger.warning("no direct lane on a Unix socket: %s is longer than 107 bytes", path)
        elif path:
            self._prepare_ipc_path(path)
            unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.direct_listeners.append(unix)
            with self._socket_umask():
                unix.bind(path)
            self._created(path)
            unix.listen()
            self.direct.ipc_name = os.path.basename(path)
        for listener in self.direct_listeners:
            listener.setblocking(False)

    @contextlib.contextmanager
    def _socket_umask(self) -> Iterator[None]:
        """Unix sockets are created 0600 (0660 with ``socket_group``): connecting needs write access."""
        old = os.umask(0o117 if self.config.socket_group else 0o177)
        try:
            yield
        finally:
            os.umask(old)

    def _created(self, path: str) -> None:
        try:
            if self.config.socket_group:
                os.chown(path, -1, group_id(self.config.socket_group))
            os.chmod(path, 0o660 if self.config.socket_group else 0o600)
        except (OSError, ValueError) as e:
            os.unlink(path)
            raise ServerStartError(f"cannot give {path} to group {self.config.socket_group}: {e}") from None
        st = os.stat(path)
        self._unix_sockets.append((path, (st.st_dev, st.st_ino)))

    @staticmethod
    def _prepare_ipc_path(path: str) -> None:
        if len(os.fsencode(path)) > 107:
            raise ServerStartError(
                f"--ipc-path {path!r} is longer than the 107 bytes a Unix socket path allows"
            )
        if os.path.lexists(path):
            st = os.lstat(path)
            if st.st_uid != os.geteuid():
                raise ServerStartError(
                    f"--ipc-path {path} exists and belongs to uid {st.st_uid}, not to this user: another "
                    "user may be impersonating the server; remove it (as root or that user) or pass another "
                    "--ipc-path"
                )
            if not stat.S_ISSOCK(st.st_mode):
                raise ServerStartError(
                    f"--ipc-path {path} exists and is not a socket; remove it or pick another"
                )
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            probe.settimeout(1.0)
            try:
                probe.connect(path)
            except (ConnectionRefusedError, FileNotFoundError):
                os.unlink(path)  # left behind by a server that died
            except OSError as e:
                raise ServerStartError(f"cannot check --ipc-path {path}: {e}") from None
            else:
                raise ServerStartError(
                    f"another process is serving on ipc://{path}; stop it, or pass another --ipc-path "
                    "(an empty --ipc-path disables the Unix socket)"
                )
            finally:
                probe.close()
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)

    def close(self) -> None:
        """Close the direct lane's listeners and remove the socket files this server created."""
        for listener in self.direct_listeners:
            listener.close()
        self.direct_listeners.clear()
        for path, inode in self._unix_sockets:
            with contextlib.suppress(OSError):
                st = os.stat(path)
                if (st.st_dev, st.st_ino) == inode:  # not a successor's socket
                    os.unlink(path)
        self._unix_sockets.clear()
