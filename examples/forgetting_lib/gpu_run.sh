#!/bin/bash
# One device call: the training benchmark (bounded), then the forgetting grid until its deadline;
# everything but the task-A checkpoints comes back as $OUT/results.tgz.
#   BENCH_SECONDS=130 GRID_SECONDS=220 WORKERS=14 bash examples/forgetting_lib/gpu_run.sh
cd "$(dirname "$0")/../.." || exit 1
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TQDM_MININTERVAL=20 OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
timeout --kill-after=5 "${BENCH_SECONDS:-130}" python benchmarks/bench_training.py 2>&1 | tee "$OUT/bench.log" | grep -v Warning
if ! python examples/forgetting.py check --device cuda 2>&1 | tee "$OUT/check.log"; then
  export SPARSIFY_BACKEND=reference  # the Triton kernels disagree with the reference here: use the reference
fi
python examples/forgetting.py run --device cuda --workers "${WORKERS:-14}" --deadline "${GRID_SECONDS:-220}" \
  --a-steps "${A_STEPS:-600}" --b-steps "${B_STEPS:-600}" > "$OUT/grid.log" 2>&1
tail -5 "$OUT/grid.log"
tar czf "$OUT/results.tgz" --exclude='*.pt' results/forgetting benchmarks/results
ls -la "$OUT"
