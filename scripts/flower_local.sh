#!/usr/bin/env bash
# Run asymlora's Flower app on this machine: one SuperLink and N SuperNodes on 127.0.0.1 (free
# ports), then `flwr run`, then stop everything (also on error or Ctrl-C).
#
#   scripts/flower_local.sh N [flwr run options...]
#   scripts/flower_local.sh 3 --run-config "method='fedalora' rounds=2 model='tiny-llama' tasks='a.jsonl,b.jsonl,c.jsonl'"
#
# Node i is started with --node-config "partition-id=i" (client i: task i of `tasks`). Uses the
# flwr of the current environment (put the venv's bin first on PATH); no runtime dependency
# installation, no downloads. Flower's files go to a temporary FLWR_HOME, removed at the end;
# the SuperLink's and SuperNodes' logs go to $FLOWER_LOGS (set it to keep them; by default they
# are written inside FLWR_HOME and removed with it).
set -euo pipefail

if [[ $# -lt 1 || ! $1 =~ ^[0-9]+$ || $1 -lt 1 ]]; then
    echo "usage: $0 NUM_NODES [flwr run options...]" >&2
    exit 2
fi
nodes=$1
shift
app_dir=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python}

FLWR_HOME=$(mktemp -d "${TMPDIR:-/tmp}/asymlora-flower.XXXXXX")
export FLWR_HOME
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

flower-superlink --insecure --isolation subprocess --disable-runtime-dependency-installation \
    --host 127.0.0.1 --port "$link_port" >"$logs/superlink.log" 2>&1 &
pids+=($!)

# Wait until the SuperLink accepts connections.
for _ in $(seq 100); do
    if "$python" -c "import socket; socket.create_connection(('127.0.0.1', $link_port), 0.5).close()" 2>/dev/null; then
        break
    fi
    sleep 0.2
done

for ((i = 0; i < nodes; i++)); do
    flower-supernode --insecure --superlink "127.0.0.1:$link_port" \
        --node-config "partition-id=$i" --port "${ports[$((i + 1))]}" >"$logs/supernode-$i.log" 2>&1 &
    pids+=($!)
done

echo "SuperLink on 127.0.0.1:$link_port, $nodes SuperNodes; logs in $logs" >&2
flwr run "$app_dir" local --stream "$@"
