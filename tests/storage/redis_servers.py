"""Real ``redis-server`` processes for the tier tests: one server, or a three-master Redis Cluster.

Each server runs in the foreground (``--daemonize no``) on a free loopback port with persistence off,
in a temporary directory, and is stopped (or killed) by the test fixtures.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

REDIS_SERVER = "/usr/bin/redis-server"
REDIS_CLI = "/usr/bin/redis-cli"
MISSING = (
    f"{REDIS_SERVER} is not installed: the Redis tier tests need a real server. "
    "Install it with `sudo apt-get install -y redis-server` (Debian/Ubuntu; provides redis-server and "
    "redis-cli), then rerun the tests."
)


def redis_binaries() -> tuple[str, str]:
    """Paths of redis-server and redis-cli; raises RuntimeError (with the install hint) if missing."""
    server = REDIS_SERVER if os.access(REDIS_SERVER, os.X_OK) else shutil.which("redis-server")
    cli = REDIS_CLI if os.access(REDIS_CLI, os.X_OK) else shutil.which("redis-cli")
    if not server or not cli:
        raise RuntimeError(MISSING)
    return server, cli


def free_port(cluster_bus: bool = False) -> int:
    """A free loopback port (and, for cluster nodes, port + 10000 free too)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not cluster_bus:
            return port
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port found")


class RedisServer:
    """One redis-server process; ``kill()`` then ``start()`` brings it back (empty) on the same port."""

    def __init__(self, workdir: Path, *extra: str, port: int | None = None, cluster: bool = False) -> None:
        self.server_bin, self.cli_bin = redis_binaries()
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port(cluster)
        self.extra = list(extra)
        self.cluster = cluster
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> RedisServer:
        args = [
            self.server_bin,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--dir",
            str(self.workdir),
            "--protected-mode",
            "no",
            *self.extra,
        ]
        if self.cluster:
            args += [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                f"nodes-{self.port}.conf",
                "--cluster-node-timeout",
                "2000",
            ]
        log = open(self.workdir / f"redis-{self.port}.log", "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {self.log_tail()}")
            if self.cli("ping", check=False).strip() == "PONG":
                return self
            time.sleep(0.02)
        raise RuntimeError(f"redis-server on port {self.port} did not answer PING: {self.log_tail()}")

    def cli(self, *args: str, check: bool = True) -> str:
        out = subprocess.run(
            [self.cli_bin, "-h", "127.0.0.1", "-p", str(self.port), *args],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if check and out.returncode:
            raise RuntimeError(f"redis-cli {' '.join(args)}: {out.stderr or out.stdout}")
        return out.stdout

    def kill(self) -> None:
        """SIGKILL, like a crash (the data is gone: persistence is off)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def log_tail(self) -> str:
        try:
            return (self.workdir / f"redis-{self.port}.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""


class RedisCluster:
    """Three masters, no replicas, all 16384 slots assigned."""

    def __init__(self, workdir: Path, masters: int = 3) -> None:
        self.nodes = [RedisServer(workdir / f"node{i}", cluster=True) for i in range(masters)]

    @property
    def url(self) -> str:
        return "redis-cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self, timeout: float = 30.0) -> RedisCluster:
        for node in self.nodes:
            node.start()
        out = subprocess.run(
            [
                self.nodes[0].cli_bin,
                "--cluster",
                "create",
                *(f"127.0.0.1:{n.port}" for n in self.nodes),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if out.returncode:
            raise RuntimeError(f"redis-cli --cluster create failed: {out.stdout}{out.stderr}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all("cluster_state:ok" in n.cli("cluster", "info", check=False) for n in self.nodes):
                return self
            time.sleep(0.05)
        raise RuntimeError("Redis Cluster did not reach cluster_state:ok")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
