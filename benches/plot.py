#!/usr/bin/env python3
"""Charts and tables from pubgate-bench JSON reports.

    python3 benches/plot.py RESULTS_DIR [--out DIR] [--tables]

Reads every *.json report in RESULTS_DIR (as written by `pubgate-bench ... --json FILE`, e.g. by
benches/run-all.sh) and writes PNG charts to --out (default docs/img):

  fanout-throughput.png  peak deliveries/s vs subscribers (fanout --saturate runs)
  fanout-p99.png         p99 publish->deliver latency at half of the peak rate vs subscribers
  fanout-cpu.png         server CPU per delivery vs subscribers (first, unsaturated step)
  idle-rss.png           RSS per connection and total RSS vs connections (idle runs)

pubgate and the bare-writer baseline of the same run are drawn side by side. With --tables it
also prints Markdown tables of every report (what docs/benchmarks.md quotes).
"""

import argparse
import glob
import json
import os
import sys


def load(results):
    reports = []
    for path in sorted(glob.glob(os.path.join(results, "*.json"))):
        try:
            with open(path) as f:
                r = json.load(f)
        except (OSError, ValueError) as e:
            print(f"skipping {path}: {e}", file=sys.stderr)
            continue
        if "runs" in r:
            r["_file"] = os.path.basename(path)
            reports.append(r)
    reports.sort(key=lambda r: (r["scenario"], r["nodes"], r["connections"]))
    return reports


def run_of(report, target):
    for run in report["runs"]:
        if run["target"] == target:
            return run
    return None


def half_peak_step(run):
    for s in run["steps"]:
        if s.get("half_peak"):
            return s
    return None


def series(reports, scenario, target, nodes, value):
    """[(connections, value)] sorted by connections, for reports that yield a value."""
    pts = []
    for r in reports:
        if r["scenario"] != scenario or r["nodes"] != nodes:
            continue
        run = run_of(r, target)
        if run is None:
            continue
        v = value(run)
        if v is not None:
            pts.append((r["connections"], v))
    pts.sort()
    return pts


def chart(path, title, ylabel, lines, logx=True):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    drawn = 0
    for label, pts, style in lines:
        if not pts:
            continue
        xs, ys = zip(*pts)
        ax.plot(xs, ys, style, label=label, linewidth=1.8, markersize=6)
        drawn += 1
    if not drawn:
        plt.close(fig)
        return False
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel("connections (subscribers)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=11)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    print(f"wrote {path}")
    return True


STYLES = {
    ("pubgate", 1): "o-",
    ("baseline", 1): "s--",
    ("pubgate", 3): "^-",
    ("baseline", 3): "v--",
}


def lines_for(reports, scenario, value, nodes_list=(1, 3)):
    out = []
    for nodes in nodes_list:
        for target in ("pubgate", "baseline"):
            label = f"{'bare writer' if target == 'baseline' else 'pubgate'}, {nodes} node{'s' if nodes > 1 else ''}"
            out.append((label, series(reports, scenario, target, nodes, value), STYLES[(target, nodes)]))
    return out


def plots(reports, out):
    os.makedirs(out, exist_ok=True)
    sat = [r for r in reports if r["scenario"] == "fanout" and any(
        half_peak_step(run) for run in r["runs"])]
    chart(
        os.path.join(out, "fanout-throughput.png"),
        "fan-out, one channel: saturated deliveries/s",
        "deliveries/s (peak step)",
        lines_for(sat, "fanout", lambda run: run["peak_deliveries_per_s"] or None),
    )
    chart(
        os.path.join(out, "fanout-p99.png"),
        "fan-out: p99 publish->deliver at half of pubgate's peak rate",
        "p99 latency (ms)",
        lines_for(sat, "fanout", lambda run: (half_peak_step(run) or {}).get(
            "latency", {}).get("p99_us", 0) / 1000.0 or None),
    )
    chart(
        os.path.join(out, "fanout-cpu.png"),
        "fan-out: server CPU per delivery (first, unsaturated step)",
        "CPU microseconds per delivery",
        lines_for(sat, "fanout", lambda run: run["steps"][0]["cpu_ns_per_delivery"] / 1000.0
                  if run["steps"] and run["steps"][0]["cpu_ns_per_delivery"] > 0 else None),
    )
    idle = [r for r in reports if r["scenario"] == "idle"]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4.2), dpi=110)
    drawn = 0
    for nodes in (1, 3):
        for target in ("pubgate", "baseline"):
            label = f"{'bare writer' if target == 'baseline' else 'pubgate'}, {nodes} node{'s' if nodes > 1 else ''}"
            per = series(idle, "idle", target, nodes,
                         lambda run: run["rss_per_connection_bytes"] / 1024.0)
            tot = series(idle, "idle", target, nodes,
                         lambda run: run["rss_connected_bytes"] / 1048576.0)
            if per:
                xs, ys = zip(*per)
                a1.plot(xs, ys, STYLES[(target, nodes)], label=label)
                drawn += 1
            if tot:
                xs, ys = zip(*tot)
                a2.plot(xs, ys, STYLES[(target, nodes)], label=label)
    if drawn:
        a1.axhline(8.0, color="grey", linestyle=":", label="target 8 KiB")
        a1.set_title("RSS per idle connection", fontsize=11)
        a1.set_ylabel("KiB per connection")
        a2.set_title("total RSS (all nodes) with N idle connections", fontsize=11)
        a2.set_ylabel("MiB")
        for a in (a1, a2):
            a.set_xlabel("connections")
            a.grid(True, alpha=0.3)
            a.set_ylim(bottom=0)
            a.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out, "idle-rss.png")
        fig.savefig(path)
        print(f"wrote {path}")
    plt.close(fig)


def fmt(v, digits=0):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return f"{v:,}"


def tables(reports):
    for r in reports:
        print(f"\n#### {r['_file']}: {r['scenario']}, {r['connections']} connections, "
              f"{r['channels']} channel(s), {r['nodes']} node(s)\n")
        print("| target | rate/s | deliveries/s | ratio | p50 ms | p99 ms | p999 ms | server CPU us/delivery "
              "| server cores | loadgen cores | redis cores | lost |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for run in r["runs"]:
            for s in run["steps"]:
                churn = s["cycles"] > 0
                redis = s.get("redis")
                print("| {} | {}{} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
                    run["target"], fmt(s["rate"]), " (half peak)" if s.get("half_peak") else "",
                    fmt(s["cycles_per_s"] if churn else s["deliveries_per_s"]),
                    fmt(s["delivery_ratio"], 3),
                    fmt((s["cycle_latency"] if churn else s["latency"])["p50_us"] / 1000, 2),
                    fmt((s["cycle_latency"] if churn else s["latency"])["p99_us"] / 1000, 2),
                    fmt((s["cycle_latency"] if churn else s["latency"])["p999_us"] / 1000, 2),
                    fmt(s["cpu_ns_per_delivery"] / 1000, 2),
                    fmt(s["server"]["cpu_cores"], 2), fmt(s["loadgen"]["cpu_cores"], 2),
                    fmt(redis["cpu_cores"], 2) if redis else "-", s["closed_by_server"]))
        for run in r["runs"]:
            print(f"\n{run['target']}: {run['connections_open']}/{run['connections']} open, "
                  f"{run['connect_errors']} connect errors, {run['connect_rate_per_s']:.0f} connects/s, "
                  f"RSS {run['rss_before_bytes'] / 1048576:.1f} -> {run['rss_connected_bytes'] / 1048576:.1f} MiB "
                  f"= {run['rss_per_connection_bytes']:.0f} B/connection; peak {run['peak_deliveries_per_s']:.0f} "
                  f"deliveries/s at {run['peak_rate']:.1f} msg/s")
        ratios = r.get("ratios")
        if ratios:
            print(f"\nratios pubgate/baseline: {json.dumps(ratios)}")


def median(xs):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    m = len(xs) // 2
    return xs[m] if len(xs) % 2 else (xs[m - 1] + xs[m]) / 2


def targets(reports):
    """The issue's targets against the measured figures, one line per report."""
    print("\n| run | CPU/delivery vs bare, first step (median of steps below pubgate's peak) "
          "| peak deliveries/s pubgate / bare | p99 at half peak: pubgate ms (bare ms) | RSS/conn pubgate (bare) |")
    print("|---|---|---|---|---|")
    for r in reports:
        gw, base = run_of(r, "pubgate"), run_of(r, "baseline")
        if gw is None:
            continue
        name = f"{r['scenario']} {r['connections']} conns / {r['channels']} ch, {r['nodes']} node(s)"
        cpu = peak = p99 = "-"
        if base is not None and gw["steps"] and base["steps"] and r["scenario"] != "idle":
            pairs = list(zip(gw["steps"], base["steps"]))
            ratio = [g["cpu_ns_per_delivery"] / b["cpu_ns_per_delivery"]
                     if b["cpu_ns_per_delivery"] > 0 and g["cpu_ns_per_delivery"] > 0 else None
                     for g, b in pairs]
            below = [x for (g, _), x in zip(pairs, ratio)
                     if not g.get("half_peak") and g["rate"] < gw["peak_rate"]]
            cpu = f"{fmt(ratio[0], 2)}x ({fmt(median(below), 2)}x)" if ratio[0] else "-"
            if base["peak_deliveries_per_s"] and len(gw["steps"]) > 1:
                peak = (f"{gw['peak_deliveries_per_s']:,.0f} / {base['peak_deliveries_per_s']:,.0f} = "
                        f"{gw['peak_deliveries_per_s'] / base['peak_deliveries_per_s']:.2f}")
            hg, hb = half_peak_step(gw), half_peak_step(base)
            if hg and hb:
                p99 = (f"{hg['latency']['p99_us'] / 1000:.1f} ({hb['latency']['p99_us'] / 1000:.1f}) "
                       f"= {hg['latency']['p99_us'] / max(hb['latency']['p99_us'], 1):.2f}x")
        rss = f"{gw['rss_per_connection_bytes'] / 1024:.1f} KiB"
        if base is not None:
            rss += f" ({base['rss_per_connection_bytes'] / 1024:.1f} KiB)"
        print(f"| {name} | {cpu} | {peak} | {p99} | {rss} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results")
    ap.add_argument("--out", default="docs/img")
    ap.add_argument("--tables", action="store_true")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args()
    reports = load(args.results)
    if not reports:
        sys.exit(f"no pubgate-bench reports in {args.results}")
    if not args.no_plots:
        plots(reports, args.out)
    if args.tables:
        targets(reports)
        tables(reports)


if __name__ == "__main__":
    main()
