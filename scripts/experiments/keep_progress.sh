#!/usr/bin/env bash
# Before a machine that keeps nothing stops: commit the grids' progress under experiments/.
# Every running `asymlora compare` / `federate` is asked for a checkpoint after its current step
# (kill -USR1; a federation keeps its last finished round), then paused while git reads the folders:
# finished cells' evidence (configs, metrics, round records, every prediction) and the checkpoint
# of every unfinished cell are committed, and the workers go on. The next session runs the grid
# scripts again and each cell resumes from its committed checkpoint.
#   scripts/experiments/keep_progress.sh [MAX_WAIT_S]
set -u
cd "$(dirname "$0")/../.."
max_wait=${1:-120}
# the grid workers of this checkout only: its .venv's python running asymlora compare / federate
pattern=${WORKERS_PATTERN:-^$(pwd)/\.venv/bin/python[0-9.]* [^ ]*\.venv/bin/asymlora (compare|federate) }
pids=$(pgrep -f "$pattern" | tr '\n' ' ')
trap '[ -n "$pids" ] && kill -CONT $pids 2>/dev/null' EXIT  # never leave a worker paused
asked=$(date +%s)
for pid in $pids; do kill -USR1 "$pid" 2>/dev/null; done

unfinished() {  # cell folders with a checkpoint and no results.json yet
  find experiments -type d \( -name checkpoint -o -name checkpoint.old \) -prune -print 2>/dev/null |
    while read -r ckpt; do cell=$(dirname "$ckpt"); [ -e "$cell/results.json" ] || echo "$ckpt"; done | sort -u
}

# wait (up to max_wait) until every training cell's checkpoint is newer than the request
deadline=$(( asked + max_wait ))
while [ "$(date +%s)" -lt "$deadline" ] && [ -n "$pids" ]; do
  stale=0
  for ckpt in $(unfinished); do
    state="$ckpt/trainer_state.json"
    [ -f "$state" ] && [ "$(stat -c %Y "$state")" -lt "$asked" ] && stale=1
  done
  [ "$stale" = 0 ] && break
  sleep 2
done

others=$(git diff --cached --name-only -- . ':(exclude)experiments')
if [ -n "$others" ]; then  # the commit is the grids' progress alone
  echo "keep_progress: other changes are staged ($(echo $others)); commit or unstage them first" >&2
  exit 1
fi
[ -n "$pids" ] && kill -STOP $pids
git add experiments
# the index then holds exactly the current checkpoint of every unfinished cell, none of a finished one
git rm -r -q --cached --ignore-unmatch -- ':(glob)experiments/**/checkpoint*/**' > /dev/null
for ckpt in $(unfinished); do git add -f "$ckpt"; done
summary=$(for ckpt in $(unfinished); do
  at=$(python3 -c "
import json, pathlib, sys
c = pathlib.Path(sys.argv[1])
t, f = c / 'trainer_state.json', c / 'state.json'
print(f'step {json.loads(t.read_text())[\"step\"]}' if t.exists() else f'round {json.loads(f.read_text())[\"round\"]}')
" "$ckpt" 2>/dev/null || echo "?")
  echo "  ${ckpt%/checkpoint*}: unfinished, checkpoint after $at"
done)
git commit -q -m "experiments: progress kept at $(date -u +%Y-%m-%dT%H:%MZ)" -m "${summary:-no unfinished cell}" \
  && git log --stat -1 | tail -n 25
exit 0
