#!/usr/bin/env bash
# Run asymlora's Flower app on this machine: one SuperLink and N SuperNodes on 127.0.0.1 (free
# ports), then `flwr run`, then stop everything (also on error or Ctrl-C).
#
#   scripts/flower_local.sh N [flwr run options...] [::: flwr run options...]...
#   scripts/flower_local.sh 3 --run-config "federation.method='fedalora' federation.rounds=2 model='tiny-llama' clients.tasks='a.jsonl,b.jsonl,c.jsonl'"
#
# Node i is started with --node-config "partition-id=i" (client i: task i of `tasks`). Several
# runs, separated by `:::`, are submitted to the same SuperLink and nodes at once (`flwr run
# --stream` each, in parallel); the script returns when all have ended, with the first non-zero
# exit status. A run of fewer clients than nodes leaves the nodes of higher partition-id out.
#
# FLOWER_ISOLATION=warm (the default) starts the SuperLink and the SuperNodes with `--isolation
# process` and one `python -m asymlora.engines.flower_exec` that launches every ServerApp and
# ClientApp task as a fork of one process that has imported torch and transformers already
# (docs/flower.md); FLOWER_PRELOAD=MODEL also loads that model in it once, for every task.
# FLOWER_ISOLATION=subprocess uses Flower's stock launcher (`--isolation
# subprocess`: a fresh Python process per message; slower, no flwr internals involved).
# FLOWER_NODE_CONFIG adds key=value items to every node's --node-config, e.g. local DP
# (docs/flower.md): FLOWER_NODE_CONFIG="local-dp='clipping_norm=1.0,sensitivity=2.0,epsilon=0.5,delta=1e-5'".
#
# Uses the flwr of the current environment (put the venv's bin first on PATH, or set PYTHON);
# no runtime dependency installation, no downloads, telemetry off. Flower's files go to a
# temporary FLWR_HOME, removed at the end; the logs go to $FLOWER_LOGS (set it to keep them;
# by default they are written inside FLWR_HOME and removed with it).
set -euo pipefail

if [[ $# -lt 1 || ! $1 =~ ^[0-9]+$ || $1 -lt 1 ]]; then
    echo "usage: $0 NUM_NODES [flwr run options...] [::: flwr run options...]..." >&2
    exit 2
fi
nodes=$1
shift
app_dir=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python}
isolation=${FLOWER_ISOLATION:-warm}
case $isolation in
warm) mode=process ;;
subprocess) mode=subprocess ;;
*)
    echo "FLOWER_ISOLATION=$isolation: expected warm or subprocess" >&2
    exit 2
    ;;
esac

FLWR_HOME=$(mktemp -d "${TMPDIR:-/tmp}/asymlora-flower.XXXXXX")
export FLWR_HOME FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
export FLWR_SUPEREXEC_TASK_POLL_INTERVAL=${FLWR_SUPEREXEC_TASK_POLL_INTERVAL:-0.2}
logs=${FLOWER_LOGS:-$FLWR_HOME/logs}
mkdir -p "$logs"
pids=()

cleanup() {
    local pid
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$FLWR_HOME"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# N + 1 free TCP ports on 127.0.0.1 (the OS picks them; all held open until all are known).
read -r -a ports <<<"$("$python" - "$((nodes + 1))" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
)"
link_port=${ports[0]}

cat >"$FLWR_HOME/config.toml" <<EOF
[superlink.local]
address = "127.0.0.1:$link_port"
insecure = true
EOF

wait_for_port() {
    local _
    for _ in $(seq 150); do
        if "$python" -c "import socket; socket.create_connection(('127.0.0.1', $1), 0.5).close()" 2>/dev/null; then
            return 0
        fi
        sleep 0.2
    done
    echo "nothing listens on 127.0.0.1:$1 after 30 s" >&2
    return 1
}

# The runtime APIs: the SuperLink's (it serves every API on one port) and one per SuperNode.
runtimes=("127.0.0.1:$link_port")
for ((i = 0; i < nodes; i++)); do runtimes+=("127.0.0.1:${ports[$((i + 1))]}"); done

# `flwr run DIR` walks every file under DIR (a .venv: tens of thousands) to build the app
# bundle; stage what the bundle holds (pyproject.toml's fab-include) in a small folder instead.
# FLOWER_APP=DIR stages DIR's pyproject.toml and *.py on top (another app around asymlora's,
# such as the tests' app with bad clients).
stage=$FLWR_HOME/app
mkdir -p "$stage"
cp "$app_dir/pyproject.toml" "$stage/"
(cd "$app_dir" && find src/asymlora -name '*.py' -print0 | xargs -0 cp --parents -t "$stage")
if [[ -n ${FLOWER_APP:-} ]]; then cp "$FLOWER_APP"/pyproject.toml "$FLOWER_APP"/*.py "$stage/"; fi

if [[ $isolation == warm ]]; then
    # One warm process: the SuperExecs of the SuperLink and of every SuperNode, and the runs. It
    # starts first (its imports take longest) and waits for the runtime APIs itself.
    runs=("$stage" local --stream)
    for arg in "$@"; do
        if [[ $arg == ::: ]]; then runs+=(::: "$stage" local --stream); else runs+=("$arg"); fi
    done
    preload=()
    [[ -z ${FLOWER_PRELOAD:-} ]] || preload=(--preload "$FLOWER_PRELOAD")
    "$python" -m asymlora.engines.flower_exec --insecure "${preload[@]}" "${runtimes[@]}" -- "${runs[@]}" &
    warm=$!
    pids+=($warm)
fi

flower-superlink --insecure --isolation "$mode" --disable-runtime-dependency-installation \
    --host 127.0.0.1 --port "$link_port" >"$logs/superlink.log" 2>&1 &
pids+=($!)

for ((i = 0; i < nodes; i++)); do
    flower-supernode --insecure --superlink "127.0.0.1:$link_port" --isolation "$mode" \
        --node-config "partition-id=$i${FLOWER_NODE_CONFIG:+ $FLOWER_NODE_CONFIG}" --host 127.0.0.1 --port "${ports[$((i + 1))]}" \
        >"$logs/supernode-$i.log" 2>&1 &
    pids+=($!)
done
echo "SuperLink on 127.0.0.1:$link_port, $nodes SuperNodes ($isolation); logs in $logs" >&2

if [[ $isolation == warm ]]; then
    wait "$warm"
    exit $?
fi

wait_for_port "$link_port"
runs=()
args=()
submit() {
    flwr run "$stage" local --stream "${args[@]}" &
    runs+=($!)
    pids+=($!)
    args=()
}
for arg in "$@"; do
    if [[ $arg == ::: ]]; then submit; else args+=("$arg"); fi
done
submit
status=0
for run in "${runs[@]}"; do
    wait "$run" || { rc=$?; [[ $status -ne 0 ]] || status=$rc; }
done
exit "$status"
