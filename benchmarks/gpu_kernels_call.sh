#!/usr/bin/env bash
# One device call of the kernels work, in parts, each under a time limit that fits the call:
#
#   cd .gpu && export PYTHONUNBUFFERED=1 && bash benchmarks/gpu_kernels_call.sh times ncu     # call 1
#   cd .gpu && export PYTHONUNBUFFERED=1 && bash benchmarks/gpu_kernels_call.sh memory check  # call 2
#
# parts: env (always first), times (kernel_profile.py: every kernel vs its cuBLAS GEMM, both big shapes,
# B = 16..128), ncu (one launch of each kernel at B = 64 and 128 under Nsight Compute, clocks left alone;
# NCU_TOKENS=16 NCU_BLOCKS=16,64 profiles the decode kernels instead),
# memory (memory_phases.py: a bench_training step per phase, dense vs sparse, and bench_training's order
# of parts), check (the GPU correctness check; check-kernels and check-rest split it over two calls), layer (bench_layer.py, the issue's table), training
# (bench_training.py), training-seeds (bench_training.py on the seeds' shape, 16 layers / hidden 640 / MLP 2560,
# B = 64 and 16, every decoder layer compiled with mode="reduce-overhead" (CUDA graphs), dense too; about
# 2-3 minutes, capped at 240 s), gluon (grouped_kernels.py: the grouped Gluon forward and grad_input checked and timed beside today's),
# gluon-ncu (two launches of each grouped design under Nsight Compute, with warp stall reasons; raw counters as CSV), gluon-sass (the grouped kernel's stalls per SASS instruction), layer-grouped (bench_layer.py with
# GROUPED=on|ws routing the grouped kernels), host (host_overhead.py --cuda-graphs), decode-split (decode_split.py:
# the forward's slot split swept at M = 16 in CUDA graphs; DECODE_CONFIGS=1 adds its decode tiles), decode-sass (the
# decode forward's stalls per SASS instruction under Nsight Compute, SASS_BLOCKS block sizes). compile_report.py needs no GPU: run it here. Everything lands in $OUT (at most 8 files come back): log.txt and one JSON per part.
# BUDGET (seconds, default 570) is the whole call's; a part gets what is left, capped by its own limit.
set -u
OUT=${OUT:-/tmp/kernels-out}
mkdir -p "$OUT"
export PYTHONPATH=.
BUDGET=${BUDGET:-570}
START=$(date +%s)
LOG="$OUT/log.txt"

left() { echo $((BUDGET - ($(date +%s) - START))); }

part() {  # part NAME LIMIT COMMAND...: run with the smaller of LIMIT and the time left
    local name=$1 limit=$2 l
    shift 2
    l=$(left)
    if [ "$l" -lt 30 ]; then echo "== $name skipped: ${l}s left" | tee -a "$LOG"; return; fi
    [ "$limit" -gt "$l" ] && limit=$l
    echo "== $name (limit ${limit}s, $(date -u +%H:%M:%S))" | tee -a "$LOG"
    timeout "$limit" "$@" >>"$LOG" 2>&1
    echo "== $name rc=$? after $(($(date +%s) - START))s" | tee -a "$LOG"
}

ncu_metrics() {  # the counters we read, kept to those this ncu knows (an unknown name stops the profile)
    local known wanted="lts__t_bytes dram__bytes_read dram__bytes_write sm__pipe_tensor_op_gmma_cycles_active
        sm__pipe_tensor_op_hmma_cycles_active sm__inst_executed_pipe_tensor_op_gmma sm__warps_active
        l1tex__data_pipe_lsu_wavefronts_mem_shared launch__registers_per_thread launch__shared_mem_per_block"
    known=$(ncu --query-metrics 2>/dev/null | awk '{print $1}')
    local m picked=()
    for m in $wanted; do
        if grep -qx "$m" <<<"$known"; then
            case $m in
                launch__*) picked+=("$m") ;;
                sm__warps_active|*cycles_active) picked+=("$m.avg.pct_of_peak_sustained_active") ;;
                *) picked+=("$m.sum" "$m.sum.per_second") ;;
            esac
        fi
    done
    local IFS=,
    echo "${picked[*]}"
}

echo "== env" | tee "$LOG"
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.total --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  ncu --version | tail -1; git log --oneline -1 2>/dev/null || true; } >>"$LOG" 2>&1

for p in "$@"; do
    case $p in
        times) part times 330 python3 benchmarks/kernel_profile.py --out "$OUT/kernels.json" ;;
        ncu)
            metrics=$(ncu_metrics)
            echo "ncu metrics: $metrics" >>"$LOG"
            part ncu 300 ncu --profile-from-start off --clock-control none --nvtx \
                --section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
                --section Occupancy --section LaunchStats --section WarpStateStats ${metrics:+--metrics "$metrics"} \
                -f -o "$OUT/ncu" \
                python3 benchmarks/kernel_profile.py --ncu --blocks "${NCU_BLOCKS:-64,128}" --tokens "${NCU_TOKENS:-8192}" \
                --labels "$OUT/ncu-labels.json"
            part ncu-export 60 bash -c "ncu --import '$OUT/ncu.ncu-rep' --csv --page raw > /tmp/ncu-raw.csv"
            part ncu-parse 30 python3 benchmarks/kernel_profile.py --parse-ncu /tmp/ncu-raw.csv \
                --labels "$OUT/ncu-labels.json" --out "$OUT/ncu.json" ;;
        memory) part memory 300 python3 benchmarks/memory_phases.py --out "$OUT" --sequence --block-sizes 64 16 ;;
        check)  # the GPU correctness check: under tests/gpu once it moved there, else benchmarks/gpu_check.py
            # xdist: compilation and autotuning are CPU-bound; 8 workers on the one GPU took 35 s, serial > 300 s
            if [ -d tests/gpu ]; then part check 330 python3 -m pytest -q -p no:cacheprovider -n 8 tests/gpu
            else part check 300 python3 benchmarks/gpu_check.py; fi ;;
        check-kernels)  # the check in two calls (the whole of tests/gpu passed 330 s in the seventh session):
            part check-kernels 330 python3 -m pytest -q -p no:cacheprovider -n 8 tests/gpu/test_gpu_kernels.py ;;
        check-rest)     # ... and every other file of tests/gpu
            part check-rest 330 python3 -m pytest -q -p no:cacheprovider -n 8 tests/gpu \
                --ignore tests/gpu/test_gpu_kernels.py ;;
        layer) part layer 540 python3 benchmarks/bench_layer.py --quick --blocks "${BLOCKS:-16,32,64,128}" --out "$OUT" \
                   --shapes "${SHAPES:-4096x14336,14336x4096,640x2560,2560x640}" ;;
        layer-grouped)  # the issue's table with the grouped Gluon kernels routed (kernel option grouped)
            part layer-grouped 300 python3 benchmarks/bench_layer.py --quick --grouped "${GROUPED:-on}" \
                --blocks 16,32,64,128 --tokens 8192 --bsr-densities= --shapes 4096x14336,14336x4096 --out "$OUT" ;;
        host)  # eager host time per layer call vs nn.Linear, and the same calls replayed as CUDA graphs
            part host 200 python3 benchmarks/host_overhead.py --cuda-graphs --budget-s 150 --out "$OUT" ;;
        decode-split)  # the gather forward's slot split at M = 16, in CUDA graphs, against dense (decode_split.py)
            part decode-split 240 python3 benchmarks/decode_split.py ${DECODE_CONFIGS:+--configs} --out "$OUT" ;;
        training) part training 540 python3 benchmarks/bench_training.py --block-sizes 128 64 16 --out "$OUT" ;;
        training-seeds)  # perf_hints logs why inductor skipped a CUDA graph, if it did (cudagraph_skips in the JSON)
            TORCH_LOGS=perf_hints part training-seeds 240 python3 benchmarks/bench_training.py --preset seeds \
                --compile-mode reduce-overhead --speed-only --block-sizes 64 16 --steps 12 --warmup 3 \
                --update-every 5 --decisions 2 --out "$OUT" ;;
        gluon)  # the grouped Gluon kernel (forward, grad_input): float64 checks, then timed beside today's kernels
            part gluon 300 python3 benchmarks/grouped_kernels.py --out "$OUT" ;;
        gluon-ncu)  # two launches each of the grouped designs NCU_DESIGNS (B:G[:key=value]; default B = 64, G = 2, BM = 256, plain and warp-specialized); clocks left alone
            metrics=$(ncu_metrics)
            # only the grouped kernels: today's autotuning launches would use up the launch count
            part gluon-ncu 240 ncu --clock-control none --kernel-name "regex:grouped" \
                --launch-count 8 --section SpeedOfLight --section MemoryWorkloadAnalysis \
                --section Occupancy --section WarpStateStats ${metrics:+--metrics "$metrics"} -f -o "$OUT/ncu-gluon" \
                python3 benchmarks/grouped_kernels.py --profile --designs "${NCU_DESIGNS:-64:2:BM=256,64:2:BM=256:WS=1}" --shapes 4096x14336 --out /tmp/gluon-ncu
            part gluon-ncu-export 60 bash -c "ncu --import '$OUT/ncu-gluon.ncu-rep' --csv --page raw > '$OUT/ncu-gluon.csv'" ;;
        gluon-sass)  # where the grouped kernel's warps stall, per SASS instruction (B = 64, G = 4, one forward launch)
            part gluon-sass 150 ncu --clock-control none --kernel-name "regex:grouped" --launch-count 1 \
                --section SourceCounters --section WarpStateStats -f -o "$OUT/ncu-sass" \
                python3 benchmarks/grouped_kernels.py --profile --designs "${SASS_DESIGN:-64:4}" --shapes 4096x14336 --out /tmp/gluon-sass
            part gluon-sass-export 60 bash -c "ncu --import '$OUT/ncu-sass.ncu-rep' --page source --csv --print-source sass > '$OUT/ncu-sass.csv' \
                || ncu --import '$OUT/ncu-sass.ncu-rep' --page source --csv > '$OUT/ncu-sass.csv'" ;;
        decode-sass)  # where the decode forward's warps stall, per SASS instruction (M = 16, B = SASS_BLOCKS, default 16)
            part decode-sass 150 ncu --profile-from-start off --clock-control none --kernel-name "regex:_forward_kernel" \
                --launch-count 2 --section SourceCounters --section WarpStateStats -f -o "$OUT/ncu-decode-sass" \
                python3 benchmarks/kernel_profile.py --ncu --blocks "${SASS_BLOCKS:-16}" --tokens 16 --labels /tmp/decode-sass-labels.json
            part decode-sass-export 60 bash -c "ncu --import '$OUT/ncu-decode-sass.ncu-rep' --page source --csv --print-source sass > '$OUT/ncu-decode-sass.csv' \
                || ncu --import '$OUT/ncu-decode-sass.ncu-rep' --page source --csv > '$OUT/ncu-decode-sass.csv'" ;;
        *) echo "unknown part $p" | tee -a "$LOG" ;;
    esac
done
echo "== done after $(($(date +%s) - START))s; files: $(ls "$OUT" | tr '\n' ' ')" | tee -a "$LOG"
