"""The server's command line: the seed's exact command, --help, signals, --stats, start-up errors."""

from __future__ import annotations

import os
import resource
import signal
import stat
import subprocess
import sys

import pytest
from support.server_process import free_port, subprocess_env

from lmcache.server.cli import build_parser, engine_config_from_args
from lmcache.server.client import CacheServerClient, wait_for_server

SEED_FLAGS = ["--host", "--port", "--l1-size-gb", "--eviction-policy", "--max-workers", "--chunk-size"]
OUR_FLAGS = [
    "--config",
    "--ipc-path",
    "--log-level",
    "--client-timeout-s",
    "--stats",
    "--busy-poll-us",
    "--max-connections-per-client",
]


def _server_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "lmcache.v1.multiprocess.server", *args]


def test_help_documents_every_flag() -> None:
    out = subprocess.run(
        _server_cmd("--help"), capture_output=True, text=True, env=subprocess_env(), timeout=60, check=True
    ).stdout
    for flag in SEED_FLAGS + OUR_FLAGS:
        assert flag in out, flag
    assert "ipc:///tmp/lmcache.sock" in out


def test_seed_command_line_starts_lazily_answers_ping_and_sigterm_exits_cleanly(workdir) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    ipc_path = str(workdir / "seed.sock")
    cmd = _server_cmd(
        "--host", "0.0.0.0", "--port", str(port), "--l1-size-gb", "10", "--eviction-policy", "LRU",
        "--max-workers", "4", "--chunk-size", "256",
    )  # fmt: skip
    log_path = workdir / "seed.log"
    with open(log_path, "wb") as log:
        # The default ipc path comes from LMCACHE_SERVER_IPC_PATH: this test leaves /tmp/lmcache.sock alone.
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=subprocess_env(LMCACHE_SERVER_IPC_PATH=ipc_path)
        )
    try:
        info = wait_for_server(f"tcp://127.0.0.1:{port}", 60)
        assert info.chunk_size == 256
        with CacheServerClient(f"ipc://{ipc_path}", timeout_s=20.0) as client:
            stats = client.stats()
        assert stats.engine.l1.capacity_bytes == 10 << 30
        assert stats.engine.l1.reserved_bytes == 0  # nothing reserved until chunks arrive
        assert stats.engine.l1.eviction_policy == "LRU"
        # Start-up froze the imported modules (torch's alone are over 100k objects) out of the garbage
        # collector's walks, and times its pauses.
        assert stats.gc.watched and stats.gc.frozen_objects > 50_000
        assert stat.S_ISSOCK(os.stat(ipc_path).st_mode)
        stats_cli = subprocess.run(
            _server_cmd("--stats", f"tcp://127.0.0.1:{port}"),
            capture_output=True,
            text=True,
            env=subprocess_env(),
            timeout=60,
        )
        assert stats_cli.returncode == 0, stats_cli.stderr
        assert "L1:" in stats_cli.stdout and "chunk_size 256" in stats_cli.stdout
        assert "garbage collector:" in stats_cli.stdout and "L1 memory: fd-" in stats_cli.stdout
        assert "collections (generation 0/1/2)" in stats_cli.stdout
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert not os.path.exists(ipc_path)
        log = log_path.read_text()
        assert f"LMCache server listening on tcp://0.0.0.0:{port} and ipc://{ipc_path}" in log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def test_stats_of_an_unreachable_server_fails_fast(workdir) -> None:  # type: ignore[no-untyped-def]
    out = subprocess.run(
        _server_cmd("--stats", f"ipc://{workdir}/none.sock"),
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=60,
    )
    assert out.returncode == 1
    assert "cannot read stats" in out.stderr


def test_port_in_use_and_live_ipc_path_are_refused(start_server, workdir) -> None:  # type: ignore[no-untyped-def]
    server = start_server()
    busy_port = subprocess.run(
        _server_cmd("--port", str(server.port), "--ipc-path", str(workdir / "other.sock")),
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=60,
    )
    assert busy_port.returncode == 1
    assert "already in use" in busy_port.stderr
    busy_ipc = subprocess.run(
        _server_cmd("--port", str(free_port()), "--ipc-path", server.ipc_path),
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=60,
    )
    assert busy_ipc.returncode == 1
    assert "another process is serving" in busy_ipc.stderr
    assert server.proc.poll() is None
    wait_for_server(server.ipc_url, 30)  # the first server still owns its socket


def test_sigint_also_exits_cleanly_and_tcp_only_mode(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(ipc=False)
    assert "and ipc://" not in server.log()
    assert server.kill(signal.SIGINT) == 0


def test_config_file_with_flag_overrides(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cfg = tmp_path / "lmcache.yaml"
    cfg.write_text("chunk_size: 128\nmax_local_cpu_size: 3\ncache_policy: FIFO\n")
    args = build_parser().parse_args(["--config", str(cfg), "--chunk-size", "512"])
    config = engine_config_from_args(args)
    assert (config.chunk_size, config.max_local_cpu_size, config.cache_policy) == (512, 3.0, "FIFO")
    args = build_parser().parse_args(["--config", str(cfg), "--eviction-policy", "lru", "--l1-size-gb", "1"])
    config = engine_config_from_args(args)
    assert (config.chunk_size, config.max_local_cpu_size, config.cache_policy) == (128, 1.0, "LRU")


def test_bad_flag_values_exit_with_a_message() -> None:
    out = subprocess.run(
        _server_cmd("--eviction-policy", "MRU", "--ipc-path", ""),
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=60,
    )
    assert out.returncode == 2
    assert "MRU" in out.stderr and "LRU" in out.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["--max-workers", "0"],
        ["--port", "70000"],
        ["--max-connections-per-client", "0"],
        ["--busy-poll-us", "-1"],
        ["--busy-poll-us", "nan"],
        ["--max-frame-mb", "nan"],
        ["--max-frame-mb", "inf"],
        ["--max-frame-mb", "0"],
        ["--client-timeout-s", "nan"],
        ["--client-timeout-s", "-5"],
        ["--pin-ttl-s", "inf"],
        ["--l1-size-gb", "-1"],
        ["--l1-size-gb", "nan"],
        ["--chunk-size", "0"],
    ],
)
def test_invalid_numbers_are_rejected_naming_the_flag(argv: list[str]) -> None:
    out = subprocess.run(
        _server_cmd(*argv, "--ipc-path", ""), capture_output=True, text=True, env=subprocess_env(), timeout=60
    )
    assert out.returncode == 2
    assert argv[0] in out.stderr and "Traceback" not in out.stderr
    assert "LMCACHE_" not in out.stderr  # the flag the user typed, not a variable they did not set


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ("extra_config: {tier_read_threads: abc}\n", "extra_config.tier_read_threads"),
        ("tier_staging_size_gb: -1\n", "tier_staging_size_gb"),
        ("remote_url: redis://localhost:notaport\n", "remote_url"),
        ("remote_url: 'redis-cluster://'\n", "remote_url"),
    ],
)
def test_bad_config_values_exit_with_a_message_naming_the_key(tmp_path, config: str, named: str) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "server.yaml"
    path.write_text(config)
    out = subprocess.run(
        _server_cmd("--config", str(path), "--ipc-path", ""),
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=60,
    )
    assert out.returncode == 2
    assert named in out.stderr and "Traceback" not in out.stderr


def test_invalid_log_level_variable_is_refused_by_the_server() -> None:
    out = subprocess.run(
        _server_cmd("--ipc-path", ""),
        capture_output=True,
        text=True,
        env=subprocess_env(LMCACHE_LOG_LEVEL="VERBOSE"),
        timeout=60,
    )
    assert out.returncode == 2
    assert "LMCACHE_LOG_LEVEL='VERBOSE'" in out.stderr and "DEBUG" in out.stderr


def test_effective_config_log_shows_the_flags_and_l1_beyond_memory_is_warned(workdir) -> None:  # type: ignore[no-untyped-def]
    huge = (os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") >> 30) * 4 + 4  # 4x this host's memory
    port = free_port()
    log_path = workdir / "huge.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            _server_cmd("--port", str(port), "--ipc-path", "", "--l1-size-gb", str(huge)),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=subprocess_env(),
        )
    try:
        wait_for_server(f"tcp://127.0.0.1:{port}", 60)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    text = log_path.read_text()
    effective = [line for line in text.splitlines() if "effective config" in line]
    assert len(effective) == 1 and f"max_local_cpu_size={float(huge)!r}" in effective[0]
    assert f"--l1-size-gb: {huge} GiB is more than this host's memory" in text


def test_stats_command_defaults_to_the_server_url_imports_no_torch_and_watches(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server()
    code = (
        "import sys\n"
        "from lmcache.cli import main\n"
        "rc = main(['stats', '--watch', '0.01', '--count', '2'])\n"
        "print('TORCH', 'torch' in sys.modules, 'RC', rc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=subprocess_env(LMCACHE_SERVER_URL=server.ipc_url),
        timeout=60,
    )
    assert out.stdout.count("LMCache server ") == 2, out.stderr
    assert "TORCH False RC 0" in out.stdout


def test_stats_piped_into_a_reader_that_stops_ends_quietly(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmcache.cli", "stats", server.ipc_url, "--watch", "0.01"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=subprocess_env(),
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().startswith(b"LMCache server ")
    proc.stdout.close()  # like `| head -1`: the next write hits a closed pipe
    assert proc.wait(60) == 0
    assert b"Traceback" not in proc.stderr.read()
    proc.stderr.close()


def test_an_instance_shows_its_leased_slots_or_its_stores_waiting_for_a_forward_in_stats() -> None:
    from lmcache.server.cli import instance_line
    from lmcache.server.stats_protocol import InstanceStats

    common = dict(
        instance_id=7, rank=0, world_size=2, model_name="m", pool_kind="cuda", pool_shape=[4, 2], dtype="bf16"
    )
    shared = InstanceStats(**common, pid=11, idle_s=0.5, sharing="shared-l1", leased_slots=384)
    exported = InstanceStats(**common, pid=12, idle_s=0.5, sharing="cuda-ipc")
    waiting = InstanceStats(**common, pid=13, idle_s=9.5, sharing="cuda-ipc", forward_waits=2)
    assert (
        instance_line(shared)
        == "instance 7 pid 11 rank 0/2 m shared-l1 [4, 2] bf16 idle 0.5 s, 384 leased slots"
    )
    assert instance_line(exported) == "instance 7 pid 12 rank 0/2 m cuda-ipc [4, 2] bf16 idle 0.5 s"
    assert (
        instance_line(waiting)
        == "instance 7 pid 13 rank 0/2 m cuda-ipc [4, 2] bf16 idle 9.5 s, 2 requests waiting for its forward"
    )


@pytest.mark.parametrize(
    ("env", "flag"),
    [("LMCACHE_SERVER_MAX_CONNECTIONS", "--max-connections"), ("LMCACHE_SERVER_PIN_TTL_S", "--pin-ttl-s")],
)
def test_a_bad_value_in_a_flags_environment_variable_is_named(env: str, flag: str) -> None:
    """Not a traceback, even for --help; the error names the flag and the variable."""
    bad = subprocess_env(**{env: "abc"})
    helped = subprocess.run(_server_cmd("--help"), capture_output=True, text=True, env=bad, timeout=60)
    assert helped.returncode == 0 and "Traceback" not in helped.stderr
    started = subprocess.run(_server_cmd("--port", "0"), capture_output=True, text=True, env=bad, timeout=60)
    assert started.returncode == 2 and "Traceback" not in started.stderr
    assert f"argument {flag}: 'abc' is not" in started.stderr and f"${env}" in started.stderr


@pytest.mark.parametrize(
    "url", ["ipc://rel.sock", "tcp://127.0.0.1:99999", "tcp://127.0.0.1:0", "http://x:1"]
)
def test_a_server_url_clients_cannot_use_is_refused_by_name(url: str) -> None:
    from lmcache.server.client_lanes import Endpoint

    with pytest.raises(ValueError, match="ipc:///ABSOLUTE/PATH"):
        Endpoint.of(url)


def test_a_relative_ipc_path_is_refused_at_start() -> None:
    cmd = _server_cmd("--ipc-path", "rel.sock")
    out = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=60)
    assert out.returncode == 2 and "--ipc-path must be an absolute path" in out.stderr


def _refused(*argv: str, **env: str) -> str:
    """The server's stderr for a command line it must refuse before starting (exit 2, no traceback)."""
    out = subprocess.run(
        _server_cmd(*argv), capture_output=True, text=True, env=subprocess_env(**env), timeout=60
    )
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and "Errno" not in out.stderr
    return out.stderr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--host", "nosuchhost.invalid"], "--host 'nosuchhost.invalid' does not resolve to an address"),
        (["--host", "0.0.0.0:5555"], "--host '0.0.0.0:5555' includes a port: give the address alone"),
        (["--host", ""], "--host '' is empty (give 127.0.0.1 for this host only, 0.0.0.0 for all"),
        (
            ["--metrics-port", "0", "--metrics-host", "nosuchhost.invalid"],
            "--metrics-host 'nosuchhost.invalid' does not resolve",
        ),
        (["--l1-size-gb", "1e12"], "--l1-size-gb must be at most 8589934591 (GiB"),
        (["--l1-size-gb", "1e300"], "--l1-size-gb must be at most 8589934591 (GiB"),
        (["--l1-size-gb", "10GB"], "--l1-size-gb: '10GB' is not a number of GiB: write the number alone"),
        (["--config", ""], "--config is empty: give the path of a YAML file, or leave --config out"),
    ],
)
def test_bad_addresses_sizes_and_an_empty_config_are_refused_before_start(
    argv: list[str], message: str
) -> None:
    assert message in _refused(*argv, "--ipc-path", "")


def test_a_config_path_that_is_no_file_is_named_with_its_flag_or_variable(tmp_path) -> None:  # type: ignore[no-untyped-def]
    directory = str(tmp_path)
    missing = str(tmp_path / "missing.yaml")
    assert f"--config {directory!r}: is a directory" in _refused("--config", directory, "--ipc-path", "")
    assert f"--config {missing!r}: no such file" in _refused("--config", missing, "--ipc-path", "")
    stderr = _refused("--ipc-path", "", LMCACHE_CONFIG_FILE=directory)
    assert f"LMCACHE_CONFIG_FILE={directory!r}: is a directory" in stderr
    twice = tmp_path / "twice.yaml"
    twice.write_text("chunk_size: 64\nchunk_size: 128\n")
    args = build_parser().parse_args(["--config", str(twice)])
    with pytest.raises(ValueError, match=r"'chunk_size' is given twice \(lines 1 and 2\); keep one"):
        engine_config_from_args(args)


def test_pool_sharing_is_read_in_any_case() -> None:
    assert build_parser().parse_args(["--pool-sharing", "Shared-L1"]).pool_sharing == "shared-l1"


def test_an_address_or_socket_directory_the_server_cannot_use_is_named_by_its_flag(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from lmcache.server.listeners import Listeners, ServerStartError
    from lmcache.server.settings import ServerConfig

    # 192.0.2.1 (TEST-NET-1) resolves but is never an address of this machine.
    with pytest.raises(ServerStartError, match=r"^--host 192\.0\.2\.1 is not an address of this machine"):
        Listeners(ServerConfig(host="192.0.2.1", port=0, ipc_path=None)).bind()
    (tmp_path / "file").write_text("")
    ipc_path = str(tmp_path / "file" / "server.sock")
    with pytest.raises(
        ServerStartError, match=r"cannot create its directory .*/file \(a file is in the way\)"
    ):
        Listeners(ServerConfig(host="127.0.0.1", port=0, ipc_path=ipc_path)).bind()


def test_a_chunk_size_a_worker_cannot_use_is_warned_at_start_and_refused_naming_the_flag(workdir) -> None:  # type: ignore[no-untyped-def]
    import torch

    from lmcache.layout import PoolLayout

    cmd = _server_cmd("--chunk-size", "100", "--host", "192.0.2.1", "--port", "0", "--ipc-path", "")
    out = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=60)
    assert out.returncode == 1 and "Traceback" not in out.stderr  # the warning comes before the bind fails
    assert "--chunk-size 100 is not a multiple of 32, TRT-LLM's default tokens_per_block" in out.stderr
    layout = PoolLayout.of_pool(torch.zeros(4, 2, 2, 32 * 8), 32)
    with pytest.raises(ValueError, match=r"chunk_size=100 must be .*\(the cache server: --chunk-size\)"):
        layout.blocks_per_chunk(100)


def test_l1_memory_comes_from_the_flag_or_its_env_and_a_bad_one_is_named() -> None:
    assert build_parser().parse_args(["--l1-memory", "FD"]).l1_memory == "fd"
    stderr = _refused("--port", "0", LMCACHE_L1_MEMORY="dev-shm")
    assert "$LMCACHE_L1_MEMORY must be one of shm, fd, got 'dev-shm'" in stderr
    assert "invalid choice: 'x'" in _refused("--l1-memory", "x")


def _server_log_with_descriptor_limit(workdir, soft: int, hard: int, *argv: str) -> str:  # type: ignore[no-untyped-def]
    """The log of a server started (on CPU) under that limit on open descriptors, once it answers."""
    port = free_port()
    log_path = workdir / f"limit-{soft}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            _server_cmd("--port", str(port), "--ipc-path", str(workdir / f"l{soft}.sock"), *argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=subprocess_env(CUDA_VISIBLE_DEVICES=""),
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)),
        )
    try:
        wait_for_server(f"tcp://127.0.0.1:{port}", 60)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    return log_path.read_text()


def test_the_server_raises_its_descriptor_limit_and_says_when_an_l1_by_descriptor_cannot_fit(workdir) -> None:  # type: ignore[no-untyped-def]
    """With --l1-memory fd the server keeps a descriptor per L1 slab (256 for 64 GiB): it takes the
    hard limit on open descriptors for its own (any host's is above 128), and names the limit when even
    that is short."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    flags = ("--l1-memory", "fd", "--l1-size-gb", "64")
    raised = _server_log_with_descriptor_limit(workdir, 128, hard, *flags)
    assert "open-descriptor limit raised from 128 to" in raised and "ulimit -n" in raised
    assert "keeps a descriptor per L1 slab" not in raised
    short = _server_log_with_descriptor_limit(workdir, 256, 256, *flags)
    assert "open-descriptor limit raised" not in short
    assert "keeps a descriptor per L1 slab: 256 slabs of 256 MiB" in short and "at least 512" in short
