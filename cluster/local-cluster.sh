#!/usr/bin/env bash
# A multi-node Ray cluster on one machine: a head and N worker nodes, each with its own raylet,
# object store, --temp-dir and ports, all under one folder. For trying multi-node behaviour
# (placement across nodes, a node dying) without machines. Token auth on, like a real cluster.
#
#   cluster/local-cluster.sh start [N_WORKERS=2] [CPUS_PER_NODE=2]
#   cluster/local-cluster.sh status
#   cluster/local-cluster.sh env      # the exports a client shell needs
#   cluster/local-cluster.sh stop
#
# `stop` ends exactly this cluster. It never runs `ray stop`, which kills every Ray process on
# the machine (other clusters, test sessions). Each node runs `ray start --block` in a session of
# its own: SIGTERM makes it kill the processes it started, then its process group gets SIGKILL,
# then leftovers whose command line or cwd lies in this cluster's session folders (job drivers).
#
# Settings (environment): LLM_RAY_CLUSTER_DIR (default /tmp/llm-ray-cluster; keep it short,
# Unix socket paths are limited to 107 bytes), LLM_RAY_PORT (GCS, 6390), LLM_RAY_DASHBOARD_PORT
# (8266), LLM_RAY_PORT_BASE (first of the per-node ports, 21000).
set -euo pipefail

DIR=$(realpath -m "${LLM_RAY_CLUSTER_DIR:-/tmp/llm-ray-cluster}")
PORT=${LLM_RAY_PORT:-6390}
DASH=${LLM_RAY_DASHBOARD_PORT:-8266}
BASE=${LLM_RAY_PORT_BASE:-21000}
RAY=${RAY:-ray}

export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$DIR/auth_token"
export RAY_USAGE_STATS_ENABLED=0
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0  # SIGTERM: stop now, not after a 30 s drain

usage() { sed -n '2,9p' "$0"; exit 2; }

# node NAME INDEX [ray start args...]: one node, its own temp dir and port block.
# Each node needs its own dashboard-agent and worker ports: several raylets share one IP.
# Block of node i: BASE+1000i agent, +1 client server (head), +100..+999 workers.
node() {
  local name=$1 i=$2; shift 2
  local ports=$((BASE + i * 1000))
  mkdir -p "$DIR/$name"
  (
    cd "$DIR/$name"
    setsid "$RAY" start --block --temp-dir="$DIR/$name/ray" --node-ip-address=127.0.0.1 \
      --dashboard-agent-listen-port=$((ports)) --min-worker-port=$((ports + 100)) \
      --max-worker-port=$((ports + 999)) --disable-usage-stats "$@" \
      >"$DIR/$name/ray-start.log" 2>&1 &
    echo $! >"$DIR/$name/pid"
  )
}

wait_nodes() {  # until N nodes are alive; fail fast when a node's `ray start` exits
  local want=$1 deadline=$((SECONDS + 120)) f alive
  while [ "$SECONDS" -lt "$deadline" ]; do
    for f in "$DIR"/*/pid; do
      if ! kill -0 "$(cat "$f")" 2>/dev/null; then
        echo "$(dirname "$f") failed to start:" >&2
        tail -5 "$(dirname "$f")/ray-start.log" >&2
        return 1
      fi
    done
    alive=$("$RAY" list nodes --address "http://127.0.0.1:$DASH" --filter "state=ALIVE" --format json 2>/dev/null |
      grep -o '"node_id"' | wc -l || true)
    [ "${alive:-0}" -ge "$want" ] && return 0
    sleep 1
  done
  echo "cluster did not reach $want nodes in 120 s; see $DIR/*/ray-start.log" >&2
  return 1
}

start() {
  local workers=${1:-2} cpus=${2:-2}
  if compgen -G "$DIR/*/pid" >/dev/null; then
    echo "already started in $DIR (run: $0 stop)" >&2
    exit 1
  fi
  mkdir -p "$DIR"
  # One token for every node and client of this cluster (not ~/.ray/auth_token).
  (umask 077 && python3 -c 'import secrets; print(secrets.token_hex(32), end="")' >"$DIR/auth_token")
  # Ray internals that look a cluster up without an address (Ray Train's placement-group
  # cleaner) otherwise fail with "Found multiple active Ray instances" beside another cluster.
  export RAY_ADDRESS="127.0.0.1:$PORT"
  node head 0 --head --port="$PORT" --dashboard-host=127.0.0.1 --dashboard-port="$DASH" \
    --ray-client-server-port=$((BASE + 1)) --num-cpus="$cpus"
  wait_nodes 1 || { stop; exit 1; }
  for i in $(seq 1 "$workers"); do
    node "worker-$i" "$i" --address="127.0.0.1:$PORT" --num-cpus="$cpus"
  done
  wait_nodes $((workers + 1)) || { stop; exit 1; }
  echo "head + $workers workers up ($cpus CPUs each); dashboard http://127.0.0.1:$DASH"
  client_env
}

client_env() {
  echo "export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$DIR/auth_token"
  echo "export RAY_ADDRESS=http://127.0.0.1:$DASH   # ray job submit --working-dir . -- ..."
}

# Kill processes whose argv or cwd lies in this cluster's session folders (bash builtins only,
# so the scan does not match itself).
sweep() {
  local p pid cwd args
  for p in /proc/[0-9]*; do
    pid=${p#/proc/}
    [ "$pid" = "$$" ] && continue
    cwd=$(readlink "$p/cwd" 2>/dev/null) || continue
    args=()
    mapfile -d '' -t args <"$p/cmdline" 2>/dev/null || continue
    if [[ "$cwd/" == "$DIR"/*/ray/* || "${args[*]:-}" == *"$DIR/"*"/ray"* ]]; then
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
}

stop() {
  local f pid
  for f in "$DIR"/*/pid; do
    [ -e "$f" ] || continue
    pid=$(cat "$f")
    kill -TERM "$pid" 2>/dev/null || true
  done
  for f in "$DIR"/*/pid; do
    [ -e "$f" ] || continue
    pid=$(cat "$f")
    for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$pid" 2>/dev/null || true  # the node's process group (setsid above)
    rm -f "$f"
  done
  [ -d /proc/self ] && sweep
  echo "stopped the cluster in $DIR (logs kept; rm -rf $DIR to clean up)"
}

case ${1:-} in
  start) shift; start "$@" ;;
  stop) stop ;;
  status) "$RAY" status --address "127.0.0.1:$PORT" ;;
  env) client_env ;;
  *) usage ;;
esac
