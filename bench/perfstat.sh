#!/usr/bin/env bash
# bench/perfstat.sh: what one GiB (or one round trip, or one new connection) through tube
# costs, in counts that do not depend on how busy the machine is: CPU time, context switches
# and system calls of the relay and the agent (perf stat, attached to both processes), per unit
# of work; the rate itself only as context.
#
# Env knobs: TEST (throughput, the default: per GiB; rtt: per 64-byte round trip, COUNT of
# them; connrate: per new connection, COUNT of them at concurrency 50),
# SYSTEM (tube, the default, or rathole: its server and client over plain TCP, from
# $TOOLS/bin/rathole as bench/compare.sh installs it; the same counts, for comparison),
# BYTES (default 1 GiB), STREAMS (default 1), COUNT (default 20000), RUNS (default 3),
# BIN (directory with release tube and tube-loadgen; default target/release after building).
# Needs perf and permission to attach to own processes (root, or perf_event_paranoid <= 1).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
BYTES=${BYTES:-1073741824}
STREAMS=${STREAMS:-1}
RUNS=${RUNS:-3}
TEST=${TEST:-throughput}
SYSTEM=${SYSTEM:-tube}
TOOLS=${TOOLS:-$ROOT/bench/.tools}
COUNT=${COUNT:-20000}
case $TEST in
throughput | rtt | connrate) ;;
*) echo "error: TEST must be throughput, rtt or connrate, got '$TEST'" >&2; exit 2 ;;
esac
WAIT_SECS=20
command -v perf >/dev/null || { echo "error: perf not found" >&2; exit 1; }

# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
release_bin
check_system

if [[ $TEST == throughput ]]; then start_system sink; else start_system echo; fi
PID_LIST=$(IFS=,; echo "${PROCS[*]}")

SYSCALLS=(read write writev readv recvfrom sendto epoll_wait futex sched_yield accept4 connect
    epoll_ctl setsockopt shutdown close)
EVENTS=task-clock,context-switches,raw_syscalls:sys_enter
for s in "${SYSCALLS[@]}"; do EVENTS+=,syscalls:sys_enter_$s; done

for ((run = 1; run <= RUNS; run++)); do
    perf stat -x, -o "$TMP/perf.$run" -e "$EVENTS" -p "$PID_LIST" &
    PERF=$!
    sleep 0.3 # perf attaches asynchronously; nothing to wait on (context only, not a result)
    case $TEST in
    throughput)
        "$BIN/tube-loadgen" throughput --addr "$PUBLIC" --bytes "$BYTES" --streams "$STREAMS" \
            >"$TMP/tp.$run"
        ;;
    rtt) "$BIN/tube-loadgen" rtt --addr "$PUBLIC" --count "$COUNT" --size 64 >"$TMP/tp.$run" ;;
    connrate)
        "$BIN/tube-loadgen" connrate --addr "$PUBLIC" --connections "$COUNT" --concurrency 50 \
            --size 64 >"$TMP/tp.$run"
        ;;
    esac
    kill -INT "$PERF"
    wait "$PERF" || true
    python3 - "$TMP/perf.$run" "$TMP/tp.$run" "$BYTES" "$TEST" "$COUNT" <<'PY'
import json, sys
counts = {}
for line in open(sys.argv[1]):
    parts = line.strip().split(",")
    if len(parts) > 2 and parts[0] and parts[0][0].isdigit():
        counts[parts[2]] = float(parts[0])
test = sys.argv[4]
tp = json.loads(open(sys.argv[2]).read().strip().splitlines()[-1])
if test == "throughput":
    # per GiB; counts in thousands
    units, unit, scale, digits = int(sys.argv[3]) / 2**30, "gib", 1e3, 1
    out = {"gbit_s": round(tp["gbit_s"], 2),
           "cpu_s_per_gib": round(counts.get("task-clock", 0) / 1e3 / units, 2)}
else:
    # per round trip or per connection; counts as they are
    units, scale, digits = int(sys.argv[5]), 1, 2
    unit = "rtt" if test == "rtt" else "conn"
    if test == "rtt":
        out = {"p50_us": tp["p50_us"], "p99_us": tp["p99_us"]}
    else:
        out = {"conns_per_sec": round(tp["conns_per_sec"]), "p99_us": tp["p99_us"]}
    out[f"cpu_us_per_{unit}"] = round(counts.get("task-clock", 0) * 1e3 / units, 1)
suffix = "_k" if scale == 1e3 else ""
out[f"ctx{suffix}_per_{unit}"] = round(counts.get("context-switches", 0) / scale / units, digits)
out[f"syscalls{suffix}_per_{unit}"] = round(
    counts.get("raw_syscalls:sys_enter", 0) / scale / units, digits)
for name, v in counts.items():
    if name.startswith("syscalls:sys_enter_") and v:
        out[name[len("syscalls:sys_enter_"):] + suffix] = round(v / scale / units, digits)
print(json.dumps(out))
PY
done
