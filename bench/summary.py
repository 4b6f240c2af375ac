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
        elif t == "rtt":
            for k in ("p50_us", "p99_us"):
                key = (f"rtt {r['size']} B {k[:3]}", "us", "lower")
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
