#!/usr/bin/env python3
"""Summary of a bench/compare.sh results file: medians over rounds per test and system, and
tube's ratios to direct loopback and to each competitor (a markdown table, so it can go into
docs/performance.md as it is)."""

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
            values[key][s].append(r["gbit_s"])
            if s != "direct" and r.get("bytes"):
                key = (f"CPU per GiB, {r['streams']} stream(s), {tool}", "s/GiB", "lower")
                values[key][s].append(r["cpu_s"] / (r["bytes"] / GIB))
        elif t == "rtt":
            for k in ("p50_us", "p99_us"):
                key = (f"rtt {r['size']} B {k[:3]}", "us", "lower")
                values[key][s].append(r[k])
        elif t == "connrate":
            values[("new connections", "conn/s", "higher")][s].append(r["conns_per_sec"])
            for k in ("p50_us", "p99_us"):
                key = (f"connect to first byte {k[:3]}", "us", "lower")
                values[key][s].append(r[k])
        elif t == "idle":
            if "error" in r:
                print(f"note: {s} could not hold {r['connections']} idle connections: {r['error']}")
                continue
            n = r["connections"]
            per = (r["rss_during_kib"] - r["rss_before_kib"]) / n
            values[(f"memory per idle connection ({n})", "KiB", "lower")][s].append(per)
            values[("memory idle, server + client", "KiB", "lower")][s].append(
                r["rss_before_kib"]
            )

    rivals = [s for s in systems if s not in ("direct", "tube")]
    header = ["figure", "unit"] + systems
    if "tube" in systems and "direct" in systems:
        header.append("tube/direct")
    header += [f"tube/{r}" for r in rivals if "tube" in systems]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for key, per_system in values.items():
        figure, unit, better = key
        med = {s: statistics.median(v) for s, v in per_system.items() if v}
        row = [figure, unit] + [f"{med[s]:.2f}" if s in med else "-" for s in systems]
        if "tube" in systems and "direct" in systems:
            row.append(ratio(med, "tube", "direct"))
        row += [ratio(med, "tube", r) for r in rivals if "tube" in systems]
        print("| " + " | ".join(row) + " |")
    print()
    print("Ratios are tube's value over the other's: above 1 is better for higher-is-better")
    print("figures (throughput, connections), below 1 is better for the others.")


def ratio(med, a, b):
    if a in med and b in med and med[b]:
        return f"{med[a] / med[b]:.3f}"
    return "-"


if __name__ == "__main__":
    main(sys.argv[1])
