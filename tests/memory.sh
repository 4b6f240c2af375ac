#!/usr/bin/env bash
# tests/memory.sh: issue 8's idle-memory figure at full scale, with release binaries. One
# relay and one agent (`tube relay`, `tube expose`) carry IDLE idle user connections (default
# 10,000) through one tunnel to an echo service (`tube-loadgen echo`); each connection did one
# echo round trip, so it is established end to end, and is then held by `tube-loadgen idle`.
# Prints the resident memory (VmRSS) of the relay and of the agent before and while holding
# them, and fails unless each grew by at most LIMIT_KIB (default 16) KiB per connection.
# The cargo test `crates/cli/tests/relay_resources.rs` checks the same bound at 1,000.
#
# Env knobs: IDLE (connections, default 10000), LIMIT_KIB (default 16).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

IDLE=${IDLE:-10000}
LIMIT_KIB=${LIMIT_KIB:-16}
WAIT_SECS=60

# Every process holds IDLE sockets (users, relay, agent, echo service) plus a few others.
need=$((IDLE + 256))
hard=$(ulimit -Hn)
if [[ $hard != unlimited && $hard -lt $need ]]; then
    echo "error: $IDLE connections need $need open files per process, but the hard limit (ulimit -Hn) is $hard" >&2
    exit 1
fi
ulimit -n "$need"

echo "building (release)..." >&2
cargo build --release -p tube-cli -p tube-loadgen >&2
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
TUBE=$BIN/tube
LOADGEN=$BIN/tube-loadgen

# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

rss_kib() { awk '/^VmRSS/ { print $2 }' "/proc/$1/status"; }

start echo "$LOADGEN" echo --listen 127.0.0.1:0
wait_lines echo 1
start_tube "$(field echo 1 3)"

# One connection there and back first, so one-time setup is in the baseline.
"$LOADGEN" --timeout 10 rtt --addr "$PUBLIC" --count 1 --size 16 >/dev/null
relay_before=$(rss_kib "$PID_relay")
agent_before=$(rss_kib "$PID_agent")

# `idle` holds its connections until its stdin (a fifo held open here) reaches EOF.
mkfifo "$TMP/idle.in"
"$LOADGEN" --timeout 30 idle --addr "$PUBLIC" --connections "$IDLE" <"$TMP/idle.in" \
    >"$TMP/idle.out" 2>"$TMP/idle.err" &
idle_pid=$!
PIDS+=("$idle_pid")
exec {hold}>"$TMP/idle.in"
for ((i = 0; i < WAIT_SECS * 10; i++)); do
    [[ -s $TMP/idle.out ]] && break
    kill -0 "$idle_pid" 2>/dev/null || break
    sleep 0.1
done
if [[ ! -s $TMP/idle.out ]]; then
    echo "error: tube-loadgen idle did not open $IDLE connections within ${WAIT_SECS}s:" >&2
    cat "$TMP/idle.err" >&2
    exit 1
fi
relay_during=$(rss_kib "$PID_relay")
agent_during=$(rss_kib "$PID_agent")
opened=$(cat "$TMP/idle.out")
exec {hold}>&-
wait "$idle_pid" || true

status=0
report() {
    local who=$1 before=$2 during=$3 per
    per=$(awk -v b="$before" -v d="$during" -v n="$IDLE" 'BEGIN { printf "%.2f", (d - b) / n }')
    echo "$who: $before KiB -> $during KiB with $IDLE idle connections: $per KiB per connection (limit $LIMIT_KIB)"
    if ! awk -v p="$per" -v l="$LIMIT_KIB" 'BEGIN { exit !(p <= l) }'; then
        echo "FAIL: $who uses more than $LIMIT_KIB KiB per idle connection" >&2
        status=1
    fi
}
echo "loadgen: $opened"
report relay "$relay_before" "$relay_during"
report agent "$agent_before" "$agent_during"
exit "$status"
