"""Smoke run of ``benchmarks/multi_rank.py`` at CPU sizes: two rank processes with CPU pools.

Correctness is asserted (every rank's output and logits bit-equal to a TP=1 run with no
connector, the third request served by the connector, no pin left) for both presets; the
bandwidth mode only has to complete and report its fields (no speed is asserted).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "multi_rank.py"


def run_harness(out: Path, *args: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--ranks",
        "2",
        "--device",
        "cpu",
        "--timeout-s",
        "120",
        "--out",
        str(out),
    ]
    proc = subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"multi_rank.py failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(out.read_text())


@pytest.mark.parametrize(("preset", "mode"), [("lmcache", "v1"), ("lmcache-mp", "v2-res")])
def test_seed_scenario_two_ranks(tmp_path: Path, preset: str, mode: str) -> None:
    data = run_harness(
        tmp_path / "r.json", "--preset", preset, "--scenario", "seed", "--mode", mode, "--prompt-len", "96"
    )
    (run,) = data["runs"]
    assert run["ranks"] == 2 and len(run["devices"]) == 2
    (row,) = run["results"]
    assert (row["scenario"], row["mode"]) == ("seed", mode)
    assert row["checks"] == {
        "third_hit_from_connector": True,
        "first_equal_no_connector": True,
        "third_equal_no_connector": True,
        "nothing_pinned_or_pending": True,
    }
    assert row["connector_matched"] > 0


def test_bandwidth_mode_completes(tmp_path: Path) -> None:
    data = run_harness(
        tmp_path / "b.json", "--bandwidth", "--tokens", "256", "--lookup-tokens", "256", "--iters", "1",
        "--lookups", "5",
    )  # fmt: skip
    (run,) = data["runs"]
    assert run["checks"] == {"loaded_bytes_equal": True, "full_hits": True}
    for key in ("store_GBps", "load_GBps", "copy_d2h_GBps", "copy_h2d_GBps", "store_vs_copy", "load_vs_copy"):
        assert run[key] > 0
    for key in ("lookup_idle_us_p50", "lookup_under_load_us_p50", "lookup_under_load_us_p99"):
        assert key in run
