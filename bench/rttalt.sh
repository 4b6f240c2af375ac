#!/usr/bin/env bash
# bench/rttalt.sh: the 64-byte round trip of tube and rathole (and, with BIN2, of a second tube
# build) in front of one echo server, alternated ROUNDS times in short runs with nothing
# attached to the processes. The round trip moves by several percent from run to run here, so
# it is compared pair by pair: each round's tube p50 over the rathole p50 measured right after
# it. perf attached to the processes (perfstat.sh, rttpath.sh) changes the comparison itself
# (every system call and context switch then costs more, and tube and rathole differ in how
# many they make per wake-up); this script is the one to judge a round-trip change by.
#
# Each round starts every system afresh (where the scheduler settles a process's threads can
# hold for the process's life, so rounds of long-lived processes are not independent samples)
# and runs them in one order in odd rounds, in the reverse order in even ones: in a run of 300
# rounds, whichever system ran first in a round measured about 7 % slower than when it ran
# second, which a fixed order turns into a bias. Every round also starts with a short run
# through every system, not counted (on the third machine the first run of a round measured
# about 30 % slower).
#
# TEST=connrate alternates new connections the same way instead (CONNS of them per run, default
# 2000, 50 at a time, one 64-byte echo each, as bench/compare.sh): each run's connections per
# second and p99 connect-to-first-byte take the places of p50 and p99 below (keys `rate` and
# `p99`; for the rate, above 1 is better).
#
# To compare the systems' own work, without the wake-ups that cross CPUs (on a virtual machine
# most of a round trip through four processes, and most of its noise): `taskset -c 0 bash
# bench/rttalt.sh` (every process inherits the one CPU; docs/performance.md, "The round trip on
# one CPU", where the 95 % interval shrank from 15-25 % wide to about 1 %).
#
# Env knobs: ROUNDS (default 15), COUNT (round trips per run, default 5000), BIN (directory
# with release tube and tube-loadgen; default target/release after building), BIN2 (a second
# build's directory, run as "tube2"), TOOLS (rathole in $TOOLS/bin, as bench/compare.sh
# installs it), RATHOLE_TLS=1 (also rathole over its TLS transport, run as "rathole_tls": the
# targets compare with plain rathole, this shows what encrypting costs rathole), RUNS (a file
# to keep every run's "system p50 p99" lines in). Prints one JSON line: each system's median
# p50 and p99 in microseconds and, for each tube build, the median of its per-round ratios to
# rathole, their geometric mean and its 95 % confidence interval (ci95_low, ci95_high); with
# BIN2, the same for tube2 over tube; with RATHOLE_TLS, for each tube build over rathole_tls.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
TOOLS=${TOOLS:-$ROOT/bench/.tools}
ROUNDS=${ROUNDS:-15}
COUNT=${COUNT:-5000}
TEST=${TEST:-rtt}
CONNS=${CONNS:-2000}
case $TEST in
rtt | connrate) ;;
*) echo "error: TEST must be rtt or connrate, got '$TEST'" >&2; exit 2 ;;
esac
WAIT_SECS=20
[[ -x $TOOLS/bin/rathole ]] || { echo "error: no rathole in $TOOLS/bin (bench/compare.sh installs it)" >&2; exit 1; }

# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
release_bin
start echo "$BIN/tube-loadgen" echo --listen 127.0.0.1:0
wait_lines echo 1
ECHO=$(field echo 1 3)
SYSTEMS=(tube rathole)
[[ -z ${RATHOLE_TLS:-} ]] || SYSTEMS+=(rathole_tls)
[[ -z ${BIN2:-} ]] || SYSTEMS+=(tube2)
REVERSED=()
for ((i = ${#SYSTEMS[@]} - 1; i >= 0; i--)); do REVERSED+=("${SYSTEMS[i]}"); done
declare -A ADDR

# The systems of one round, started afresh; the plain rathole always without TLS.
start_round() {
    ROUND_PIDS=()
    TUBE_NAME='' start_tube "$ECHO"
    ADDR[tube]=$PUBLIC
    ROUND_PIDS+=("$PID_relay" "$PID_agent")
    RATHOLE_NAME='' RATHOLE_TLS='' start_rathole "$ECHO" rtt
    ADDR[rathole]=$PUBLIC
    ROUND_PIDS+=("$PID_server" "$PID_client")
    if [[ -n ${RATHOLE_TLS:-} ]]; then
        RATHOLE_NAME=_tls RATHOLE_TLS=1 start_rathole "$ECHO" rtt
        ADDR[rathole_tls]=$PUBLIC
        ROUND_PIDS+=("$PID_server_tls" "$PID_client_tls")
    fi
    if [[ -n ${BIN2:-} ]]; then
        BIN=$BIN2 TUBE_NAME=2 start_tube "$ECHO"
        ADDR[tube2]=$PUBLIC
        ROUND_PIDS+=("$PID_relay2" "$PID_agent2")
    fi
}

stop_round() {
    kill "${ROUND_PIDS[@]}" 2>/dev/null || true
    wait "${ROUND_PIDS[@]}" 2>/dev/null || true
}

# run_one SYSTEM [warm]: one run of TEST through SYSTEM (a short one with `warm`).
run_one() {
    local addr=${ADDR[$1]} n
    if [[ $TEST == rtt ]]; then
        n=$COUNT
        [[ -z ${2:-} ]] || n=500
        "$BIN/tube-loadgen" --timeout 60 rtt --addr "$addr" --count "$n" --size 64
    else
        n=$CONNS
        [[ -z ${2:-} ]] || n=300
        "$BIN/tube-loadgen" --timeout 60 connrate --addr "$addr" --connections "$n" \
            --concurrency 50 --size 64
    fi
}

: >"$TMP/runs"
for ((round = 1; round <= ROUNDS; round++)); do
    start_round
    if ((round % 2)); then ORDER=("${SYSTEMS[@]}"); else ORDER=("${REVERSED[@]}"); fi
    # Warm-up through every system, not counted (see the header).
    for s in "${ORDER[@]}"; do
        run_one "$s" warm >/dev/null
    done
    for s in "${ORDER[@]}"; do
        run_one "$s" |
            python3 -c 'import json,sys; j=json.load(sys.stdin); print(sys.argv[1], j.get("conns_per_sec", j.get("p50_us")), j["p99_us"])' "$s" >>"$TMP/runs"
    done
    stop_round
done

[[ -z ${RUNS:-} ]] || cp "$TMP/runs" "$RUNS"
python3 - "$TMP/runs" "$TEST" <<'PY'
import collections, json, math, statistics, sys
first = "p50" if sys.argv[2] == "rtt" else "rate"
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    name, p50, p99 = line.split()
    runs[name].append((float(p50), float(p99)))
out = {"rounds": len(runs["rathole"])}
for name, v in runs.items():
    unit = "_us" if first == "p50" else "_per_s"
    out[f"{name}_{first}{unit}"] = round(statistics.median(x[0] for x in v), 2)
    out[f"{name}_p99_us"] = round(statistics.median(x[1] for x in v), 2)


def ratios(key, a, b):
    """Per-round ratios of a over b: their median, and the geometric mean with its 95 %
    confidence interval (normal approximation on the logarithms)."""
    for i, what in enumerate([first, "p99"]):
        pairs = [x[i] / y[i] for x, y in zip(a, b)]
        out[f"{key}_{what}"] = round(statistics.median(pairs), 3)
        if len(pairs) < 2:
            continue
        logs = [math.log(r) for r in pairs]
        mean = statistics.mean(logs)
        half = 1.96 * statistics.stdev(logs) / math.sqrt(len(logs))
        out[f"{key}_{what}_geomean"] = round(math.exp(mean), 3)
        out[f"{key}_{what}_ci95_low"] = round(math.exp(mean - half), 3)
        out[f"{key}_{what}_ci95_high"] = round(math.exp(mean + half), 3)


for name in runs:
    if name != "rathole":
        ratios(f"{name}_over_rathole", runs[name], runs["rathole"])
    if name.startswith("tube") and "rathole_tls" in runs:
        ratios(f"{name}_over_rathole_tls", runs[name], runs["rathole_tls"])
if "tube2" in runs:
    ratios("tube2_over_tube", runs["tube2"], runs["tube"])
print(json.dumps(out))
PY
