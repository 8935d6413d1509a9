#!/bin/bash
# Usage: benches/presence-drain.sh <pubgate binary> <pubgate-bench binary> <connections>
# Connections on one node (of 2) draining: time to exit and members left in Redis.
set -u
bin=$1; bench=$2; conns=$3
ulimit -n 20000
dir=${TMPDIR:-/tmp}/pubgate-presence-bench/drain; rm -rf $dir; mkdir -p $dir
port=$((20000 + RANDOM % 20000))
redis-server --port $port --save "" --appendonly no --logfile $dir/redis.log &
rpid=$!
sleep 0.5
rc() { redis-cli -p $port "$@"; }
PUBGATE_LISTEN=127.0.0.1:$((port+1)) PUBGATE_REDIS_URL=redis://127.0.0.1:$port/ PUBGATE_NODE_ID=a \
  PUBGATE_PING_INTERVAL=5m PUBGATE_RATE_LIMIT=0 RUST_LOG=info $bin > $dir/a.log 2>&1 &
apid=$!
PUBGATE_LISTEN=127.0.0.1:$((port+2)) PUBGATE_REDIS_URL=redis://127.0.0.1:$port/ PUBGATE_NODE_ID=b \
  PUBGATE_PING_INTERVAL=5m RUST_LOG=info $bin > $dir/b.log 2>&1 &
bpid=$!
sleep 1
$bench idle --url ws://127.0.0.1:$((port+1))/ws -c $conns --channels 100 --duration 40s -q > $dir/bench.txt 2>&1 &
lpid=$!
for t in $(seq 1 120); do
  v=$(curl -s 127.0.0.1:$((port+1))/metrics | grep '^pubgate_subscriptions ' | cut -d' ' -f2)
  [ "${v:-0}" -ge "$conns" ] && break
  sleep 1
done
sleep 3
before=0; for k in $(rc --scan --pattern '*__presence:{*'); do before=$((before + $(rc hlen "$k"))); done
rc config resetstat > /dev/null
start=$(date +%s%N)
kill -TERM $apid
wait $apid; code=$?
end=$(date +%s%N)
after=0; for k in $(rc --scan --pattern '*__presence:{*'); do after=$((after + $(rc hlen "$k"))); done
echo "members before: $before; SIGTERM to exit: $(( (end - start) / 1000000 )) ms (exit $code); members left in Redis: $after"
rc info commandstats | grep -E 'publish|evalsha|srem' | sed 's/,usec_per_call.*//'
grep -E 'released|timed out|failed|stopped' $dir/a.log | tail -3
kill $lpid $bpid 2>/dev/null; wait $lpid $bpid 2>/dev/null
kill $rpid; wait $rpid 2>/dev/null
