#!/usr/bin/env bash
# tests/soak.sh: issue 8's soak (item 7). Runs every service as release binaries for DURATION
# seconds (default 3600) under mixed traffic, samples the resident memory (VmRSS) and the open
# descriptors of every tube process every INTERVAL seconds (default 10) into a CSV, and prints
# the trend per process: first, last and largest value and the least-squares slope per hour.
#
# Services: `tube relay` + `tube expose` in front of `tube-loadgen echo`; a chain of three
# `tube node`s on 127.0.0.2-4 (`tube hub --intermediates 1`, `tube chain accept` on the
# endpoint, `tube chain listen` on the requester) to the same echo; a mailbox `tube peer
# --http` with `tube longpoll` in front of it, one `tube msg listen` client on TCP and one
# through the proxy.
# Traffic, in loops until the end: `tube-loadgen verify` (every echoed byte checked) and
# `connrate` through the tunnel; `verify` through the chain (each connection is a new chain);
# messages to both mailbox listeners, one over TCP and one through the proxy every MSG_EVERY
# seconds (default 3: the peer allows 30 registrations a minute, and a send through the proxy
# logs in once).
#
# Exits non-zero if a process died, a traffic step failed, a message was lost, or a process
# leaked (thresholds below, each overridable):
#   - RSS: the last sample may exceed the first sample after the warm-up (the first tenth of
#     the run) by at most RSS_LIMIT_KIB (default 32768 = 32 MiB). After warm-up the same
#     buffers are allocated and freed over and over; a process under this traffic holds at
#     most a few dozen connections at once (about 50 KiB each with TLS and mux buffers), so a
#     few MiB of allocator variation is normal, while a leak of even 100 bytes per connection
#     passes 32 MiB within the hour (the relay alone serves several 100,000 connections).
#   - Descriptors: once the traffic has stopped, every process must be back within FD_SLACK
#     (default 2) of its count before the traffic started, within REST_SECS (default 240).
#     The relay, agent, hub and nodes are back to their exact counts at once; the peer and the
#     proxy need minutes, because every send through the proxy leaves a client that is
#     forgotten only after 30 s idle, and the proxy's HTTP client keeps idle connections to
#     the peer for 90 s (checked by a reaper about as often). A socket per connection or per
#     message would stay.
#
# Env knobs: DURATION, INTERVAL, MSG_EVERY, RSS_LIMIT_KIB, FD_SLACK, REST_SECS, SOAK_CSV (where the
# samples go, default target/soak.csv), SOAK_LOGS (where every output is kept when the soak
# fails, default target/soak-logs).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

DURATION=${DURATION:-3600}
INTERVAL=${INTERVAL:-10}
MSG_EVERY=${MSG_EVERY:-3}
RSS_LIMIT_KIB=${RSS_LIMIT_KIB:-32768}
FD_SLACK=${FD_SLACK:-2}
REST_SECS=${REST_SECS:-240}
SOAK_CSV=${SOAK_CSV:-$ROOT/target/soak.csv}
SOAK_LOGS=${SOAK_LOGS:-$ROOT/target/soak-logs}
WAIT_SECS=60

echo "building (release)..." >&2
cargo build --release -p tube-cli -p tube-loadgen >&2
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
TUBE=$BIN/tube
LOADGEN=$BIN/tube-loadgen

# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ); machine: $(nproc) cores; duration ${DURATION}s, sample every ${INTERVAL}s"

# Relay and agent, exposing an echo server.
start echo "$LOADGEN" echo --listen 127.0.0.1:0
wait_lines echo 1
ECHO=$(field echo 1 3)
start_tube "$ECHO"
TUNNEL=$PUBLIC

# A chain a -> b -> c to the same echo.
start_chain_nodes a b c
start accept "$TUBE" chain --api "$(field node_c 1 3)" accept --forward "$ECHO" --allow a
wait_err accept "accepting chains"
start listen "$TUBE" chain --api "$(field node_a 1 3)" listen c --local 127.0.0.1:0
wait_lines listen 1
CHAIN=$(field listen 1 3)

# A mailbox peer with its HTTP backend behind the long-poll proxy (clients idle for 30 s are
# forgotten, so the descriptor check at the end need not wait 10 minutes for them). x listens
# on TCP and y through the proxy; s sends to y over TCP and t to x through the proxy (a client
# that listens and sends at once shares one data dir between two processes: kept apart here).
start peer "$TUBE" peer --listen 127.0.0.1:0 --http 127.0.0.1:0 --http-hold 5s
wait_lines peer 2
PEER=$(field peer 1 3)
start longpoll "$TUBE" longpoll --listen 127.0.0.1:0 --backend "http://$(field peer 2 3)/" \
    --idle-timeout 30s
wait_lines longpoll 1
VIA=http://$(field longpoll 1 3)
for who in x y s t; do
    "$TUBE" msg init --data-dir "$TMP/msg-$who" >/dev/null
    "$TUBE" msg id --peer "$PEER" --data-dir "$TMP/msg-$who" >"$TMP/msg-$who.addr"
done
ADDR_X=$(cat "$TMP/msg-x.addr")
ADDR_Y=$(cat "$TMP/msg-y.addr")
"$TUBE" msg fetch --peer "$PEER" --data-dir "$TMP/msg-s" >/dev/null
"$TUBE" msg fetch --peer "$PEER" --via "$VIA" --data-dir "$TMP/msg-t" >/dev/null
start inbox_x "$TUBE" msg listen --peer "$PEER" --data-dir "$TMP/msg-x"
start inbox_y "$TUBE" msg listen --peer "$PEER" --via "$VIA" --data-dir "$TMP/msg-y"
wait_err inbox_x "registered, listening"
wait_err inbox_y "registered, listening"

PROCS=(relay agent hub node_a node_b node_c accept listen peer longpoll inbox_x inbox_y)
pid_of() { local v="PID_$1"; echo "${!v}"; }
rss_of() { awk '/^VmRSS/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo dead; }
fds_of() { ls "/proc/$1/fd" 2>/dev/null | wc -l; }
# Alive: running and not a zombie (a dead child stays one until this shell waits for it).
alive() { ! grep -qs '^State:[[:space:]]*Z' "/proc/$(pid_of "$1")/status" && [[ -e /proc/$(pid_of "$1")/status ]]; }

# One round of each kind before the baseline, so one-time setup is not counted as growth.
"$LOADGEN" --timeout 30 verify --addr "$TUNNEL" --bytes 1048576 --streams 2 >/dev/null
"$LOADGEN" --timeout 30 verify --addr "$CHAIN" --bytes 1048576 --streams 1 >/dev/null
declare -A FD_START
for p in "${PROCS[@]}"; do
    FD_START[$p]=$(fds_of "$(pid_of "$p")")
done

# Traffic loops, each counting its rounds and failures in $TMP/<loop>.{rounds,fails}, until
# the end or the stop file.
END=$((SECONDS + DURATION))
running() { ((SECONDS < END)) && [[ ! -e $TMP/stop ]]; }
loop() {
    local name=$1
    shift
    local rounds=0 fails=0
    while running; do
        if ! "$@" >>"$TMP/$name.log" 2>&1; then
            fails=$((fails + 1))
            echo "round $rounds failed" >>"$TMP/$name.log"
        fi
        rounds=$((rounds + 1))
        echo "$rounds" >"$TMP/$name.rounds"
        echo "$fails" >"$TMP/$name.fails"
    done
}
relay_round() {
    "$LOADGEN" --timeout 30 verify --addr "$TUNNEL" --bytes 4194304 --streams 4 &&
        "$LOADGEN" --timeout 30 connrate --addr "$TUNNEL" --connections 500 --concurrency 20
}
chain_round() {
    "$LOADGEN" --timeout 30 verify --addr "$CHAIN" --bytes 1048576 --streams 2
}
# One message each way, counted per direction when sent.
msg_loop() {
    local rounds=0 fails=0 to_x=0 to_y=0
    while running; do
        if "$TUBE" msg send --to "$ADDR_Y" "s to y $rounds" --data-dir "$TMP/msg-s" >>"$TMP/msg.log" 2>&1; then
            to_y=$((to_y + 1))
        else
            fails=$((fails + 1))
        fi
        if "$TUBE" msg send --via "$VIA" --to "$ADDR_X" "t to x $rounds" --data-dir "$TMP/msg-t" >>"$TMP/msg.log" 2>&1; then
            to_x=$((to_x + 1))
        else
            fails=$((fails + 1))
        fi
        rounds=$((rounds + 1))
        echo "$rounds" >"$TMP/msg.rounds"
        echo "$fails" >"$TMP/msg.fails"
        echo "$to_x $to_y" >"$TMP/msg.sent"
        sleep "$MSG_EVERY"
    done
}
loop relay relay_round &
LOOPS=($!)
loop chain chain_round &
LOOPS+=($!)
msg_loop &
LOOPS+=($!)
PIDS+=("${LOOPS[@]}")

# Sample until the end, or until a process dies.
mkdir -p "$(dirname "$SOAK_CSV")"
echo "seconds,process,rss_kib,fds" >"$SOAK_CSV"
START=$SECONDS
DEAD=()
while :; do
    t=$((SECONDS - START))
    for p in "${PROCS[@]}"; do
        if alive "$p"; then
            pid=$(pid_of "$p")
            echo "$t,$p,$(rss_of "$pid"),$(fds_of "$pid")" >>"$SOAK_CSV"
        else
            DEAD+=("$p")
        fi
    done
    ((${#DEAD[@]} == 0)) || break
    ((SECONDS + INTERVAL <= END)) || break
    sleep "$INTERVAL"
done
touch "$TMP/stop" # ends the loops after their current round
for l in "${LOOPS[@]}"; do
    wait "$l" || true
done

status=0
fail() {
    echo "FAIL  $*" >&2
    status=1
}
for p in "${DEAD[@]}"; do
    fail "$p died; its stderr ends with:"
    tail -n 20 "$TMP/$p.err" >&2
done

# Trend per process. Warm-up: the first tenth of the run; its last sample is the baseline.
WARMUP=$((DURATION / 10 > INTERVAL ? DURATION / 10 : INTERVAL))
echo
echo "trend per process (RSS in KiB; the baseline is the last sample of the ${WARMUP}s warm-up)"
printf '%-9s %9s %9s %9s %9s %12s   %5s %5s %5s %9s\n' process "rss first" last max baseline "slope/h" "fds" last max "slope/h"
awk -F, -v warm="$WARMUP" -v limit="$RSS_LIMIT_KIB" '
    NR == 1 { next }
    {
        p = $2; t = $1; r = $3; f = $4
        if (!(p in n)) { order[++np] = p; first[p] = r; ffirst[p] = f; max[p] = r; fmax[p] = f }
        n[p]++; last[p] = r; flast[p] = f
        if (r > max[p]) max[p] = r
        if (f > fmax[p]) fmax[p] = f
        if (t <= warm) base[p] = r
        st[p] += t; sr[p] += r; stt[p] += t * t; str[p] += t * r; sf[p] += f; stf[p] += t * f
    }
    # Least-squares slope of y over t, per hour.
    function slope(sy, sty, p,   d) {
        d = n[p] * stt[p] - st[p] * st[p]
        return d == 0 ? 0 : (n[p] * sty - st[p] * sy) / d * 3600
    }
    END {
        for (i = 1; i <= np; i++) {
            p = order[i]
            if (!(p in base)) base[p] = first[p]
            printf "%-9s %9d %9d %9d %9d %+12.0f   %5d %5d %5d %+9.1f\n", p, first[p], last[p],
                max[p], base[p], slope(sr[p], str[p], p), ffirst[p], flast[p], fmax[p],
                slope(sf[p], stf[p], p)
            if (last[p] - base[p] > limit)
                printf "RSS %s %d %d\n", p, base[p], last[p] > "/dev/stderr"
        }
    }' "$SOAK_CSV" 2>"$TMP/rss.fail"
while read -r _ p base last; do
    fail "$p grew from $base KiB (after warm-up) to $last KiB: more than $RSS_LIMIT_KIB KiB"
done <"$TMP/rss.fail"

# Descriptors once the traffic has stopped: wait (bounded, see the header) for connections to
# close.
echo
REST_BY=$((SECONDS + REST_SECS))
for p in "${PROCS[@]}"; do
    alive "$p" || continue
    pid=$(pid_of "$p")
    while ((SECONDS < REST_BY)); do
        (($(fds_of "$pid") <= FD_START[$p] + FD_SLACK)) && break
        sleep 0.1
    done
    now=$(fds_of "$pid")
    echo "descriptors at rest: $p ${FD_START[$p]} before the traffic, $now after"
    ((now <= FD_START[$p] + FD_SLACK)) || fail "$p holds $now descriptors at rest, ${FD_START[$p]} before the traffic"
done

# Traffic: rounds, failures, and every message delivered (listeners print one line each).
echo
for l in relay chain msg; do
    rounds=$(cat "$TMP/$l.rounds" 2>/dev/null || echo 0)
    fails=$(cat "$TMP/$l.fails" 2>/dev/null || echo 0)
    echo "traffic: $l $rounds rounds, $fails failed"
    ((rounds > 0)) || fail "no $l round completed"
    if ((fails > 0)); then
        fail "$l rounds failed; the last lines of their output:"
        tail -n 10 "$TMP/$l.log" >&2
    fi
done
read -r to_x to_y <"$TMP/msg.sent" || { to_x=0 to_y=0; }
for ((i = 0; i < 100; i++)); do
    got_x=$(wc -l <"$TMP/inbox_x.out")
    got_y=$(wc -l <"$TMP/inbox_y.out")
    ((got_x >= to_x && got_y >= to_y)) && break
    sleep 0.1
done
echo "messages: x got $got_x of $to_x (sent through the proxy, listening on TCP), y got $got_y of $to_y (sent over TCP, listening through the proxy)"
((got_x == to_x && got_y == to_y)) || fail "messages lost or duplicated"
chains=$(grep -c "building chain" "$TMP/hub.err" || true)
conns=$(awk -F'"connections":' 'NF > 1 { split($2, a, ","); s += a[1] } END { print s + 0 }' "$TMP/relay.log")
echo "relay: $conns connrate connections; hub: $chains chains built"
echo "samples: $SOAK_CSV"
if ((status != 0)); then
    # Keep every output for a look (the temporary dir goes on exit).
    rm -rf "$SOAK_LOGS"
    mkdir -p "$SOAK_LOGS"
    cp "$TMP"/*.out "$TMP"/*.err "$TMP"/*.log "$SOAK_LOGS"/ 2>/dev/null || true
    echo "outputs kept in $SOAK_LOGS"
fi
if ((status == 0)); then
    echo "soak passed: ${DURATION}s, no process died, no failed round, no leak above the thresholds"
fi
exit "$status"
