"""Who may talk to the cache server (see ``docs/security.md``): peer credentials, the server secret.

* **Unix sockets** (``ipc://``) are created 0600 (0660 with a configured group). The server reads
  each peer's credentials (``SO_PEERCRED``) when it accepts a connection and serves only its own
  uid, root and the configured uids / groups (:class:`PeerPolicy`). A client refuses a socket owned
  by another uid, and a connection served by a process of another uid.
* **TCP** carries the **server secret** in every request (``auth``). The server reads it from
  ``$LMCACHE_SERVER_SECRET`` or from a 0600 file it generates at first start
  (``$LMCACHE_SERVER_SECRET_FILE``, default ``~/.lmcache/server_secret``); clients of the same user
  find the same file, so nothing needs configuring on one host. Compared in constant time.
"""

from __future__ import annotations

import argparse
import contextlib
import grp
import hmac
import math
import os
import pwd
import secrets
import socket
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "SECRET_ENV",
    "SECRET_FILE_ENV",
    "Peer",
    "PeerPolicy",
    "SecretError",
    "client_secret",
    "default_secret_file",
    "load_or_create_secret",
    "peer_of_socket",
    "process_started",
    "secret_matches",
    "trusted_owner",
]

SECRET_ENV = "LMCACHE_SERVER_SECRET"
"""The server secret itself (containers, other hosts): takes precedence over the file."""
SECRET_FILE_ENV = "LMCACHE_SERVER_SECRET_FILE"
"""Where the secret file is (default :func:`default_secret_file`)."""
_SECRET_BYTES = 32
_UCRED = struct.Struct("3i")


class SecretError(RuntimeError):
    """The server secret cannot be read or created safely; the message says what to fix."""


def default_secret_file() -> Path:
    """``~/.lmcache/server_secret`` of the effective user (from the password database if no HOME)."""
    home = os.environ.get("HOME") or pwd.getpwuid(os.geteuid()).pw_dir
    return Path(home) / ".lmcache" / "server_secret"


def _secret_path(path: str | os.PathLike[str] | None) -> Path:
    if path:
        return Path(path)
    return Path(os.environ.get(SECRET_FILE_ENV) or default_secret_file())


def _read_private(path: Path) -> bytes:
    """The secret in ``path``, refusing a file another user owns or others can read."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise SecretError(
                f"secret file {path} must be a regular file owned by uid {os.geteuid()} with mode 0600; "
                "fix it (chmod 600) or remove it to have a new secret generated"
            )
        data = os.read(fd, 4096).strip()
    finally:
        os.close(fd)
    if len(data) < 16:
        raise SecretError(f"secret file {path} holds fewer than 16 bytes; remove it to generate a new one")
    return data


def load_or_create_secret(path: str | os.PathLike[str] | None = None) -> bytes | None:
    """The server secret: ``$LMCACHE_SERVER_SECRET``, else the secret file (created 0600 in a 0700
    directory with a random secret if absent); ``path`` "" means no file (None without the variable).
    Raises :class:`SecretError`."""
    env = os.environ.get(SECRET_ENV, "").strip()
    if env:
        if len(env) < 16:
            raise SecretError(f"${SECRET_ENV} must be at least 16 characters")
        return env.encode()
    if path == "":
        return None
    target = _secret_path(path)
    try:
        return _read_private(target)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise SecretError(f"cannot read the secret file {target}: {e.strerror}") from None
    try:
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:  # another server created it meanwhile
        return _read_private(target)
    except OSError as e:
        raise SecretError(
            f"cannot create the secret file {target}: {e.strerror}; pass --secret-file or set ${SECRET_ENV}"
        ) from None
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_hex(_SECRET_BYTES).encode() + b"\n")
    return _read_private(target)


def client_secret(path: str | os.PathLike[str] | None = None) -> bytes | None:
    """What a client sends over TCP: ``$LMCACHE_SERVER_SECRET``, else the secret file if it is
    readable and private; None if there is none (the server will then refuse TCP requests)."""
    env = os.environ.get(SECRET_ENV, "").strip()
    if env:
        return env.encode()
    with contextlib.suppress(OSError, SecretError):
        return _read_private(_secret_path(path))
    return None


def secret_matches(expected: bytes | None, given: bytes | None) -> bool:
    """Constant-time comparison; never true without an expected secret."""
    return expected is not None and given is not None and hmac.compare_digest(expected, given)


@dataclass(frozen=True)
class Peer:
    """Who sent a request: a Unix-socket peer's credentials, or a TCP peer (``uid`` None)."""

    uid: int | None = None
    gid: int | None = None
    pid: int | None = None
    started: int | None = None
    """When the process of ``pid`` started (:func:`process_started`), read as it connected: with the pid
    it names that process even once the pid is another's; None if ``/proc`` did not say."""
    address: str = ""
    """A TCP peer's IP address (per-client caps)."""

    @property
    def is_unix(self) -> bool:
        return self.uid is not None


TCP_PEER = Peer()


def peer_of_socket(sock: socket.socket) -> Peer:
    """``SO_PEERCRED`` of a connected Unix socket; a TCP socket gives :data:`TCP_PEER`."""
    if sock.family != socket.AF_UNIX:
        try:
            return Peer(address=str(sock.getpeername()[0]))
        except OSError:
            return TCP_PEER
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return Peer(uid, gid, pid, process_started(pid) if pid else None)


def process_started(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (``/proc/PID/stat``'s 22nd field); None if
    there is no such process or ``/proc`` does not show it. No two processes given the same pid share it."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat_line = f.read()
        # fields after the command name (which may hold spaces and parentheses) start at the 3rd
        return int(stat_line[stat_line.rindex(b")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class PeerPolicy:
    """Which Unix-socket peers the server serves: its own uid, root, ``uids`` and members of ``groups``."""

    uids: frozenset[int] = frozenset()
    groups: frozenset[int] = frozenset()
    _members: dict[int, bool] = field(default_factory=dict, repr=False)

    def allows(self, peer: Peer) -> bool:
        if peer.uid is None:
            return False
        if peer.uid in (0, os.geteuid()) or peer.uid in self.uids:
            return True
        if not self.groups:
            return False
        if peer.gid in self.groups:
            return True
        member = self._members.get(peer.uid)
        if member is None:
            member = self._members[peer.uid] = bool(self.groups & _groups_of(peer.uid))
        return member

    @staticmethod
    def is_operator(peer: Peer) -> bool:
        """The server's own uid or root (TCP peers hold the secret: operators too)."""
        return peer.uid is None or peer.uid in (0, os.geteuid())


def _groups_of(uid: int) -> set[int]:
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return set()
    return set(os.getgrouplist(entry.pw_name, entry.pw_gid))


def group_id(name: str) -> int:
    """A group given by name or number (ValueError if unknown)."""
    if name.isdigit():
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ValueError(f"unknown group {name!r}") from None


def user_id(name: str) -> int:
    """A user given by name or number (ValueError if unknown)."""
    if name.isdigit():
        return int(name)
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        raise ValueError(f"unknown user {name!r}") from None


def trusted_owner(uid: int) -> bool:
    """Whether a client trusts a socket (or a server) owned by ``uid``: its own, or root."""
    return uid in (0, os.geteuid())


# ---- command line (``python -m lmcache.v1.multiprocess.server``) ---------------------------------

_LIMITS: tuple[tuple[str, str, type, Any, str], ...] = (
    ("--max-registrations", "max_registrations", int, 256, "registered pools in total"),
    ("--max-registrations-per-client", "max_registrations_per_client", int, 64,
     "registered pools per client (a Unix peer's uid, a TCP peer's address)"),
    ("--max-connections", "max_connections", int, 256,
     "open client connections in total (more are answered limit and closed)"),
    ("--max-connections-per-client", "max_connections_per_client", int, 128,
     "open connections per client (a Unix peer's uid, a TCP peer's address); each client holds a few"),
    ("--max-pending-mb", "max_pending_bytes", float, 256.0,
     "MiB of unfinished request frames all connections may announce together"),
    ("--idle-timeout-s", "idle_timeout_s", float, 300.0,
     "close a connection silent for this long (clients reopen it)"),
    ("--frame-timeout-s", "frame_timeout_s", float, 30.0,
     "close a connection that sent part of a frame and nothing more for this long"),
    ("--pin-share", "pin_share", float, 0.25,
     "largest fraction of L1 the pins of one instance's lookups may hold"),
)  # fmt: skip


def env_typed(kind: type, env: str) -> Any:
    """An argparse ``type`` for a flag whose default comes from ``env``: a bad value (typed on the
    command line or set in the environment) is reported naming both."""

    def convert(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what} (from the flag or ${env})") from None

    convert.__name__ = kind.__name__
    return convert


def _env_name(flag: str) -> str:
    return "LMCACHE_SERVER_" + flag.removeprefix("--").replace("-", "_").upper()


def add_security_arguments(parser: Any) -> None:
    """The access and resource-cap flags; each default can also come from ``$LMCACHE_SERVER_<FLAG>``."""
    group = parser.add_argument_group("access and resource caps (docs/security.md)")
    group.add_argument(
        "--secret-file",
        default=os.environ.get(SECRET_FILE_ENV),
        help="file holding the secret TCP clients must present, created 0600 at first start "
        f"[default: ${SECRET_FILE_ENV}, else ~/.lmcache/server_secret; ${SECRET_ENV} overrides both]",
    )
    group.add_argument(
        "--socket-group",
        default=os.environ.get("LMCACHE_SERVER_SOCKET_GROUP"),
        help="group given access to the Unix sockets (mode 0660 instead of 0600) "
        "[default: $LMCACHE_SERVER_SOCKET_GROUP, else none]",
    )
    group.add_argument(
        "--allow-uid",
        action="append",
        default=_env_list("LMCACHE_SERVER_ALLOW_UIDS"),
        help="a user (name or uid) served on the Unix sockets besides the server's own and root; "
        "repeatable [default: $LMCACHE_SERVER_ALLOW_UIDS, comma-separated]",
    )
    group.add_argument(
        "--allow-group",
        action="append",
        default=_env_list("LMCACHE_SERVER_ALLOW_GROUPS"),
        help="a group whose members are served on the Unix sockets; repeatable "
        "[default: $LMCACHE_SERVER_ALLOW_GROUPS, comma-separated]",
    )
    for flag, key, kind, default, text in _LIMITS:
        env = _env_name(flag)
        group.add_argument(
            flag,
            dest=key,
            type=env_typed(kind, env),
            default=os.environ.get(env, str(default)),  # argparse converts it (and names a bad one)
            help=f"{text} [env: {env}]",
        )


def _env_list(name: str) -> list[str]:
    return [v.strip() for v in os.environ.get(name, "").split(",") if v.strip()]


def security_settings(args: Any) -> dict[str, Any]:
    """``ServerConfig`` keyword arguments from the parsed flags; ValueError names a bad value."""
    settings: dict[str, Any] = {
        "secret_file": args.secret_file,
        "socket_group": args.socket_group or None,
        "allowed_uids": tuple(user_id(u) for u in args.allow_uid),
        "allowed_groups": tuple(group_id(g) for g in args.allow_group),
    }
    if args.socket_group:
        group_id(args.socket_group)
    for flag, key, _, _, _ in _LIMITS:
        value = getattr(args, key)
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{flag} must be a positive number, got {value}")
        settings[key] = int(value * (1 << 20)) if key == "max_pending_bytes" else value
    if settings["pin_share"] > 1:
        raise ValueError(f"--pin-share must be in (0, 1], got {settings['pin_share']}")
    return settings
