#!/usr/bin/env bash
# tests/integrity.sh: issue 8's integrity figures at full size, on release binaries running as
# real processes (the cargo tests prove the same properties at a smaller scale, see
# docs/reliability.md section 4):
#   1. 1 GiB each way through `tube relay` + `tube expose`, one stream;
#   2. 100 concurrent streams of 10 MiB each way through the same tunnel;
#   3. 256 MiB each way through a chain of three nodes: `tube hub --intermediates 1`, three
#      `tube node`s on 127.0.0.2-4 (requester, intermediate, endpoint), `tube chain accept` on
#      the endpoint and `tube chain listen` on the requester.
# Each figure is `tube-loadgen verify` against `tube-loadgen echo`: every stream sends its own
# deterministic pattern and compares every echoed byte with it (stronger than comparing SHA-256
# digests), and must get back exactly what it sent. The script prints one line per figure with
# its time and exits non-zero at the first failure.
#
# Env knobs (bytes): RELAY_BYTES (default 1 GiB), STREAMS (100), STREAM_BYTES (10 MiB),
# CHAIN_BYTES (256 MiB).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

RELAY_BYTES=${RELAY_BYTES:-1073741824}
STREAMS=${STREAMS:-100}
STREAM_BYTES=${STREAM_BYTES:-10485760}
CHAIN_BYTES=${CHAIN_BYTES:-268435456}
WAIT_SECS=30

echo "building (release)..." >&2
cargo build --release -p tube-cli -p tube-loadgen >&2
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
TUBE=$BIN/tube
LOADGEN=$BIN/tube-loadgen

# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
BUILT=$SECONDS

# json_field LINE KEY: the value of KEY in the one-line JSON object LINE (numbers, no nesting).
json_field() {
    sed -E "s/.*\"$2\":([^,}]*).*/\1/" <<<"$1"
}

# human BYTES: 1 GiB, 10 MiB, 4096 B.
human() {
    if (($1 % (1 << 30) == 0)); then
        echo "$(($1 >> 30)) GiB"
    elif (($1 % (1 << 20) == 0)); then
        echo "$(($1 >> 20)) MiB"
    else
        echo "$1 B"
    fi
}

# figure WHAT ADDR STREAMS BYTES: runs `verify` of STREAMS x BYTES against the echo at ADDR,
# asserts every stream came back intact and prints the figure with its time.
figure() {
    local what=$1 addr=$2 streams=$3 bytes=$4 line intact secs gbit
    if ! line=$("$LOADGEN" verify --addr "$addr" --streams "$streams" --bytes "$bytes"); then
        echo "FAIL  $what: $line" >&2
        exit 1
    fi
    intact=$(json_field "$line" intact)
    secs=$(json_field "$line" secs)
    gbit=$(json_field "$line" gbit_s)
    if [[ $intact != "$streams" || $(json_field "$line" bytes_per_stream) != "$bytes" ]]; then
        echo "FAIL  $what: $line" >&2
        exit 1
    fi
    printf 'ok    %-72s %7.2f s  %5.2f Gbit/s each way\n' "$what" "$secs" "$gbit"
}

echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ); machine: $(nproc) cores"

# Relay and agent, exposing an echo server.
start echo "$LOADGEN" echo --listen 127.0.0.1:0
wait_lines echo 1
ECHO=$(field echo 1 3)
start_tube "$ECHO"
TUNNEL=$PUBLIC

figure "$(human "$RELAY_BYTES") each way through relay and agent, every byte checked" \
    "$TUNNEL" 1 "$RELAY_BYTES"
figure "$STREAMS concurrent streams x $(human "$STREAM_BYTES") each way through relay and agent" \
    "$TUNNEL" "$STREAMS" "$STREAM_BYTES"

# A hub that builds chains with one intermediate, and exactly three nodes: the chain from a to
# c can only go through b.
start_chain_nodes a b c
API_A=$(field node_a 1 3)
API_C=$(field node_c 1 3)
start accept "$TUBE" chain --api "$API_C" accept --forward "$ECHO" --allow a
wait_err accept "accepting chains"
start listen "$TUBE" chain --api "$API_A" listen c --local 127.0.0.1:0
wait_lines listen 1
LOCAL=$(field listen 1 3)

figure "$(human "$CHAIN_BYTES") each way through a chain of three nodes (a, b, c)" \
    "$LOCAL" 1 "$CHAIN_BYTES"
# The hub built exactly one chain, of two hops (one intermediate), and nobody said it was
# shorter than asked.
built=$(grep -c "building chain" "$TMP/hub.err" || true)
hops=$(grep "building chain" "$TMP/hub.err" | grep -o 'hops=[0-9]*' || true)
if [[ $built != 1 || $hops != "hops=2" ]] || grep -q "intermediate(s) available" "$TMP/listen.err"; then
    echo "FAIL  the chain was not a->b->c: $built chain(s) built, $hops; hub stderr:" >&2
    cat "$TMP/hub.err" "$TMP/listen.err" >&2
    exit 1
fi
echo "ok    the chain went through three nodes (the hub built one chain, $hops)"
echo "all integrity figures hold ($((SECONDS - BUILT)) s after the build)"
