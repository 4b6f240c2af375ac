#!/usr/bin/env bash
# bench/rttpath.sh: where a 64-byte round trip's time goes, hop by hop. Traces the system calls
# of every process (`perf record -a` on the sendto, recvfrom and epoll_wait tracepoints, in
# nanoseconds) during COUNT round trips through relay and agent (or rathole's server and
# client) to an echo server, and prints one JSON line of medians in microseconds:
#   <proc>_wake_to_recv, <proc>_recv, <proc>_recv_to_send: a wake-up's path, from epoll_wait's
#     return to the forwarding sendto (the user-space work between the two calls is
#     recv_to_send: opening or sealing a record, the mux, tokio); the same again for each
#     direction apart, as <proc>_from_<sender>_... (the relay woken by the load tool seals a
#     record, woken by the agent opens one);
#   <proc>_after_send: from sendto's return to the next epoll_wait, when the process was not
#     preempted on the way (under 5 us); <proc>_preempted: the share of wake-ups in which it was
#     (the woken peer ran on its CPU first);
#   hop_<from>_<to>: from a sendto's return to the receiver's wake-up (epoll_wait's return, or
#     recvfrom's for the load tool and the echo server): the scheduler's part.
# Each time is a median over the round trips (a mean would follow the rare slow ones).
# Tracing adds about a microsecond per system call to every system alike; compare systems in
# one run. Needs perf with tracepoint access (Debian package `linux-perf`, run as root or with
# kernel.perf_event_paranoid <= -1).
#
# Env knobs: SYSTEM (tube, the default, or rathole from $TOOLS/bin/rathole as bench/compare.sh
# installs it), COUNT (round trips traced, default 5000, after 2000 not traced), BIN (directory
# with release tube and tube-loadgen; default target/release after building).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
SYSTEM=${SYSTEM:-tube}
TOOLS=${TOOLS:-$ROOT/bench/.tools}
COUNT=${COUNT:-5000}
WAIT_SECS=20
command -v perf >/dev/null || { echo "error: perf not found (apt-get install linux-perf)" >&2; exit 1; }

# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
release_bin
check_system

start_system echo

"$BIN/tube-loadgen" rtt --addr "$PUBLIC" --count 2000 --size 64 >/dev/null
EVENTS=()
for call in sendto recvfrom epoll_wait; do
    EVENTS+=(-e "syscalls:sys_enter_$call" -e "syscalls:sys_exit_$call")
done
perf record -q -a -o "$TMP/perf.data" "${EVENTS[@]}" -- \
    "$BIN/tube-loadgen" rtt --addr "$PUBLIC" --count "$COUNT" --size 64 >"$TMP/rtt.json" 2>/dev/null
perf script --ns -i "$TMP/perf.data" -F pid,tid,time,event >"$TMP/trace.txt" 2>/dev/null

python3 - "$SYSTEM" "$TMP/trace.txt" "$TMP/rtt.json" "$PID_sink" "${PROCS[@]}" <<'PY'
import collections, json, statistics, sys

system, trace, rtt, sink, a, b = sys.argv[1:7]
names = {int(a): "relay", int(b): "agent"} if system == "tube" else {int(a): "server", int(b): "client"}
names[int(sink)] = "echo"
forwarders = [n for n in names.values() if n != "echo"]
events = []
for line in open(trace):
    parts = line.split()
    if len(parts) < 3:
        continue
    pid, tid = (int(x) for x in parts[0].split("/"))
    if pid == 0:
        continue
    events.append((float(parts[1].rstrip(":")), pid, tid, parts[2].split(":")[1]))
events.sort()
loadgen = collections.Counter(p for _, p, _, e in events if p not in names and e == "sys_enter_sendto")
lg = loadgen.most_common(1)[0][0]
names[lg] = "loadgen"

seg = collections.defaultdict(list)
state = {}
last_send = None  # (time of sendto's return, sender)
for t, pid, tid, e in events:
    who = names.get(pid)
    if who is None:
        continue
    s = state.setdefault(tid, {})
    if e == "sys_exit_sendto":
        if who in forwarders and "wake" in s and "sent" not in s:
            s["sent"] = t
        last_send = (t, who)
        continue
    waking = (e == "sys_exit_epoll_wait") if who in forwarders else (e == "sys_exit_recvfrom")
    sender = None
    if waking and last_send and last_send[1] != who:
        sender = last_send[1]
        seg[f"hop_{sender}_{who}"].append(t - last_send[0])
        last_send = None
    if who not in forwarders:
        continue
    if e == "sys_exit_epoll_wait":
        state[tid] = {"wake": t, "from": sender}
    elif e == "sys_enter_recvfrom" and "wake" in s and "r0" not in s:
        s["r0"] = t
    elif e == "sys_exit_recvfrom" and "r0" in s and "r1" not in s:
        s["r1"] = t
    elif e == "sys_enter_sendto" and "r1" in s and "s0" not in s:
        s["s0"] = t
        for key in [who] + ([f"{who}_from_{s['from']}"] if s["from"] else []):
            seg[f"{key}_wake_to_recv"].append(s["r0"] - s["wake"])
            seg[f"{key}_recv"].append(s["r1"] - s["r0"])
            seg[f"{key}_recv_to_send"].append(t - s["r1"])
    elif e == "sys_enter_epoll_wait" and "sent" in s:
        after = t - s["sent"]
        seg[f"{who}_preempted"].append(1.0 if after >= 5e-6 else 0.0)
        if after < 5e-6:
            seg[f"{who}_after_send"].append(after)
        state[tid] = {}

out = {"system": system, "round_trips": int(json.load(open(rtt))["count"])}
out["rtt_p50_us"] = round(json.load(open(rtt))["p50_us"], 2)
for key in sorted(seg):
    values = seg[key]
    if len(values) < out["round_trips"] // 2:
        continue  # stray pairs (a heartbeat, the tool's own calls)
    if key.endswith("preempted"):
        out[key] = round(statistics.mean(values), 3)
    else:
        out[key] = round(statistics.median(values) * 1e6, 3)
print(json.dumps(out))
PY
