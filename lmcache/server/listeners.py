"""The cache server's listening sockets, at the addresses of the seed's URLs: a TCP listener for
``tcp://host:port`` and, with an ipc path, a Unix stream socket for ``ipc://path``. Both carry the
same length-prefixed frames (:mod:`lmcache.server.framing`). Unix socket files are created 0600
(0660 with ``socket_group``), a stale one left by a dead server is replaced, one owned by another
user or served by a live process is refused; :meth:`Listeners.close` removes the files this server
created (not a successor's).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from collections.abc import Iterator

from lmcache.logging import init_logger
from lmcache.server.security import group_id
from lmcache.server.settings import ServerConfig

logger = init_logger(__name__)

__all__ = ["Listeners", "ServerStartError", "tcp_bind_problem"]


class ServerStartError(RuntimeError):
    """The server cannot start (address in use, bad ipc path...); the message says what to do."""


def tcp_bind_problem(e: OSError, host: str, port: int, flags: tuple[str, str]) -> str:
    """Why listening on ``host:port`` failed, naming the (host, port) ``flags`` the user typed and what
    to pass instead (no bare errno)."""
    host_flag, port_flag = flags
    if e.errno == errno.EADDRINUSE:
        return (
            f"tcp port {port} on {host} is already in use (another lmcache server?); stop it or pass "
            f"another {port_flag}"
        )
    if e.errno == errno.EADDRNOTAVAIL:
        return (
            f"{host_flag} {host} is not an address of this machine; pass 127.0.0.1 (this host only), "
            "0.0.0.0 (all interfaces) or one of this machine's addresses"
        )
    if e.errno in (errno.EACCES, errno.EPERM):
        return (
            f"{port_flag} {port} is not allowed to this user (ports below 1024 need root or "
            f"CAP_NET_BIND_SERVICE); pass a {port_flag} of 1024 or more"
        )
    return f"cannot listen on tcp {host}:{port} ({host_flag} / {port_flag}): {e.strerror or e}"


def _dir_problem(e: OSError) -> str:
    """Why a directory could not be made: a file in the way reads as that, not as "File exists"."""
    return "a file is in the way" if e.errno in (errno.EEXIST, errno.ENOTDIR) else str(e.strerror or e)


class Listeners:
    """Binds and owns the server's listening sockets."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.endpoints: list[str] = []
        """The URLs served: ``tcp://...`` first, then ``ipc://...`` if bound."""
        self.sockets: list[socket.socket] = []
        """The listening sockets (non-blocking), in the order of ``endpoints``."""
        self._unix_sockets: list[tuple[str, tuple[int, int]]] = []
        """Socket files this server created, with their (st_dev, st_ino): removed on close."""

    def bind(self) -> None:
        """Bind and listen on every address. Raises :class:`ServerStartError` with what to do."""
        try:
            self._listen_tcp()
            if self.config.ipc_path:
                self._listen_unix(self.config.ipc_path)
        except BaseException:
            self.close()
            raise
        for listener in self.sockets:
            listener.setblocking(False)

    @property
    def bound(self) -> bool:
        return bool(self.sockets)

    @property
    def tcp_port(self) -> int:
        return int(self.endpoints[0].rsplit(":", 1)[1])

    def _listen_tcp(self) -> None:
        host, port = self.config.host, self.config.port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            tcp = socket.create_server((host.strip("[]"), port), family=family, backlog=128)
        except OSError as e:
            raise ServerStartError(tcp_bind_problem(e, host, port, ("--host", "--port"))) from None
        self.sockets.append(tcp)
        address, bound_port = tcp.getsockname()[:2]
        shown = f"[{address}]" if family == socket.AF_INET6 else address
        self.endpoints.append(f"tcp://{shown}:{bound_port}")

    def _listen_unix(self, path: str) -> None:
        self._prepare_ipc_path(path)
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sockets.append(unix)
        try:
            with self._socket_umask():
                unix.bind(path)
        except OSError as e:
            raise ServerStartError(f"cannot bind --ipc-path {path}: {e.strerror or e}") from None
        self._created(path)
        unix.listen(128)
        self.endpoints.append(f"ipc://{path}")

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
            try:
                os.makedirs(parent, exist_ok=True)
            except OSError as e:
                raise ServerStartError(
                    f"--ipc-path {path}: cannot create its directory {parent} ({_dir_problem(e)}); pass "
                    "another --ipc-path (an empty one disables the Unix socket)"
                ) from None

    def close(self) -> None:
        """Close the listening sockets and remove the socket files this server created."""
        for listener in self.sockets:
            listener.close()
        self.sockets.clear()
        for path, inode in self._unix_sockets:
            with contextlib.suppress(OSError):
                st = os.stat(path)
                if (st.st_dev, st.st_ino) == inode:  # not a successor's socket
                    os.unlink(path)
        self._unix_sockets.clear()
