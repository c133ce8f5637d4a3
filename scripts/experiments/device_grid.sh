#!/usr/bin/env bash
# Run a grid on a lent GPU machine (one H200 here) for at most DEADLINE seconds, then bring its
# evidence back. Runs there, from the repository root, after the parts of .device-bundle/ (made by
# scripts/experiments/device_bundle.sh) have arrived, one per call (experiments/README.md):
#   scripts/experiments/device_grid.sh multitask|federated [WORKERS] [DEADLINE]
# It joins and checks the parts, installs the carried wheels into /tmp/site and the BIG-bench
# files into a fresh ASYMLORA_CACHE, then runs WORKERS (default 6) workers of the grid script into
# its own folder, experiments/<grid>-gpu (GPU cells are a grid of their own: they are not
# bit-identical to CPU cells; GRID_ARGS defaults to float32 training, the CPU grid's arithmetic).
# At the deadline (default 480 s from this script's start, which leaves the device's 600 s per call
# room to stop and pack) every worker is asked for a checkpoint (kill -USR1), then stopped. The
# grid's status is printed, and the folder, checkpoints of unfinished cells included, goes back as
# $OUT/grid.tar.gz (cut into 15 MiB parts when larger); on this machine unpack it with
#   tar -xzf grid.tar.gz  (or: cat grid.tar.gz.part-* | tar -xzf -)
# and commit it; a later call resumes from it. A second call on the same warm machine skips the
# unpacking and resumes the cells where they are.
set -uo pipefail
grid=${1:?say multitask or federated}
workers=${2:-6}
deadline=${3:-480}
case "$grid" in
  multitask) script=scripts/experiments/multitask_grid.sh out=experiments/commonsense-smollm2-gpu ;;
  federated) script=scripts/experiments/federated_grid.sh out=experiments/fed-mc-smollm2-gpu ;;
  *) echo "device_grid.sh: say multitask or federated, not $grid" >&2; exit 2 ;;
esac
out=${GRID_OUT:-$out}
py=${PYTHON:-python3}
home=${DEVICE_HOME:-/tmp/asymlora-device}
back=${OUT:-/tmp/asymlora-device-out}  # the device tool's $OUT: what is written there comes back
export ASYMLORA_CACHE=$home/cache PYTHONPATH="$PWD/src:$home/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# GRID_ARGS unset: float32 training; GRID_ARGS="": the config as it is
export GRID_ARGS=${GRID_ARGS---set train.precision=fp32} OUT="$out" ASYMLORA="$home/bin/asymlora"

if [ ! -f "$home/ready" ]; then
  mkdir -p "$(dirname "$home")"
  cat .device-bundle/part-*/part-* > "$home.tar"
  sed "s|bundle.tar|$home.tar|" .device-bundle/part-0/SHA256SUMS | sha256sum -c --quiet \
    || { echo "the bundle's parts are incomplete or damaged: carry every .device-bundle/part-N, one per call" >&2; exit 2; }
  mkdir -p "$home/unpacked" "$ASYMLORA_CACHE" "$home/bin"
  tar -C "$home/unpacked" -xf "$home.tar" && rm "$home.tar"
  for wheel in "$home"/unpacked/wheels/*.whl; do
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$home/site" "$wheel" \
      || echo "not installed: $(basename "$wheel") (does not fit this Python)"
  done
  xz -dc "$home/unpacked/cache.tar.xz" | tar -C "$ASYMLORA_CACHE" -xf -
  printf '#!/bin/sh\nexec %s -c "import sys; from asymlora.cli import main; sys.exit(main(sys.argv[1:]))" "$@"\n' "$py" \
    > "$ASYMLORA" && chmod +x "$ASYMLORA"
  "$ASYMLORA" tasks --suite commonsense > /dev/null || exit 2  # the data loads
  "$py" -c "from asymlora.models import smollm2_folder; print('model:', smollm2_folder())" || exit 2  # once
  touch "$home/ready"
fi
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader

mkdir -p "$out"
pids=()
for i in $(seq 1 "$workers"); do
  setsid "$script" "gpu$i" & pids+=($!)
  sleep 2
done
any_alive() { for pid in "${pids[@]}"; do kill -0 "$pid" 2> /dev/null && return 0; done; return 1; }
while [ $SECONDS -lt "$deadline" ] && any_alive; do sleep 5; done  # SECONDS: since this script started
# the Python processes of the workers' sessions (USR1 only to them: it would end a bash worker)
running=$(for pid in "${pids[@]}"; do pgrep -s "$pid" -f "asymlora.cli import main"; done || true)
if [ -n "$running" ]; then
  echo "deadline: asking $(echo $running | wc -w) processes for a checkpoint, then stopping them"
  kill -USR1 $running 2> /dev/null
  sleep 15
  for pid in "${pids[@]}"; do kill -- -"$pid" 2> /dev/null; done
  for _ in 1 2 3 4 5; do any_alive || break; sleep 2; done
  for pid in "${pids[@]}"; do kill -KILL -- -"$pid" 2> /dev/null; done
fi
"$script" status
mkdir -p "$back"
finished=$(mktemp)  # a finished cell's checkpoint stays behind; an unfinished one's comes back to resume
find "$out" -name results.json -execdir test -d checkpoint \; -printf '%h/checkpoint\n%h/checkpoint.old\n' > "$finished"
tar -czf "$back/grid.tar.gz" --exclude='*/adapter' --exclude='*/adapter_init' --exclude='*/tensorboard' \
  --exclude='*/plots' --exclude='*/peft' --exclude='*.png' --exclude-from="$finished" "$out" "$out"-gpu*.log
if [ "$(stat -c %s "$back/grid.tar.gz")" -gt $((15 * 1024 * 1024)) ]; then
  split -b 15M -d -a 1 "$back/grid.tar.gz" "$back/grid.tar.gz.part-" && rm "$back/grid.tar.gz"
fi
ls -l "$back"
