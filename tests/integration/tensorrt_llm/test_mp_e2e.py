"""The multi-process connector (preset ``lmcache-mp``) end to end: replay engines, a real server."""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from support.e2e import DEVICES, MODEL, assert_same_output, baseline, llm_args, logits_digest, prompt
from support.server_process import REPO, ServerProcess, subprocess_env, wait_until

from lmcache.integration.tensorrt_llm.server_backend import ServerTransfers
from lmcache.integration.tensorrt_llm.tensorrt_mp_adapter import reset_process_connections
from lmcache.server.client import CacheServerClient
from lmcache.testing.trtllm_replay import ReplayExecutor

LOOKUP_LINE = re.compile(r"LMCache MP scheduler: req (\d+) .*lmcache_cached=(\d+) new_matched=(\d+)")
ENGINE_PROC = REPO / "tests" / "integration" / "tensorrt_llm" / "mp_engine_proc.py"


@pytest.fixture
def mp_server(request: pytest.FixtureRequest, lmcache_env) -> Iterator[ServerProcess]:
    """A cache server; an indirect parameter adds flags (by default none: its --client-timeout-s long
    enough that a live client whose heartbeats are held up on a busy machine is never reaped)."""
    workdir = Path(tempfile.mkdtemp(prefix="lmmp-", dir="/tmp"))
    flags = getattr(request, "param", ())
    server = ServerProcess(workdir, None, "--chunk-size", "64", *flags).start()
    reset_process_connections()
    yield server
    reset_process_connections()
    server.stop()
    shutil.rmtree(workdir, ignore_errors=True)


def run_engine_process(server: ServerProcess, seed: int, length: int, mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(ENGINE_PROC), server.ipc_url, str(seed), str(length), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=subprocess_env(LMCACHE_CHUNK_SIZE="64"),
    )


@dataclasses.dataclass(frozen=True)
class EngineOutput:
    """What an engine process (``mp_engine_proc.py``) printed for its prompt."""

    tokens: list[int]
    matched: int
    logits: str
    """:func:`logits_digest` of its logits."""


def read_output(proc: subprocess.Popen[str]) -> EngineOutput:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("TOKENS"):
            head, rest = line.split("MATCHED")
            matched, logits = rest.split("LOGITS")
            return EngineOutput([int(t) for t in head.split()[1:]], int(matched), logits.strip())
    raise AssertionError(f"engine process ended without output (exit {proc.wait()})")


def seed_scenario(url: str, device: str, start: int) -> None:
    """Prompt A, B (evicting A from the device pool), then A again through the server at ``url``: the
    third request hits, and both of A's outputs equal recompute's."""
    a, b = prompt(520, start=start), prompt(520, start=start + 1)
    executor = ReplayExecutor(llm_args("lmcache-mp", max_tokens=640, server_url=url), MODEL, device=device)
    first = executor.generate([a], 8)[0]
    executor.generate([b], 8)
    third = executor.generate([a], 8)[0]
    assert third.num_connector_matched_tokens > 0
    want = baseline([a], 8, device, max_tokens=640)[0]
    assert_same_output(first, want)
    assert_same_output(third, want)


@pytest.mark.parametrize("sharing", ["export", "shared-l1"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tp", [1, 2])
def test_seed_scenario_through_the_server(
    mp_server, lmcache_env, caplog, tp: int, device: str, sharing
) -> None:
    lmcache_env.setenv("LMCACHE_POOL_SHARING", sharing)  # the server stays in auto
    caplog.set_level(logging.DEBUG, logger="lmcache")
    a, b = prompt(520, start=1), prompt(520, start=2)
    args = llm_args("lmcache-mp", tp=tp, max_tokens=640, server_url=mp_server.ipc_url)
    executor = ReplayExecutor(args, MODEL, device=device)
    first = executor.generate([a], 8)[0]
    executor.generate([b], 8)
    third = executor.generate([a], 8)[0]
    assert third.num_connector_matched_tokens > 0
    assert third.num_device_matched_tokens + third.num_connector_matched_tokens == 512
    cached, new_matched = map(int, LOOKUP_LINE.findall(caplog.text)[-1][1:])
    assert cached == 512 and new_matched == third.num_connector_matched_tokens
    assert "Retrieved" in caplog.text
    want = baseline([a], 8, device, tp=tp, max_tokens=640)[0]
    assert_same_output(first, want)
    assert_same_output(third, want)
    assert not [r for r in caplog.records if r.name.endswith("save_fence")]  # every save was released


@pytest.mark.parametrize("sharing", ["export", "shared-l1"])
@pytest.mark.parametrize("device", DEVICES)
def test_async_loads_through_the_server_wait_for_the_stream_on_their_own_thread(
    mp_server, lmcache_env, monkeypatch, device: str, sharing: str
) -> None:
    """``enable_async_loading``: ``start_load_kv`` returns without waiting for the stream's earlier work
    (TRT-LLM's executor goes on); the loading thread waits for it, then loads, and the output equals
    recompute's."""
    lmcache_env.setenv("LMCACHE_POOL_SHARING", sharing)
    lmcache_env.setenv("LMCACHE_ENABLE_ASYNC_LOADING", "True")
    loading = threading.local()  # set while this thread is in the back-end's load (start_load_kv)
    load, stream_wait = ServerTransfers.load, torch.cuda.Stream.synchronize

    def watched(backend: ServerTransfers, *args: Any, **kwargs: Any) -> Any:
        loading.active = True
        try:
            return load(backend, *args, **kwargs)
        finally:
            loading.active = False

    def unwaited(stream: torch.cuda.Stream) -> None:
        assert not getattr(loading, "active", False), "start_load_kv waited for the stream"
        stream_wait(stream)

    monkeypatch.setattr(ServerTransfers, "load", watched)
    monkeypatch.setattr(torch.cuda.Stream, "synchronize", unwaited)
    seed_scenario(mp_server.ipc_url, device, start=41)


@pytest.mark.parametrize("device", DEVICES)
def test_seed_scenario_with_the_l1_passed_by_descriptor(
    lmcache_env, caplog, monkeypatch, device: str
) -> None:
    """``--l1-memory fd``: the worker maps the server's slabs from descriptors its channel passes (the
    CUDA driver's host memory where the server has a GPU, memfds elsewhere), never by a /dev/shm name;
    the third request hits and its output equals recompute's."""

    def by_name(*args: object, **kwargs: object) -> None:
        raise AssertionError("an L1 slab was mapped by its /dev/shm name")

    monkeypatch.setattr("lmcache.server.slab_mappings.map_slab", by_name)
    workdir = Path(tempfile.mkdtemp(prefix="lmfd-", dir="/tmp"))
    server = ServerProcess(workdir, None, "--chunk-size", "64", "--l1-memory", "fd").start()
    reset_process_connections()
    try:
        lmcache_env.setenv("LMCACHE_POOL_SHARING", "shared-l1")
        caplog.set_level(logging.DEBUG, logger="lmcache")
        seed_scenario(server.ipc_url, device, start=31)
        kind = "cuda" if torch.cuda.is_available() else "memfd"  # the server's host decides
        assert f"in {kind} slabs passed to workers by descriptor" in server.log()
        with CacheServerClient(server.ipc_url, timeout_s=10) as client:
            assert client.stats().l1_memory == f"fd-{kind}"
        assert "dropped a save" not in caplog.text
    finally:
        reset_process_connections()
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def test_tcp_url_works_too(mp_server) -> None:
    p = prompt(200, start=3)
    ReplayExecutor(llm_args("lmcache-mp", server_url=mp_server.tcp_url), MODEL).generate([p], 3)
    again = ReplayExecutor(llm_args("lmcache-mp", server_url=mp_server.tcp_url), MODEL).generate([p], 3)[0]
    assert again.num_connector_matched_tokens == 192
    assert_same_output(again, baseline([p], 3)[0])


def test_two_engine_processes_share_one_server(mp_server) -> None:
    writer = run_engine_process(mp_server, seed=4, length=300, mode="exit")
    first = read_output(writer)
    assert writer.wait(timeout=120) == 0 and first.matched == 0
    reader = run_engine_process(mp_server, seed=4, length=300, mode="exit")
    again = read_output(reader)
    assert reader.wait(timeout=120) == 0
    want = baseline([prompt(300, start=4)], 4)[0]
    assert again.matched == 256 and again.tokens == first.tokens == want.tokens
    assert again.logits == first.logits == logits_digest(want)


@pytest.mark.parametrize("mp_server", [("--client-timeout-s", "3")], indirect=True, ids=["client-timeout-3"])
def test_engine_killed_mid_run_is_reaped_and_its_chunks_stay(mp_server) -> None:
    victim = run_engine_process(mp_server, seed=5, length=200, mode="hang")
    first = read_output(victim)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    with CacheServerClient(mp_server.ipc_url, timeout_s=10) as probe:
        deadline = time.monotonic() + 60
        while probe.stats().instances and time.monotonic() < deadline:
            time.sleep(0.2)
        assert probe.stats().instances == []  # the dead engine's mapping and pins were released
    survivor = ReplayExecutor(llm_args("lmcache-mp", server_url=mp_server.ipc_url), MODEL)
    again = survivor.generate([prompt(200, start=5)], 4)[0]
    assert again.num_connector_matched_tokens == 192 and again.tokens == first.tokens
    assert logits_digest(again) == first.logits  # what the dead engine saved, bit for bit


@pytest.mark.parametrize(
    ("mp_server", "sharing"),
    [((), "export"), (("--l1-memory", "shm"), "shared-l1"), ((), "shared-l1")],
    indirect=["mp_server"],
    ids=["export", "shared-l1-shm", "shared-l1-fd"],
)
def test_server_restart_keeps_output_correct_and_hits_resume(mp_server, lmcache_env, caplog, sharing) -> None:
    """Killed while the workers hold its pools' mappings (export) or its L1 slabs (shared-l1, named or
    passed by descriptor): mappings of the dead server's slabs are never copied into again."""
    lmcache_env.setenv("LMCACHE_POOL_SHARING", sharing)
    caplog.set_level(logging.WARNING, logger="lmcache")
    executor = ReplayExecutor(llm_args("lmcache-mp", server_url=mp_server.ipc_url, max_tokens=512), MODEL)
    p, q = prompt(200, start=6), prompt(200, start=7)
    executor.generate([p], 3)
    mp_server.kill()
    # Server down: the engine keeps serving, without cache, output unchanged.
    down = [executor.generate([r], 3)[0] for r in (q, prompt(200, start=8), prompt(200, start=9))]
    for got, want in zip(down, baseline([q, prompt(200, start=8), prompt(200, start=9)], 3), strict=True):
        assert_same_output(got, want)
        assert got.num_connector_matched_tokens == 0
    # The outage is said once per kind of call, not once per request. Lookups of prompts the server
    # never held may not ask it (its presence counts say so), so saves may be the first to notice.
    said = caplog.text
    assert "not answering lookups" in said or "dropped a save" in said
    assert said.count("not answering lookups") <= 1 and said.count("dropped a save") <= 1
    mp_server.start()
    # The first request after the restart re-registers the worker and stores on the fresh (empty)
    # server; another engine process, whose mappings are all of the new server, hits and loads what
    # that store wrote (not what a mapping of the dead server's slabs would have kept).
    executor.generate([q], 3)
    reader = run_engine_process(mp_server, seed=7, length=200, mode="exit")
    again = read_output(reader)
    assert reader.wait(timeout=120) == 0
    want = baseline([q], 4)[0]
    assert again.matched == 192 and again.tokens == want.tokens and again.logits == logits_digest(want)


def test_a_worker_that_cannot_map_the_l1_regions_drops_its_saves_loudly(
    mp_server, lmcache_env, caplog, monkeypatch
) -> None:
    """Shared-L1 across users (or an unshared /dev/shm): each save is refused by the worker's own
    region check; the engine keeps serving correct output, with a warning and no exception."""
    from lmcache.shm_slabs import ShmSlabError

    def refuse(*args: object, **kwargs: object) -> None:
        raise ShmSlabError("L1 region is owned by another uid; run the worker as the server's user")

    monkeypatch.setattr("lmcache.server.slab_mappings.map_slab", refuse)  # --l1-memory shm
    monkeypatch.setattr("lmcache.server.slab_mappings.map_descriptor", refuse)  # fd, the default
    lmcache_env.setenv("LMCACHE_POOL_SHARING", "shared-l1")
    caplog.set_level(logging.WARNING, logger="lmcache")
    a = prompt(520, start=21)
    args = llm_args("lmcache-mp", max_tokens=640, server_url=mp_server.ipc_url)
    executor = ReplayExecutor(args, MODEL)
    first = executor.generate([a], 8)[0]
    again = executor.generate([a], 8)[0]
    assert "dropped a save" in caplog.text and "run the worker as the server's user" in caplog.text
    assert again.num_connector_matched_tokens == 0  # nothing was published
    want = baseline([a], 8, max_tokens=640)[0]
    assert_same_output(first, want)
    assert_same_output(again, want)
    with CacheServerClient(mp_server.ipc_url, timeout_s=20.0) as client:
        stats = client.stats()
        assert stats.engine.l1.chunks == 0 and sum(i.leased_slots for i in stats.instances) > 0
        reset_process_connections()  # the worker unregisters: its lease goes too
        assert client.stats().engine.l1.used_bytes == 0  # the reserved slots went back


def test_a_save_that_fails_in_the_worker_is_dropped_with_a_warning(
    mp_server, lmcache_env, caplog, monkeypatch
) -> None:
    """An unexpected error in a save (a bug, host memory gone) loses that save only, and says so: the
    saver thread's future is only polled for completion, so nothing else would ever report it."""

    def broken_store(*args: object, **kwargs: object) -> int:
        raise RuntimeError("host memory gone")

    monkeypatch.setattr(CacheServerClient, "store", broken_store)
    caplog.set_level(logging.WARNING, logger="lmcache")
    a = prompt(520, start=22)
    args = llm_args("lmcache-mp", max_tokens=640, server_url=mp_server.ipc_url)
    executor = ReplayExecutor(args, MODEL)
    out = executor.generate([a], 8)[0]
    assert "a save failed and was dropped (RuntimeError: host memory gone)" in caplog.text
    assert_same_output(out, baseline([a], 8, max_tokens=640)[0])
    assert executor.manager is not None and not executor.manager.has_pending_transfers


def test_engine_starts_and_serves_while_the_server_is_down(lmcache_env, tmp_path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="lmcache")
    reset_process_connections()
    args = llm_args("lmcache-mp", server_url=f"ipc://{tmp_path}/nobody.sock")
    p = prompt(150, start=11)
    out = ReplayExecutor(args, MODEL).generate([p], 3)[0]
    assert out.num_connector_matched_tokens == 0
    assert_same_output(out, baseline([p], 3)[0])
    assert "cannot reach the cache server" in caplog.text
    reset_process_connections()


def test_server_restart_with_disk_tier_serves_what_it_stored_before(lmcache_env, tmp_path) -> None:
    config = tmp_path / "server.yaml"
    config.write_text(f"local_disk: {tmp_path}/l2\nmax_local_disk_size: 0.1\n")
    workdir = Path(tempfile.mkdtemp(prefix="lmmp-", dir="/tmp"))
    server = ServerProcess(workdir, None, "--chunk-size", "64", "--config", str(config)).start()
    reset_process_connections()
    try:
        p = prompt(300, start=12)
        writer = ReplayExecutor(llm_args("lmcache-mp", server_url=server.ipc_url), MODEL)
        first = writer.generate([p], 4)[0]
        assert server.kill(signal.SIGTERM) == 0  # a clean stop flushes the disk writes
        # A lookup while the server is down times out: the process's client is now failing fast.
        assert writer.generate([prompt(300, start=13)], 4)[0].num_connector_matched_tokens == 0
        server.start()
        with CacheServerClient(server.ipc_url, timeout_s=10.0) as client:  # its disk index rebuilt
            wait_until(lambda: client.stats().engine.tier("disk").state is None, "the disk tier's scan")
        again = ReplayExecutor(llm_args("lmcache-mp", server_url=server.ipc_url), MODEL).generate([p], 4)[0]
        assert again.num_connector_matched_tokens == 256
        assert_same_output(again, first)
    finally:
        reset_process_connections()
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
