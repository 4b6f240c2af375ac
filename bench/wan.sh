#!/usr/bin/env bash
# bench/wan.sh: bulk throughput through tube when the agent is a wide-area round trip away
# from the relay. A `tube-loadgen delay` forwarder between agent and relay holds every chunk
# DELAY_MS milliseconds each way (this machine has no tc netem); the same transfer through the
# same forwarder without tube gives the path's own limit. Prints one JSON line per system:
# {"system":"path"|"tube", ...the loadgen throughput fields}.
#
# What it models: the delay of bytes, which is what tube's per-stream credit (WINDOW frames,
# themselves bytes) has to cross. TCP's own acknowledgements are not delayed (the forwarder's
# sockets are local and it holds up to 64 MiB), so a plain TCP connection through it is not held
# back by its kernel window as on a real path; "path", and any plain-TCP tunnel through it, is
# therefore an upper bound, not a comparison.
#
# Env knobs: DELAY_MS (one-way, default 10: a 20 ms round trip), BYTES (default 256 MiB),
# STREAMS (default 1), BIN (directory with release tube and tube-loadgen; default
# target/release after building).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
DELAY_MS=${DELAY_MS:-10}
BYTES=${BYTES:-268435456}
STREAMS=${STREAMS:-1}
WAIT_SECS=20

# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
release_bin

run() {
    local system=$1 addr=$2 line
    line=$("$BIN/tube-loadgen" throughput --addr "$addr" --bytes "$BYTES" --streams "$STREAMS")
    echo "{\"system\":\"$system\",\"delay_ms\":$DELAY_MS,${line#\{}"
}

start sink "$BIN/tube-loadgen" sink --listen 127.0.0.1:0
wait_lines sink 1
SINK=$(field sink 1 3)
start path "$BIN/tube-loadgen" delay --listen 127.0.0.1:0 --to "$SINK" --ms "$DELAY_MS"
wait_lines path 1
run path "$(field path 1 3)"

start relay "$BIN/tube" relay --listen 127.0.0.1:0 --data-dir "$TMP/relay"
wait_lines relay 2
start wan "$BIN/tube-loadgen" delay --listen 127.0.0.1:0 --to "$(field relay 1 3)" --ms "$DELAY_MS"
wait_lines wan 1
TOKEN=$("$BIN/tube" token --subject bench --data-dir "$TMP/relay")
start agent "$BIN/tube" expose "$SINK" --relay "$(field wan 1 3)" --token "$TOKEN" \
    --fingerprint "$(field relay 2 2)"
wait_lines agent 1
run tube "$(field agent 1 2)"
