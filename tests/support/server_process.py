"""Helpers for the cache server tests: server subprocesses, shared pools, free ports."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lmcache.server.client import ServerUnavailable, VersionMismatch, wait_for_server

REPO = Path(__file__).resolve().parents[2]
CLIENT_PROC = REPO / "tests" / "server" / "client_proc.py"
SERVER_MODULE = ("-m", "lmcache.v1.multiprocess.server")
OTHER_VERSION_SERVER = (str(REPO / "tests" / "support" / "other_version_server.py"),)
"""A server of another protocol version (another lmcache release): ``ServerProcess(..., entry=)``."""

# Geometry of the test pools: 8 tokens per block, chunks of 32 tokens (4 blocks).
TPB = 8
CHUNK = 32
POOL_SHAPE = (64, 2, 2, TPB * 16)
MODEL = "test/tiny"


def server_secret() -> bytes:
    """The server secret of the test session (tests/conftest.py), for hand-made request frames."""
    return os.environ["LMCACHE_SERVER_SECRET"].encode()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
    env.setdefault("LMCACHE_LOG_LEVEL", "INFO")
    env.update(extra)
    return env


def shared_pool(seed: int | None = None, shape: tuple[int, ...] = POOL_SHAPE) -> torch.Tensor:
    pool = torch.zeros(shape, dtype=torch.float32)
    if seed is not None:
        pool.copy_(torch.randn(shape, generator=torch.Generator().manual_seed(seed)))
    pool.share_memory_()
    return pool


class ServerProcess:
    """A cache server subprocess; ``stop()`` kills it if still running."""

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        *extra: str,
        ipc: bool = True,
        env: dict[str, str] | None = None,
        entry: tuple[str, ...] = SERVER_MODULE,
    ) -> None:
        self.workdir = workdir
        self.entry = entry
        """What the Python interpreter runs: the server's module, or a script taking its flags."""
        self.env = env or {}
        self.port = port or free_port()
        self.ipc_path = str(workdir / "s.sock") if ipc else ""
        self.extra = extra
        self.log_path = workdir / f"server-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def tcp_url(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    @property
    def ipc_url(self) -> str:
        return f"ipc://{self.ipc_path}"

    def start(self, wait: bool = True) -> ServerProcess:
        cmd = [
            sys.executable,
            *self.entry,
            "--port",
            str(self.port),
            "--ipc-path",
            self.ipc_path,
            "--chunk-size",
            str(CHUNK),
            "--l1-size-gb",
            "0.25",
            *self.extra,
        ]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=subprocess_env(**self.env)
            )
        if wait:
            try:
                self.wait_ready()
            except BaseException:  # a server that never answered is not left running after the test
                self.stop()
                raise
        return self

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        try:
            wait_for_server(self.tcp_url, timeout_s)
        except VersionMismatch:
            pass  # a server of another protocol version answers, refusing: it is up
        except ServerUnavailable:
            raise AssertionError(f"server did not come up; log:\n{self.log()}") from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self, sig: int = signal.SIGKILL) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def wait_until(predicate: Callable[[], object], what: str, limit_s: float = 30.0) -> object:
    """Poll ``predicate`` until it returns a truthy value (a hang guard, not a timing assertion)."""
    deadline = time.monotonic() + limit_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.02)


def metrics_base_url(server: ServerProcess) -> str:
    """The base URL of a server's ``--metrics-port`` endpoint, as its start-up log gives it (so the
    test can pass port 0 and never race another process for a port it picked)."""
    pattern = re.compile(r"LMCache metrics on (http://\S+)/metrics")
    found = wait_until(lambda: pattern.search(server.log()), "the metrics endpoint's URL in the server log")
    assert isinstance(found, re.Match)
    return found.group(1)
