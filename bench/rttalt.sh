#!/usr/bin/env bash
# bench/rttalt.sh: the 64-byte round trip of tube and rathole (and, with BIN2, of a second tube
# build) in front of one echo server, alternated ROUNDS times in short runs with nothing
# attached to the processes. The round trip moves by several percent from run to run here, so
# it is compared pair by pair: each round's tube p50 over the rathole p50 measured right after
# it. perf attached to the processes (perfstat.sh, rttpath.sh) changes the comparison itself
# (every system call and context switch then costs more, and tube and rathole differ in how
# many they make per wake-up); this script is the one to judge a round-trip change by.
#
# Env knobs: ROUNDS (default 15), COUNT (round trips per run, default 5000), BIN (directory
# with release tube and tube-loadgen; default target/release after building), BIN2 (a second
# build's directory, run as "tube2"), TOOLS (rathole in $TOOLS/bin, as bench/compare.sh
# installs it). Prints one JSON line: each system's median p50 and p99 in microseconds and the
# median of the per-round ratios to rathole.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
TOOLS=${TOOLS:-$ROOT/bench/.tools}
ROUNDS=${ROUNDS:-15}
COUNT=${COUNT:-5000}
WAIT_SECS=20
if [[ -z ${BIN:-} ]]; then
    cargo build --release -p tube-cli -p tube-loadgen >&2
    BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
fi
[[ -x $TOOLS/bin/rathole ]] || { echo "error: no rathole in $TOOLS/bin (bench/compare.sh installs it)" >&2; exit 1; }

# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
start echo "$BIN/tube-loadgen" echo --listen 127.0.0.1:0
wait_lines echo 1
ECHO=$(field echo 1 3)
start_tube "$ECHO"
declare -A ADDR=([tube]=$PUBLIC)
SYSTEMS=(tube rathole)
start_rathole "$ECHO" rtt
ADDR[rathole]=$PUBLIC
if [[ -n ${BIN2:-} ]]; then
    BIN=$BIN2 TUBE_NAME=2 start_tube "$ECHO"
    ADDR[tube2]=$PUBLIC
    SYSTEMS+=(tube2)
fi

: >"$TMP/runs"
for ((round = 1; round <= ROUNDS; round++)); do
    for s in "${SYSTEMS[@]}"; do
        "$BIN/tube-loadgen" --timeout 60 rtt --addr "${ADDR[$s]}" --count "$COUNT" --size 64 |
            python3 -c 'import json,sys; j=json.load(sys.stdin); print(sys.argv[1], j["p50_us"], j["p99_us"])' "$s" >>"$TMP/runs"
    done
done

python3 - "$TMP/runs" <<'PY'
import collections, json, statistics, sys
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    name, p50, p99 = line.split()
    runs[name].append((float(p50), float(p99)))
out = {"rounds": len(runs["rathole"])}
for name, v in runs.items():
    out[f"{name}_p50_us"] = round(statistics.median(x[0] for x in v), 2)
    out[f"{name}_p99_us"] = round(statistics.median(x[1] for x in v), 2)
    if name != "rathole":
        for i, what in enumerate(["p50", "p99"]):
            pairs = [a[i] / b[i] for a, b in zip(v, runs["rathole"])]
            out[f"{name}_over_rathole_{what}"] = round(statistics.median(pairs), 3)
print(json.dumps(out))
PY
