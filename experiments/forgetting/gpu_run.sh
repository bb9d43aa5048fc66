#!/bin/bash
# The forgetting grid in one device call of at most 600 s: CUDA MPS where available, the Triton-vs-reference
# check, then the grid until its deadline. Every run's JSON (not the task-A checkpoints) comes back as
# $OUT/results.tgz, refreshed every minute, so a call cut off still returns what had finished.
# The runs are written on the machine's disk outside the repository, in WORK_DIR/RESULTS: a warm machine
# (the next call within 30 s) still has them there with the .pt files that never come back (task-A
# checkpoints, which the task-B runs start from; the training state of task-A runs cut at the deadline,
# which the next call resumes bit-identically). Before the grid, the runs of RESULTS in the tree and of
# the RESTORE tarballs (earlier calls' results.tgz, committed under experiments/forgetting/runs/) are
# added there, never over newer files; a cold machine then reruns only what needs a lost .pt file.
# See README.md, "Running the paired grid", for the sequence of calls.
#
#   run(command="bash experiments/forgetting/gpu_run.sh", carry=["experiments/forgetting/data/prose.json"], timeout_s=600)
#   PLAN=experiments/forgetting/plans/calibrate_a.txt TOTAL_SECONDS=500 BIG_BLOCK=0 bash experiments/forgetting/gpu_run.sh
#     (task A's curve at two model sizes and every paired arm once; see that file)
#
# Settings are environment variables (defaults in the code below): TOTAL_SECONDS (the whole call, 560),
# TAR_SECONDS (kept for packing at the end, 40), WORKERS (14 a GPU, at most cores - 2 on several GPUs;
# the grid pins worker n to GPU n mod GPUs), USE_MPS (1), TF32 (1), N_LAYERS, HIDDEN,
# MLP, HEADS, SEQ, BATCH, LAYERS (sparse MLP layers), A_STEPS, B_STEPS, A_EVALS, B_EVALS, B_LRS ("low base high"),
# SEEDS, BIG_BLOCK, PAIRED (1: the paired design with the replay, LoRA, densified and sparse-EWC baselines;
# LoRA needs peft: see below),
# RESULTS (experiments/forgetting/results/gpu, relative to the repository: the tarball's paths),
# WORK_DIR (/tmp/forgetting-work), RESTORE (tarballs, space-separated), DEVICE (cuda; cpu for a dry run),
# EXTRA (more `run` options),
# PLAN (a file of lines `name workers options...`: instead of the one grid, one `run` per line, all at once
# until the same deadline, each into RESULTS/name with its own options after the common ones (the last of a
# repeated option wins) and its log in $OUT/grid-name.log; plans/calibrate_a.txt is one).
#
# Why this configuration fits (estimate for one H100, 16 cores): the last call measured 600 task-A steps
# of this model (6 layers, hidden 256, MLP 1024, batch 64 x 128 bytes, float32) at 38 s dense and 109-130 s
# sparse with 14 processes time-slicing the GPU: 63 and 180-217 ms a step. Assumed now: MPS about doubles
# the throughput (dense ~32 ms a step) and the host-overhead fix in sparsify/ops.py brings a sparse step to
# 1.3-1.5x dense (~45 ms); TF32 (tensor cores for every float32 matmul, cuBLAS and our kernels alike;
# without it our kernels ran exact-float32 dots) is not counted, it is margin.
#   work: 18 task-A runs (3 dense, 15 sparse) x 1000 steps + 60 task-B runs (21 dense or EWC, including
#         4 lambda-search runs, 39 sparse) x 600 steps = 15.6k dense steps x 32 ms + 38.4k sparse x 45 ms
#         = 2230 process-seconds / 14 workers = 160 s
#   + per-run overhead (model build; 13 evaluations in B, 6 in A, each ~2 steps' worth of forward passes;
#     Fisher or saliency; checkpoint I/O: ~3 s x 78 runs / 14) ~ 17 s, worker start-up and Triton
#     compilation ~ 20 s, the last wave's tail ~ one run (30 s)  =>  ~230 s,
# against a grid deadline of ~470 s (560 s - ~50 s start-up and check - 40 s packing): about 2x margin.
# The base table (every arm, 3 seeds, base learning rate: 36k of the 54k steps) comes first, ~150 s;
# the sweeps follow. Task A: 1000 steps (600 gave dense 9-23% exact match last call, not converged);
# task B: 600 steps with 12 checkpoints, so the calibration can pick where dense forgets 30-80%.
#
# Calibration after the first H100 grid (a partial H100 grid, 2026-11-23): at B lr 3e-4 dense forgot
# 97% of task A by the first checkpoint (B step 50), so no checkpoint fell in the 30-80% band. Defaults since:
# task B 300 steps at learning rates 3e-5 / 1e-4 / 3e-4 (base 1e-4) with 30 checkpoints (every 10 steps).
# Measured there: task-B runs of 600 steps + 12 evaluations took 62-82 s with 14 workers under MPS, so the
# grid (18 task-A runs of 1000 steps, ~60 task-B runs of 300 steps + 30 evaluations) is ~300 s of the ~470 s.
#
# Measured on 2 x H200 (32 cores, 28 workers, MPS), 2026-11-23 (README.md, reports/gpu_a1000.md): the default grid
# (3 seeds, 79 runs) took 185 s; 5 more seeds (125 runs) 288 s; with A_STEPS=2000, 3 seeds (80 runs) 248 s and
# 2 more seeds (50 runs) 171 s. Task-A runs took 57-165 s, task-B runs 19-48 s.
set -u -o pipefail
cd "$(dirname "$0")/../.." || exit 1
START=$(date +%s)
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TQDM_MININTERVAL=20
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
# 14 workers a GPU (measured on one H100 with 16 cores), at most one a core less two
DEFAULT_WORKERS=$((GPUS > 1 ? 14 * GPUS : 14)); CORES=$(nproc)
[ "$DEFAULT_WORKERS" -gt $((CORES - 2)) ] && [ "$GPUS" -gt 1 ] && DEFAULT_WORKERS=$((CORES - 2))
TOTAL=${TOTAL_SECONDS:-560} TAR=${TAR_SECONDS:-40} WORKERS=${WORKERS:-$DEFAULT_WORKERS} DEVICE=${DEVICE:-cuda}
RESULTS=${RESULTS:-experiments/forgetting/results/gpu} WORK=${WORK_DIR:-/tmp/forgetting-work}
REL=${RESULTS#/} STAMP=$(date -u -d "@$START" +%Y%m%dT%H%M%SZ)
RUNS="$WORK/$REL"  # the grid's folder on this machine's disk
PROSE=experiments/forgetting/data/prose.json
ARGS=(--device "$DEVICE" --out "$RUNS" --n-layers "${N_LAYERS:-6}" --hidden "${HIDDEN:-256}" --mlp "${MLP:-1024}"
      --heads "${HEADS:-4}" --seq "${SEQ:-128}" --batch "${BATCH:-64}" --layers "${LAYERS:-1..4}"
      --a-steps "${A_STEPS:-1000}" --b-steps "${B_STEPS:-300}" --a-evals "${A_EVALS:-5}" --b-evals "${B_EVALS:-30}"
      --seeds "${SEEDS:-3}" --big-block "${BIG_BLOCK:-64}")
# shellcheck disable=SC2206  # three numbers: low, base, high
B_LR_LIST=(${B_LRS:-3e-5 1e-4 3e-4})
ARGS+=(--b-lrs "${B_LR_LIST[@]}")
[ "${TF32:-1}" = 1 ] && ARGS+=(--tf32)
[ "${PAIRED:-0}" = 1 ] && ARGS+=(--paired)
# shellcheck disable=SC2206  # EXTRA is a list of options, split on purpose
[ -n "${EXTRA:-}" ] && ARGS+=($EXTRA)
if [ ! -f "$PROSE" ]; then
  echo "$PROSE is missing: build it with 'python experiments/forgetting/run.py prepare' and carry it (carry=[\"$PROSE\"])"
  exit 1
fi
nvidia-smi --query-gpu=name,memory.used,memory.total,compute_mode --format=csv 2>/dev/null || echo "no nvidia-smi"
echo "user $(id -un), $(nproc) cores, $GPUS GPUs; settings: workers $WORKERS, call $TOTAL s, packing $TAR s; ${ARGS[*]}"

# ---- CUDA MPS: one GPU context for all workers, so their kernels run side by side instead of time-slicing
MPS="off (not requested)" SNAPSHOTS=""
stop_mps() { if [ "${MPS%% *}" = on ]; then echo quit | timeout 20 nvidia-cuda-mps-control >/dev/null 2>&1; fi; }
stop_snapshots() { if [ -n "$SNAPSHOTS" ]; then kill "$SNAPSHOTS" 2>/dev/null; wait "$SNAPSHOTS" 2>/dev/null; SNAPSHOTS=""; fi; }
cleanup() { stop_snapshots; stop_mps; }
trap cleanup EXIT
if [ "$DEVICE" = cuda ] && [ "${USE_MPS:-1}" = 1 ]; then
  if command -v nvidia-cuda-mps-control >/dev/null 2>&1; then
    CUDA_MPS_PIPE_DIRECTORY=$(mktemp -d /tmp/mps-pipe.XXXXXX) CUDA_MPS_LOG_DIRECTORY=$(mktemp -d /tmp/mps-log.XXXXXX)
    export CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
    if nvidia-cuda-mps-control -d >/dev/null 2>&1; then MPS="on"; else MPS="off (the daemon did not start)"; fi
  else
    MPS="off (nvidia-cuda-mps-control not found)"
  fi
fi
probe() {  # versions, and one CUDA call (the first client starts the MPS server)
  timeout 90 python -c "
import torch, transformers
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = 'none'
try:
    import peft; pv = peft.__version__
except ImportError:
    pv = 'none'
print('torch', torch.__version__, 'triton', tv, 'transformers', transformers.__version__, 'peft', pv)
torch.ones(1, device='$DEVICE').sum().item()"
}
if ! probe; then
  if [ "${MPS%% *}" = on ]; then
    stop_mps
    MPS="off (a CUDA client failed under MPS; stopped it)"
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
    probe || { echo "no working $DEVICE device"; exit 1; }
  else
    echo "no working $DEVICE device"
    exit 1
  fi
fi
echo "CUDA MPS: $MPS"

# ---- the lora arm needs peft; the device machine has no network: carry wheels made here with
#      `pip download peft accelerate --no-deps -d .whl` (carry=[".whl", ...]) and they are installed from there
if { [ "${PAIRED:-0}" = 1 ] || [ -n "${PLAN:-}" ]; } && ! python -c "import peft" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    pip install -q --no-index --no-deps --find-links .whl peft accelerate || echo "peft: installing from .whl failed"
  fi
  python -c "import peft" 2>/dev/null || echo "peft is missing: the lora runs will fail (the grid goes on)"
fi

# ---- the kernels against the reference on this model's shapes (B = 16 and the big block); warms Triton's cache
CHECK="passed"
if ! timeout 180 python experiments/forgetting/run.py check "${ARGS[@]}" 2>&1 | grep -v Warning | tee "$OUT/check.log"; then
  ARGS+=(--backend reference)
  CHECK="failed or timed out: reference backend"
  echo "check $CHECK"
fi

# ---- the runs so far: this machine's from an earlier call, the tree's, the RESTORE tarballs' (none overwritten)
mkdir -p "$RUNS" "$RESULTS"
tar -C "$RESULTS" -cf - . | tar -C "$RUNS" -xf - --skip-old-files
for T in ${RESTORE:-}; do tar -C "$WORK" -xzf "$T" --skip-old-files || echo "RESTORE $T: not restored"; done
echo "runs in $RUNS: $(find "$RUNS" -name '*.json' -path '*/runs/*' | wc -l) task-B and $(find "$RUNS" -name '*.json' -path '*/a/*' | wc -l) task-A JSONs, $(find "$RUNS" -name '*.pt' -path '*/a/*' | wc -l) task-A checkpoints, $(find "$RUNS" -name '*.pt' -path '*/cut/*' | wc -l) cut task-A runs to resume"

# ---- the grid until the deadline, then packing
snapshot() {  # $1: a name for the partial file; completed runs only (JSONs are written to *.tmp, then renamed)
  tar czf "$OUT/.results.tgz.$1" --exclude='*.pt' --exclude='*.tmp' -C "$WORK" "$REL" 2>/dev/null
  [ $? -le 1 ] && mv -f "$OUT/.results.tgz.$1" "$OUT/results.tgz"  # tar's 1: a file changed while read
}
DEADLINE_AT=$((START + TOTAL - TAR))
GRID=$((DEADLINE_AT - $(date +%s)))
printf '{"started": "%s", "device": "%s", "workers": %s, "mps": "%s", "check": "%s", "total_seconds": %s, "grid_seconds": %s, "args": "%s"}\n' \
  "$(date -u -d "@$START" +%Y-%m-%dT%H:%M:%SZ)" "$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)" \
  "$WORKERS" "$MPS" "$CHECK" "$TOTAL" "$GRID" "${ARGS[*]}" > "$RUNS/run_info.json"
mkdir -p "$RUNS/calls" && cp "$RUNS/run_info.json" "$RUNS/calls/run_info-$STAMP.json"  # every call's, kept
echo "grid: $GRID s until the deadline, $WORKERS workers"
# every minute; on TERM the loop ends its sleep (or, after a tar in progress, skips its rename) and exits
(trap 'kill $! 2>/dev/null; exit 0' TERM; while true; do sleep 60 & wait $!; snapshot loop; done) >/dev/null 2>&1 &
SNAPSHOTS=$!
# runs still going at the deadline stop at their next 50-step mark; the hard limit only catches a hang
grid() {  # $1: workers, $2: results folder, $3: log; the rest: options after the common ones
  local workers=$1 results=$2 log=$3
  shift 3
  timeout --kill-after=10 $((GRID + 25)) python experiments/forgetting/run.py run --workers "$workers" \
    --deadline-at "$DEADLINE_AT" --no-report "${ARGS[@]}" --out "$results" "$@" > "$log" 2>&1
  local rc=$?
  cp "$results/grid.json" "$RUNS/calls/grid-$(basename "$results")-$STAMP.json" 2>/dev/null
  [ "$results" != "$RUNS" ] && cp "$RUNS/run_info.json" "$results/run_info.json"  # the report's "Grid:" line
  echo "grid $(basename "$results") exit $rc after $(($(date +%s) - START)) s of the call"
}
if [ -n "${PLAN:-}" ]; then
  PIDS=()
  while read -r NAME PLAN_WORKERS PLAN_ARGS; do
    case "$NAME" in ''|'#'*) continue ;; esac
    echo "plan $NAME: $PLAN_WORKERS workers, $PLAN_ARGS"
    # shellcheck disable=SC2086  # the line's options, split on purpose
    grid "$PLAN_WORKERS" "$RUNS/$NAME" "$OUT/grid-$NAME.log" $PLAN_ARGS &
    PIDS+=($!)
  done < "$PLAN"
  for PID in "${PIDS[@]}"; do wait "$PID"; done
else
  grid "$WORKERS" "$RUNS" "$OUT/grid.log"
fi
stop_snapshots
snapshot final
rm -f "$OUT/.results.tgz.loop"  # a snapshot the loop had not finished
for LOG in "$OUT"/grid*.log; do echo "== $LOG"; grep -v Warning "$LOG" | tail -4; done
ls -la "$OUT"
