#!/usr/bin/env bash
# The GPU runs behind benchmarks/RESULTS.md, in one go on a CUDA machine (run from the repo root):
#   benchmarks/run_gpu_checks.sh OUTDIR
# CUDA tests (pinned memory, side streams, CUDA IPC between processes), then the benchmarks.
set -u
out=${1:-gpu-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/card.txt"
git log -1 --format=%H 2>/dev/null | tee "$out/commit.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/storage/test_tier_cuda.py \
    tests/integration -k "cuda or test_cuda or tier_cuda" 2>&1 | tail -5 | tee "$out/pytest_cuda.txt"
python3 benchmarks/bench_engine.py --tokens 16384 --repeats 10 --out "$out/bench_engine_16k.json"
python3 benchmarks/bench_engine.py --tokens 65536 --repeats 5 --out "$out/bench_engine_64k.json"
python3 benchmarks/gpu_mp_check.py --out "$out/mp_check.json"
