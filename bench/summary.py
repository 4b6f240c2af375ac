#!/usr/bin/env python3
"""Summary of a bench/compare.sh results file: medians over rounds per test and system, and
tube's ratios to direct loopback and to each competitor (a markdown table, so it can go into
docs/performance.md as it is). A ratio is the median over rounds of that round's ratio (the
two systems measured minutes apart in one round see the same machine), or the ratio of the
medians for a figure measured once (memory)."""

import json
import statistics
import sys
from collections import defaultdict

GIB = 1 << 30


def main(path):
    values = defaultdict(lambda: defaultdict(list))
    systems = []
    for line in open(path):
        r = json.loads(line)
        s = r["system"]
        if s not in systems:
            systems.append(s)
        t = r["test"]
        if t in ("throughput", "iperf3"):
            tool = "loadgen" if t == "throughput" else "iperf3"
            key = (f"throughput {r['streams']} stream(s), {tool}", "Gbit/s", "higher")
            values[key][s].append((r.get("round"), r["gbit_s"]))
            if s != "direct" and r.get("bytes"):
                key = (f"CPU per GiB, {r['streams']} stream(s), {tool}", "s/GiB", "lower")
                values[key][s].append((r.get("round"), r["cpu_s"] / (r["bytes"] / GIB)))
        elif t in ("rtt", "rtt_one_cpu"):
            # rtt_one_cpu: everything on one CPU (compare.sh), the systems' own work.
            where = ", one CPU" if t == "rtt_one_cpu" else ""
            for k in ("p50_us", "p99_us"):
                key = (f"rtt {r['size']} B {k[:3]}{where}", "us", "lower")
                values[key][s].append((r.get("round"), r[k]))
        elif t == "connrate":
            values[("new connections", "conn/s", "higher")][s].append(
                (r.get("round"), r["conns_per_sec"])
            )
            for k in ("p50_us", "p99_us"):
                key = (f"connect to first byte {k[:3]}", "us", "lower")
                values[key][s].append((r.get("round"), r[k]))
        elif t == "idle":
            if "error" in r:
                print(f"note: {s} could not hold {r['connections']} idle connections: {r['error']}")
                continue
            n = r["connections"]
            per = (r["rss_during_kib"] - r["rss_before_kib"]) / n
            values[(f"memory per idle connection ({n})", "KiB", "lower")][s].append((None, per))
            values[("memory idle, server + client", "KiB", "lower")][s].append(
                (None, r["rss_before_kib"])
            )

    rivals = [s for s in systems if s not in ("direct", "tube")]
    header = ["figure", "unit"] + systems
    if "tube" in systems and "direct" in systems:
        header.append("tube/direct")
    header += [f"tube/{r}" for r in rivals if "tube" in systems]
    # A second tube build (compare.sh's BIN2) against the same rivals.
    rivals2 = [r for r in rivals if r != "tube2"] if "tube2" in systems else []
    header += [f"tube2/{r}" for r in rivals2]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for key, per_system in values.items():
        figure, unit, better = key
        med = {s: statistics.median(v for _, v in rv) for s, rv in per_system.items() if rv}
        row = [figure, unit] + [f"{med[s]:.2f}" if s in med else "-" for s in systems]
        if "tube" in systems and "direct" in systems:
            row.append(ratio(per_system, med, "tube", "direct"))
        row += [ratio(per_system, med, "tube", r) for r in rivals if "tube" in systems]
        row += [ratio(per_system, med, "tube2", r) for r in rivals2]
        print("| " + " | ".join(row) + " |")
    print()
    print("Ratios are tube's value over the other's, the median over rounds of each round's")
    print("ratio: above 1 is better for higher-is-better figures (throughput, connections),")
    print("below 1 is better for the others.")
    targets(values, systems)


# Issue 7's relay targets: (figure, the rivals it is measured against, the bar, higher is
# better). "rathole bore" means the better of the two.
BULK = [f"{n} stream(s), {tool}" for n in (1, 8) for tool in ("loadgen", "iperf3")]
TARGETS = (
    [(f"throughput {b}", "rathole bore", 1.0, True) for b in BULK]
    + [
        ("new connections", "rathole bore", 1.3, True),
        ("connect to first byte p99", "rathole bore", 1.0, False),
        ("rtt 64 B p50", "rathole", 1.0, False),
        ("rtt 64 B p99", "rathole", 1.0, False),
        ("memory per idle connection (1000)", "rathole", 0.5, False),
    ]
    + [(f"CPU per GiB, {b}", "rathole", 1.0, False) for b in BULK]
)


def targets(values, systems):
    """Each tube build against issue 7's targets: the median over rounds of its ratio to each
    round's better rival ("round"), and to the rival better by its median over the rounds
    ("run"); a figure measured once (memory) has one ratio. A target is met when both are."""
    builds = [b for b in ("tube", "tube2") if b in systems]
    by_figure = {figure: per for (figure, _, _), per in values.items()}
    rows = []
    for figure, rivals, bar, higher in TARGETS:
        per = by_figure.get(figure)
        rivals = [r for r in rivals.split() if per and per.get(r)]
        if not per or not rivals:
            continue
        row = [figure, (">= " if higher else "<= ") + f"{bar:g}"]
        for b in builds:
            if not per.get(b):
                row += ["-", "-", "-"]
                continue
            rnd, run = against(per, b, rivals, higher)
            ok = all(x is not None and (x >= bar if higher else x <= bar) for x in (rnd, run))
            row += [fmt(rnd, bar), fmt(run, bar), "met" if ok else "**no**"]
        rows.append(row)
    if not rows:
        return
    print()
    print("Against issue 7's targets (better of rathole and bore where both are named):")
    print()
    header = ["target", "bar"]
    for b in builds:
        header += [f"{b} per round", f"{b} per run", b]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def against(per, a, rivals, higher):
    """(per-round better rival, better rival over the run) ratios of `a`, as medians."""
    pick = max if higher else min
    rounds = {r: {} for r, _ in per[a] if r is not None}
    for s in [a] + rivals:
        for r, v in per[s]:
            if r in rounds:
                rounds[r][s] = v
    paired = [
        vals[a] / pick(vals[r] for r in rivals)
        for vals in rounds.values()
        if all(s in vals for s in [a] + rivals) and pick(vals[r] for r in rivals)
    ]
    meds = {s: statistics.median(v for _, v in per[s]) for s in [a] + rivals}
    best = pick(rivals, key=lambda r: meds[r])
    by_run = [
        vals[a] / vals[best] for vals in rounds.values() if a in vals and vals.get(best)
    ]
    if not paired:  # measured once: the ratio of the values
        one = meds[a] / meds[best] if meds[best] else None
        return one, one
    return statistics.median(paired), statistics.median(by_run)


def fmt(x, bar):
    """Three decimals; more where three would print the bar for a ratio on the other side."""
    if x is None:
        return "-"
    short = f"{x:.3f}"
    return f"{x:.5f}" if float(short) == bar and x != bar else short


def ratio(per_system, med, a, b):
    """a over b: the median of the rounds' ratios, or the ratio of the medians."""
    rounds_b = {rnd: v for rnd, v in per_system.get(b, []) if rnd is not None}
    paired = [
        v / rounds_b[rnd]
        for rnd, v in per_system.get(a, [])
        if rnd is not None and rounds_b.get(rnd)
    ]
    if paired:
        return f"{statistics.median(paired):.3f}"
    if a in med and b in med and med[b]:
        return f"{med[a] / med[b]:.3f}"
    return "-"


if __name__ == "__main__":
    main(sys.argv[1])
