#!/usr/bin/env bash
# The docker compose topology as native processes on loopback, for development and benchmarks:
# a private redis-server, NODES pubgate nodes and HAProxy configured by
# deploy/haproxy/render-local.sh from the same deploy/haproxy/haproxy.cfg.
#
# Usage: deploy/local/cluster.sh up | down | status | restart-node I
#   up             start everything (builds target/release/pubgate first if it is missing) and
#                  wait until every node is ready and HAProxy sees it UP
#   down           SIGTERM the nodes (they drain and close clients with 1001), then HAProxy and
#                  Redis; SIGKILL only what is still running after the wait
#   status         one line per process; exits 1 unless everything runs and is UP
#   restart-node I SIGTERM node I, wait for it to exit, start it again (a one-node rolling restart)
# Environment (defaults in brackets):
#   NODES [3]  BASE_PORT [8081] (node i listens on BASE_PORT+i-1)  LB_PORT [8080]
#   STATS_PORT [8404]  REDIS_PORT [6390]  STATE_DIR [target/local-cluster]
#   GATEWAY_BIN [target/release/pubgate]  STOP_TIMEOUT [20] seconds `down` waits per stage
#   Any PUBGATE_* variable is passed to the nodes; this script sets PUBGATE_LISTEN,
#   PUBGATE_REDIS_URL and PUBGATE_NODE_ID (node1..), and defaults PUBGATE_DRAIN_DELAY=5s and
#   PUBGATE_SHUTDOWN_TIMEOUT=15s as in docker-compose.yml. HAPROXY_CHECK_INTER/FALL/RISE go to
#   render-local.sh.
# State: STATE_DIR/{redis,haproxy,node1,...}.{pid,log}, STATE_DIR/haproxy.cfg.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
NODES=${NODES:-3}
BASE_PORT=${BASE_PORT:-8081}
LB_PORT=${LB_PORT:-8080}
STATS_PORT=${STATS_PORT:-8404}
REDIS_PORT=${REDIS_PORT:-6390}
STATE_DIR=${STATE_DIR:-$ROOT/target/local-cluster}
GATEWAY_BIN=${GATEWAY_BIN:-}
STOP_TIMEOUT=${STOP_TIMEOUT:-20}
export PUBGATE_DRAIN_DELAY=${PUBGATE_DRAIN_DELAY:-5s}
export PUBGATE_SHUTDOWN_TIMEOUT=${PUBGATE_SHUTDOWN_TIMEOUT:-15s}

die() { echo "cluster.sh: $*" >&2; exit 1; }
[[ $NODES =~ ^[1-9][0-9]*$ ]] || die "NODES must be a positive integer"
for p in BASE_PORT LB_PORT STATS_PORT REDIS_PORT STOP_TIMEOUT; do
    [[ ${!p} =~ ^[0-9]+$ ]] || die "$p must be a number"
done
# 6379 is the machine's shared Redis: never start or stop anything there.
[[ $REDIS_PORT != 6379 ]] || die "REDIS_PORT 6379 is reserved for the system Redis; pick another"

node_port() { echo $((BASE_PORT + $1 - 1)); }
pidfile() { echo "$STATE_DIR/$1.pid"; }

# True when the pid file names a live process whose command line contains $2 (so a recycled pid
# of some other program is never signalled).
running() {
    local f pid
    f=$(pidfile "$1")
    [[ -s $f ]] || return 1
    pid=$(<"$f")
    alive "$pid" && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$2"
}

# kill -0 also succeeds on a zombie, which lingers until init reaps it.
alive() {
    local state
    kill -0 "$1" 2>/dev/null || return 1
    state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ $state != Z ]]
}

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# HTTP GET over bash's /dev/tcp (no curl needed); prints the raw response. (The single-quoted
# scripts below get their values as $0, $1: SC2016 is intended.)
# shellcheck disable=SC2016
http_get() {
    timeout 3 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$0" || exit 1
        printf "GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n" "$1" >&3
        cat <&3' "$1" "$2" 2>/dev/null || true
}
http_status() { http_get "$1" "$2" | head -n1 | awk '{print $2}'; }

# shellcheck disable=SC2016
redis_ping() {
    timeout 2 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$0" || exit 1
        printf "PING\r\n" >&3; read -r line <&3; [[ $line == "+PONG"* ]]' "$REDIS_PORT" 2>/dev/null
}

# HAProxy's view of each gw server: "gw1 UP" lines from the stats CSV (field 18 is status).
lb_servers() {
    http_get "$STATS_PORT" "/;csv" | tr -d '\r' | awk -F, '$1 == "gateways" && $2 ~ /^gw/ { print $2, $18 }'
}

# Polls the command until it succeeds; it returns 2 to give up at once (its process died).
wait_for() { # description timeout_s command...
    local what=$1 limit=$2 i rc
    shift 2
    for ((i = 0; i < limit * 5; i++)); do
        rc=0
        "$@" || rc=$?
        ((rc != 0)) || return 0
        ((rc != 2)) || return 1
        sleep 0.2
    done
    echo "cluster.sh: timed out after ${limit}s waiting for $what" >&2
    return 1
}

start_node() {
    local i=$1 port
    port=$(node_port "$i")
    PUBGATE_LISTEN=127.0.0.1:$port \
    PUBGATE_REDIS_URL=redis://127.0.0.1:$REDIS_PORT/ \
    PUBGATE_NODE_ID=node$i \
        nohup "$GATEWAY_BIN" >>"$STATE_DIR/node$i.log" 2>&1 </dev/null &
    echo $! >"$(pidfile "node$i")"
}

node_ready() { [[ $(http_status "$(node_port "$1")" /readyz) == 200 ]]; }
node_alive_or_fail() {
    running "node$1" "$GATEWAY_BIN" && return 0
    echo "cluster.sh: node$1 exited; last lines of $STATE_DIR/node$1.log:" >&2
    tail -n 20 "$STATE_DIR/node$1.log" >&2
    return 2
}
wait_node_ready() {
    local i=$1 t
    for ((t = 0; t < 150; t++)); do
        node_ready "$i" && return 0
        node_alive_or_fail "$i" || return 1
        sleep 0.2
    done
    echo "cluster.sh: node$i not ready after 30s (see $STATE_DIR/node$i.log)" >&2
    return 1
}
all_lb_up() { [[ $(lb_servers | grep -c ' UP$') -eq $NODES ]]; }
lb_up_or_fail() {
    all_lb_up && return 0
    running haproxy haproxy && return 1
    echo "cluster.sh: haproxy exited; last lines of $STATE_DIR/haproxy.log:" >&2
    tail -n 20 "$STATE_DIR/haproxy.log" >&2
    return 2
}

# SIGTERM every named component, wait up to STOP_TIMEOUT, then SIGKILL what is left.
stop() { # name:pattern...
    local spec name pat pids=() names=() t
    for spec in "$@"; do
        name=${spec%%:*} pat=${spec#*:}
        if running "$name" "$pat"; then
            pids+=("$(<"$(pidfile "$name")")") names+=("$name")
            kill -TERM "${pids[-1]}"
        fi
    done
    for ((t = 0; t < STOP_TIMEOUT * 5; t++)); do
        local left=0 p
        for p in "${pids[@]}"; do alive "$p" && left=1; done
        ((left)) || break
        sleep 0.2
    done
    local k
    for k in "${!pids[@]}"; do
        if alive "${pids[k]}"; then
            echo "cluster.sh: ${names[k]} still running after ${STOP_TIMEOUT}s, sending SIGKILL" >&2
            kill -KILL "${pids[k]}" 2>/dev/null || true
        fi
        echo "stopped ${names[k]}"
    done
    for spec in "$@"; do rm -f "$(pidfile "${spec%%:*}")"; done
}

node_specs() { local i; for ((i = 1; i <= NODES; i++)); do echo "node$i:$GATEWAY_BIN"; done; }

cmd_down() {
    [[ -d $STATE_DIR ]] || { echo "nothing to stop ($STATE_DIR does not exist)"; return 0; }
    # Nodes first, while HAProxy and Redis still run: they drain (readyz 503, HAProxy takes them
    # out), close clients with 1001 and remove their presence members from Redis.
    mapfile -t specs < <(node_specs)
    stop "${specs[@]}"
    stop "haproxy:haproxy"
    stop "redis:redis-server"
    echo "down (logs kept in $STATE_DIR)"
}

cmd_up() {
    command -v redis-server >/dev/null || die "redis-server not found (apt-get install redis-server)"
    command -v haproxy >/dev/null || die "haproxy not found (apt-get install haproxy)"
    mkdir -p "$STATE_DIR/redis-data"
    local i
    running redis redis-server && die "already running (deploy/local/cluster.sh status / down)"
    for ((i = 1; i <= NODES; i++)); do
        running "node$i" "$GATEWAY_BIN" && die "node$i already running (cluster.sh down first)"
    done
    for p in "$REDIS_PORT" "$LB_PORT" "$STATS_PORT" $(for ((i = 1; i <= NODES; i++)); do node_port "$i"; done); do
        port_busy "$p" && die "127.0.0.1:$p is already in use"
    done
    if [[ ! -x $GATEWAY_BIN ]]; then
        [[ $GATEWAY_BIN == "$ROOT/target/release/pubgate" ]] || die "GATEWAY_BIN $GATEWAY_BIN is not executable"
        echo "building $GATEWAY_BIN"
        (cd "$ROOT" && cargo build --release --locked)
    fi
    # Every WebSocket costs a descriptor in its node and two in HAProxy: use the hard limit.
    ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
    # From here on, a failure stops whatever was started.
    trap 'echo "cluster.sh: start failed, stopping" >&2; cmd_down >/dev/null' ERR

    nohup redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
        --dir "$STATE_DIR/redis-data" >"$STATE_DIR/redis.log" 2>&1 </dev/null &
    echo $! >"$(pidfile redis)"
    wait_for "redis on 127.0.0.1:$REDIS_PORT" 10 redis_ping

    for ((i = 1; i <= NODES; i++)); do : >"$STATE_DIR/node$i.log"; start_node "$i"; done

    local ports=()
    for ((i = 1; i <= NODES; i++)); do ports+=("$(node_port "$i")"); done
    "$ROOT/deploy/haproxy/render-local.sh" "$LB_PORT" "$STATS_PORT" "${ports[@]}" >"$STATE_DIR/haproxy.cfg"
    haproxy -c -q -f "$STATE_DIR/haproxy.cfg"
    # -db: stay in the foreground (no daemon), so the pid we record is HAProxy's own.
    nohup haproxy -db -f "$STATE_DIR/haproxy.cfg" >"$STATE_DIR/haproxy.log" 2>&1 </dev/null &
    echo $! >"$(pidfile haproxy)"

    for ((i = 1; i <= NODES; i++)); do wait_node_ready "$i"; done
    wait_for "HAProxy to see all $NODES nodes UP" 30 lb_up_or_fail
    trap - ERR
    cmd_status
}

cmd_status() {
    local ok=0 i st
    if running redis redis-server && redis_ping; then
        echo "redis    127.0.0.1:$REDIS_PORT  up"
    else
        echo "redis    127.0.0.1:$REDIS_PORT  DOWN"; ok=1
    fi
    for ((i = 1; i <= NODES; i++)); do
        if running "node$i" "$GATEWAY_BIN"; then
            st=$(http_status "$(node_port "$i")" /readyz)
            echo "node$i    127.0.0.1:$(node_port "$i")  running, /readyz ${st:-no answer}"
            [[ $st == 200 ]] || ok=1
        else
            echo "node$i    127.0.0.1:$(node_port "$i")  not running"; ok=1
        fi
    done
    if running haproxy haproxy; then
        echo "haproxy  127.0.0.1:$LB_PORT (clients, ws://127.0.0.1:$LB_PORT/ws), stats http://127.0.0.1:$STATS_PORT/"
        lb_servers | sed 's/^/         backend /'
        all_lb_up || ok=1
    else
        echo "haproxy  127.0.0.1:$LB_PORT  not running"; ok=1
    fi
    echo "logs     $STATE_DIR/*.log"
    return $ok
}

cmd_restart_node() {
    local i=${1:-}
    if ! [[ $i =~ ^[0-9]+$ ]] || ((i < 1 || i > NODES)); then
        die "usage: cluster.sh restart-node 1..$NODES"
    fi
    stop "node$i:$GATEWAY_BIN"
    start_node "$i"
    wait_node_ready "$i"
    echo "node$i ready"
}

[[ -n $GATEWAY_BIN ]] || GATEWAY_BIN=$ROOT/target/release/pubgate
case ${1:-} in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    restart-node) cmd_restart_node "${2:-}" ;;
    *) echo "usage: $0 up|down|status|restart-node I" >&2; exit 2 ;;
esac
