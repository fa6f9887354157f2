"""``gpu_mp_check.py --quick --device cpu``: both pool-sharing modes side by side, at CPU sizes.

No timing is asserted: the run must pass its own checks (every load bit-equal, each pool registered
in the mode asked for) and write the JSON the GPU run writes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from lmcache.testing import pool_modes

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_mp_check.py"


def run_check(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["LMCACHE_LOG_LEVEL"] = "WARNING"
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=300
    )


def test_quick_cpu_run_compares_both_modes(tmp_path: Path) -> None:
    out = tmp_path / "mp_modes.json"
    proc = run_check("--quick", "--device", "cpu", "--out", str(out))
    assert proc.returncode == 0, f"gpu_mp_check failed:\n{proc.stdout}\n{proc.stderr}"
    data = json.loads(out.read_text())
    assert data["ok"] and data["modes"] == list(pool_modes.MODES)
    assert data["checks"] and all(data["checks"].values())
    assert [r["shape"] for r in data["results"]] == ["qwen2-1.5b t32 1k", "llama-3.1-8b t64 0.5k"]
    for row in data["results"]:
        assert row["export"]["sharing"] == pool_modes.CPU_SHM
        assert row["shared-l1"]["sharing"] == pool_modes.SHARED_L1
        for name in ("engine", *pool_modes.MODES):
            assert row[name]["bytes_equal"]
            for op in ("store", "load"):
                assert row[name][op]["median_ratio"] > 0 and row[name][op]["worst_GBps"] > 0
    assert set(data["lookup"]) == set(pool_modes.MODES)
    for found in data["lookup"].values():
        assert found["ipc"]["hit"] and found["tcp"]["hit"] and found["ipc"]["p50_us"] > 0
    assert "shared-l1" in proc.stdout and "export" in proc.stdout  # the side-by-side table


def test_an_unknown_mode_is_refused_naming_the_known_ones(tmp_path: Path) -> None:
    proc = run_check("--quick", "--device", "cpu", "--modes", "export,ipc", "--out", str(tmp_path / "x.json"))
    assert proc.returncode == 2
    assert "'ipc'" in proc.stderr and "export, shared-l1" in proc.stderr
    assert not (tmp_path / "x.json").exists()
