"""Operator metrics and health: /metrics and /health over real HTTP (loopback), in-process and server."""

from __future__ import annotations

import json
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from support.e2e import MODEL, TPB, llm_args, prompt
from support.server_process import CHUNK as SERVER_CHUNK
from support.server_process import MODEL as SERVER_MODEL
from support.server_process import TPB as SERVER_TPB
from support.server_process import ServerProcess, free_port, metrics_base_url, shared_pool

from lmcache import http_endpoint
from lmcache.config import LMCacheEngineConfig
from lmcache.engine import CacheEngine, KeySpace
from lmcache.integration.tensorrt_llm.tensorrt_adapter import process_engine
from lmcache.layout import PoolLayout
from lmcache.server.cli import build_parser
from lmcache.server.client import CacheServerClient
from lmcache.stats import LATENCY_BUCKETS_S, LatencyHistogram
from lmcache.testing.trtllm_replay import ReplayExecutor
from lmcache.transfer import BlockTransfer

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def get(url: str) -> tuple[int, str]:
    """Status and body of a GET (error statuses returned, not raised)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def scrape(base: str) -> Samples:
    status, text = get(base + "/metrics")
    assert status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def health(base: str) -> tuple[int, dict]:
    status, body = get(base + "/health")
    return status, json.loads(body)


def inprocess_endpoint() -> http_endpoint.MetricsEndpoint:
    process_engine()  # starts the endpoint (once per process) when metrics_port is set
    endpoint = http_endpoint.process_endpoint()
    assert endpoint is not None and endpoint.running
    return endpoint


# ---- in-process ---------------------------------------------------------------------------------


def test_inprocess_counters_move_with_the_replay(lmcache_env) -> None:
    lmcache_env.setenv("LMCACHE_METRICS_PORT", "0")
    base = inprocess_endpoint().url
    before = scrape(base)
    p = prompt(300, start=5)
    ReplayExecutor(llm_args(max_tokens=640), MODEL).generate([p], 4)
    first = scrape(base)
    assert value(first, "lmcache_lookups_total") > value(before, "lmcache_lookups_total")
    assert value(first, "lmcache_lookup_requested_tokens_total") >= 300
    assert value(first, "lmcache_stored_chunks_total") >= 4  # 300 tokens: 4 full chunks of 64
    assert value(first, "lmcache_stored_bytes_total") > 0
    assert value(first, "lmcache_l1_chunks") >= 4 and value(first, "lmcache_l1_used_bytes") > 0
    assert value(first, "lmcache_store_duration_seconds_count") >= 1
    hits_before = value(first, "lmcache_lookup_hit_tokens_total")

    # The same prompt on a fresh executor (cold GPU pool): LMCache supplies the prefix.
    ReplayExecutor(llm_args(max_tokens=640), MODEL).generate([p], 4)
    second = scrape(base)
    assert value(second, "lmcache_lookups_total") > value(first, "lmcache_lookups_total")
    assert value(second, "lmcache_lookup_hit_tokens_total") >= hits_before + 256
    assert value(second, "lmcache_retrieved_chunks_total") >= 4
    assert value(second, "lmcache_retrieved_bytes_total") > value(first, "lmcache_retrieved_bytes_total")
    assert value(second, "lmcache_failed_retrieves_total") == 0
    assert value(second, "lmcache_retrieve_duration_seconds_count") >= 1
    assert value(second, "lmcache_lookup_duration_seconds_bucket", le="+Inf") == value(
        second, "lmcache_lookup_duration_seconds_count"
    )
    assert value(second, "lmcache_tier_healthy", tier="l1") == 1
    # Prometheus' own parser accepted the whole page; the process's default registry is untouched.
    from prometheus_client import REGISTRY

    assert REGISTRY.get_sample_value("lmcache_lookups_total") is None


def test_inprocess_health_ok_with_l1_only(lmcache_env) -> None:
    lmcache_env.setenv("LMCACHE_METRICS_PORT", "0")
    base = inprocess_endpoint().url
    status, body = health(base)
    assert status == 200
    assert body["status"] == "ok" and body["tiers"] == {"l1": True} and body["reasons"] == []
    assert body["l1"]["capacity_bytes"] == process_engine().engine.l1.arena.capacity_bytes
    assert get(base + "/nowhere")[0] == 404


def test_inprocess_health_reports_a_dead_remote_tier(lmcache_env, tmp_path: Path) -> None:
    lmcache_env.setenv("LMCACHE_METRICS_PORT", "0")
    lmcache_env.setenv("LMCACHE_LOCAL_DISK", str(tmp_path / "disk"))
    lmcache_env.setenv("LMCACHE_MAX_LOCAL_DISK_SIZE", "0.01")
    lmcache_env.setenv("LMCACHE_REMOTE_URL", f"redis://127.0.0.1:{free_port()}")  # nothing listens there
    base = inprocess_endpoint().url
    engine = process_engine().engine
    try:
        status, body = health(base)
        assert status == 200 and body["tiers"] == {"l1": True, "disk": True, "remote": True}

        # An L1 miss asks the lower tiers; the remote call fails and its circuit breaker opens.
        layout = PoolLayout(
            num_blocks=16,
            num_layers=2,
            kv_factor=2,
            block_elems=TPB * 8,
            tokens_per_block=TPB,
            dtype=torch.float32,
        )
        assert engine.lookup(KeySpace("m", layout), list(range(128))) == 0

        status, body = health(base)
        assert status == 503
        assert body["status"] == "degraded"
        assert body["tiers"] == {"l1": True, "disk": True, "remote": False}
        assert any(r.startswith("remote tier ") for r in body["reasons"])
        samples = scrape(base)
        assert value(samples, "lmcache_tier_healthy", tier="remote") == 0
        assert value(samples, "lmcache_tier_healthy", tier="disk") == 1
        assert value(samples, "lmcache_errors_total", kind="remote_failure") >= 1
        assert value(samples, "lmcache_errors_total", kind="disk_failure") == 0
        assert value(samples, "lmcache_tier_dropped_writes_total", tier="remote") == 0
        assert ("lmcache_tier_capacity_bytes", (("tier", "remote"),)) not in samples  # unknown for Redis
        assert value(samples, "lmcache_tier_hits_total", tier="remote") == 0
        assert value(samples, "lmcache_tier_capacity_bytes", tier="disk") > 0
    finally:
        engine.close(timeout=5)


# ---- the endpoint on its own ----------------------------------------------------------------------


def test_endpoint_start_stop_and_port_zero() -> None:
    engine = CacheEngine(
        LMCacheEngineConfig.from_defaults(chunk_size=64, max_local_cpu_size=0.01), pinned=False
    )
    endpoint = http_endpoint.MetricsEndpoint(engine, port=0).start()
    port = endpoint.port
    assert port > 0 and endpoint.url == f"http://127.0.0.1:{port}"
    assert value(scrape(endpoint.url), "lmcache_lookups_total") == 0
    endpoint.stop()
    assert not endpoint.running
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)


def test_latency_histogram_buckets_are_inclusive_upper_bounds() -> None:
    hist = LatencyHistogram()
    hist.observe(LATENCY_BUCKETS_S[0])  # exactly on the first bound: counted in it ("le")
    hist.observe(LATENCY_BUCKETS_S[-1] * 2)  # above every bound: +Inf only
    snap = hist.snapshot()
    assert snap.counts[0] == 1 and snap.counts[-1] == 1 and snap.count == 2
    assert snap.bounds == LATENCY_BUCKETS_S
    assert snap.total == pytest.approx(LATENCY_BUCKETS_S[0] + LATENCY_BUCKETS_S[-1] * 2)


# ---- the cache server -----------------------------------------------------------------------------


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="lmcm-", dir="/tmp"))  # short: Unix socket paths are limited
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_server_metrics_port_serves_metrics_and_health(workdir: Path) -> None:
    server = ServerProcess(workdir, None, "--metrics-port", "0").start()
    try:
        base = metrics_base_url(server)
        status, body = health(base)
        assert status == 200 and body["status"] == "ok" and body["server"]["connected_instances"] == 0
        assert body["server"]["l1_memory"] == "fd-memfd"  # the default on a CPU host: workers copy into it
        with CacheServerClient(server.ipc_url, timeout_s=20.0) as client:
            pool = shared_pool(seed=7)
            client.register(pool, 0, 1, SERVER_MODEL, SERVER_TPB, pool_sharing="export")
            tokens = list(range(3000, 3000 + 2 * SERVER_CHUNK))
            assert client.store(BlockTransfer(tokens, None, list(range(8)), 0, len(tokens))) == len(tokens)
            assert client.lookup(tokens) == len(tokens)
            samples = scrape(base)
        assert value(samples, "lmcache_server_connected_instances") == 1
        assert value(samples, "lmcache_server_forward_waits") == 0
        assert value(samples, "lmcache_lookups_total") == 1
        assert value(samples, "lmcache_lookup_hit_tokens_total") == len(tokens)
        assert value(samples, "lmcache_stored_chunks_total") == 2
        assert value(samples, "lmcache_server_requests_total") >= 3
        assert value(samples, "lmcache_chunk_size_tokens") == SERVER_CHUNK
        assert value(samples, "lmcache_server_gc_frozen_objects") > 50_000
        for generation in "012":
            assert value(samples, "lmcache_server_gc_collections_total", generation=generation) >= 0
            assert value(samples, "lmcache_server_gc_pause_seconds_total", generation=generation) >= 0
    finally:
        server.stop()


def test_server_metrics_flags() -> None:
    args = build_parser().parse_args([])
    assert args.metrics_port is None and args.metrics_host == "127.0.0.1"
    args = build_parser().parse_args(["--metrics-port", "0", "--metrics-host", "0.0.0.0"])
    assert args.metrics_port == 0 and args.metrics_host == "0.0.0.0"
