#!/usr/bin/env bash
# The multiple-choice federation's grid (issue 17, configs/fed-mc-smollm2.yaml), one worker, in the
# order that answers the main questions first, each tier seed by seed:
#   1. fedit, fedalora (independent A's, the default) and fedsa (A shared), and fedalora with one common A
#      (federation.client_a_init=common): the paper's claim and the initialisation question;
#   2. the other homogeneous methods (r = 8 everywhere);
#   3. heterogeneous ranks 64,64,32,32,16,16,8,8 (the paper's) for zeropad, flora, flexlora and
#      fedalora-het, plus fedalora-het from a common A;
#   4. the rest of the ablation: A reset to its start every round (the reference), from a common
#      or an independent start.
# Two workers may run it at once (cells hold locks; a finished cell is skipped), so a stopped grid
# resumes where it stopped:  scripts/experiments/federated_grid.sh w1 &  ... w2 &
# Where every cell stands (reads only):  scripts/experiments/federated_grid.sh status
# The ablation tables from the finished cells (also written after the last tables):  ... ablation
# CONFIG and OUT choose another federation of the same shape, HET_RANKS its heterogeneous ranks (one
# per client), e.g. the reasoning suite's 4 clients:
#   CONFIG=configs/fed-reasoning-smollm2.yaml OUT=experiments/fed-reasoning-smollm2 HET_RANKS=64,32,16,8 \
#     scripts/experiments/federated_grid.sh w1
# SETTINGS keeps only the named settings (default: all of them), e.g. the generative federation's
#   SETTINGS="homogeneous heterogeneous" CONFIG=configs/fed-generative-smollm2.yaml \
#     OUT=experiments/fed-generative-smollm2 scripts/experiments/federated_grid.sh w1
# ASYMLORA names the command (default .venv/bin/asymlora), PYTHON the interpreter of the ablation
# tables (default .venv/bin/python); GRID_ARGS adds arguments to every call
# (e.g. GRID_ARGS="--set train.precision=fp32" on a GPU: scripts/experiments/device_grid.sh); it is
# split on spaces, without quotes, so each of its --set values must hold no space. Needs bash >= 4.4.
set -u
worker=${1:-w1}
asymlora=${ASYMLORA:-.venv/bin/asymlora}
python=${PYTHON:-.venv/bin/python}
read -r -a grid_args <<< "${GRID_ARGS:-}"
seeds=${SEEDS:-0 1 2}
out=${OUT:-experiments/fed-mc-smollm2}
log="$out-$worker.log"
[ "$worker" = status ] && log=/dev/stdout
config=${CONFIG:-configs/fed-mc-smollm2.yaml}
het=(--set "adapter.ranks=[${HET_RANKS:-64,64,32,32,16,16,8,8}]")
common=(--set federation.client_a_init=common)
reset=(--set federation.reset_a_each_round=true)
all_settings="homogeneous a-common-keep heterogeneous heterogeneous-common-a a-common-reset a-independent-reset"
settings=${SETTINGS:-$all_settings}
for name in $settings; do
  case " $all_settings " in *" $name "*) ;; *) echo "SETTINGS: unknown setting $name; known: $all_settings" >&2; exit 2 ;; esac
done
mkdir -p "$out"

link_base() {  # link_base FOLDER: the base model's row is the same in every folder (same clients
  # and questions), so it is scored once, in homogeneous/, and linked from the others
  local folder=$1
  if [ "$folder" != homogeneous ] && [ ! -e "$out/$folder/base" ] && [ -f "$out/homogeneous/base/results.json" ]; then
    mkdir -p "$out/$folder" && ln -s ../homogeneous/base "$out/$folder/base"
  fi
}

cell() {  # cell FOLDER METHODS SEEDS [flags]: SEEDS comma-separated
  local folder=$1 methods=$2 seeds=$3
  shift 3
  local against=fedit
  case ",$methods," in *,fedit,*) ;; *) against=${methods%%,*} ;; esac
  link_base "$folder"
  OMP_NUM_THREADS=1 "$asymlora" federate --config "$config" --methods "$methods" --seeds "$seeds" \
    --out "$out/$folder" --against "$against" --threads 1 "${grid_args[@]}" "$@" >> "$log" 2>&1
}

homogeneous=fedit,fedalora,ffa,fedsa,zeropad,flora,flexlora,fedalora-het
setting() {  # setting NAME SEEDS [flags]: the cells of one setting (a folder of the grid)
  local name=$1 seeds=$2
  shift 2
  case $name in
    homogeneous) cell homogeneous "$homogeneous" "$seeds" "$@" ;;
    homogeneous-first) cell homogeneous fedit,fedalora,fedsa "$seeds" "$@" ;;  # the main questions first: B or A shared
    a-common-keep) cell a-common-keep fedalora "$seeds" "${common[@]}" "$@" ;;
    heterogeneous) cell heterogeneous zeropad,flora,flexlora,fedalora-het "$seeds" "${het[@]}" "$@" ;;
    heterogeneous-common-a) cell heterogeneous-common-a fedalora-het "$seeds" "${het[@]}" "${common[@]}" "$@" ;;
    a-common-reset) cell a-common-reset fedalora "$seeds" "${common[@]}" "${reset[@]}" "$@" ;;
    a-independent-reset) cell a-independent-reset fedalora "$seeds" "${reset[@]}" "$@" ;;
  esac
}
tables() {  # every setting over all seeds: the tables (these calls wait for what others still run)
  local name
  for name in $settings; do
    setting "$name" "$(echo $seeds | tr ' ' ',')" "$@"
  done
}
# The ablation tables: one method with one setting changed, kept in different folders of the grid,
# paired on the same questions (benchmarks/fed_runs_table.py). A setting is left out until all of
# its seeds have finished (pooled seeds must match for the paired differences).
ablation_table() {  # ablation_table NAME AGAINST LABEL=FOLDER/METHOD ...
  local name=$1 against=$2 spec label where seed folders runs=() missing
  shift 2
  for spec in "$@"; do
    label=${spec%%=*} where=${spec#*=} folders="" missing=""
    for seed in $seeds; do
      if [ -f "$out/$where/seed-$seed/results.json" ]; then folders+="${folders:+,}$out/$where/seed-$seed"
      else missing+=" $seed"; fi
    done
    if [ -n "$missing" ]; then echo "$name: $label left out (seeds$missing not finished)"
    else runs+=(--run "$label=$folders"); fi
  done
  case " ${runs[*]} " in *" $against="*) ;; *) echo "$name: $against has not finished; no table"; return ;; esac
  link_base "$name"
  OMP_NUM_THREADS=1 "$python" benchmarks/fed_runs_table.py --out "$out/$name" --against "$against" "${runs[@]}" \
    && echo "$name: $out/$name/results.md"
}
ablations() {
  ablation_table ablation fedalora fedit=homogeneous/fedit fedalora=homogeneous/fedalora \
    fedalora-common-a=a-common-keep/fedalora fedalora-reset=a-independent-reset/fedalora \
    fedalora-common-a-reset=a-common-reset/fedalora
  ablation_table ablation-het fedalora-het fedalora-het=heterogeneous/fedalora-het \
    fedalora-het-common-a=heterogeneous-common-a/fedalora-het zeropad=heterogeneous/zeropad \
    flora=heterogeneous/flora flexlora=heterogeneous/flexlora
}
if [ "$worker" = status ]; then tables --status; exit; fi
if [ "$worker" = ablation ]; then ablations; exit; fi

tiers=("homogeneous-first a-common-keep" homogeneous "heterogeneous heterogeneous-common-a"
       "a-common-reset a-independent-reset")
for tier in "${tiers[@]}"; do
  for seed in $seeds; do
    for name in $tier; do
      case " $settings " in *" ${name%-first} "*) setting "$name" "$seed" --leave-busy ;; esac
    done
  done
done
tables
ablations
