#!/usr/bin/env bash
# The GPU runs behind benchmarks/RESULTS.md, on a CUDA machine (run from the repo root):
#   benchmarks/run_gpu_checks.sh OUTDIR [tests] [transfer] [latency] [ttft] [overhead] [workload]   (default: all)
# The tests marked gpu (pinned memory, side streams, CUDA IPC between processes), then the benchmarks; each
# part writes its JSON and log into OUTDIR, so the parts can run as separate calls.
set -u
out=${1:-gpu-results}
shift || true
parts=${*:-tests transfer latency ttft overhead workload}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/card.txt"
git log -1 --format=%H 2>/dev/null | tee "$out/commit.txt"
for part in $parts; do
    echo "== $part" | tee -a "$out/log.txt"
    case $part in
    tests)
        python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tail -5 ;;
    transfer)
        python3 benchmarks/bench_engine.py --tokens 65536 --repeats 5 --out "$out/engine_qwen_t32_64k.json"
        for model in qwen2-1.5b llama-3.1-8b; do
            for tpb in 32 64; do
                python3 benchmarks/bench_engine.py --tokens 16384 --repeats 10 --model $model \
                    --tokens-per-block $tpb --out "$out/engine_${model}_t${tpb}_16k.json"
                python3 benchmarks/gpu_mp_check.py --tokens 16384 --model $model --tokens-per-block $tpb \
                    --out "$out/mp_${model}_t${tpb}_16k.json"
            done
        done
        python3 benchmarks/gpu_mp_check.py --tokens 32768 --out "$out/mp_qwen2-1.5b_t32_32k.json" ;;
    latency)
        python3 benchmarks/bench_mp_latency.py --out "$out/mp_latency.json" ;;
    ttft)
        python3 benchmarks/bench_ttft.py --device cuda --mp --out "$out/ttft.json" ;;
    overhead)
        python3 benchmarks/bench_overhead.py --device cuda --repeats 3 \
            --out "$out/overhead.json" ;;
    workload)
        python3 benchmarks/bench_workload.py --device cuda --out "$out/workload.json" ;;
    *)
        echo "unknown part $part" >&2; exit 2 ;;
    esac 2>&1 | tee -a "$out/log.txt"
done
