#!/usr/bin/env bash
# The multi-task grid of docs/results.md (issue 12), one worker. The cells that answer the main
# question come first: lora and alora for seeds 0, 1 and 2 (ALoRA - LoRA over three seeds), then
# hydralora, the parameter-matched lora@alora and mola, seed by seed; last, one call over the whole
# grid runs the single-task LoRAs for delta-m (`share` budget) and writes the table (paired against
# lora and hydralora). Two workers may run it at once: cells hold locks, a cell the other worker
# runs is left to it (--leave-busy) and a finished one is skipped, so a stopped grid resumes where
# it stopped, from each unfinished cell's checkpoint.
#   scripts/experiments/multitask_grid.sh w1 &   scripts/experiments/multitask_grid.sh w2 &
#   scripts/experiments/multitask_grid.sh status  # where every cell stands (reads only)
# CONFIG and OUT choose another grid of the same shape, e.g. the reasoning suite's:
#   CONFIG=configs/reasoning-smollm2.yaml OUT=experiments/reasoning-smollm2 scripts/experiments/multitask_grid.sh w1
# ASYMLORA names the command (default .venv/bin/asymlora); GRID_ARGS adds arguments to every call
# (e.g. GRID_ARGS="--set train.precision=fp32" on a GPU: scripts/experiments/device_grid.sh); it is
# split on spaces, without quotes, so each of its --set values must hold no space. Needs bash >= 4.4.
set -u
worker=${1:-w1}
asymlora=${ASYMLORA:-.venv/bin/asymlora}
read -r -a grid_args <<< "${GRID_ARGS:-}"
seeds=${SEEDS:-0 1 2}
config=${CONFIG:-configs/commonsense-smollm2.yaml}
out=${OUT:-experiments/commonsense-smollm2}
log="$out-$worker.log"
[ "$worker" = status ] && log=/dev/stdout
mkdir -p "$(dirname "$out")"

grid() {  # grid METHODS SEEDS [more flags]: SEEDS comma-separated
  local methods=$1 seeds=$2
  shift 2
  OMP_NUM_THREADS=1 "$asymlora" compare --config "$config" \
    --methods "$methods" --seeds "$seeds" --out "$out" --threads 1 "${grid_args[@]}" "$@" >> "$log" 2>&1
}

whole=(lora,alora,lora@alora,hydralora,mola "$(echo $seeds | tr ' ' ',')" --against lora,hydralora
       --single-task-baseline share)
if [ "$worker" = status ]; then grid "${whole[@]}" --status; exit; fi

for methods in lora,alora hydralora lora@alora mola; do
  for seed in $seeds; do grid "$methods" "$seed" --leave-busy; done
done
grid "${whole[@]}" --leave-busy
grid "${whole[@]}"  # the whole table: this call waits for what the other worker still runs
