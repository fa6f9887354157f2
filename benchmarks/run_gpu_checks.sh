#!/usr/bin/env bash
# The GPU runs behind benchmarks/RESULTS.md, on a CUDA machine (run from the repo root):
#   benchmarks/run_gpu_checks.sh OUTDIR [modes] [tests] [transfer] [adapters] [fill] [fd] [engines]
#       [latency] [pinning] [ttft] [overhead] [workload]
# (default: all). The tests marked gpu (pinned memory, side streams, CUDA IPC between processes), then the
# benchmarks; each part writes its JSON and log into OUTDIR, so the parts can run as separate calls.
# `modes` alone is issue 13's acceptance in one call (a few minutes on an H200): the shared-L1 GPU tests,
# gpu_mp_check.py with both pool-sharing modes for every shape, where a shared-L1 transfer spends its time
# (transfer_timeline.py), and TTFT at 16k in-process vs each mode:
#   benchmarks/run_gpu_checks.sh "$OUT" modes
# The exit status is non-zero if any part failed (each part's status is in OUTDIR/status.txt).
set -u
out=${1:-gpu-results}
shift || true
parts=${*:-modes tests transfer adapters fill fd engines latency pinning ttft overhead workload}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/card.txt"
git log -1 --format=%H 2>/dev/null | tee "$out/commit.txt"
df -B1 /dev/shm | tee "$out/dev_shm.txt"  # the shared-L1 mode's L1 lives there
failed=0
: >"$out/status.txt"
for part in $parts; do
    echo "== $part" | tee -a "$out/log.txt"
    case $part in
    modes)
        status=0
        python3 -m pytest -q -p no:cacheprovider -m gpu tests/server/test_shared_l1_cuda.py \
            >"$out/modes_tests.txt" 2>&1 || status=1
        tail -5 "$out/modes_tests.txt"
        python3 benchmarks/gpu_mp_check.py --out "$out/mp_modes.json" || status=1
        python3 benchmarks/transfer_timeline.py --out "$out/transfer_timeline.json" || status=1
        python3 benchmarks/bench_ttft.py --device cuda --mp --no-disk --lengths 16384 --repeats 5 \
            --out "$out/ttft_modes_16k.json" || status=1
        exit $status ;;
    tests)
        python3 -m pytest -q -p no:cacheprovider -m gpu tests >"$out/gpu_tests.txt" 2>&1
        status=$?
        tail -5 "$out/gpu_tests.txt"
        exit $status ;;
    transfer)
        python3 benchmarks/bench_engine.py --tokens 65536 --repeats 5 --out "$out/engine_qwen_t32_64k.json"
        for model in qwen2-1.5b llama-3.1-8b; do
            for tpb in 32 64; do
                python3 benchmarks/bench_engine.py --tokens 16384 --repeats 10 --model $model \
                    --tokens-per-block $tpb --out "$out/engine_${model}_t${tpb}_16k.json"
            done
        done
        python3 benchmarks/bench_layered.py --out "$out/layered.json"  # through the server: `modes`
        python3 benchmarks/bench_row_dma.py --shm --out "$out/row_dma.json" ;;  # the copy engine's own ceiling
    adapters)
        python3 benchmarks/bench_adapters.py --preset lmcache --out "$out/adapters_lmcache.json"
        python3 benchmarks/bench_adapters.py --preset lmcache --layer-hooks --mixed \
            --out "$out/adapters_lmcache_layer_hooks.json"
        for mode in export shared-l1; do
            LMCACHE_POOL_SHARING=$mode python3 benchmarks/bench_adapters.py --preset lmcache-mp \
                --out "$out/adapters_mp_$mode.json"
        done
        LMCACHE_POOL_SHARING=shared-l1 python3 benchmarks/bench_adapters.py --preset lmcache-mp --layer-hooks \
            --mixed --out "$out/adapters_mp_shared-l1_layer_hooks.json"
        # saves as TRT-LLM hands them over: the forward still running when wait_for_save is called
        python3 benchmarks/bench_adapters.py --preset lmcache --forward-ms 20 \
            --out "$out/adapters_lmcache_forward.json"
        LMCACHE_POOL_SHARING=shared-l1 python3 benchmarks/bench_adapters.py --preset lmcache-mp --forward-ms 20 \
            --out "$out/adapters_mp_shared-l1_forward.json"
        # and as TRT-LLM's overlap scheduler waits for the previous tokens before get_finished (D67)
        python3 benchmarks/bench_adapters.py --preset lmcache --forward-ms 20 --overlap-scheduler --mixed \
            --out "$out/adapters_lmcache_overlap.json"
        LMCACHE_POOL_SHARING=shared-l1 python3 benchmarks/bench_adapters.py --preset lmcache-mp --forward-ms 20 \
            --overlap-scheduler --mixed --out "$out/adapters_mp_shared-l1_overlap.json" ;;
    fill)  # saves while a cold L1 first fills, no warm-up, traced: what overlapped each save's copies (D82)
        for ms in 150 20; do
            python3 benchmarks/fill_timeline.py --forward-ms $ms --overlap-scheduler --out "$out/fill_lmcache_f$ms.json"
            LMCACHE_POOL_SHARING=shared-l1 python3 benchmarks/fill_timeline.py --preset lmcache-mp --forward-ms $ms \
                --overlap-scheduler --out "$out/fill_mp_shared-l1_f$ms.json"
        done ;;
    fd)  # the server's L1 passed by descriptor against /dev/shm regions (D86), alternating, while L1 fills
        run=0
        for memory in fd shm fd shm; do
            run=$((run + 1))
            LMCACHE_L1_MEMORY=$memory LMCACHE_POOL_SHARING=shared-l1 python3 benchmarks/fill_timeline.py \
                --preset lmcache-mp --forward-ms 20 --overlap-scheduler --out "$out/fill_mp_${memory}_$run.json"
        done ;;
    engines)  # with LMCACHE_L1_MEMORY=fd set, the server passes its L1 by descriptor
        python3 benchmarks/multi_engine.py --device cuda --mixed --out "$out/engines.json"
        # as TRT-LLM's executor hands saves over: the next request's host work beside the last save
        python3 benchmarks/multi_engine.py --device cuda --mixed --pipelined-saves \
            --out "$out/engines_pipelined.json" ;;
    latency)
        python3 benchmarks/bench_mp_latency.py --out "$out/mp_latency.json"
        for preset in lmcache lmcache-mp; do
            python3 benchmarks/bench_lookup.py --preset $preset --out "$out/lookup_$preset.json"
        done
        # exported requests waiting for workers' forwards: their cost to the server's other work (D96)
        python3 benchmarks/bench_forward_waits.py --device cuda --waiters 1 4 8 16 32 \
            --out "$out/forward_waits.json" ;;
    pinning)
        python3 benchmarks/bench_pinning.py --out "$out/pinning.json" ;;
    ttft)
        python3 benchmarks/bench_ttft.py --device cuda --mp --layerwise --out "$out/ttft.json" ;;
    overhead)
        python3 benchmarks/bench_overhead.py --device cuda --repeats 3 \
            --out "$out/overhead.json" ;;
    workload)
        python3 benchmarks/bench_workload.py --device cuda --out "$out/workload.json" ;;
    *)
        echo "unknown part $part" >&2; exit 2 ;;
    esac 2>&1 | tee -a "$out/log.txt"
    status=${PIPESTATUS[0]}
    echo "$part $status" >>"$out/status.txt"
    [ "$status" -eq 0 ] || failed=1
done
exit $failed
