#!/usr/bin/env bash
# Several GPUs over NCCL, on however many GPUs the machine has (N = nvidia-smi's count), in one device call of
# at most 600 s: the parts below run in this order, each with a time limit cut to what is left of the call
# (DEADLINE, default 580 s); a part that no longer fits is skipped and says so in $OUT/summary.txt. The whole
# grid does not fit in one call at the default model size: run it again with PARTS naming the parts skipped.
#   machine   nvidia-smi (and topo -m), python, torch (CUDA, NCCL), triton, transformers   -> $OUT/machine.txt
#   tests     the 2-process DDP, FSDP2 and compiled DDP / FSDP2 tests on cuda:0 and cuda:1
#             (SPARSIFY_TEST_DIST_DEVICE=cuda; -s prints every rank's decisions, swaps, checksums) and the
#             benchmark's CPU smoke tests                                                -> $OUT/dist_tests.log
#   gap       2 GPUs, eager, B = 64: dense, and sparse with topology decide / stats / off, DDP with buffer
#             broadcast on and off: what the sparse model's DDP overhead is made of      -> $OUT/gap/
#   compiled  2 GPUs, torch.compile (inductor): dense and sparse B = 64 (deciding), 1 GPU, DDP, FSDP2; every
#             decoder layer compiled first (one graph for all layers: fast to compile), then the whole model
#             (under DDP split at the gradient buckets; FSDP2's hooks break it at every layer)
#   blocks    2 GPUs, eager and compiled: sparse B = 16 (deciding), 1 GPU, DDP, FSDP2
#   scale     4 and 8 GPUs where the machine has them, eager: dense and sparse B = 64, 1 GPU, DDP, FSDP2
#   scale-compiled   the same, compiled
# Every benchmark part writes benchmarks/bench_distributed.py's JSON (devices, versions, configuration, every
# rank's topology checksum and value digest) under $OUT/<part>/, rewritten after every run (a part cut short
# keeps what it measured), and its log beside it.
# Run from the repository root with OUT set:   OUT=/some/dir bash benchmarks/distributed_gpu_run.sh
#                                              OUT=/some/dir PARTS="compiled scale" bash benchmarks/distributed_gpu_run.sh
# A part that fails or times out does not stop the next; the exit status is that of the last failing part.
set -u
: "${OUT:?set OUT to the folder for the logs and the result JSON}"
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
# NVLink multicast (NVLS) stays off on the lent machines: NCCL, symmetric memory and NVSHMEM alike
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PARTS=${PARTS:-"machine tests gap compiled blocks scale scale-compiled"}
DEADLINE=${DEADLINE:-580}
GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
GPUS=${GPUS:-0}
start=$SECONDS
status=0
# the grid's common settings: the 2-GPU results of 2026-11-23 were taken at these (bench defaults), with
# 3 decisions (steps 5, 10, 15) in a window of 3 warm-up + 15 timed steps
BENCH=(benchmarks/bench_distributed.py --warmup 3 --steps 15 --update-every 5)

step() { echo; echo "=== $* (at $((SECONDS - start)) s, $GPUS GPUs) ==="; }
record() {  # record <name> <exit status>
    echo "=== $1: exit status $2$( [ "$2" = 124 ] && echo ' (timed out)') (at $((SECONDS - start)) s) ===" | tee -a "$OUT/summary.txt"
    [ "$2" = 0 ] || status=$2
}
left() {  # left <most seconds the part needs>: the time limit to give it, 0 if it no longer fits
    local rest=$((DEADLINE - (SECONDS - start)))
    if [ "$rest" -lt 45 ]; then echo 0; elif [ "$rest" -lt "$1" ]; then echo "$rest"; else echo "$1"; fi
}
bench() {  # bench <part> <GPUs> <most seconds> <bench_distributed.py arguments...>
    local part=$1 world=$2 limit
    limit=$(left "$3"); shift 3
    if [ "$GPUS" -lt "$world" ]; then echo "=== $part on $world GPUs: skipped, the machine has $GPUS ===" | tee -a "$OUT/summary.txt"; return; fi
    if [ "$limit" = 0 ]; then echo "=== $part on $world GPUs: skipped, no time left in this call ===" | tee -a "$OUT/summary.txt"; return; fi
    step "$part: torchrun --nproc-per-node $world ${BENCH[*]} $* (limit $limit s)"
    mkdir -p "$OUT/$part"
    CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((world - 1))) timeout -k 5 "$limit" torchrun --nproc-per-node "$world" \
        "${BENCH[@]}" --out "$OUT/$part" "$@" 2>&1 | tee "$OUT/$part/bench-${world}gpus.log"
    record "$part on $world GPUs" "${PIPESTATUS[0]}"
}

for part in $PARTS; do
    case $part in
    machine)
        step "machine"
        { timeout 10 nvidia-smi; timeout 10 nvidia-smi topo -m; } 2>&1 | tee "$OUT/machine.txt"
        timeout 30 python - <<'PY' 2>&1 | tee -a "$OUT/machine.txt"
import platform, sys
import torch
print("python", sys.version.split()[0], platform.platform())
print("torch", torch.__version__, "cuda", torch.version.cuda, "devices", torch.cuda.device_count(),
      [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
try:
    print("nccl", ".".join(map(str, torch.cuda.nccl.version())))
except Exception as error:  # noqa: BLE001
    print("nccl: unknown", error)
for name in ("triton", "transformers", "pytest", "tabulate"):
    try:
        print(name, __import__(name).__version__)
    except Exception as error:  # noqa: BLE001
        print(name, "missing:", error)
PY
        ;;
    tests)
        limit=$(left 200)
        if [ "$GPUS" -lt 2 ] || [ "$limit" = 0 ]; then echo "=== tests: skipped ($GPUS GPUs, $limit s) ===" | tee -a "$OUT/summary.txt"; continue; fi
        step "tests: DDP, FSDP2 and compiled over NCCL on 2 GPUs, the benchmark's CPU smoke tests (limit $limit s)"
        SPARSIFY_TEST_DIST_DEVICE=cuda timeout -k 5 "$limit" python -m pytest -q -s -p no:cacheprovider \
            tests/test_distributed_ddp.py tests/test_distributed_fsdp.py tests/test_distributed_compiled.py \
            tests/test_bench_distributed.py 2>&1 | tee "$OUT/dist_tests.log"
        record tests "${PIPESTATUS[0]}"
        ;;
    gap)
        bench gap 2 240 --models dense sparse --block-sizes 64 --topology decide stats off \
            --broadcast-buffers on off --modes single ddp --execution eager ;;
    compiled)
        bench compiled 2 300 --models dense sparse --block-sizes 64 --modes single ddp fsdp --execution compiled-layers compiled ;;
    blocks)
        bench blocks 2 300 --models sparse --block-sizes 16 --modes single ddp fsdp --execution eager compiled-layers ;;
    scale)
        for world in 4 8; do bench scale "$world" 240 --models dense sparse --block-sizes 64 --execution eager; done ;;
    scale-compiled)
        for world in 4 8; do bench scale-compiled "$world" 300 --models dense sparse --block-sizes 64 --execution compiled-layers compiled; done ;;
    *)
        echo "=== $part: unknown part (machine tests gap compiled blocks scale scale-compiled) ===" | tee -a "$OUT/summary.txt"
        status=2 ;;
    esac
done

step "done"
cat "$OUT/summary.txt"
exit "$status"
