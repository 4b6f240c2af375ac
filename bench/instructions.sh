#!/usr/bin/env bash
# bench/instructions.sh: user-space instructions the relay and the agent (or rathole's server
# and client) execute per 64-byte round trip, counted by valgrind's callgrind. Unlike time,
# the count does not move with the machine's load (runs agree to a few instructions), so a
# change of 1 % shows in one run; it leaves out the kernel and weighs every instruction alike
# (a cache miss or a contended atomic costs more than its one instruction).
#
# Env knobs: SYSTEM (tube, the default, or rathole from $TOOLS/bin/rathole as
# bench/compare.sh installs it), TEST (rtt, the default, or connrate: per new connection, each
# doing one 64-byte echo, 50 at a time), COUNT (round trips or connections counted, default
# 2000, after 300 not counted), OUT (directory for the callgrind files, default: a temporary one, removed),
# BIN (directory with release tube and tube-loadgen; default target/release after building),
# CACHE=1 (also simulate 32 KiB L1 caches, as this machine's, with a 1 MiB last level: adds
# the L1 instruction-fetch and data misses per round trip. A process alone in the simulation
# misses only what its own round trip does not fit; on the machine, the kernel and the other
# processes evict more, so the code a round trip runs is worth keeping under 32 KiB).
# Needs valgrind (Debian package `valgrind`). Prints one JSON line; with OUT set, the files
# can be read with `callgrind_annotate --inclusive=yes OUT/cg.PID.1`, and `python3
# bench/hotcode.py OUT/cg.PID.1 COUNT` counts the code a round trip runs (its cache lines, by
# function).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
SYSTEM=${SYSTEM:-tube}
TOOLS=${TOOLS:-$ROOT/bench/.tools}
COUNT=${COUNT:-2000}
TEST=${TEST:-rtt}
case $TEST in
rtt) UNIT=rtt ;;
connrate) UNIT=conn ;;
*) echo "error: TEST must be rtt or connrate, got '$TEST'" >&2; exit 2 ;;
esac
command -v valgrind >/dev/null && command -v callgrind_control >/dev/null ||
    { echo "error: valgrind not found (apt-get install valgrind)" >&2; exit 1; }
# Everything is about 50 times slower under valgrind: the handshake too.
WAIT_SECS=60

# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
release_bin
check_system
CG=${OUT:-$TMP/cg}
mkdir -p "$CG"
rm -f "$CG"/cg.*
VG=(valgrind --tool=callgrind "--callgrind-out-file=$CG/cg.%p")
# With OUT, costs per instruction too: which code lines a round trip touches.
[[ -n ${OUT:-} ]] && VG+=(--dump-instr=yes)
if [[ -n ${CACHE:-} ]]; then
    VG+=(--cache-sim=yes --I1=32768,8,64 --D1=32768,8,64 --LL=1048576,16,64)
fi

start_system echo "${VG[@]}"

# Warm up (buffers, windows, the allocator), zero the counters, count COUNT round trips and
# dump: the dump holds exactly what the round trips cost (and the idle ticks between them).
# work N: N round trips over one connection, or N new connections.
work() {
    if [[ $TEST == rtt ]]; then
        "$BIN/tube-loadgen" --timeout 60 rtt --addr "$PUBLIC" --count "$1" --size 64
    else
        "$BIN/tube-loadgen" --timeout 60 connrate --addr "$PUBLIC" --connections "$1" \
            --concurrency 50 --size 64
    fi
}
work 300 >/dev/null
callgrind_control -z "${PROCS[@]}" >/dev/null 2>&1
work "$COUNT" >"$TMP/rtt.json"
callgrind_control -d "${PROCS[@]}" >/dev/null 2>&1
for ((i = 0; i < WAIT_SECS * 10; i++)); do
    n=0
    for pid in "${PROCS[@]}"; do [[ -s $CG/cg.$pid.1 ]] && n=$((n + 1)); done
    ((n == ${#PROCS[@]})) && break
    sleep 0.1
done

python3 - "$SYSTEM" "$COUNT" "$CG" "$UNIT" "${PROCS[@]}" <<'PY'
import json, re, sys
system, count, cg, unit, pids = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5:]
names = ["relay", "agent"] if system == "tube" else ["server", "client"]
out = {"system": system, "round_trips" if unit == "rtt" else "connections": count}
total = 0
for name, pid in zip(names, pids):
    text = open(f"{cg}/cg.{pid}.1", errors="replace").read()
    events = re.search(r"^events:\s+(.*)$", text, re.M).group(1).split()
    sums = re.search(r"^(?:summary|totals):\s+(.*)$", text, re.M).group(1).split()
    got = dict(zip(events, (int(v) / count for v in sums)))
    out[f"{name}_instructions_per_{unit}"] = round(got["Ir"])
    total += got["Ir"]
    if "I1mr" in got:
        out[f"{name}_l1i_misses_per_{unit}"] = round(got["I1mr"], 1)
        out[f"{name}_l1d_misses_per_{unit}"] = round(got["D1mr"] + got["D1mw"], 1)
out[f"instructions_per_{unit}"] = round(total)
print(json.dumps(out))
PY
