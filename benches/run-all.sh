#!/usr/bin/env bash
# Reproduces the figures of docs/benchmarks.md: every run measures pubgate and the bare-writer
# baseline side by side (--target both), writes its JSON report to RESULTS, and benches/plot.py
# turns them into the charts in docs/img and Markdown tables.
#
#   benches/run-all.sh [RESULTS_DIR]        (default: benches/results)
#   QUICK=1 benches/run-all.sh              (smaller sizes, shorter)
#
# Needs: cargo, redis-server on PATH (3-node runs), python3 with matplotlib (charts).
# All traffic stays on 127.0.0.0/8; every run is bounded by --duration and `timeout`.
# Run it on an otherwise idle machine: the load generator shares the cores with the servers.
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-benches/results}
mkdir -p "$RESULTS"
cargo build --release --bins
BENCH=target/release/pubgate-bench
STEP=${STEP:-3s}

run() { # name, then pubgate-bench arguments
  local name=$1
  shift
  echo "== $name: pubgate-bench $*" >&2
  if ! timeout 900 "$BENCH" "$@" --json "$RESULTS/$name.json" > "$RESULTS/$name.txt"; then
    echo "!! $name failed (see $RESULTS/$name.txt)" >&2
  fi
  cat "$RESULTS/$name.txt"
}

if [[ -n "${QUICK:-}" ]]; then
  SIZES="1000 5000"
  IDLE="1000 5000"
  BIG=12000
else
  SIZES="1000 5000 10000 19000"
  IDLE="1000 5000 10000 19000"
  BIG=54000
fi

# Fan-out on one channel: ramp the publish rate from ~20k deliveries/s x1.5 per step until
# deliveries/s stop growing, then a step at half of pubgate's peak rate (the latency figure).
# The first step gives CPU per delivery at moderate load.
for n in $SIZES; do
  rate=$(python3 -c "print(max(1, round(20000 / $n, 2)))")
  run "fanout-n1-c$n" fanout -c "$n" --rate "$rate" --saturate --duration "$STEP" --target both
done
for n in $SIZES; do
  rate=$(python3 -c "print(max(1, round(20000 / $n, 2)))")
  run "fanout-n3-c$n" fanout --nodes 3 -c "$n" --rate "$rate" --saturate --duration "$STEP" --target both
done

# 10k connections over 1k channels (10 subscribers per channel), ~50k deliveries/s.
run channels-n1-c10000 channels -c 10000 --channels 1000 --rate 5000 --duration 5s --target both
run channels-n3-c10000 channels --nodes 3 -c 10000 --channels 1000 --rate 5000 --duration 5s --target both

# Idle memory per connection (pings every 5 min so they do not count).
for n in $IDLE; do
  run "idle-n1-c$n" idle -c "$n" --duration 2s --settle 2s --ping-interval 5m --target both
done
# 50k+ concurrent connections over 3 nodes on one Redis (18k per node), idle, then a fan-out to all.
run "idle-n3-c$BIG" idle --nodes 3 -c "$BIG" --duration 5s --settle 2s --ping-interval 5m --target both
run "fanout-n3-c$BIG" fanout --nodes 3 -c "$BIG" --rate 1 --duration 5s --ping-interval 5m

# Connection churn: connect + subscribe + close per second beside 1000 standing connections.
run churn-n1 churn -c 1000 --channels 100 --rate 200 --duration 5s --target both
run churn-n3 churn --nodes 3 -c 1000 --channels 100 --rate 200 --duration 5s --target both

python3 benches/plot.py "$RESULTS" --out docs/img --tables > "$RESULTS/tables.md"
echo "results in $RESULTS, tables in $RESULTS/tables.md, charts in docs/img" >&2
