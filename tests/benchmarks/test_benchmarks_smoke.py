"""Smoke runs of the benchmarks at CPU sizes: they must not crash and must write their JSON.

No timing is asserted. The Redis variant of ``bench_ttft.py`` (``--redis-url``) is not run here at
all (it would need a redis-server); the multi-process variant (``--mp``, a cache server
subprocess per pool-sharing mode) and the cold-disk variant are.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks"
SMALL = ["--small", "--device", "cpu", "--tokens-per-block", "16", "--chunk-size", "64"]


def run_bench(
    script: str,
    out: Path,
    *extra: str,
    model_args: list[str] = SMALL,
    env_extra: dict[str, str] | None = None,
) -> dict:
    env = dict(os.environ, **(env_extra or {}))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["LMCACHE_LOG_LEVEL"] = "WARNING"
    env["OMP_NUM_THREADS"] = "1"  # tiny matmuls; spinning OpenMP threads only fight other jobs for cores
    cmd = [sys.executable, str(BENCH / script), *model_args, "--out", str(out), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(out.read_text())


SHAPES = [["--model", "qwen2-1.5b"], ["--model", "llama-3.1-8b", "--tokens-per-block", "64"]]


@pytest.mark.parametrize(("shape", "l1"), [(SHAPES[0], "private"), (SHAPES[1], "shm")])
def test_bench_engine(tmp_path: Path, shape: list[str], l1: str) -> None:
    args = ["--tokens", "512", "--repeats", "1", *(["--shm-l1"] if l1 == "shm" else [])]
    data = run_bench("bench_engine.py", tmp_path / "e.json", *args, model_args=shape)
    assert data["l1_memory"] == l1
    for blocks in ("adjacent_blocks", "scattered_blocks"):
        assert data[blocks]["bytes_identical"] is True
        assert data[blocks]["store_gbps"] > 0 and data[blocks]["retrieve_gbps"] > 0
    assert data["lookup"]["lookup_hit_8192_p50_us"] > 0
    beside = data["store_beside_retrieve"]
    assert beside["store_then_retrieve_ratio"] > 0 and beside["retrieve_then_store_ratio"] > 0
    assert beside["store_host_ms"] > 0 and beside["retrieve_host_ms"] > 0


def test_bench_tiers_and_mp_latency_and_model(tmp_path: Path) -> None:
    tiers = run_bench(
        "bench_tiers.py", tmp_path / "t.json", "--chunks", "4", "--no-redis", "--repeats", "1",
        "--read-threads", "1", model_args=[],
    )  # fmt: skip
    assert tiers
    latency = run_bench(
        "bench_mp_latency.py", tmp_path / "l.json", "--sizes", "1024", "--repeats", "20", "--warmup", "5",
        model_args=[],
    )  # fmt: skip
    assert latency
    model = run_bench("prefill_model.py", tmp_path / "m.json", "--tokens", "64", "--repeats", "1")
    assert model["prefill"][0]["tokens"] == 64


def test_bench_disk_startup(tmp_path: Path) -> None:
    data = run_bench(
        "bench_disk_startup.py", tmp_path / "d.json", "--files", "40", "--repeats", "1", model_args=[]
    )
    for phase in ("warm_foreground", "warm_background", "cold_foreground", "cold_background"):
        (run,) = data[phase]
        assert run["chunks"] == 40 and run["indexed_s"] >= run["built_s"] > 0


def test_bench_ttft(tmp_path: Path) -> None:
    args = ("--repeats", "2", "--mp", "--disk-cold", "--layerwise")
    data = run_bench("bench_ttft.py", tmp_path / "ttft.json", *args)
    for key in ("card", "device", "model", "dtype", "prompt_lengths", "tiers", "results", "checks"):
        assert key in data
    assert data["prompt_lengths"] == [128, 256]
    hooked = ["l1_hooked", "l1_layerwise", "mp_shared-l1_hooked", "mp_shared-l1_layerwise"]
    assert data["tiers"] == ["recompute", "l1", "disk", "mp_export", "mp_shared-l1", "disk_cold", *hooked]
    rows = {(r["tokens"], r["tier"]): r for r in data["results"]}
    assert set(rows) == {(n, t) for n in (128, 256) for t in data["tiers"]}
    for (n, tier), r in rows.items():
        assert r["median_ms"] > 0 and r["speedup"] > 0
        if tier != "recompute":
            assert r["kv_rows_bitwise_equal"] and r["logits_bitwise_equal_reference"]
            assert r["loaded_tokens"] == n - 16 and r["prefilled_tokens"] == 16
        if tier.startswith("mp_") and tier.count("_") == 1:
            assert r["vs_inprocess"] > 0
        assert ("vs_hooked" in r) == tier.endswith("_layerwise")
    assert rows[(128, "mp_shared-l1")]["vs_export"] > 0


def test_bench_overhead(tmp_path: Path) -> None:
    data = run_bench("bench_overhead.py", tmp_path / "overhead.json", "--repeats", "2")
    it = data["connector_iteration"]
    assert set(it) == {"prefill", "prefill_no_overlap", "decode"}
    for r in it.values():
        assert {"no_connector_ms", "connector_ms", "ratio"} <= set(r)
    assert it["prefill"]["overlap_scheduler"] and not it["prefill_no_overlap"]["overlap_scheduler"]
    assert it["prefill"]["stored_chunks"] > 0 and it["prefill_no_overlap"]["stored_chunks"] > 0
    for name in ("prefill", "prefill_no_overlap"):  # a naive save beside the connector
        assert it[name]["plain_copy_ms"] > 0 and it[name]["plain_copy_ratio"] > 0
    saves = data["saves_in_flight"]
    for name in ("prefill_adjacent", "prefill_scattered", "decode_adjacent", "decode_scattered"):
        keys = {"no_saves_ms", "with_saves_ms", "ratio", "store_enqueue_ms", "saves_still_running"}
        assert keys | {"launch_no_saves_ms", "launch_with_saves_ms"} <= set(saves[name])
        assert saves[name]["steps"] == (2 if name.startswith("decode") else 1)  # --small: 2 decode steps


def test_bench_workload(tmp_path: Path) -> None:
    data = run_bench("bench_workload.py", tmp_path / "workload.json")
    assert set(data["workloads"]) == {"multi_round_chat", "long_doc_qa"}
    for w in data["workloads"].values():
        assert w["working_set_tokens"] > w["gpu_pool_tokens"]
        for variant in ("no_connector", "connector"):
            r = w[variant]
            assert {"hit_rate", "device_hit_rate", "lmcache_hit_rate", "mean_ttft_ms", "total_s"} <= set(r)
        assert w["no_connector"]["lmcache_hit_rate"] == 0
        assert w["connector"]["lmcache_hit_rate"] > 0
        assert w["connector"]["hit_rate"] > w["no_connector"]["hit_rate"]


def _load_bench(script: str, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN202
    """``benchmarks/<script>.py`` as a module (registered until the test ends: dataclasses need it)."""
    spec = importlib.util.spec_from_file_location(f"{script}_under_test", BENCH / f"{script}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_bench_ttft_fails_on_a_wrong_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A load that puts one wrong value into the pool must fail the benchmark, not just slow it."""
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script prepends benchmarks/ and the repo
    bench = _load_bench("bench_ttft", monkeypatch)
    real_load = bench.EngineTier.load

    def corrupt_load(self, tokens, blocks, end, rid, layers=None):  # noqa: ANN001, ANN202
        loaded = real_load(self, tokens, blocks, end, rid, layers)
        self.pool[blocks[0], 0, 0, 0] += 1.0
        return loaded

    monkeypatch.setattr(bench.EngineTier, "load", corrupt_load)
    argv = ["bench_ttft.py", *SMALL, "--lengths", "128", "--repeats", "1", "--no-disk"]
    monkeypatch.setattr(sys, "argv", argv + ["--out", str(tmp_path / "x.json")])
    assert bench.main() == 1
    assert "loaded KV rows differ" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_plot_results(tmp_path: Path) -> None:
    ttft = run_bench(
        "bench_ttft.py", tmp_path / "ttft.json", "--repeats", "1", "--lengths", "128,256", "--no-disk"
    )
    assert ttft["tiers"] == ["recompute", "l1"]
    side = {
        "bytes": 1 << 20,
        "copy_d2h_gbps": 50.0,
        "copy_h2d_gbps": 51.0,
        "store_gbps": 45.0,
        "retrieve_gbps": 44.0,
    }
    engine = {
        "device": "cuda",
        "card": "Test GPU",
        "tokens": 1024,
        "adjacent_blocks": side,
        "scattered_blocks": side,
    }
    (tmp_path / "engine.json").write_text(json.dumps(engine))
    outdir = tmp_path / "docs"
    cmd = [sys.executable, str(BENCH / "plot_results.py"), "--ttft", str(tmp_path / "ttft.json")]
    cmd += ["--engine", str(tmp_path / "engine.json"), "--outdir", str(outdir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in ("ttft.png", "bandwidth.png"):
        assert (outdir / name).stat().st_size > 1000


def plot(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(BENCH / "plot_results.py"), *args, "--outdir", str(tmp_path / "docs")]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_plot_results_picks_ttft_tiers_and_joins_overhead_parts(tmp_path: Path) -> None:
    """``--ttft-tiers`` draws the tiers named (an unknown one is refused by name); ``--overhead`` takes
    part (a) and part (b) from two runs' files of one card, and refuses files of two cards."""
    rows = [
        {"tokens": n, "tier": tier, "median_ms": ms, "speedup": 10.0 / ms}
        for n in (1024, 4096)
        for tier, ms in (("recompute", 10.0), ("l1", 2.0), ("l1_layerwise", 1.5))
    ]
    ttft = {"card": "Test GPU", "tiers": ["recompute", "l1", "l1_layerwise"], "prompt_lengths": [1024, 4096]}
    (tmp_path / "ttft.json").write_text(json.dumps({**ttft, "results": rows}))
    proc = plot(tmp_path, "--ttft", str(tmp_path / "ttft.json"), "--ttft-tiers", "recompute", "l1_layerwise")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "docs" / "ttft.png").stat().st_size > 1000
    proc = plot(tmp_path, "--ttft", str(tmp_path / "ttft.json"), "--ttft-tiers", "recompute", "disk")
    assert proc.returncode != 0 and "--ttft-tiers: ['disk'] not in the TTFT file" in proc.stderr

    part_a = {"card": "Test GPU", "connector_iteration": {"prefill": {"ratio": 1.01}}}
    in_flight = {"save_tokens": 32768, "decode_adjacent": {"ratio": 1.02}}
    part_b = {"card": "Test GPU", "saves_in_flight": in_flight}
    for name, data in (("a", part_a), ("b", part_b), ("other", {**part_b, "card": "Other GPU"})):
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
    proc = plot(tmp_path, "--overhead", str(tmp_path / "a.json"), str(tmp_path / "b.json"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "docs" / "overhead.png").stat().st_size > 1000
    proc = plot(tmp_path, "--overhead", str(tmp_path / "a.json"), str(tmp_path / "other.json"))
    assert proc.returncode != 0 and "--overhead: the files differ in card" in proc.stderr
    proc = plot(tmp_path, "--overhead", str(tmp_path / "b.json"), str(tmp_path / "b.json"))
    assert proc.returncode != 0 and "2 files have saves_in_flight" in proc.stderr


@pytest.mark.parametrize(
    "hooks",
    [
        [],
        ["--layer-hooks", "--mixed", "--prefill-ms", "2", "--warmup-s", "0.05", "--forward-ms", "1"],
        ["--mixed", "--forward-ms", "1", "--overlap-scheduler"],
    ],
)
@pytest.mark.parametrize("preset", ["lmcache", "lmcache-mp"])
def test_bench_adapters(tmp_path: Path, preset: str, hooks: list[str]) -> None:
    """Saves, loads and lookups through a preset's adapters, L1 filling then full (CPU sizes); with
    the per-layer hooks called, the loads go layer-wise; with ``--mixed``, saves beside loads; saves
    spaced as prefills, a warm-up before the registration and a forward before each save are
    recorded with the figures; with ``--overlap-scheduler``, a previous forward waited for before
    ``get_finished``."""
    args = ["--preset", preset, "--tokens", "1024", "--l1-size-gb", "0.004", "--repeats", "2", *hooks]
    data = run_bench("bench_adapters.py", tmp_path / "a.json", *args, model_args=["--model", "tiny"])
    assert data["loaded_rows_equal"] is True and data["layer_hooks"] == ("--layer-hooks" in hooks)
    assert data["server_l1_memory"] == ("fd-memfd" if preset == "lmcache-mp" else None)  # the default, CPU
    assert data["overlap_scheduler"] == ("--overlap-scheduler" in hooks)
    spacing = {
        (): (0.0, 0.0, 0.0),
        ("--layer-hooks",): (2.0, 0.05, 1.0),
        ("--overlap-scheduler",): (0.0, 0.0, 1.0),
    }
    variant = tuple(flag for flag in hooks if flag in ("--layer-hooks", "--overlap-scheduler"))
    assert (data["prefill_ms"], data["warmup_s"], data["forward_ms"]) == spacing[variant]
    assert min(data["save_l1_full"]["runs_ms"]) > 0  # timed from the forward's end, which came before
    if "--forward-ms" in hooks:  # each forward measured (its calibration's probes not among them)
        assert data["forward_device_p50_ms"] > 0
    else:
        assert data["forward_device_p50_ms"] is None
    assert data["save_while_l1_fills"]["runs"] == 2 and data["save_l1_full"]["runs"] == 2
    assert len(data["load_l1_full"]["runs_ms"]) == 2 and max(data["load_l1_full"]["runs_ms"]) > 0
    assert data["load_l1_full"]["median_ratio"] > 0 and data["lookup_hit_p50_us"] > 0
    assert 0 < data["load_host_p50_ms"] <= data["load_l1_full"]["median_ms"]
    if hooks:
        assert data["save_beside_load"]["runs"] == 2 and data["bidirectional_gbps"] > 0
        assert 0 < data["save_beside_load_host_p50_ms"] <= data["save_beside_load"]["median_ms"]
    else:
        assert data["save_beside_load"] is None


def test_bench_adapters_refuses_an_overlap_scheduler_without_a_forward(tmp_path: Path) -> None:
    cmd = [sys.executable, str(BENCH / "bench_adapters.py"), "--device", "cpu", "--overlap-scheduler"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--overlap-scheduler needs --forward-ms" in proc.stderr


@pytest.mark.parametrize("preset", ["lmcache", "lmcache-mp"])
def test_bench_lookup(tmp_path: Path, preset: str) -> None:
    """Lookups of misses and hits through a preset's scheduler, back to back and after a gap (CPU sizes)."""
    args = ["--preset", preset, "--lengths", "512", "1024", "--count", "3", "--gap-ms", "1"]
    data = run_bench("bench_lookup.py", tmp_path / "l.json", *args, model_args=["--model", "tiny"])
    for length in ("512", "1024"):
        assert set(data[length]) == {
            "miss_back_to_back_p50_us",
            "miss_after_gap_p50_us",
            "hit_back_to_back_p50_us",
            "hit_after_gap_p50_us",
            "hit_back_to_back_report_p50_us",
            "hit_after_gap_report_p50_us",
        }
        assert all(v > 0 for v in data[length].values())
    assert ("ping_after_gap_p50_us" in data) == (preset == "lmcache-mp")


def test_multi_engine(tmp_path: Path) -> None:
    """Engine processes on one server, each its own pool: ceilings, saves (handed over during a
    forward), loads, a save beside a load, lookups under load (CPU sizes); the server's L1 passed to
    the engines by descriptor (``LMCACHE_L1_MEMORY=fd``), and recorded so."""
    args = ["--tokens", "1024", "--iters", "2", "--engines", "1", "2", "--mixed", "--l1-size-gb", "0.05"]
    args += ["--forward-ms", "1"]
    data = run_bench(
        "multi_engine.py",
        tmp_path / "e.json",
        *args,
        model_args=["--model", "tiny"],
        env_extra={"LMCACHE_L1_MEMORY": "fd"},
    )
    assert data["server_l1_memory"] == "fd-memfd"
    assert [run["engines"] for run in data["runs"]] == [1, 2]
    for run in data["runs"]:
        assert run["rows_equal"] and run["save_gbps"] > 0 and run["load_gbps"] > 0
        after_forward = run["save_after_forward"]
        assert after_forward["count"] == 2 * run["engines"]
        assert 0 < after_forward["worst_ratio"] <= after_forward["median_ratio"]
        assert (
            run["lookup_under_load"]["lookup"]["count"] > 0
            and run["lookup_under_load"]["round_trip"]["count"] > 0
        )
    assert data["mixed"]["rows_equal"] and data["mixed"]["bidirectional_ceiling_gbps"] > 0


def test_concurrent_pools(tmp_path: Path) -> None:
    """Pools copied at once by one process's threads: every path at every pool count, loads checked."""
    args = ["--device", "cpu", "--tokens", "512", "--pools", "1", "2", "--iters", "1"]
    data = run_bench("concurrent_pools.py", tmp_path / "p.json", *args, model_args=[])
    assert data["row_bytes"] == 28 * 2 * 1 * 32 * 128 * 2  # qwen2-1.5b's 2 KV heads over 4 ranks: 1 each
    assert list(data["pools"]) == ["1", "2"]
    assert data["engine_row_dma"] is False and data["row_dma_trial"] is None  # CPU: no trial, no DMA
    for result in data["pools"].values():
        assert result["loads_equal"] is True
        for direction in ("save", "load"):
            assert result[f"{direction}/copy"]["vs_copy"] == 1.0
            for path in ("transfer_kernels", "transfer_row_dma", "engine"):
                figures = result[f"{direction}/{path}"]
                assert figures["GBps"] > 0 and 0 < figures["worst_vs_copy"] <= figures["vs_copy"]


def test_transfer_timeline(tmp_path: Path) -> None:
    """Stores and loads through a shared-L1 server and in-process, each split into the worker's steps
    (CPU sizes: no device batches, the host steps only)."""
    args = ["--shapes", "qwen2-1.5b:32:1024", "--iters", "2", "--l1-size-gb", "0.5"]
    data = run_bench("transfer_timeline.py", tmp_path / "t.json", *args, model_args=["--device", "cpu"])
    (row,) = data["results"]
    for path in ("shared-l1", "in-process"):
        for op in ("store", "load"):
            assert row[path][op]["ratio"] > 0 and len(row[path]["runs"][op]) == 2
    server_store, server_load = row["shared-l1"]["store"]["steps"], row["shared-l1"]["load"]["steps"]
    assert server_store["begin_store_in"] < server_store["wait_stored_out"] <= server_store["send_in"]
    assert server_load["begin_load_in"] < server_load["finish_load_out"] <= server_load["send_in"]


def test_fill_timeline(tmp_path: Path) -> None:
    """bench_adapters' run traced: every save with its time and its overlaps, the run's results (CPU
    sizes: nothing page-locked, no forward)."""
    args = ["--tokens", "1024", "--l1-size-gb", "0.004", "--repeats", "2", "--saves", "3"]
    data = run_bench("fill_timeline.py", tmp_path / "f.json", *args, model_args=["--model", "tiny"])
    assert data["results"]["loaded_rows_equal"] is True
    saves = data["saves"]
    assert len(saves) == data["results"]["l1_bytes"] // data["results"]["bytes_per_request"] + 2
    assert [s["number"] for s in saves] == list(range(1, len(saves) + 1))
    for save in saves:
        assert 0 < save["save_ms"] <= save["end_ms"] - save["start_ms"]
        kinds = ("populate", "register", "driver", "import", "pool_wait")
        assert save["overlapped_ms"] == dict.fromkeys(kinds, 0.0)


def test_fill_timeline_counts_only_what_overlaps_a_saves_copies(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "path", list(sys.path))
    timeline = _load_bench("fill_timeline", monkeypatch)
    spans = [
        timeline.Span("register", "a", 0.0, 10.0),  # 5 ms inside [5, 20]
        timeline.Span("register", "b", 18.0, 30.0),  # 2 ms inside
        timeline.Span("driver", "c", 21.0, 40.0),  # after
        timeline.Span("import", "d", 19.0, 25.0),  # 1 ms inside
        timeline.Span("forward", "main", 0.0, 20.0),  # not page-locking
    ]
    assert timeline.overlap_ms(spans, 5.0, 20.0) == {
        "populate": 0.0,
        "register": 7.0,
        "driver": 0.0,
        "import": 1.0,
        "pool_wait": 0.0,
    }


def test_adapter_rig_load_check_catches_wrong_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """The adapter benchmarks' load compares what it loaded with the pages its prompt was saved from:
    the right rows pass, rows saved for another prompt (or changed since) fail."""
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script prepends benchmarks/ and the repo
    for key, value in {"CHUNK_SIZE": "256", "LOCAL_CPU": "True", "MAX_LOCAL_CPU_SIZE": "0.01"}.items():
        monkeypatch.setenv(f"LMCACHE_{key}", value)
    bench = _load_bench("bench_adapters", monkeypatch)
    args = bench.rig_parser(None, l1_size_gb=0.01).parse_args(["--device", "cpu", "--model", "tiny"])
    args.tokens = 1024
    rig = bench.AdapterRig(args, None)
    first, second = ([int(t) for t in range(seed, seed + 1024)] for seed in (0, 5000))
    *_, first_pages = rig.save(first)
    *_, second_pages = rig.save(second)
    assert rig.load(first, first_pages)[1] and rig.load(second, second_pages)[1]
    assert not rig.load(first, second_pages)[1]  # the same rows, saved in another order
    rig.pool[first_pages[0]] += 1
    assert not rig.load(first, first_pages)[1]


def test_multi_engine_pipelined_saves(tmp_path: Path) -> None:
    """Saves handed over without waiting for the last one to land: every row still loads back equal."""
    args = ["--tokens", "1024", "--iters", "3", "--engines", "2", "--mixed", "--l1-size-gb", "0.05"]
    data = run_bench(
        "multi_engine.py", tmp_path / "e.json", *args, "--pipelined-saves", model_args=["--model", "tiny"]
    )
    assert data["pipelined_saves"] is True
    assert all(run["rows_equal"] and run["save_gbps"] > 0 for run in data["runs"])
    assert data["mixed"]["rows_equal"] and data["mixed"]["save_beside_load_gbps"] > 0


def test_multi_engine_refuses_an_l1_its_loads_would_overflow(tmp_path: Path) -> None:
    """Loads of evicted prompts would be timed as loads: the run is refused before it starts."""
    cmd = [sys.executable, str(BENCH / "multi_engine.py"), "--device", "cpu", "--model", "tiny"]
    cmd += [
        "--tokens",
        "1024",
        "--iters",
        "4",
        "--engines",
        "1",
        "4",
        "--l1-size-gb",
        "0.001",
        "--out",
        str(tmp_path / "e.json"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and not (tmp_path / "e.json").exists()
    assert "--l1-size-gb 0.001 cannot hold the 16 requests" in proc.stderr


def test_bench_forward_waits(tmp_path: Path) -> None:
    args = ["--device", "cpu", "--waiters", "1", "4", "--seconds", "0.2", "--repeats", "10"]
    data = run_bench("bench_forward_waits.py", tmp_path / "w.json", *args, model_args=[])
    for count in ("1", "4"):
        assert data[count]["work_ratio"] > 0
        assert 0 < data[count]["wake_p50_us"] <= data[count]["wake_p99_us"]
