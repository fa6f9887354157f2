"""The attacks of the security issue as tests (docs/security.md): another uid, forged ids, capabilities,
descriptors, offsets and sizes, a shrunk shared-memory file, floods of registrations and half-sent
frames, pins beyond their share, impostor sockets."""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
import torch
from prometheus_client import generate_latest
from raw_lane import connect, framed, read_reply
from support.server_process import (
    CHUNK,
    MODEL,
    TPB,
    free_port,
    server_secret,
    shared_pool,
    subprocess_env,
    wait_until,
)

from lmcache.config import LMCacheEngineConfig
from lmcache.engine import CacheEngine
from lmcache.metrics import make_registry
from lmcache.server import protocol as P
from lmcache.server.client import (
    BadPool,
    CacheServerClient,
    InvalidRequest,
    LimitExceeded,
    ServerUnavailable,
    Unauthorized,
    UnknownInstance,
)
from lmcache.server.pool_sharing import PoolSharingError, RawCudaIPCWrapper, share_cpu_pool
from lmcache.server.security import (
    SECRET_ENV,
    SECRET_FILE_ENV,
    SecretError,
    client_secret,
    load_or_create_secret,
)
from lmcache.server.server import CacheServer, ServerConfig, ServerStartError
from lmcache.transfer import BlockTransfer

HOSTILE = Path(__file__).with_name("hostile_peer.py")
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="a second uid (nobody) needs root to switch to")


def _hostile(action: str, arg: str) -> dict:
    """Run hostile_peer.py as ``nobody``; its JSON outcome."""
    out = subprocess.run(
        [sys.executable, str(HOSTILE), action, arg],
        env=subprocess_env(**{SECRET_ENV: ""}),
        capture_output=True,
        timeout=120,
        check=True,
    )
    return json.loads(out.stdout)


def _open_dir(path: Path) -> None:
    """Let other users reach the sockets in ``path`` (mkdtemp makes it 0700): only their modes guard them."""
    path.chmod(0o755)


def _url(server: CacheServer) -> str:
    return f"tcp://127.0.0.1:{server.tcp_port}"


def _port_closed(port: int) -> bool:
    """True once nothing listens on ``port``; a reset means the listener is still closing."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:
        return False
    return False


# ---- who may connect ------------------------------------------------------------------------------


@as_root
def test_another_uid_cannot_connect_nor_read_the_secret(start_server, workdir: Path, monkeypatch) -> None:
    secret_file = workdir / "secret"
    server = start_server("--secret-file", str(secret_file), env={SECRET_ENV: ""})
    _open_dir(workdir)
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(os.stat(server.ipc_path).st_mode) == 0o600
    assert _hostile("send", server.ipc_url) == {"errno": errno.EACCES}
    assert _hostile("read", str(secret_file)) == {"errno": errno.EACCES}
    assert _hostile("send", server.tcp_url) == {"codes": ["unauthorized", "unauthorized"]}
    # The same user finds the secret file by itself: the seed's tcp:// URL works unchanged.
    monkeypatch.delenv(SECRET_ENV)
    monkeypatch.setenv(SECRET_FILE_ENV, str(secret_file))
    with CacheServerClient(server.tcp_url, timeout_s=20.0) as client:
        assert client.stats().refusals["unauthorized"] == 2


@as_root
def test_peer_credentials_are_checked_even_on_a_socket_open_to_all(start_server, workdir: Path) -> None:
    server = start_server()
    _open_dir(workdir)
    os.chmod(server.ipc_path, 0o666)  # a careless operator: the server's own check still refuses
    # told why at once, then the connection is closed
    assert _hostile("send", server.ipc_url) == {"codes": ["unauthorized", None]}


@as_root
def test_a_socket_group_admits_its_members_but_not_to_operator_ops(start_server, workdir: Path) -> None:
    server = start_server("--socket-group", "65534")
    _open_dir(workdir)
    st = os.stat(server.ipc_path)
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == 65534
    assert _hostile("send", server.ipc_url) == {"codes": ["ok", "unauthorized"]}  # heartbeat; stats


def test_tcp_needs_the_secret(make_server) -> None:
    server = make_server(secret=b"s" * 32)
    with CacheServerClient(_url(server), timeout_s=20.0, secret="wrong" * 8) as intruder:
        assert intruder.ping().server_id == server.server_id  # liveness only
        for call in (
            intruder.stats,
            intruder.clear,
            lambda: intruder.register(shared_pool(), 0, 1, MODEL, TPB, pool_sharing="export"),
            lambda: intruder.shared_l1.map_l1_ahead(pin=False, certain=True, timeout_s=20.0),  # slab names
        ):
            with pytest.raises(Unauthorized, match="secret"):
                call()
    with CacheServerClient(_url(server), timeout_s=20.0, secret=b"s" * 32) as client:
        client.register(shared_pool(seed=1), 0, 1, MODEL, TPB, pool_sharing="export")
        assert client.stats().refusals["unauthorized"] == 4


def test_a_non_loopback_bind_without_a_secret_refuses_to_start(monkeypatch) -> None:
    monkeypatch.delenv(SECRET_ENV)
    engine = CacheEngine(
        LMCacheEngineConfig.from_defaults(chunk_size=CHUNK, max_local_cpu_size=0.01), pinned=False
    )
    server = CacheServer(engine, ServerConfig(host="0.0.0.0", port=0, ipc_path=None, secret_file=""))
    with pytest.raises(ServerStartError, match="without a secret"):
        server.start()
    server.close()


def test_the_secret_file_is_created_private_reused_and_checked(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(SECRET_ENV)
    monkeypatch.delenv(SECRET_FILE_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    secret = load_or_create_secret()
    path = tmp_path / ".lmcache" / "server_secret"
    assert secret is not None and len(secret) == 64
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert load_or_create_secret() == secret == client_secret()
    path.chmod(0o644)  # readable by others: no longer a secret
    with pytest.raises(SecretError, match="mode 0600"):
        load_or_create_secret()
    assert client_secret() is None


# ---- what a client may touch ------------------------------------------------------------------------


def test_forged_instance_ids_and_capabilities_are_refused(make_server) -> None:
    server = make_server()
    victim = CacheServerClient(_url(server), timeout_s=20.0)
    attacker = CacheServerClient(_url(server), timeout_s=20.0)
    try:
        pool = shared_pool(seed=2)
        info = victim.register(pool, 0, 1, MODEL, TPB, pool_sharing="export")
        iid, tokens = info.instance_id, list(range(64))
        assert victim.store(BlockTransfer(tokens, None, list(range(8)), 0, 64)) == 64
        assert victim.lookup(tokens, pin_id="v") == 64
        forged = {"instance_id": iid, "auth": server_secret()}
        for cap in (None, b"\0" * 32):
            for req in (
                P.Lookup(tokens=P.tokens_to_bytes(tokens), cap=cap, **forged),
                P.Store(
                    tokens=P.tokens_to_bytes(tokens), block_ids=list(range(8)), end=64, cap=cap, **forged
                ),
                P.Retrieve(
                    tokens=P.tokens_to_bytes(tokens), block_ids=list(range(8)), end=64, cap=cap, **forged
                ),
                P.Release(pin_id="v", cap=cap, **forged),
            ):
                with pytest.raises(UnknownInstance):
                    attacker.call(req, int, retry=False)
            assert attacker.call(P.Unregister(cap=cap, **forged), bool, retry=False) is False
            heartbeat = P.Heartbeat(instance_ids=[iid], caps=[cap or b""], auth=server_secret())
            assert attacker.call(heartbeat, P.HeartbeatInfo, retry=False).unknown == [iid]
        with pytest.raises(Unauthorized, match="registered by someone else"):
            attacker.register(shared_pool(seed=3), 0, 1, MODEL, TPB, instance_id=iid, pool_sharing="export")
        # the attacker's own instance cannot act on the victim's pins through pin_owner either
        attacker.register(shared_pool(seed=4), 0, 1, "another/model", TPB, pool_sharing="export")
        with pytest.raises(Unauthorized, match="pin_owner"):
            attacker.release("v", pin_owner=iid)
        assert server.engine.pinned_ids() == [(iid, "v")]
        assert victim.retrieve(BlockTransfer(tokens, None, list(range(8, 16)), 0, 64), pin_id="v") == 64
        assert server.stats().refusals["capability"] >= 10
    finally:
        attacker.close()
        victim.close()


def test_forged_descriptors_are_refused_without_naming_other_files(make_server, tmp_path: Path) -> None:
    server = make_server()
    with CacheServerClient(_url(server), timeout_s=20.0) as client:
        pool = shared_pool()  # kept alive: its descriptor stays open
        desc = share_cpu_pool(pool)
        other = subprocess.Popen(
            [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
        )
        try:  # another process's descriptor (its stdin, a pipe): named by pid and fd
            with pytest.raises(BadPool, match="cannot be used") as refused:
                client.register(
                    msgspec.structs.replace(desc, pid=other.pid, fd=0),
                    0,
                    1,
                    MODEL,
                    TPB,
                    pool_sharing="export",
                )
            assert "pipe" not in str(refused.value)
        finally:
            other.communicate(b"")
        foreign = Path("/dev/shm") / f"lmcache-test-{os.getpid()}"
        foreign.write_bytes(b"\0" * (1 << 20))
        try:
            if os.geteuid() == 0:
                os.chown(foreign, 65534, 65534)  # a file of another user: not the caller's to name
                st = foreign.stat()
                forged = msgspec.structs.replace(
                    desc,
                    fd=None,
                    shm_name=foreign.name,
                    file_dev=st.st_dev,
                    file_inode=st.st_ino,
                    offset_bytes=0,
                )
                with pytest.raises(BadPool, match="cannot be used") as refused:
                    client.register(forged, 0, 1, MODEL, TPB, pool_sharing="export")
                assert foreign.name not in str(refused.value)
        finally:
            foreign.unlink()
        with pytest.raises(BadPool, match="cannot be used"):
            client.register(
                msgspec.structs.replace(desc, file_inode=desc.file_inode + 1),
                0,
                1,
                MODEL,
                TPB,
                pool_sharing="export",
            )
        with pytest.raises(BadPool, match="does not fit"):
            client.register(
                msgspec.structs.replace(desc, offset_bytes=desc.offset_bytes + 4096), 0, 1, MODEL, TPB
            )


class _FakeCuda:
    """Stands in for the CUDA binding: a 4 KiB allocation at 0x10000, whatever the client claims."""

    name = "fake"

    def __init__(self) -> None:
        self.closed: list[int] = []

    def device_count(self) -> int:
        return 1

    def device_uuid(self, ordinal: int) -> str:
        return "ab" * 16

    def set_device(self, ordinal: int) -> None:
        pass

    def ipc_open(self, handle: bytes) -> int:
        return 0x10000

    def address_range(self, ptr: int) -> tuple[int, int]:
        return 0x10000, 4096

    def ipc_close(self, ptr: int) -> None:
        self.closed.append(ptr)


@pytest.mark.parametrize(
    "offset, shape", [(4096 - 512, [1, 2, 2, 64]), (0, [5, 2, 2, 64]), (8 << 20, [1, 2, 2, 8])]
)
def test_cuda_span_is_checked_against_the_opened_allocation(offset: int, shape: list[int]) -> None:
    api = _FakeCuda()
    desc = P.CudaIpcPool(
        shape=shape,
        dtype="float32",
        ipc_handle=bytes(64),
        alloc_bytes=1 << 40,  # the client's claim: never trusted
        offset_bytes=offset,
        device_uuid="ab" * 16,
    )
    with pytest.raises(
        PoolSharingError, match=r"exceeds the CUDA allocation its handle opens \(4096 bytes\)"
    ):
        RawCudaIPCWrapper.open(desc, api)
    assert api.closed == [0x10000]  # the handle is closed again


@pytest.mark.gpu
def test_cuda_forged_offset_or_size_is_refused_by_a_real_server(start_server) -> None:
    server = start_server()
    pool = torch.zeros(64, 2, 2, TPB * 16, device="cuda")
    desc = RawCudaIPCWrapper(pool).descriptor
    with CacheServerClient(server.ipc_url, timeout_s=60.0) as client:
        beyond = desc.alloc_bytes - desc.offset_bytes + 4096  # past the end of the real allocation
        for forged in (
            msgspec.structs.replace(desc, offset_bytes=desc.offset_bytes + beyond, alloc_bytes=1 << 40),
            msgspec.structs.replace(desc, shape=[64 * 1024, 2, 2, TPB * 16], alloc_bytes=1 << 40),
        ):
            with pytest.raises(BadPool, match="exceeds the CUDA allocation"):
                client.register(forged, 0, 1, MODEL, TPB, pool_sharing="export")
        client.register(pool, 0, 1, MODEL, TPB, pool_sharing="export")  # the honest descriptor still works
        assert client.store(BlockTransfer(list(range(64)), None, list(range(8)), 0, 64)) == 64


def test_a_shrunk_shared_memory_file_does_not_crash_the_server(start_server) -> None:
    server = start_server()
    pool = torch.zeros(64, 2, 2, TPB * 16)
    pool.share_memory_()
    desc = share_cpu_pool(pool)
    assert desc.fd is not None
    with CacheServerClient(server.ipc_url, timeout_s=20.0) as client:
        client.register(desc, 0, 1, MODEL, TPB, pool_sharing="export")
        os.ftruncate(desc.fd, 4096)  # our pool is gone too: this test never touches it again
        with pytest.raises(BadPool, match="shrunk|does not fit"):
            client.store(BlockTransfer(list(range(64)), None, list(range(8)), 0, 64))
        assert client.ping().server_id and server.proc is not None and server.proc.poll() is None
        assert "its shared memory changed under the server" in server.log()


# ---- bounded resources ------------------------------------------------------------------------------


def test_floods_of_registrations_and_half_sent_frames_leave_the_server_answering(start_server) -> None:
    server = start_server()
    pool = shared_pool(seed=5)
    limited = 0
    with CacheServerClient(server.ipc_url, timeout_s=20.0, heartbeat_interval_s=0) as flood:
        for _ in range(2000):
            try:
                flood.register(pool, 0, 1, MODEL, TPB, pool_sharing="export")
            except LimitExceeded:
                limited += 1
        assert limited == 2000 - 64  # --max-registrations-per-client
        port = server.port
        frame = P.encode(P.Ping(rid=1))
        half_sent = []
        for _ in range(100):  # each announces 100 MiB and sends 1 KiB of it
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(P.FRAME_HEADER.pack(100 << 20) + frame + bytes(1024))
            half_sent.append(sock)
        try:
            with CacheServerClient(server.tcp_url, timeout_s=20.0, fail_fast=False) as correct:
                correct.register(shared_pool(seed=6), 0, 1, MODEL, TPB, pool_sharing="export")
                assert correct.store(BlockTransfer(list(range(64)), None, list(range(8)), 0, 64)) == 64
                answered = False
                for _ in range(5):  # within 100 ms, allowing a few scheduling hiccups of a shared host
                    try:
                        answered = correct.lookup(list(range(64)), timeout_s=0.1) == 64
                        break
                    except ServerUnavailable:
                        continue
                assert answered
                refusals = correct.stats().refusals
        finally:
            for sock in half_sent:
                sock.close()
    assert refusals["registrations_per_client"] == limited
    assert refusals["pending_bytes"] >= 98  # 256 MiB of unfinished frames at most: two of them


@pytest.mark.parametrize(
    "cap, flag",
    [
        ("max_connections_per_client", "--max-connections-per-client"),
        ("max_connections", "--max-connections"),
    ],
)
def test_a_client_over_a_connection_cap_is_told_so(make_server, workdir: Path, cap: str, flag: str) -> None:
    path = str(workdir / "c.sock")
    server = make_server(ipc_path=path, **{cap: 2})
    with CacheServerClient(f"ipc://{path}", timeout_s=20.0, heartbeat_interval_s=0) as client:
        # two connections open, a third is refused
        with client.lanes.hold(), client.lanes.hold(), pytest.raises(LimitExceeded, match=flag):
            client.ping()
        assert client.ping().server_id == server.server_id  # on a lane it holds
    reason = "connections_per_client" if cap == "max_connections_per_client" else "connections"
    assert server.refusals[reason] == 1


def test_an_instance_cannot_act_on_the_pins_of_another_of_its_rank(make_server) -> None:
    """Two engines, or two attention-DP ranks, of one user and model: each a world of one rank. Only
    another rank of a TP world may name a lookup's pins (``pin_owner``); these never may."""
    server = make_server()
    with CacheServerClient(_url(server), timeout_s=20.0) as client:
        first = client.register(shared_pool(seed=5), 0, 1, MODEL, TPB, pool_sharing="export").instance_id
        second = client.register(shared_pool(seed=6), 0, 1, MODEL, TPB, pool_sharing="export").instance_id
        tokens = list(range(3000, 3064))
        assert client.store(BlockTransfer(tokens, None, list(range(8)), 0, 64), instance_id=first) == 64
        assert client.lookup(tokens, pin_id="r1", instance_id=first) == 64
        with pytest.raises(Unauthorized, match="pin_owner"):
            client.release("r1", pin_owner=first, instance_id=second)
        load = BlockTransfer(tokens, None, list(range(8, 16)), 0, 64)
        with pytest.raises(Unauthorized, match="pin_owner"):
            client.retrieve(load, pin_id="r1", pin_owner=first, instance_id=second)
        assert server.engine.pinned_ids() == [(first, "r1")]
        assert client.retrieve(load, pin_id="r1", instance_id=first) == 64
        assert client.stats().pinned_lookups == 0  # released once the retrieve's reply went out


def test_pins_cannot_take_more_than_their_share_and_blocks_cannot_repeat(make_server) -> None:
    server = make_server(pin_share=0.0002)  # of 0.05 GiB: one 8 KiB chunk fits, two do not
    with CacheServerClient(_url(server), timeout_s=20.0) as client:
        client.register(shared_pool(seed=7), 0, 1, MODEL, TPB, pool_sharing="export")
        long, short = list(range(96)), list(range(1000, 1032))
        assert client.store(BlockTransfer(long, None, list(range(12)), 0, 96)) == 96
        assert client.store(BlockTransfer(short, None, list(range(12, 16)), 0, 32)) == 32
        with pytest.raises(LimitExceeded, match="share of L1"):
            client.lookup(long, pin_id="a")
        assert server.engine.pinned_ids() == []  # refused lookups leave nothing pinned
        assert client.lookup(short, pin_id="b") == 32
        with pytest.raises(LimitExceeded, match="share of L1"):
            client.lookup(short, pin_id="c")
        assert client.release("b") is True
        assert client.lookup(short, pin_id="c") == 32
        with pytest.raises(InvalidRequest, match="block ids repeat"):
            client.store(BlockTransfer(list(range(2000, 2064)), None, [0] * 8, 0, 64))
        with pytest.raises(InvalidRequest, match="block ids repeat"):  # one repeat, far apart
            client.store(BlockTransfer(list(range(2000, 2064)), None, [5, 1, 2, 3, 4, 6, 7, 1], 0, 64))
        assert client.lookup(list(range(2000, 2064))) == 0
        text = generate_latest(make_registry(server.engine, server)).decode()
        assert 'lmcache_server_refusals_total{reason="pinned_bytes"} 2.0' in text
        assert 'lmcache_server_refusals_total{reason="repeated_blocks"} 2.0' in text


def test_a_deeply_nested_frame_is_malformed_without_a_traceback(make_server, caplog) -> None:
    server = make_server()
    with connect(_url(server)) as sock, caplog.at_level(logging.DEBUG, logger="lmcache"):
        for _ in range(3):
            sock.sendall(framed(b"\x81\xa2op" + b"\x91" * 100_000 + b"\xc0"))
            assert read_reply(sock).error.code == P.ErrorCode.MALFORMED.value  # type: ignore[union-attr]
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


# ---- local exposure -----------------------------------------------------------------------------------


@as_root
def test_an_impostor_socket_of_another_user_is_refused_by_server_and_client(workdir: Path) -> None:
    path = workdir / "taken.sock"
    impostor = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    impostor.bind(str(path))
    impostor.listen()
    os.chown(path, 65534, 65534)
    try:
        engine = CacheEngine(
            LMCacheEngineConfig.from_defaults(chunk_size=CHUNK, max_local_cpu_size=0.01), pinned=False
        )
        server = CacheServer(engine, ServerConfig(port=0, ipc_path=str(path)))
        with pytest.raises(ServerStartError, match="belongs to uid 65534"):
            server.start()
        server.close()
        client = CacheServerClient(f"ipc://{path}", timeout_s=2.0, heartbeat_interval_s=0)
        with client, pytest.raises(ServerUnavailable, match="belongs to uid 65534"):
            client.register(shared_pool(), 0, 1, MODEL, TPB, pool_sharing="export")
    finally:
        impostor.close()


def test_a_single_user_needs_no_configuration(start_server, workdir: Path, monkeypatch) -> None:
    """The seed's setup: default secret location, a tcp:// and an ipc:// client of the same user."""
    monkeypatch.setenv("HOME", str(workdir))
    env = {SECRET_ENV: "", "HOME": str(workdir)}
    server = start_server("--host", "0.0.0.0", env=env)
    assert stat.S_IMODE((workdir / ".lmcache" / "server_secret").stat().st_mode) == 0o600
    monkeypatch.delenv(SECRET_ENV)
    for url in (server.tcp_url, server.ipc_url):
        with CacheServerClient(url, timeout_s=20.0) as client:
            client.register(shared_pool(seed=8), 0, 1, MODEL, TPB, pool_sharing="export")
            assert client.store(BlockTransfer(list(range(64)), None, list(range(8)), 0, 64)) in (0, 64)
            assert client.lookup(list(range(64))) == 64
            assert client.stats().instances


_SHRINK_DURING_A_COPY = """
import os, threading, torch
from support.server_process import MODEL, TPB
from lmcache.config import LMCacheEngineConfig
from lmcache.engine import CacheEngine
from lmcache.server.client import BadPool, CacheServerClient
from lmcache.server.pool_sharing import share_cpu_pool
from lmcache.server.server import CacheServer, ServerConfig
from lmcache.transfer import BlockTransfer

engine = CacheEngine(LMCacheEngineConfig.from_defaults(chunk_size=32, max_local_cpu_size=0.05), pinned=False)
server = CacheServer(engine, ServerConfig(port=0, ipc_path=None))
server.start()
threading.Thread(target=server.serve_forever, daemon=True).start()
pool = torch.ones(64, 2, 2, TPB * 16)
pool.share_memory_()
desc = share_cpu_pool(pool)
real_store = engine.store

def store(*args, **kwargs):
    os.ftruncate(desc.fd, 0)  # after the server's size check, before its copy
    return real_store(*args, **kwargs)

engine.store = store
client = CacheServerClient(f"tcp://127.0.0.1:{server.tcp_port}", timeout_s=20.0)
client.register(desc, 0, 1, MODEL, TPB, pool_sharing="export")
try:
    client.store(BlockTransfer(list(range(64)), None, list(range(8)), 0, 64))
except BadPool as e:
    print("refused:", e.message)
print("alive:", client.ping().server_id == server.server_id)
"""


def test_a_file_shrunk_during_a_copy_does_not_crash_the_server() -> None:
    """The window between the size check and the copy: the SIGBUS guard turns the lost pages into zeros
    and the copy is refused after the fact (run in a child: without the guard it dies of SIGBUS)."""
    pytest.importorskip("lmcache._busguard", reason="the C extension is not built (setup.py build_ext)")
    out = subprocess.run(
        [sys.executable, "-c", _SHRINK_DURING_A_COPY], env=subprocess_env(), capture_output=True, timeout=300
    )
    assert out.returncode == 0, out.stderr.decode(errors="replace")[-2000:]
    assert b"refused: the pool's shared-memory file was shrunk" in out.stdout
    assert b"alive: True" in out.stdout


def test_a_client_started_first_finds_the_secret_and_follows_a_new_one(
    make_server, tmp_path: Path, monkeypatch
) -> None:
    """TRT-LLM may start before the server creates its secret, and the server may come back with a
    new one: the client reads the file again while it has none, and once after a refusal."""
    monkeypatch.delenv(SECRET_ENV)
    secret_file = tmp_path / "secret"
    monkeypatch.setenv(SECRET_FILE_ENV, str(secret_file))
    port = free_port()
    with CacheServerClient(f"tcp://127.0.0.1:{port}", timeout_s=20.0, fail_fast=False) as client:
        first = make_server(port=port)
        assert secret_file.exists()
        client.register(shared_pool(seed=9), 0, 1, MODEL, TPB, pool_sharing="export")
        assert client.store(BlockTransfer(list(range(64)), None, list(range(8)), 0, 64)) == 64
        first.stop()
        wait_until(lambda: _port_closed(port), "the first server to stop")
        secret_file.unlink()
        second = make_server(port=port)  # a new secret file, a new secret
        assert secret_file.exists()
        assert client.lookup(list(range(64))) == 0  # re-read the secret, re-registered, a new cache
        assert client.stats().server_id == second.server_id
