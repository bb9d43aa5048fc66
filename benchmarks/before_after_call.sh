#!/usr/bin/env bash
# One device call that times the same layer benchmark from two trees, interleaved, and compares them:
# "no kernel slower than before" measured in the same run. Prepare both trees here first:
#
#   echo /.gpu/ >> .git/info/exclude; echo /.gpu-old/ >> .git/info/exclude     # once
#   rm -rf .gpu .gpu-old && mkdir .gpu .gpu-old
#   git archive HEAD | tar -x -C .gpu && git archive 58cb55d | tar -x -C .gpu-old   # after / before
#
# then run (device tool, carry [".gpu", ".gpu-old"]):  bash .gpu/benchmarks/before_after_call.sh
# Each tree is timed twice, in the order before, after, before, after, so a drift of the machine shows as
# a difference between a tree's two runs. Results and the comparison land in $OUT.
set -u
OUT=${OUT:-/tmp/before-after}
mkdir -p "$OUT/before" "$OUT/after"
ARGS=${ARGS:---quick --shapes 4096x14336,14336x4096,640x2560,2560x640 --bsr-densities ""}
ROUNDS=${ROUNDS:-2}          # 1 fits beside other work in one call; 2 shows the machine's drift
BENCH_TIMEOUT=${BENCH_TIMEOUT:-240}  # seconds per tree and round; a cut-off run keeps the shapes it finished
for round in $(seq "$ROUNDS"); do
    for tree in before after; do
        dir=.gpu; [ "$tree" = before ] && dir=.gpu-old
        echo "== $tree, round $round ($(date -u +%H:%M:%S))" | tee -a "$OUT/log.txt"
        (cd "$dir" && PYTHONPATH=. timeout "$BENCH_TIMEOUT" python benchmarks/bench_layer.py $ARGS --out "$OUT/$tree/r$round") \
            >>"$OUT/log.txt" 2>&1 || echo "== $tree round $round failed" | tee -a "$OUT/log.txt"
    done
done
for round in $(seq "$ROUNDS"); do
    PYTHONPATH=.gpu python .gpu/benchmarks/compare_runs.py "$OUT"/before/r$round/*.json "$OUT"/after/r$round/*.json \
        | tee -a "$OUT/compare.txt"
done
