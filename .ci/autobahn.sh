#!/usr/bin/env bash
# The Autobahn TestSuite (wstest, fuzzingclient mode), sections 1 to 11, against pubgate's own
# connection code in echo mode (examples/autobahn_echo.rs, cargo feature `autobahn`, route
# /echo). Fails if any case's behaviour or close behaviour is other than OK, NON-STRICT or
# INFORMATIONAL. Sections 12 and 13 (permessage-deflate) are not run: pubgate offers no
# extension. Loopback only; the echo server is stopped on exit.
#
#   bash .ci/autobahn.sh
#
# Environment (all optional):
#   AUTOBAHN_CACHE    virtualenv and tools (default ${XDG_CACHE_HOME:-~/.cache}/pubgate-autobahn)
#   AUTOBAHN_REPORTS  reports: index.json, HTML, summary.txt (default target/autobahn)
#   AUTOBAHN_CASES    JSON list of case patterns (default sections 1 to 11), for a partial run
#   AUTOBAHN_TIMEOUT  bound of the wstest run in seconds (default 900)
#   PYTHON27          Python 2.7 (default pyenv's 2.7.18, else python2.7 on PATH)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

step() { printf '\n==> %s\n' "$*"; }
now() { date +%s; }
t0=$(now)

cache=${AUTOBAHN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pubgate-autobahn}
reports=${AUTOBAHN_REPORTS:-$root/target/autobahn}
cases=${AUTOBAHN_CASES:-'["1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "8.*", "9.*", "10.*", "11.*"]'}
run_timeout=${AUTOBAHN_TIMEOUT:-900}
requirements=$root/.ci/autobahn-requirements.txt

py=${PYTHON27:-}
if [ -z "$py" ]; then
  for candidate in /root/.pyenv/versions/2.7.18/bin/python "$(command -v python2.7 || true)"; do
    if [ -n "$candidate" ] && [ -x "$candidate" ]; then py=$candidate; break; fi
  done
fi
if [ -z "$py" ] || ! "$py" -c 'import sys; sys.exit(sys.version_info[:2] != (2, 7))'; then
  echo "autobahn: wstest needs Python 2.7 (set PYTHON27); none found" >&2
  exit 1
fi

# --- The suite, in a virtualenv of its own (rebuilt when the pinned requirements change). ---
step "Autobahn TestSuite in $cache/venv"
venv=$cache/venv
stamp=$( (echo "$py"; cat "$requirements") | sha256sum | cut -c1-16)
if [ "$(cat "$venv/.stamp" 2>/dev/null)" != "$stamp" ] || [ ! -x "$venv/bin/wstest" ]; then
  rm -rf "$venv"
  mkdir -p "$cache"
  # virtualenv 16.7 is the last without dependencies of its own; it seeds pip 20.3.4, the last
  # pip for Python 2.7, from wheels it ships (no download).
  if [ ! -f "$cache/virtualenv/virtualenv.py" ]; then
    timeout 300 "$py" -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
      --target "$cache/virtualenv" virtualenv==16.7.12
  fi
  PYTHONPATH=$cache/virtualenv timeout 300 "$py" -m virtualenv --quiet --no-download "$venv"
  # wsaccel's sdist ships its generated C; without build isolation it needs no Cython.
  timeout 600 "$venv/bin/pip" install --quiet --disable-pip-version-check --no-warn-script-location \
    --no-build-isolation -r "$requirements"
  echo "$stamp" >"$venv/.stamp"
fi
"$venv/bin/python" -c 'import autobahntestsuite, autobahn, wsaccel; print("autobahntestsuite %s, autobahn %s, wsaccel" % (autobahntestsuite.__version__, autobahn.__version__))'
t_install=$(now)

# --- The echo endpoint: the gateway's connection code, built with the `autobahn` feature. ---
step "cargo build --release --features autobahn --example autobahn_echo"
cargo build --release --quiet --features autobahn --example autobahn_echo
t_build=$(now)

work=$(mktemp -d)
server_pid=
cleanup() {
  if [ -n "$server_pid" ]; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

step "echo server"
"${CARGO_TARGET_DIR:-$root/target}/release/examples/autobahn_echo" 127.0.0.1:0 >"$work/server.out" 2>"$work/server.err" &
server_pid=$!
url=
for _ in $(seq 100); do
  url=$(sed -n 's/^listening on //p' "$work/server.out")
  [ -n "$url" ] && break
  kill -0 "$server_pid" 2>/dev/null || break
  sleep 0.1
done
if [ -z "$url" ]; then
  echo "autobahn: the echo server did not start" >&2
  cat "$work/server.err" >&2
  exit 1
fi
echo "$url"

# --- The run. ---
step "wstest -m fuzzingclient: $cases"
rm -rf "$reports"
mkdir -p "$reports"
cat >"$work/spec.json" <<EOF
{
  "outdir": "$reports",
  "servers": [{"agent": "pubgate", "url": "$url"}],
  "cases": $cases,
  "exclude-cases": ["12.*", "13.*"],
  "exclude-agent-cases": {}
}
EOF
set +e
(cd "$work" && timeout "$run_timeout" "$venv/bin/wstest" -m fuzzingclient -s spec.json >"$work/wstest.log" 2>&1)
rc=$?
set -e
t_run=$(now)
if [ "$rc" -ne 0 ] || [ ! -f "$reports/index.json" ]; then
  echo "autobahn: wstest failed (exit $rc)" >&2
  tail -n 40 "$work/wstest.log" >&2
  exit 1
fi
if ! kill -0 "$server_pid" 2>/dev/null; then
  echo "autobahn: the echo server died during the run" >&2
  tail -n 40 "$work/server.err" >&2
  exit 1
fi

# --- The verdict: counts per section, every case that is not acceptable. ---
step "results"
verdict=0
"$venv/bin/python" - "$reports/index.json" "$reports/summary.txt" "$work/verdict" <<'EOF' || verdict=$?
import json, sys
from collections import defaultdict

ACCEPTED = ("OK", "NON-STRICT", "INFORMATIONAL")
COLUMNS = ("OK", "NON-STRICT", "INFORMATIONAL", "FAILED", "UNIMPLEMENTED")
index = json.load(open(sys.argv[1]))
(agent, results), = index.items()

def key(case_id):
    return tuple(int(p) for p in case_id.split("."))

counts = defaultdict(lambda: defaultdict(int))
bad, odd = [], []
for case_id in sorted(results, key=key):
    r = results[case_id]
    section = int(case_id.split(".")[0])
    behavior, close = r["behavior"], r["behaviorClose"]
    counts[section][behavior if behavior in COLUMNS else "other"] += 1
    if close not in ACCEPTED:
        counts[section]["close not ok"] += 1
    if behavior not in ACCEPTED or close not in ACCEPTED:
        bad.append("%s: behavior %s, close %s (remote close code %s)"
                   % (case_id, behavior, close, r.get("remoteCloseCode")))
    elif behavior != "OK" or close != "OK":
        odd.append("%s: behavior %s, close %s" % (case_id, behavior, close))

cols = COLUMNS + ("other", "close not ok")
lines = ["agent %s, %d cases" % (agent, len(results)),
         "%-8s %6s " % ("section", "cases") + " ".join("%13s" % c for c in cols)]
total = defaultdict(int)
for section in sorted(counts):
    c = counts[section]
    n = sum(c[x] for x in COLUMNS + ("other",))
    lines.append("%-8s %6d " % (section, n) + " ".join("%13d" % c[x] for x in cols))
    for x in cols:
        total[x] += c[x]
lines.append("%-8s %6d " % ("all", len(results)) + " ".join("%13d" % total[x] for x in cols))
if odd:
    lines.append("")
    lines.append("accepted, not OK:")
    lines.extend("  " + o for o in odd)
if bad:
    lines.append("")
    lines.append("NOT ACCEPTED:")
    lines.extend("  " + b for b in bad)
text = "\n".join(lines) + "\n"
sys.stdout.write(text)
open(sys.argv[2], "w").write(text)
open(sys.argv[3], "w").write("autobahn: %d passed, %d failed\n" % (len(results) - len(bad), len(bad)))
sys.exit(1 if bad else 0)
EOF
t_end=$(now)
echo
echo "autobahn: install $((t_install - t0)) s, build $((t_build - t_install)) s, run $((t_run - t_build)) s, total $((t_end - t0)) s; reports in $reports"
cat "$work/verdict"
exit "$verdict"
