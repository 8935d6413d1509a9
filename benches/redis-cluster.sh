#!/bin/bash
# Usage: benches/redis-cluster.sh <pubgate-bench binary> [bench args...]
# The same channels scenario with 3 spawned gateway nodes, first on one private redis-server, then
# on a private 3-master Redis Cluster (3 masters + 3 replicas); prints each Redis's CPU seconds
# (INFO cpu, used_cpu_sys + used_cpu_user) spent during the run, per master.
# Ports: redis on 21000-21006 (cluster bus +10000). Everything is killed at the end.
set -u
bench=$1; shift
args=("$@")
[ ${#args[@]} -eq 0 ] && args=(channels -c 3000 --channels 300 --rate 20000 --duration 10s -q)
dir=${TMPDIR:-/tmp}/pubgate-cluster-bench; rm -rf "$dir"; mkdir -p "$dir"
pids=()
cleanup() { for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null; done; }
trap cleanup EXIT
cpu() { redis-cli -p "$1" INFO cpu | tr -d '\r' | awk -F: '/^used_cpu_(sys|user):/ {s += $2} END {printf "%.2f", s}'; }

start_redis() { # port [cluster]
    local port=$1 extra=()
    [ "${2:-}" = cluster ] && extra=(--cluster-enabled yes --cluster-config-file "$dir/nodes-$port.conf"
        --cluster-node-timeout 1500 --cluster-replica-validity-factor 0)
    redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$dir" \
        --logfile "$dir/redis-$port.log" "${extra[@]}" &
    pids+=($!)
    until redis-cli -p "$port" ping >/dev/null 2>&1; do sleep 0.05; done
}

echo "== one Redis"
start_redis 21000
before=$(cpu 21000)
"$bench" "${args[@]}" --nodes 3 --redis-url redis://127.0.0.1:21000/ | tee "$dir/single.txt"
echo "redis 21000 (single): $(echo "$(cpu 21000) - $before" | bc) CPU s"

echo "== Redis Cluster, 3 masters + 3 replicas"
for p in 21001 21002 21003 21004 21005 21006; do start_redis $p cluster; done
redis-cli --cluster create 127.0.0.1:21001 127.0.0.1:21002 127.0.0.1:21003 127.0.0.1:21004 \
    127.0.0.1:21005 127.0.0.1:21006 --cluster-replicas 1 --cluster-yes >"$dir/create.log" 2>&1
until redis-cli -p 21001 cluster info | grep -q cluster_state:ok; do sleep 0.1; done
sleep 2
masters=$(redis-cli -p 21001 cluster nodes | awk '/master/ {split($2, a, "[:@]"); print a[2]}' | sort)
declare -A b
for p in 21001 21002 21003 21004 21005 21006; do b[$p]=$(cpu $p); done
"$bench" "${args[@]}" --nodes 3 \
    --redis-cluster redis://127.0.0.1:21001,redis://127.0.0.1:21002,redis://127.0.0.1:21003 | tee "$dir/cluster.txt"
for p in 21001 21002 21003 21004 21005 21006; do
    role=replica; grep -qx "$p" <<<"$masters" && role=master
    echo "redis $p ($role): $(echo "$(cpu $p) - ${b[$p]}" | bc) CPU s"
done
