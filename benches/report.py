#!/usr/bin/env python3
"""Turns benches/results/latest.json (written by bench.py) into latest.md (one
table per workload, each figure with its ratio against the workload's reference
target from the same run) and latest.png (a chart of those ratios).

    python3 benches/report.py [benches/results/latest.json]

The PNG needs matplotlib (benches/run installs it); without it only the
markdown is written.
"""

import json
import statistics
import sys
from pathlib import Path

# (key, column title, better: "high" | "low" | None (no ratio), scale, format)
COLUMNS = {
    "wrk": [("rps", "req/s", "high", 1, "{:,.0f}"), ("p50_us", "p50 µs", "low", 1, "{:,.0f}"),
            ("p99_us", "p99 µs", "low", 1, "{:,.0f}"), ("p999_us", "p99.9 µs", "low", 1, "{:,.0f}"),
            ("errors", "errors", None, 1, "{:,.0f}"), ("cpu_us_per_req", "CPU µs/req", "low", 1, "{:,.2f}"),
            ("cpu_pct", "proxy CPU %", None, 1, "{:,.0f}"),
            ("peak_rss_kb", "peak RSS MiB", "low", 1 / 1024, "{:,.1f}")],
    "bidi": [("mb_per_s", "MB/s", "high", 1, "{:,.1f}"), ("errors", "errors", None, 1, "{:,.0f}"),
             ("cpu_us_per_mb", "CPU µs/MB", "low", 1, "{:,.0f}"), ("cpu_pct", "proxy CPU %", None, 1, "{:,.0f}"),
             ("peak_rss_kb", "peak RSS MiB", "low", 1 / 1024, "{:,.1f}")],
    "idle": [("bytes_per_conn", "RSS bytes/conn", "low", 1, "{:,.0f}"),
             ("rss_before_kb", "RSS before MiB", "low", 1 / 1024, "{:,.1f}"),
             ("rss_after_kb", "RSS after MiB", "low", 1 / 1024, "{:,.1f}"),
             ("opened", "conns held", None, 1, "{:,.0f}"), ("errors", "failed conns", None, 1, "{:,.0f}")],
}
COLUMNS["h2load"] = COLUMNS["wrk"]
COLUMNS["openloop"] = [("rps", "achieved req/s", "high", 1, "{:,.0f}")] + COLUMNS["wrk"][1:]


def ratio(v, ref):
    if not isinstance(v, (int, float)) or not isinstance(ref, (int, float)) or ref == 0:
        return None
    return v / ref


# The goals of the benchmark issue: (goal, workload, target, key, compared with (workload, target), op, bound).
GOALS = [
    ("HTTP/1.1 throughput ≥ 1.2× nginx", "http-small", "luagate", "rps", ("http-small", "nginx"), ">=", 1.2),
    ("HTTP/1.1 proxy CPU per request ≤ 0.8× nginx", "http-small", "luagate", "cpu_us_per_req",
     ("http-small", "nginx"), "<=", 0.8),
    ("HTTP/1.1 p99 at half load ≤ nginx's", "http-openloop", "luagate", "p99_us", ("http-openloop", "nginx"), "<=", 1.0),
    ("gRPC unary throughput ≥ 1.5× nginx grpc_pass", "grpc-unary", "luagate", "rps", ("grpc-unary", "nginx"), ">=", 1.5),
    ("gRPC unary CPU per request ≤ 0.6× nginx", "grpc-unary", "luagate", "cpu_us_per_req", ("grpc-unary", "nginx"),
     "<=", 0.6),
    # "The same route without one": lua-none, the same request on a route without a hook.
    ("empty Lua hook keeps ≥ 95 % of the route's throughput", "lua-empty", "luagate", "rps", ("lua-none", "luagate"),
     ">=", 0.95),
    ("realistic Lua hook keeps ≥ 90 % of the route's throughput", "lua-realistic", "luagate", "rps",
     ("lua-none", "luagate"), ">=", 0.90),
    ("(for scale: OpenResty's own empty hook keeps)", "lua-empty", "nginx-lua", "rps", ("lua-none", "nginx-lua"),
     None, None),
    ("(for scale: OpenResty's own realistic hook keeps)", "lua-realistic", "nginx-lua", "rps",
     ("lua-none", "nginx-lua"), None, None),
    ("with the empty hook ≥ 1.3× OpenResty", "lua-empty", "luagate", "rps", ("lua-empty", "nginx-lua"), ">=", 1.3),
    ("with the realistic hook ≥ 1.3× OpenResty", "lua-realistic", "luagate", "rps", ("lua-realistic", "nginx-lua"),
     ">=", 1.3),
]


def paired_ratio(doc, w, t, key, rw, rt):
    """The median over rounds of the ratio within each round: the two runs of
    a round are minutes apart at most, so a drift of the machine over the
    whole run (this VM's throughput wanders by ±10 % between rounds) cancels
    out, where a ratio of the two overall medians would keep it."""
    by_round = {}
    for run in doc.get("runs", []):
        v = run.get("result", {}).get(key)
        if isinstance(v, (int, float)):
            by_round.setdefault(run["round"], {})[(run["workload"], run["target"])] = v
    ratios = [ratio(vals[(w, t)], vals[(rw, rt)]) for vals in by_round.values() if (w, t) in vals and (rw, rt) in vals]
    ratios = [r for r in ratios if r is not None]
    return statistics.median(ratios) if ratios else None


def goals(doc):
    """The goals table: each goal's ratio from this run (median of the
    per-round ratios, see `paired_ratio`), met or not."""
    summary = doc["summary"]
    rows = []
    for title, w, t, key, (rw, rt), op, bound in GOALS:
        r = paired_ratio(doc, w, t, key, rw, rt)
        if r is None:
            r = ratio(summary.get(w, {}).get(t, {}).get(key), summary.get(rw, {}).get(rt, {}).get(key))
        if r is None:
            continue
        if op is None:
            rows.append(f"| {title} | {r:.2f}× | |")
            continue
        met = r >= bound if op == ">=" else r <= bound
        rows.append(f"| {title} | {r:.2f}× | {'met' if met else 'not met'} |")
    idle = summary.get("idle-conns", {}).get("luagate", {}).get("bytes_per_conn")
    if isinstance(idle, (int, float)):
        rows.append(f"| ≤ 2 KiB of RSS per idle keep-alive connection | {idle:,.0f} B | "
                    f"{'met' if idle <= 2048 else 'not met'} |")
    if not rows:
        return []
    return ["## Goals", "", "From this run: for each goal, the median over rounds of the ratio within each round "
            "(benches/NOTES.md: what bounds the goals not met).", "",
            "| goal | this run | |", "|---|---:|---|"] + rows + [""]


def markdown(doc):
    meta, targets, summary = doc["meta"], doc["targets"], doc["summary"]
    k = meta["knobs"]
    out = ["# luagate benchmark results", ""]
    la0, la1 = meta["loadavg_start"], meta.get("loadavg_end", ["?"])
    out.append(f"Run {meta['started']} – {meta.get('finished', '?')} on {meta['cpus']} CPUs; "
               f"{k['ROUNDS']} round(s) × {k['DURATION']:g} s per run (+{k['WARMUP']:g} s warm-up), "
               f"median over rounds (errors: summed). Proxy on CPU {k['PROXY_CPU']}, backend and load "
               f"generators on CPU {k['LOAD_CPU']}. Load average at start {la0[0]:.2f}, at end {la1[0]:.2f}.")
    if la0[0] > 0.5:
        out += ["", f"**Noisy run:** the machine was busy when it started (load average {la0[0]:.2f}); "
                "treat these figures as a smoke test, not as results."]
    out += ["", "Versions: " + "; ".join(f"{n} `{v}`" for n, v in meta["versions"].items() if v), ""]
    out += ["Each cell is the median and, in brackets, its ratio to the workload's reference target "
            "(marked *ref*) from the same run. For req/s and MB/s higher is better; for latency, CPU and "
            "memory lower is better.", ""]
    out += goals(doc)
    for w in doc["workloads"]:
        s = summary.get(w["name"], {})
        if not s:
            continue
        cols = COLUMNS[w["kind"]]
        ref = s.get(w["ref"], {})
        out += [f"## {w['name']}: {w['title']}", "", f"Load: {w['load']}. Reference: {targets.get(w['ref'], w['ref'])}.",
                ""]
        out.append("| target | " + " | ".join(c[1] for c in cols) + " | rounds |")
        out.append("|---|" + "---:|" * len(cols) + "---:|")
        notes = []
        for t, label in targets.items():
            if t not in s:
                continue
            m = s[t]
            name = label + (" *ref*" if t == w["ref"] else "")
            if "error" in m:
                out.append(f"| {name} | " + " | ".join("—" for _ in cols) + " | 0 |")
                notes.append(f"- {label}: not measured: {m['error']}")
                continue
            cells = []
            for key, _, better, scale, fmt in cols:
                v = m.get(key)
                if v is None:
                    cells.append("—")
                    continue
                cell = fmt.format(v * scale)
                r = ratio(v, ref.get(key)) if better else None
                if r is not None:
                    cell += f" ({r:.2f}×)"
                cells.append(cell)
            rounds = f"{m.get('rounds', 0)}" + (f" ({m['failed_rounds']} failed)" if m.get("failed_rounds") else "")
            out.append(f"| {name} | " + " | ".join(cells) + f" | {rounds} |")
        out.append("")
        if notes:
            out += notes + [""]
    failed = [r for r in doc["runs"] if "error" in r]
    if failed:
        out += ["## Failed runs", ""]
        out += [f"- round {r['round']} {r['workload']} {r['target']}: {r['error']}" for r in failed]
        out.append("")
    return "\n".join(out)


def chart(doc, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker  # noqa: F401 - used as matplotlib.ticker
    except ImportError:
        print("report: matplotlib missing, no chart (pip install matplotlib)", file=sys.stderr)
        return False
    targets, summary = doc["targets"], doc["summary"]
    panels = [
        ("Throughput vs reference (higher is better)", {"rps", "mb_per_s"}),
        ("p99 latency vs reference (lower is better)", {"p99_us"}),
        ("Proxy CPU per request / per MB (lower is better)", {"cpu_us_per_req", "cpu_us_per_mb"}),
        ("Memory: peak RSS, bytes per idle conn (lower is better)", {"peak_rss_kb", "bytes_per_conn"}),
    ]
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 3.3 * len(panels)))
    colors = {"luagate": "#d62728", "nginx": "#2ca02c", "nginx-lua": "#98df8a", "haproxy": "#1f77b4"}
    for ax, (title, keys) in zip(axes, panels):
        groups = []
        for w in doc["workloads"]:
            s = summary.get(w["name"], {})
            ref = s.get(w["ref"], {})
            key = next((k for k in (c[0] for c in COLUMNS[w["kind"]]) if k in keys and k in ref), None)
            if key is None:
                continue
            groups.append((w["name"], {t: ratio(s[t].get(key), ref.get(key)) for t in targets if t in s}))
        width = 0.8 / max(1, len(targets))
        for i, t in enumerate(targets):
            xs = [g for g, (_, vals) in enumerate(groups) if vals.get(t) is not None]
            ys = [groups[g][1][t] for g in xs]
            bars = ax.bar([x + (i - (len(targets) - 1) / 2) * width for x in xs], ys, width,
                          label=targets[t], color=colors.get(t))
            for b, y in zip(bars, ys):
                ax.annotate(f"{y:.2f}", (b.get_x() + b.get_width() / 2, y), ha="center", va="bottom", fontsize=7)
        ax.axhline(1.0, color="black", linewidth=0.8)
        # log scale: 0.5x and 2x sit equally far from 1x, and one outlier does not flatten the rest
        ax.set_yscale("log")
        vals = [v for _, d in groups for v in d.values() if v]
        lo, hi = (min(min(vals), 1) / 1.4, max(max(vals), 1) * 1.4) if vals else (0.5, 2)
        ax.set_ylim(lo, hi)
        ticks = [t for t in (0.05, 0.1, 0.2, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 20, 50, 100, 200) if lo <= t <= hi]
        ax.yaxis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}×"))
        ax.yaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([g[0] for g in groups], fontsize=8)
        ax.set_ylabel("ratio to reference")
        ax.set_title(title, fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, ncol=len(targets), loc="lower center", bbox_to_anchor=(0.5, 0.0))
    k, la = doc["meta"]["knobs"], doc["meta"]["loadavg_start"][0]
    fig.suptitle(f"luagate vs nginx / nginx+lua / HAProxy — ratios to the reference (nginx; nginx+lua for lua-*)\n"
                 f"{doc['meta']['started']}, {k['ROUNDS']}×{k['DURATION']:g}s, load avg at start {la:.2f}",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    return True


def main():
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "results" / "latest.json"
    doc = json.loads(src.read_text())
    md = src.with_suffix(".md")
    md.write_text(markdown(doc))
    print(f"report: wrote {md}")
    png = src.with_suffix(".png")
    if chart(doc, png):
        print(f"report: wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
