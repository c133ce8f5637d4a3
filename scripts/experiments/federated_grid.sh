#!/usr/bin/env bash
# The multiple-choice federation's grid (issue 17, configs/fed-mc-smollm2.yaml), one worker, in the
# order that answers the main questions first, each tier seed by seed:
#   1. fedit and fedalora (independent A's, the default) and fedalora with one common A
#      (federation.client_a_init=common): the paper's claim and the initialisation question;
#   2. the other homogeneous methods (r = 8 everywhere);
#   3. heterogeneous ranks 64,64,32,32,16,16,8,8 (the paper's) for zeropad, flora, flexlora and
#      fedalora-het, plus fedalora-het from a common A;
#   4. the rest of the ablation: A reset to its start every round (the reference), from a common
#      or an independent start.
# Two workers may run it at once (cells hold locks; a finished cell is skipped), so a stopped grid
# resumes where it stopped:  scripts/experiments/federated_grid.sh w1 &  ... w2 &
set -u
worker=${1:-w1}
seeds=${SEEDS:-0 1 2}
out=${OUT:-experiments/fed-mc-smollm2}
config=configs/fed-mc-smollm2.yaml
het="--set adapter.ranks=[64,64,32,32,16,16,8,8]"
mkdir -p "$out"

cell() {  # cell FOLDER METHODS SEED [--set ...]
  local folder=$1 methods=$2 seed=$3
  shift 3
  local against=fedit
  case ",$methods," in *,fedit,*) ;; *) against=${methods%%,*} ;; esac
  OMP_NUM_THREADS=1 .venv/bin/asymlora federate --config "$config" --methods "$methods" --seeds "$seed" \
    --out "$out/$folder" --against "$against" --threads 1 --leave-busy "$@" >> "$out-$worker.log" 2>&1
}

for seed in $seeds; do
  cell homogeneous fedit,fedalora "$seed"
  cell a-common-keep fedalora "$seed" --set federation.client_a_init=common
done
for seed in $seeds; do
  cell homogeneous fedit,fedalora,ffa,fedsa,zeropad,flora,flexlora,fedalora-het "$seed"
done
for seed in $seeds; do
  cell heterogeneous zeropad,flora,flexlora,fedalora-het "$seed" $het
  cell heterogeneous-common-a fedalora-het "$seed" $het --set federation.client_a_init=common
done
for seed in $seeds; do
  cell a-common-reset fedalora "$seed" --set federation.client_a_init=common --set federation.reset_a_each_round=true
  cell a-independent-reset fedalora "$seed" --set federation.reset_a_each_round=true
done
