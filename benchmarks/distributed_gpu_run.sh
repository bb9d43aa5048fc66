#!/usr/bin/env bash
# Issue 8 on 2 GPUs over NCCL, in one call of at most 600 s (worst case here about 530 s: 10 + 10 + 30 + 175 + 305):
#   1. the machine: nvidia-smi and the versions of python, torch (CUDA, NCCL), triton, transformers;
#   2. the 2-process DDP and FSDP2 tests on cuda:0 and cuda:1 (SPARSIFY_TEST_DIST_DEVICE=cuda; with -s
#      they print every rank's topology decisions, swaps and checksums) and the benchmark's CPU smoke
#      test                                                                     -> $OUT/dist_tests.log
#   3. the benchmark at its defaults (12 layers, hidden 2048, MLP 8192, bf16): dense and sparse, 1 GPU,
#      DDP and FSDP2, with every rank's topology checksum and block-value digest
#                                                     -> $OUT/bench.log, $OUT/distributed-*.json
# Run from the repository root with OUT set:   OUT=/some/dir bash benchmarks/distributed_gpu_run.sh
# A step that fails or times out does not stop the next; the exit status is that of the last failing step.
set -u
: "${OUT:?set OUT to the folder for the logs and the result JSON}"
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
start=$SECONDS
status=0
step() { echo; echo "=== $* (at $((SECONDS - start)) s) ==="; }
record() {  # record <name> <exit status>
    echo "=== $1: exit status $2$( [ "$2" = 124 ] && echo ' (timed out)') (at $((SECONDS - start)) s) ===" | tee -a "$OUT/summary.txt"
    [ "$2" = 0 ] || status=$2
}

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

step "tests: DDP and FSDP2 over NCCL on 2 GPUs, the benchmark's CPU smoke test"
SPARSIFY_TEST_DIST_DEVICE=cuda timeout -k 5 170 python -m pytest -q -s -p no:cacheprovider \
    tests/test_distributed_ddp.py tests/test_distributed_fsdp.py tests/test_bench_distributed.py 2>&1 | tee "$OUT/dist_tests.log"
record tests "${PIPESTATUS[0]}"

step "benchmark: torchrun --nproc-per-node 2 benchmarks/bench_distributed.py (defaults)"
timeout -k 5 300 torchrun --nproc-per-node 2 benchmarks/bench_distributed.py --out "$OUT" 2>&1 | tee "$OUT/bench.log"
record benchmark "${PIPESTATUS[0]}"

step "done"
cat "$OUT/summary.txt"
exit "$status"
