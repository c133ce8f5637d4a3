#!/usr/bin/env bash
# The multi-task grid of docs/results.md (issue 12), one worker: every cell of seed 0, then of seed 1,
# then of seed 2 (`compare` runs method-major within one call, so the seeds are looped here to finish
# whole seeds first). Two workers may run it at once: cells hold locks, a busy cell is left to the
# other worker, and a finished one is skipped, so a stopped grid resumes where it stopped.
#   scripts/experiments/multitask_grid.sh w1 &   scripts/experiments/multitask_grid.sh w2 &
set -u
worker=${1:-w1}
seeds=${SEEDS:-0 1 2}
out=${OUT:-experiments/commonsense-smollm2}
mkdir -p "$(dirname "$out")"
for seed in $seeds; do
  OMP_NUM_THREADS=1 .venv/bin/asymlora compare --config configs/commonsense-smollm2.yaml \
    --methods lora,alora,lora@alora,hydralora,mola --seeds "$seed" --out "$out" \
    --against lora,hydralora --single-task-baseline share --threads 1 --leave-busy >> "$out-$worker.log" 2>&1
done
