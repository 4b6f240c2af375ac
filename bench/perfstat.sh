#!/usr/bin/env bash
# bench/perfstat.sh: what one GiB through tube costs, in counts that do not depend on how busy
# the machine is: instructions, context switches and system calls of the relay and the agent
# (perf stat, attached to both processes), per GiB carried; throughput only as context.
#
# Env knobs: BYTES (default 1 GiB), STREAMS (default 1), RUNS (default 3),
# BIN (directory with release tube and tube-loadgen; default target/release after building).
# Needs perf and permission to attach to own processes (root, or perf_event_paranoid <= 1).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
BYTES=${BYTES:-1073741824}
STREAMS=${STREAMS:-1}
RUNS=${RUNS:-3}
WAIT_SECS=20
if [[ -z ${BIN:-} ]]; then
    cargo build --release -p tube-cli -p tube-loadgen >&2
    BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
fi
command -v perf >/dev/null || { echo "error: perf not found" >&2; exit 1; }

# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

start sink "$BIN/tube-loadgen" sink --listen 127.0.0.1:0
start relay "$BIN/tube" relay --listen 127.0.0.1:0 --data-dir "$TMP/relay"
wait_lines sink 1
wait_lines relay 2
SINK=$(field sink 1 3)
TOKEN=$("$BIN/tube" token --subject bench --data-dir "$TMP/relay")
start agent "$BIN/tube" expose "$SINK" --relay "$(field relay 1 3)" --token "$TOKEN" \
    --fingerprint "$(field relay 2 2)"
wait_lines agent 1
PUBLIC=$(field agent 1 2)

SYSCALLS=(read write writev readv recvfrom sendto epoll_wait futex sched_yield)
EVENTS=task-clock,context-switches,raw_syscalls:sys_enter
for s in "${SYSCALLS[@]}"; do EVENTS+=,syscalls:sys_enter_$s; done

for ((run = 1; run <= RUNS; run++)); do
    perf stat -x, -o "$TMP/perf.$run" -e "$EVENTS" -p "$PID_relay,$PID_agent" &
    PERF=$!
    sleep 0.3 # perf attaches asynchronously; nothing to wait on (context only, not a result)
    "$BIN/tube-loadgen" throughput --addr "$PUBLIC" --bytes "$BYTES" --streams "$STREAMS" \
        >"$TMP/tp.$run"
    kill -INT "$PERF"
    wait "$PERF" || true
    python3 - "$TMP/perf.$run" "$TMP/tp.$run" "$BYTES" <<'PY'
import json, sys
counts = {}
for line in open(sys.argv[1]):
    parts = line.strip().split(",")
    if len(parts) > 2 and parts[0] and parts[0][0].isdigit():
        counts[parts[2]] = float(parts[0])
gib = int(sys.argv[3]) / 2**30
tp = json.loads(open(sys.argv[2]).read().strip().splitlines()[-1])
out = {
    "gbit_s": round(tp["gbit_s"], 2),
    "cpu_s_per_gib": round(counts.get("task-clock", 0) / 1e3 / gib, 2),
    "ctx_k_per_gib": round(counts.get("context-switches", 0) / 1e3 / gib, 1),
    "syscalls_k_per_gib": round(counts.get("raw_syscalls:sys_enter", 0) / 1e3 / gib, 1),
}
for name, v in counts.items():
    if name.startswith("syscalls:sys_enter_") and v:
        out[name[len("syscalls:sys_enter_"):] + "_k"] = round(v / 1e3 / gib, 1)
print(json.dumps(out))
PY
done
