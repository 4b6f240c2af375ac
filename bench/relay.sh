#!/usr/bin/env bash
# bench/relay.sh: tube relay + agent against direct loopback, side by side in one run.
#
# Starts a sink and an echo server (tube-loadgen), a relay and an agent exposing both, then
# runs ROUNDS rounds; each round runs every test directly and through the tunnel, one after
# the other, so both see the same machine state. Results go to $OUT (JSON lines); a summary
# of medians and tube/direct ratios is printed at the end. See docs/performance.md.
#
# Env knobs:
#   ROUNDS   rounds (default 5)
#   BYTES    bytes per throughput run, 1 stream and 8 streams alike (default 2 GiB)
#   COUNT    timed round trips per rtt run (default 20000)
#   OUT      results file (default bench/out/relay-<date>.jsonl)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

ROUNDS=${ROUNDS:-5}
BYTES=${BYTES:-2147483648}
COUNT=${COUNT:-20000}
RTT_SIZE=64
mkdir -p bench/out
OUT=${OUT:-bench/out/relay-$(date +%Y%m%d-%H%M%S).jsonl}
WAIT_SECS=20

echo "building (release)..." >&2
cargo build --release -p tube-cli -p tube-loadgen >&2
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
TUBE=$BIN/tube
LOADGEN=$BIN/tube-loadgen

# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

start sink "$LOADGEN" sink --listen 127.0.0.1:0
start echo "$LOADGEN" echo --listen 127.0.0.1:0
wait_lines sink 1
wait_lines echo 1
SINK=$(field sink 1 3)
ECHO=$(field echo 1 3)
start_tube "$SINK $ECHO"
TUBE_SINK=$(field agent 1 2)
TUBE_ECHO=$(field agent 2 2)

{
    echo "date:    $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    echo "direct:  sink $SINK, echo $ECHO"
    echo "tube:    sink $TUBE_SINK, echo $TUBE_ECHO (relay $(field relay 1 3))"
    echo "rounds $ROUNDS, bytes $BYTES, count $COUNT; results in $OUT"
} >&2

# record SYSTEM ROUND CMD...: runs one test, tags its JSON line, appends it to $OUT.
record() {
    local system=$1 round=$2 line
    shift 2
    if ! line=$("$@") || [[ $line != "{"* ]]; then
        echo "error: $system round $round failed: $*" >&2
        exit 1
    fi
    echo "{\"system\":\"$system\",\"round\":$round,${line#\{}" | tee -a "$OUT" >&2
}

: >"$OUT"
for ((round = 1; round <= ROUNDS; round++)); do
    echo "round $round/$ROUNDS" >&2
    for streams in 1 8; do
        record direct "$round" "$LOADGEN" throughput --addr "$SINK" --bytes "$BYTES" --streams "$streams"
        record tube "$round" "$LOADGEN" throughput --addr "$TUBE_SINK" --bytes "$BYTES" --streams "$streams"
    done
    record direct "$round" "$LOADGEN" rtt --addr "$ECHO" --count "$COUNT" --size "$RTT_SIZE"
    record tube "$round" "$LOADGEN" rtt --addr "$TUBE_ECHO" --count "$COUNT" --size "$RTT_SIZE"
done

python3 - "$OUT" <<'PY'
import json, statistics, sys
from collections import defaultdict

runs = defaultdict(list)
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r["test"] == "throughput":
        runs[(f"throughput {r['streams']} stream(s)", "Gbit/s", r["system"])].append(r["gbit_s"])
    else:
        for key in ("p50_us", "p99_us", "mean_us"):
            name = f"rtt {r['size']} B {key[:-3]}"
            runs[(name, "us", r["system"])].append(r[key])

tests = list(dict.fromkeys((name, unit) for name, unit, _ in runs))
rows = [("test", "unit", "direct", "tube", "tube/direct", "n")]
for name, unit in tests:
    d = statistics.median(runs[(name, unit, "direct")])
    t = statistics.median(runs[(name, unit, "tube")])
    n = len(runs[(name, unit, "tube")])
    rows.append((name, unit, f"{d:.2f}", f"{t:.2f}", f"{t / d:.3f}", str(n)))
widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
print("\nmedians over rounds (rtt ratio: latency, lower is better)")
for i, r in enumerate(rows):
    print("  ".join(c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
    if i == 0:
        print("  ".join("-" * w for w in widths))
PY

rss() {
    awk -v name="$1" '/^VmRSS|^VmHWM/ { printf "%s %s %s %s  ", name, $1, $2, $3 } END { print "" }' \
        "/proc/$2/status"
}
echo
echo "memory after the run (VmHWM: peak):"
rss relay "$PID_relay"
rss agent "$PID_agent"
echo "results: $OUT"
