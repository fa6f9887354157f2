"""The multi-process connector when the cache server comes (back) with settings that do not fit the
engine: another --chunk-size than LMCACHE_CHUNK_SIZE, a --pool-sharing mode the pools cannot use,
another protocol version. At bring-up that fails fast; later the engine serves without cache, saying
why at ERROR, never loads or saves under the other layout, and uses the cache again once a server
that fits is back."""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.e2e import CHUNK, MODEL, assert_same_output, baseline, llm_args, prompt
from support.server_process import OTHER_VERSION_SERVER, ServerProcess, wait_until

from lmcache.integration.tensorrt_llm import server_backend
from lmcache.integration.tensorrt_llm.tensorrt_mp_adapter import reset_process_connections
from lmcache.server.client import CacheServerClient
from lmcache.testing.trtllm_replay import ReplayExecutor


@pytest.fixture
def workdir(lmcache_env) -> Iterator[Path]:
    # Every call of an unregistered engine tries to register (not once per REGISTER_RETRY_S): what a
    # round finds does not depend on how long the previous one took.
    lmcache_env.setattr(server_backend, "REGISTER_RETRY_S", 0.0)
    path = Path(tempfile.mkdtemp(prefix="lmms-", dir="/tmp"))
    reset_process_connections()
    yield path
    reset_process_connections()
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def servers(workdir: Path) -> Iterator[dict[str, ServerProcess]]:
    """A server that fits the engine ("fits") and one per setting that does not, one at a time on one
    ipc path."""
    fits = ServerProcess(workdir, None, "--chunk-size", str(CHUNK))
    others = {
        "chunk-size": ServerProcess(workdir, fits.port, "--chunk-size", str(CHUNK // 2)),
        "pool-sharing": ServerProcess(
            workdir, fits.port, "--chunk-size", str(CHUNK), "--pool-sharing", "shared-l1"
        ),
        "small-l1": ServerProcess(workdir, fits.port, "--chunk-size", str(CHUNK), "--l1-size-gb", "0.000001"),
        "protocol": ServerProcess(workdir, fits.port, "--chunk-size", str(CHUNK), entry=OTHER_VERSION_SERVER),
    }
    yield {"fits": fits, **others}
    for server in (fits, *others.values()):
        server.stop()


SAID = {
    "chunk-size": f"{CHUNK // 2} (its --chunk-size) but this engine has LMCACHE_CHUNK_SIZE={CHUNK}",
    "pool-sharing": "--pool-sharing shared-l1",
    "small-l1": "--l1-size-gb",
    "protocol": "protocol version mismatch",
}


def _executor(server: ServerProcess) -> ReplayExecutor:
    """A small device pool: a prompt run again after another one is looked up in the cache server."""
    return ReplayExecutor(llm_args("lmcache-mp", server_url=server.ipc_url, max_tokens=256), MODEL)


def _run_a_b_a(executor: ReplayExecutor, start: int) -> int:
    """Tokens the connector matched for ``a`` run again; every output as without a connector."""
    a, b = prompt(200, start=start), prompt(200, start=start + 1)
    outs = [executor.generate([p], 3)[0] for p in (a, b, a)]
    for got, want in zip(outs, baseline([a, b, a], 3, max_tokens=256), strict=True):
        assert_same_output(got, want)
    return outs[2].num_connector_matched_tokens


def _stored_chunks(server: ServerProcess) -> int:
    with CacheServerClient(server.ipc_url, timeout_s=20.0, heartbeat_interval_s=0) as probe:
        return probe.stats().engine.l1.chunks


def _registered_with(server: ServerProcess) -> None:
    """Wait until the engine's pools are registered with ``server`` (a pool the client holds registered
    with a server that did not fit is registered again by its heartbeat, within a second)."""
    with CacheServerClient(server.ipc_url, timeout_s=20.0, heartbeat_interval_s=0) as probe:
        wait_until(lambda: probe.stats().instances, "the engine registered with the server that fits")


def _errors(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)


@pytest.mark.parametrize("sharing", ["export", "shared-l1"])
def test_restart_with_another_chunk_size_neither_loads_nor_saves_then_recovers(
    servers, lmcache_env, caplog, sharing
) -> None:
    lmcache_env.setenv("LMCACHE_POOL_SHARING", sharing)
    caplog.set_level(logging.WARNING, logger="lmcache")
    fits, other = servers["fits"], servers["chunk-size"]
    fits.start()
    executor = _executor(fits)
    assert _run_a_b_a(executor, start=30) > 0
    fits.kill()
    other.start()
    assert _run_a_b_a(executor, start=32) == 0
    assert _stored_chunks(other) == 0  # nothing saved under the server's 32-token chunks
    assert SAID["chunk-size"] in _errors(caplog) and f"--chunk-size {CHUNK}" in _errors(caplog)
    assert len(_errors(caplog).splitlines()) == 1  # said once, not once per request
    other.kill()
    fits.start()
    _registered_with(fits)  # by itself
    assert _run_a_b_a(executor, start=34) > 0  # hits again


@pytest.mark.parametrize("case", list(SAID))
def test_a_server_that_does_not_fit_never_crashes_the_engine_first_reached_or_restarted(
    servers, lmcache_env, caplog, case
) -> None:
    """The engine starts while the server is down; a server that does not fit comes up, then one that
    fits, then again one that does not (a restart), and again one that fits."""
    lmcache_env.setenv("LMCACHE_POOL_SHARING", "export")
    caplog.set_level(logging.WARNING, logger="lmcache")
    fits, other = servers["fits"], servers[case]
    executor = _executor(fits)
    for start in (40, 44):
        other.start()
        assert _run_a_b_a(executor, start=start) == 0
        assert SAID[case] in _errors(caplog)  # what does not fit, and what to do, at ERROR
        caplog.clear()
        other.kill()
        fits.start()
        executor.generate([prompt(200, start=start + 2)], 3)  # registers with the server that fits
        _registered_with(fits)
        assert _run_a_b_a(executor, start=start + 2) > 0
        fits.kill()


def test_bring_up_against_a_server_of_another_chunk_size_fails_fast(servers, lmcache_env) -> None:
    other = servers["chunk-size"]
    other.start()
    with pytest.raises(ValueError, match=rf"--chunk-size\) but this process has LMCACHE_CHUNK_SIZE={CHUNK};"):
        _executor(servers["fits"])
    with CacheServerClient(other.ipc_url, timeout_s=20.0, heartbeat_interval_s=0) as probe:
        assert probe.stats().instances == []  # what the failed bring-up registered is taken back
