#!/usr/bin/env bash
# bench/pgo.sh: a profile-guided build of `tube`, the build to hand out as a binary
# (docs/performance.md, "A profile-guided build trained on every part"): builds tube
# instrumented, trains it, merges the profile and builds tube again with it. Prints the
# directory holding the optimised `tube` and a release `tube-loadgen`, for `BIN2=... bash
# bench/compare.sh`, `BIN2=... bash bench/rttalt.sh` or `BIN=... bash bench/instructions.sh`.
#
# The training runs the relay and an agent under the relay workloads (round trips, new
# connections, bulk with 1 and 8 streams), then every other part through `bench/parts.sh` at
# small sizes (a chain of three nodes with its hub, the mailbox peer, the long-poll proxy), so
# no part is laid out as cold code (trained on the relay alone, the mailbox peer ran a quarter
# slower than the plain build). TRAIN=relay trains the relay path only (the fifth session's
# build; BULK=1073741824 for its sizes).
#
# Env knobs: OUT (directory for the builds, profiles and the result; default target/pgo), BIN
# (directory with a release tube-loadgen; default target/release after building), TRAIN (all,
# the default, or relay), BULK (bytes of the 1-stream bulk run, default 256 MiB).
# Needs llvm-profdata of the toolchain's LLVM: the script runs `rustup component add
# llvm-tools` when it is missing. About 15 minutes on two cores (two release builds).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-${CARGO_TARGET_DIR:-$ROOT/target}/pgo}
WAIT_SECS=30
TRAIN=${TRAIN:-all}
# Bytes of the 1-stream bulk run (the 8-stream run carries half): small enough that the other
# parts' runs still count as hot next to it.
BULK=${BULK:-268435456}
case $TRAIN in
all | relay) ;;
*) echo "error: TRAIN must be all or relay, got '$TRAIN'" >&2; exit 2 ;;
esac
PROFDATA=$(rustc --print sysroot)/lib/rustlib/$(rustc -vV | sed -n 's/^host: //p')/bin/llvm-profdata
if [[ ! -x $PROFDATA ]] && command -v rustup >/dev/null; then
    rustup component add llvm-tools >&2
fi
[[ -x $PROFDATA ]] || { echo "error: no $PROFDATA (rustup component add llvm-tools)" >&2; exit 1; }

# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
release_bin
LOADGEN=$BIN/tube-loadgen
rm -rf "$OUT/raw" "$OUT/bin" "$OUT/train" "$OUT/parts.jsonl"
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
    "$LOADGEN" throughput --addr "$SINK" --streams 1 --bytes "$BULK"
    "$LOADGEN" throughput --addr "$SINK" --streams 8 --bytes "$((BULK / 2))"
    "$LOADGEN" rtt --addr "$PUBLIC" --count 30000 --size 64
} >&2
# The profile is written when the processes exit (SIGTERM: tube shuts down cleanly).
kill -TERM "$PID_agent" "$PID_relay"
wait "$PID_agent" "$PID_relay" 2>/dev/null || true
if [[ $TRAIN == all ]]; then
    # The other parts, through their own benchmark at small sizes (its processes get SIGTERM
    # on its exit too). Its relay runs count toward the relay's profile as well.
    mkdir -p "$OUT/train"
    cp "$OUT/gen/release/tube" "$LOADGEN" "$OUT/train/"
    ROUNDS=1 BYTES=134217728 COUNT=5000 SETUPS=20 RECIPIENTS=300 SENDERS=16 MESSAGES=60000 \
        MAILBOX_PACED=0 CLIENTS=300 PACKETS=30000 LONGPOLL_PACED=0 BIN=$OUT/train \
        OUT=$OUT/parts.jsonl bash "$ROOT/bench/parts.sh" >&2
fi
"$PROFDATA" merge -o "$OUT/merged.profdata" "$OUT"/raw/*.profraw

echo "building (with the profile)..." >&2
RUSTFLAGS="-Cprofile-use=$OUT/merged.profdata" CARGO_TARGET_DIR=$OUT/use \
    cargo build --release -p tube-cli >&2
cp "$OUT/use/release/tube" "$LOADGEN" "$OUT/bin/"
echo "$OUT/bin"
