#!/bin/bash
# Usage: benches/presence-redis-cost.sh <label> <pubgate binary> <pubgate-bench binary> <connections> <channels>
# 3 nodes on one private redis-server; measures Redis commands/s over a 30 s idle window and
# used_memory per member.
set -u
label=$1; bin=$2; bench=$3; conns=$4; chans=$5
ulimit -n 20000
dir=${TMPDIR:-/tmp}/pubgate-presence-bench/$label; rm -rf $dir; mkdir -p $dir
port=$((20000 + RANDOM % 20000))
redis-server --port $port --save "" --appendonly no --daemonize no --logfile $dir/redis.log &
rpid=$!
sleep 0.5
rc() { redis-cli -p $port "$@"; }
pids=()
urls=()
for i in 1 2 3; do
  p=$((port + i))
  PUBGATE_LISTEN=127.0.0.1:$p PUBGATE_REDIS_URL=redis://127.0.0.1:$port/ PUBGATE_NODE_ID=n$i \
  PUBGATE_PING_INTERVAL=5m PUBGATE_RATE_LIMIT=0 RUST_LOG=warn $bin > $dir/node$i.log 2>&1 &
  pids+=($!)
  urls+=(--url ws://127.0.0.1:$p/ws)
done
sleep 1
base=$(rc info memory | grep '^used_memory:' | cut -d: -f2 | tr -d '\r')
# Hold the connections long enough for the measurement window below.
$bench idle "${urls[@]}" -c $conns --channels $chans --duration 75s -q --json $dir/bench.json > $dir/bench.txt 2>&1 &
bpid=$!
# Wait until every member is in presence (subscriptions gauge on the nodes).
for t in $(seq 1 240); do
  n=0
  for i in 1 2 3; do
    v=$(curl -s 127.0.0.1:$((port + i))/metrics | grep '^pubgate_subscriptions ' | cut -d' ' -f2)
    n=$((n + ${v:-0}))
  done
  [ "$n" -ge "$conns" ] && break
  sleep 1
done
echo "members subscribed: $n after ${t}s" | tee $dir/result.txt
sleep 5
mem=$(rc info memory | grep '^used_memory:' | cut -d: -f2 | tr -d '\r')
rc config resetstat > /dev/null
sleep 30
rc info commandstats > $dir/commandstats.txt
rc info stats > $dir/stats.txt
total=$(grep -o 'calls=[0-9]*' $dir/commandstats.txt | cut -d= -f2 | paste -sd+ | bc)
# `info commandstats` and `config resetstat` themselves are counted: subtract them.
echo "used_memory before: $base after: $mem delta: $((mem - base)) per member: $(( (mem - base) / n )) bytes" | tee -a $dir/result.txt
echo "commands in 30 s: $total => $(echo "scale=1; $total / 30" | bc) per s" | tee -a $dir/result.txt
grep -E 'cmdstat' $dir/commandstats.txt | sed 's/,usec_per_call.*//' | tee -a $dir/result.txt
rc dbsize | sed 's/^/keys: /' | tee -a $dir/result.txt
wait $bpid
kill ${pids[@]} 2>/dev/null
wait ${pids[@]} 2>/dev/null
kill $rpid; wait $rpid 2>/dev/null
