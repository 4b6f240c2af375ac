#!/usr/bin/env bash
# bench/pgo.sh: a profile-guided build of `tube` for measuring (docs/performance.md, "Profile-
# guided optimisation"): builds tube instrumented, runs the relay and an agent under the relay
# workloads (round trips, new connections, bulk with 1 and 8 streams), merges the profile and
# builds tube again with it. Prints the directory holding the optimised `tube` and a release
# `tube-loadgen`, for `BIN2=... bash bench/rttalt.sh` or `BIN=... bash bench/instructions.sh`.
#
# Only the relay path is trained, so the compiler treats the rest of tube (hub and nodes, the
# mailbox peer, the long-poll proxy) as cold code: this is a build for measuring the relay, not
# a release build.
#
# Env knobs: OUT (directory for the builds, profiles and the result; default target/pgo), BIN
# (directory with a release tube-loadgen; default target/release after building).
# Needs llvm-profdata of the toolchain's LLVM: `rustup component add llvm-tools`.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-${CARGO_TARGET_DIR:-$ROOT/target}/pgo}
WAIT_SECS=30
PROFDATA=$(rustc --print sysroot)/lib/rustlib/$(rustc -vV | sed -n 's/^host: //p')/bin/llvm-profdata
[[ -x $PROFDATA ]] || { echo "error: no $PROFDATA (rustup component add llvm-tools)" >&2; exit 1; }

# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
release_bin
LOADGEN=$BIN/tube-loadgen
rm -rf "$OUT/raw" "$OUT/bin"
mkdir -p "$OUT/raw" "$OUT/bin"

echo "building (instrumented)..." >&2
RUSTFLAGS="-Cprofile-generate=$OUT/raw" CARGO_TARGET_DIR=$OUT/gen \
    cargo build --release -p tube-cli >&2

echo "training..." >&2
# Only the training's profiles count (the build's own scripts ran instrumented too).
rm -rf "$OUT/raw"
start echo "$LOADGEN" echo --listen 127.0.0.1:0
wait_lines echo 1
start sink "$LOADGEN" sink --listen 127.0.0.1:0
wait_lines sink 1
BIN=$OUT/gen/release start_tube "$(field echo 1 3) $(field sink 1 3)"
SINK=$(field agent 2 2)
{
    "$LOADGEN" rtt --addr "$PUBLIC" --count 30000 --size 64
    "$LOADGEN" connrate --addr "$PUBLIC" --connections 3000 --concurrency 50
    "$LOADGEN" throughput --addr "$SINK" --streams 1 --bytes 1073741824
    "$LOADGEN" throughput --addr "$SINK" --streams 8 --bytes 536870912
    "$LOADGEN" rtt --addr "$PUBLIC" --count 30000 --size 64
} >&2
# The profile is written when the processes exit (SIGTERM: tube shuts down cleanly).
kill -TERM "$PID_agent" "$PID_relay"
wait "$PID_agent" "$PID_relay" 2>/dev/null || true
"$PROFDATA" merge -o "$OUT/merged.profdata" "$OUT"/raw/*.profraw

echo "building (with the profile)..." >&2
RUSTFLAGS="-Cprofile-use=$OUT/merged.profdata" CARGO_TARGET_DIR=$OUT/use \
    cargo build --release -p tube-cli >&2
cp "$OUT/use/release/tube" "$LOADGEN" "$OUT/bin/"
echo "$OUT/bin"
