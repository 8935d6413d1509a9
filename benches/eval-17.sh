#!/usr/bin/env bash
# Issue 17's evaluation in one run: every scenario measures pubgate, the bare writer (baseline)
# and Nchan (nginx + libnginx-mod-nchan) one after the other on the same connections count, rate
# and node count (--target pubgate,baseline,nchan), so each figure has its ratios in the same run.
#
#   benches/eval-17.sh [RESULTS_DIR]     (default: benches/results/eval-17; est. 6-10 min, <= 24)
#   QUICK=1 benches/eval-17.sh [DIR]     (1,000 connections, short steps: checks the script works;
#                                         default DIR: $TMPDIR/eval-17-quick)
#
# (a) fanout: 10k subscribers on 1 channel, 10 msg/s = 100k deliveries/s, 2 nodes on one Redis
# (b) channels: 2k subscribers over 10 channels (200 each), 500 msg/s = 100k deliveries/s, 2 nodes
# (c) fanout --saturate: 19k subscribers, 1 node: peak deliveries/s, then latency at half the peak
# (d) idle: 19k subscribers, 1 node: memory per connection
#
# Writes RESULTS_DIR/<name>.json and .txt per run, env.txt (versions, machine) and summary.txt.
# Needs: cargo, redis-server, Debian's nginx and libnginx-mod-nchan, python3 (summary).
# Run it on an otherwise idle machine: the load generator shares the cores with the servers.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -n "${QUICK:-}" ]]; then
  OUT=${1:-${TMPDIR:-/tmp}/eval-17-quick}
  C_FANOUT=1000 C_CHANNELS=1000 C_SAT=1000 C_IDLE=1000
  STEP=3s SAT_STEP=2s
else
  OUT=${1:-benches/results/eval-17}
  C_FANOUT=10000 C_CHANNELS=2000 C_SAT=19000 C_IDLE=19000
  STEP=10s SAT_STEP=5s
fi
CHANNELS=10
DELIVERIES=100000 # per second, the load of (a) and (b)
TARGETS=pubgate,baseline,nchan
BENCH=target/release/pubgate-bench

for need in redis-server /usr/sbin/nginx /usr/lib/nginx/modules/ngx_nchan_module.so python3; do
  if ! command -v "$need" >/dev/null && [[ ! -e $need ]]; then
    echo "eval-17: $need is missing (apt-get install redis-server nginx libnginx-mod-nchan)" >&2
    exit 2
  fi
done

START=$SECONDS
elapsed() { printf '%dm%02ds' $(((SECONDS - START) / 60)) $(((SECONDS - START) % 60)); }

echo "== eval-17: building (cargo build --release: pubgate and pubgate-bench)" >&2
cargo build --release --quiet
mkdir -p "$OUT"
{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo -)$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
  echo "cpu: $(nproc) x $(sed -n 's/^model name\t: //p' /proc/cpuinfo | head -n1)"
  echo "kernel: $(uname -r)"
  echo "loadavg at start: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "redis: $(redis-server --version)"
  echo "nginx: $(/usr/sbin/nginx -v 2>&1)"
  echo "nchan: $(dpkg-query -W -f '${Version}' libnginx-mod-nchan 2>/dev/null || echo '?')"
  echo "sizes: fanout $C_FANOUT, channels $C_CHANNELS/$CHANNELS, saturate $C_SAT, idle $C_IDLE; step $STEP, saturate step $SAT_STEP"
} > "$OUT/env.txt"
cat "$OUT/env.txt" >&2

FAILED=()
N=0
run() { # name, timeout in s, then pubgate-bench arguments
  local name=$1 limit=$2
  shift 2
  N=$((N + 1))
  echo "== [$N/4 $(elapsed)] $name: pubgate-bench $* --target $TARGETS" >&2
  if timeout "$limit" "$BENCH" "$@" --target "$TARGETS" --quiet \
    --json "$OUT/$name.json" > "$OUT/$name.txt"; then
    cat "$OUT/$name.txt"
  else
    echo "!! $name failed (exit $?; see $OUT/$name.txt)" >&2
    FAILED+=("$name")
  fi
}

# The timeouts only bound a run gone wrong; together they stay under 25 min.
run "fanout-n2-c$C_FANOUT" 240 fanout --nodes 2 -c "$C_FANOUT" \
  --rate "$(python3 -c "print(round($DELIVERIES / $C_FANOUT, 3))")" --duration "$STEP"
run "channels-n2-c$C_CHANNELS" 240 channels --nodes 2 -c "$C_CHANNELS" --channels "$CHANNELS" \
  --rate "$(python3 -c "print(round($DELIVERIES * $CHANNELS / $C_CHANNELS, 3))")" --duration "$STEP"
# From ~95k deliveries/s up x1.5 per step until deliveries/s stop growing; Nchan and the bare
# writer get their half-peak step at pubgate's half-peak rate.
run "saturate-n1-c$C_SAT" 720 fanout -c "$C_SAT" --saturate --duration "$SAT_STEP" \
  --rate "$(python3 -c "print(round(95000 / $C_SAT, 3))")"
run "idle-n1-c$C_IDLE" 240 idle -c "$C_IDLE" --duration 5s --settle 2s --ping-interval 5m

python3 - "$OUT" > "$OUT/summary.txt" <<'EOF'
import glob, json, os, sys

out = sys.argv[1]
print(f"{'run':<24} {'target':<9} {'deliv/s':>10} {'recv/exp':>8} {'ns/deliv':>9} "
      f"{'p99 ms':>8} {'B/conn':>8} {'lost':>5}")
for path in sorted(glob.glob(os.path.join(out, "*.json"))):
    report = json.load(open(path))
    name = os.path.basename(path)[:-5]
    for run in report["runs"]:
        steps = run["steps"]
        # Saturated runs: the peak step and the half-peak step; else every step.
        if any(s["half_peak"] for s in steps):
            best = max((s for s in steps if not s["half_peak"]), key=lambda s: s["deliveries_per_s"])
            steps = [best] + [s for s in steps if s["half_peak"]]
        for s in steps:
            ratio = f"{s['delivery_ratio']:.3f}" if s["expected_deliveries"] else "-"
            tag = " (half peak)" if s["half_peak"] else ""
            print(f"{name:<24} {run['target']:<9} {s['deliveries_per_s']:>10.0f} {ratio:>8} "
                  f"{s['cpu_ns_per_delivery']:>9.0f} {s['latency']['p99_us'] / 1000:>8.2f} "
                  f"{run['rss_per_connection_bytes']:>8.0f} {s['closed_by_server']:>5}{tag}")
    for key, title in [("ratios", "pubgate/baseline"), ("ratios_nchan", "nchan/baseline"),
                       ("ratios_pubgate_nchan", "pubgate/nchan")]:
        r = report.get(key)
        if not r:
            continue
        fmt = lambda v: "-" if v is None else f"{v:.2f}"
        print(f"{'':<24} {title}: cpu/delivery {' '.join(map(fmt, r['cpu_per_delivery']))}, "
              f"p99 {' '.join(map(fmt, r['p99']))}, peak deliv/s {fmt(r['peak_deliveries_per_s'])}, "
              f"RSS/conn {fmt(r['rss_per_connection'])}")
    print()
EOF
cat "$OUT/summary.txt"
echo "== eval-17 done in $(elapsed): results in $OUT (summary.txt, env.txt, <run>.json/.txt)" >&2
if [[ ${#FAILED[@]} -gt 0 ]]; then
  echo "!! failed: ${FAILED[*]}" >&2
  exit 1
fi
