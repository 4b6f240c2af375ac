#!/usr/bin/env bash
# bench/parts.sh: tube's other parts, next to the relay suite (docs/performance.md, section
# "Chain, mailbox and long-poll"). One run, ROUNDS rounds; each round runs, in this order:
#   1. chain: bulk throughput (1 stream) and 64-byte round trips directly over loopback,
#      through tube's relay (relay + expose) and through a chain of three nodes (`tube hub
#      --intermediates 1`, requester a, intermediate b, endpoint c or d: `tube chain listen`
#      on a, `tube chain accept` on the endpoint), one after the other (A B C A B C), so the
#      ratios chain/direct and chain/relay are measured side by side; and SETUPS new
#      connections one at a time (connect to first echoed byte: through the chain, that is
#      building the chain);
#   2. mailbox: `tube-loadgen mailbox` against `tube peer` (TCP): RECIPIENTS online recipients,
#      SENDERS senders, MESSAGES messages of MSG_SIZE bytes as fast as the senders can
#      (capacity: messages/s, and push latency at saturation), then MAILBOX_PACED messages
#      offered at MAILBOX_RATE per second (push latency below saturation);
#   3. long-poll: `tube-loadgen longpoll` through `tube longpoll` in front of
#      `tube-loadgen longpoll-echo`: CLIENTS polling clients, PACKETS packets of PACKET_SIZE
#      bytes as fast as the clients can (capacity: packets/s, and send-to-echo latency at
#      saturation), then LONGPOLL_PACED packets offered at LONGPOLL_RATE per second.
# Every run prints one JSON line, tagged with `system` and `round`, appended to $OUT; at the
# end a summary of medians and ratios, and the memory of the peer and the proxy.
#
# Env knobs:
#   ROUNDS       rounds (default 5)
#   BYTES        bytes per throughput run (default 512 MiB)
#   COUNT        timed round trips per rtt run (default 10000)
#   SETUPS       new connections per connection-setup run (default 20)
#   RECIPIENTS   mailbox recipients (default 1000), SENDERS (32), MESSAGES (20000), MSG_SIZE (256)
#   MAILBOX_RATE offered messages/s of the paced mailbox run (default 2000), MAILBOX_PACED
#                its messages (default 6000; 0 skips the paced run)
#   CLIENTS      long-poll clients (default 1000), PACKETS (20000), PACKET_SIZE (256)
#   LONGPOLL_RATE offered packets/s of the paced long-poll run (default 500), LONGPOLL_PACED
#                its packets (default 1500; 0 skips the paced run)
#   PARTS        which parts to run (default "chain mailbox longpoll")
#   BIN          directory with release tube and tube-loadgen (default: target/release after
#                building)
#   OUT          results file (default bench/out/parts-<date>.jsonl)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

ROUNDS=${ROUNDS:-5}
BYTES=${BYTES:-536870912}
COUNT=${COUNT:-10000}
SETUPS=${SETUPS:-20}
RECIPIENTS=${RECIPIENTS:-1000}
SENDERS=${SENDERS:-32}
MESSAGES=${MESSAGES:-20000}
MSG_SIZE=${MSG_SIZE:-256}
MAILBOX_RATE=${MAILBOX_RATE:-2000}
MAILBOX_PACED=${MAILBOX_PACED:-6000}
CLIENTS=${CLIENTS:-1000}
PACKETS=${PACKETS:-20000}
PACKET_SIZE=${PACKET_SIZE:-256}
LONGPOLL_RATE=${LONGPOLL_RATE:-500}
LONGPOLL_PACED=${LONGPOLL_PACED:-1500}
PARTS=${PARTS:-"chain mailbox longpoll"}
RTT_SIZE=64
mkdir -p bench/out
OUT=${OUT:-bench/out/parts-$(date +%Y%m%d-%H%M%S).jsonl}
WAIT_SECS=30
# Rate limits of the peer, raised so that they are not what is measured.
UNLIMITED=4000000000

# 1,000 recipients or clients hold a connection each, in the load tool and in the server (the
# proxy holds one more per client towards its backend).
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" || true

have_part() { [[ " $PARTS " == *" $1 "* ]]; }

# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
release_bin
TUBE=$BIN/tube
LOADGEN=$BIN/tube-loadgen

{
    echo "date:    $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    echo "load:    $(cut -d' ' -f1-3 /proc/loadavg) (1, 5, 15 min) before the run"
} >&2

if have_part chain; then
    start sink "$LOADGEN" sink --listen 127.0.0.1:0
    start echo "$LOADGEN" echo --listen 127.0.0.1:0
    wait_lines sink 1
    wait_lines echo 1
    SINK=$(field sink 1 3)
    ECHO=$(field echo 1 3)
    start_tube "$SINK $ECHO"
    declare -A SINK_OF ECHO_OF
    SINK_OF[direct]=$SINK
    ECHO_OF[direct]=$ECHO
    SINK_OF[relay]=$(field agent 1 2)
    ECHO_OF[relay]=$(field agent 2 2)

    # The hub builds chains with one intermediate. Four nodes: a requests, c (in front of the
    # sink) and d (in front of the echo server) are endpoints that refuse to relay, so every
    # chain is a -> b -> c or a -> b -> d: three nodes.
    NO_RELAY="c d" start_chain_nodes a b c d
    start accept_c "$TUBE" chain --api "$(field node_c 1 3)" accept --forward "$SINK" --allow a
    start accept_d "$TUBE" chain --api "$(field node_d 1 3)" accept --forward "$ECHO" --allow a
    wait_err accept_c "accepting chains"
    wait_err accept_d "accepting chains"
    API_A=$(field node_a 1 3)
    start listen_c "$TUBE" chain --api "$API_A" listen c --local 127.0.0.1:0
    start listen_d "$TUBE" chain --api "$API_A" listen d --local 127.0.0.1:0
    wait_lines listen_c 1
    wait_lines listen_d 1
    SINK_OF[chain]=$(field listen_c 1 3)
    ECHO_OF[chain]=$(field listen_d 1 3)
    for s in direct relay chain; do
        echo "$s: sink ${SINK_OF[$s]}, echo ${ECHO_OF[$s]}" >&2
    done
fi

if have_part mailbox; then
    start peer "$TUBE" peer --listen 127.0.0.1:0 \
        --registrations-per-minute "$UNLIMITED" --deliveries-per-minute "$UNLIMITED"
    wait_lines peer 1
    PEER=$(field peer 1 3)
    echo "mailbox: peer $PEER" >&2
fi

if have_part longpoll; then
    start lpecho "$LOADGEN" longpoll-echo --listen 127.0.0.1:0
    wait_lines lpecho 1
    start longpoll "$TUBE" longpoll --listen 127.0.0.1:0 --backend "http://$(field lpecho 1 3)"
    wait_lines longpoll 1
    PROXY=http://$(field longpoll 1 3)
    echo "longpoll: proxy $PROXY, echo backend $(field lpecho 1 3)" >&2
fi

echo "rounds $ROUNDS, parts: $PARTS; bytes $BYTES, count $COUNT;" \
    "mailbox $RECIPIENTS recipients, $SENDERS senders, $MESSAGES x $MSG_SIZE B, paced" \
    "$MAILBOX_PACED at $MAILBOX_RATE/s; longpoll $CLIENTS clients, $PACKETS x $PACKET_SIZE B," \
    "paced $LONGPOLL_PACED at $LONGPOLL_RATE/s; results in $OUT" >&2

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
    if have_part chain; then
        for s in direct relay chain; do
            record "$s" "$round" "$LOADGEN" throughput --addr "${SINK_OF[$s]}" --bytes "$BYTES"
        done
        for s in direct relay chain; do
            record "$s" "$round" "$LOADGEN" rtt --addr "${ECHO_OF[$s]}" --count "$COUNT" --size "$RTT_SIZE"
        done
        for s in direct relay chain; do
            record "$s" "$round" "$LOADGEN" connrate --addr "${ECHO_OF[$s]}" --connections "$SETUPS" \
                --concurrency 1 --size "$RTT_SIZE"
        done
    fi
    if have_part mailbox; then
        record peer "$round" "$LOADGEN" mailbox --peer "$PEER" --recipients "$RECIPIENTS" \
            --senders "$SENDERS" --messages "$MESSAGES" --size "$MSG_SIZE" --seed "$round"
        if ((MAILBOX_PACED > 0)); then
            record peer "$round" "$LOADGEN" mailbox --peer "$PEER" --recipients "$RECIPIENTS" \
                --senders "$SENDERS" --messages "$MAILBOX_PACED" --size "$MSG_SIZE" \
                --seed "$round" --rate "$MAILBOX_RATE"
        fi
    fi
    if have_part longpoll; then
        record longpoll "$round" "$LOADGEN" longpoll --url "$PROXY" --clients "$CLIENTS" \
            --packets "$PACKETS" --size "$PACKET_SIZE"
        if ((LONGPOLL_PACED > 0)); then
            record longpoll "$round" "$LOADGEN" longpoll --url "$PROXY" --clients "$CLIENTS" \
                --packets "$LONGPOLL_PACED" --size "$PACKET_SIZE" --rate "$LONGPOLL_RATE"
        fi
    fi
done

if have_part chain; then
    # Every chain had two hops (a -> b -> endpoint), and none was built shorter than asked.
    built=$(grep -c "building chain" "$TMP/hub.err" || true)
    two=$(grep "building chain" "$TMP/hub.err" | grep -c "hops=2" || true)
    if [[ $built == 0 || $built != "$two" ]] || grep -q "intermediate(s) available" "$TMP"/listen_*.err; then
        echo "error: not every chain went through three nodes ($built built, $two of two hops)" >&2
        exit 1
    fi
    echo "chains: $built built, each a -> b -> endpoint (hops=2)" >&2
fi

python3 - "$OUT" <<'PY'
import json, statistics, sys
from collections import defaultdict

runs = defaultdict(list)
for line in open(sys.argv[1]):
    r = json.loads(line)
    t, s = r["test"], r["system"]
    if t == "throughput":
        runs[("throughput 1 stream", "Gbit/s", s)].append(r["gbit_s"])
    elif t == "rtt":
        for key in ("p50_us", "p99_us", "mean_us"):
            runs[(f"rtt {r['size']} B {key[:-3]}", "us", s)].append(r[key])
    elif t == "connrate":
        runs[("new connection, connect to first echoed byte, p50", "ms", s)].append(r["p50_us"] / 1000)
    elif t == "mailbox":
        how = f"offered {r['rate']}/s" if r["rate"] else "saturated"
        runs[(f"mailbox, {r['recipients']} online recipients, {r['senders']} senders, {how}: messages/s", "msg/s", s)].append(r["msgs_per_sec"])
        for key in ("p50_us", "p99_us"):
            runs[(f"mailbox send-to-push latency {key[:3]}, {how}", "ms", s)].append(r[key] / 1000)
        if not r["rate"]:
            runs[(f"mailbox registering {r['recipients']} recipients", "s", s)].append(r["register_secs"])
    elif t == "longpoll":
        how = f"offered {r['rate']}/s" if r["rate"] else "saturated"
        runs[(f"longpoll, {r['clients']} polling clients, {how}: packets/s", "pkt/s", s)].append(r["packets_per_sec"])
        for key in ("p50_us", "p99_us"):
            runs[(f"longpoll send-to-echo latency {key[:3]}, {how}", "ms", s)].append(r[key] / 1000)
        if not r["rate"]:
            runs[(f"longpoll logging in {r['clients']} clients", "s", s)].append(r["login_secs"])

def table(rows):
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        print("| " + " | ".join(c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")

med = lambda k: statistics.median(runs[k])
tests = list(dict.fromkeys((name, unit) for name, unit, _ in runs))
chain = [(n, u) for n, u in tests if (n, u, "chain") in runs]
if chain:
    print("\nchain, medians over rounds (ratios of latency: lower is better)\n")
    rows = [("test", "unit", "direct", "relay", "chain", "chain/direct", "chain/relay", "relay/direct")]
    for n, u in chain:
        d, r, c = med((n, u, "direct")), med((n, u, "relay")), med((n, u, "chain"))
        rows.append((n, u, f"{d:.2f}", f"{r:.2f}", f"{c:.2f}", f"{c / d:.3f}", f"{c / r:.3f}", f"{r / d:.3f}"))
    table(rows)
    k = ("rtt 64 B p50", "us")
    print(f"\nadded latency per 64 B round trip (p50): chain {med(k + ('chain',)) - med(k + ('direct',)):.1f} us, "
          f"relay {med(k + ('relay',)) - med(k + ('direct',)):.1f} us over direct loopback")
    ratio = med(("throughput 1 stream", "Gbit/s", "chain")) / med(("throughput 1 stream", "Gbit/s", "relay"))
    print(f"target: chain throughput >= 0.8 x relay throughput: {ratio:.3f} ({'met' if ratio >= 0.8 else 'NOT met'})")
others = [(n, u, s) for n, u, s in runs if s in ("peer", "longpoll")]
if others:
    print("\nmailbox and long-poll, medians over rounds (min - max)\n")
    rows = [("test", "unit", "median", "min", "max", "rounds")]
    for n, u, s in others:
        v = runs[(n, u, s)]
        rows.append((n, u, f"{statistics.median(v):.2f}", f"{min(v):.2f}", f"{max(v):.2f}", str(len(v))))
    table(rows)
PY

rss() {
    awk -v name="$1" '/^VmRSS|^VmHWM/ { printf "%s %s %s %s  ", name, $1, $2, $3 } END { print "" }' \
        "/proc/$2/status"
}
echo
echo "memory after the run (VmHWM: peak):"
if have_part chain; then
    for name in relay agent node_a node_b node_c node_d; do
        pidvar="PID_$name"
        rss "$name" "${!pidvar}"
    done
fi
have_part mailbox && rss peer "$PID_peer"
have_part longpoll && rss longpoll "$PID_longpoll"
echo "results: $OUT"
