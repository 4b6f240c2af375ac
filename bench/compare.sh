#!/usr/bin/env bash
# bench/compare.sh: the relay benchmark suite (docs/performance.md). Direct loopback, tube
# (relay + agent, TLS 1.3), rathole and bore (both plain TCP; rathole over its TLS transport
# too when SYSTEMS names rathole_tls), side by side in one run: each
# round runs every test on every system one after the other (A B C D, and D C B A in the next
# round: the first system of a round tends to measure slower), so all see the same machine
# state; the summary takes medians over the rounds.
#
# Figures: bulk throughput with 1 and 8 streams (tube-loadgen, and iperf3 when installed),
# 64-byte round trip p50/p99 over one connection (and again with everything on one CPU), new
# connections per second at concurrency 50 with p50/p99 connect-to-first-byte, CPU seconds of
# server + client per GiB carried, and the resident memory of server + client idle and holding
# 1,000 and 10,000 idle user connections.
#
# rathole and bore are installed with `cargo install --root $TOOLS` (their code never enters
# this repository); a system whose install fails is left out with a note.
#
# Env knobs:
#   ROUNDS    rounds (default 5)
#   BYTES     bytes per throughput run (default 1 GiB)
#   COUNT     timed round trips per rtt run (default 20000)
#   CONNS     connections per connrate run (default 2000), CONC their concurrency (default 50)
#   IDLE      idle connection counts for the memory test (default "1000 10000")
#   SYSTEMS   systems to run (default "direct tube rathole bore"; add rathole_tls for rathole
#             over its TLS transport, with a self-signed certificate made by openssl)
#   TOOLS     where rathole and bore get installed (default bench/.tools)
#   OUT       results file (default bench/out/compare-<date>.jsonl)
#   BIN       the directory with tube and tube-loadgen (default: target/release, built first)
#   BIN2      a second tube build's directory (tube and tube-loadgen), run as system "tube2"
#             (added to SYSTEMS): two builds side by side, with tube/tube2 among the ratios
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

ROUNDS=${ROUNDS:-5}
BYTES=${BYTES:-1073741824}
COUNT=${COUNT:-20000}
CONNS=${CONNS:-2000}
CONC=${CONC:-50}
IDLE=${IDLE:-"1000 10000"}
SYSTEMS=${SYSTEMS:-"direct tube rathole bore"}
[[ -n ${BIN2:-} && " $SYSTEMS " != *" tube2 "* ]] && SYSTEMS="$SYSTEMS tube2"
TOOLS=${TOOLS:-$ROOT/bench/.tools}
mkdir -p bench/out
OUT=${OUT:-bench/out/compare-$(date +%Y%m%d-%H%M%S).jsonl}
WAIT_SECS=30
RTT_SIZE=64

ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" || true

if [[ -z ${BIN:-} ]]; then
    echo "building (release)..." >&2
    cargo build --release -p tube-cli -p tube-loadgen >&2
    BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
fi
TUBE=$BIN/tube
LOADGEN=$BIN/tube-loadgen

have_system() { [[ " $SYSTEMS " == *" $1 "* ]]; }
drop_system() {
    echo "note: $1 left out: $2" >&2
    SYSTEMS=$(echo " $SYSTEMS " | sed "s/ $1 / /; s/^ *//; s/ *$//")
}

# The competitors, built from crates.io into $TOOLS (a few minutes the first time).
if { have_system rathole || have_system rathole_tls; } && [[ ! -x $TOOLS/bin/rathole ]]; then
    echo "installing rathole into $TOOLS..." >&2
    # rathole's lock file pins a `time` that no longer builds on current Rust: resolve afresh.
    if ! cargo install --root "$TOOLS" rathole >&2; then
        drop_system rathole "cargo install failed"
        drop_system rathole_tls "cargo install failed"
    fi
fi
if have_system bore && [[ ! -x $TOOLS/bin/bore ]]; then
    echo "installing bore into $TOOLS..." >&2
    cargo install --root "$TOOLS" --locked bore-cli >&2 || drop_system bore "cargo install failed"
fi
IPERF=$(command -v iperf3 || true)
if [[ -z $IPERF && $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    (apt-get install -y -qq iperf3 >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq iperf3; }) >&2 || true
    IPERF=$(command -v iperf3 || true)
fi

# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

# wait_echo ADDR WHAT: waits (bounded) until an echo round trip through ADDR works.
wait_echo() {
    local i
    for ((i = 0; i < WAIT_SECS * 4; i++)); do
        if "$LOADGEN" --timeout 2 rtt --addr "$1" --count 1 --size 8 >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.25
    done
    echo "error: no echo through $2 ($1) within ${WAIT_SECS}s" >&2
    exit 1
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

start sink "$LOADGEN" sink --listen 127.0.0.1:0
start echo "$LOADGEN" echo --listen 127.0.0.1:0
wait_lines sink 1
wait_lines echo 1
SINK=$(field sink 1 3)
ECHO=$(field echo 1 3)
declare -A SINK_OF ECHO_OF PROCS_OF IPERF_OF
SINK_OF[direct]=$SINK
ECHO_OF[direct]=$ECHO
PROCS_OF[direct]=""
if [[ -n $IPERF ]]; then
    IPERF_PORT=$(free_port)
    start iperf "$IPERF" -s -B 127.0.0.1 -p "$IPERF_PORT"
    IPERF_OF[direct]=127.0.0.1:$IPERF_PORT
fi
# Every tunnel carries the sink, the echo server and (if present) the iperf3 server.
LOCALS=("$SINK" "$ECHO")
[[ -n $IPERF ]] && LOCALS+=("127.0.0.1:$IPERF_PORT")

if have_system tube; then
    start_tube "${LOCALS[*]}"
    SINK_OF[tube]=$(field agent 1 2)
    ECHO_OF[tube]=$(field agent 2 2)
    [[ -n $IPERF ]] && IPERF_OF[tube]=$(field agent 3 2)
    PROCS_OF[tube]="$PID_relay $PID_agent"
fi
if have_system tube2; then
    [[ -x ${BIN2:-}/tube ]] || { echo "error: tube2 needs BIN2, a directory with a tube build" >&2; exit 1; }
    BIN=$BIN2 TUBE_NAME=2 start_tube "${LOCALS[*]}"
    SINK_OF[tube2]=$(field agent2 1 2)
    ECHO_OF[tube2]=$(field agent2 2 2)
    [[ -n $IPERF ]] && IPERF_OF[tube2]=$(field agent2 3 2)
    PROCS_OF[tube2]="$PID_relay2 $PID_agent2"
fi

# rathole, and with rathole_tls in SYSTEMS rathole over its TLS transport too.
for rh in rathole rathole_tls; do
    have_system "$rh" || continue
    RH_CONTROL=$(free_port)
    RATHOLE_TLS_SERVER='' RATHOLE_TLS_CLIENT=''
    [[ $rh == rathole_tls ]] && rathole_tls "$rh"
    {
        echo "[server]"
        echo "bind_addr = \"127.0.0.1:$RH_CONTROL\""
        echo "$RATHOLE_TLS_SERVER"
    } >"$TMP/$rh-server.toml"
    {
        echo "[client]"
        echo "remote_addr = \"127.0.0.1:$RH_CONTROL\""
        echo "$RATHOLE_TLS_CLIENT"
    } >"$TMP/$rh-client.toml"
    names=(sink echo iperf)
    for i in "${!LOCALS[@]}"; do
        port=$(free_port)
        printf '[server.services.%s]\ntoken = "bench"\nbind_addr = "127.0.0.1:%s"\n' \
            "${names[$i]}" "$port" >>"$TMP/$rh-server.toml"
        printf '[client.services.%s]\ntoken = "bench"\nlocal_addr = "%s"\n' \
            "${names[$i]}" "${LOCALS[$i]}" >>"$TMP/$rh-client.toml"
        case ${names[$i]} in
            sink) SINK_OF[$rh]=127.0.0.1:$port ;;
            echo) ECHO_OF[$rh]=127.0.0.1:$port ;;
            iperf) IPERF_OF[$rh]=127.0.0.1:$port ;;
        esac
    done
    start "${rh}_server" "$TOOLS/bin/rathole" --server "$TMP/$rh-server.toml"
    start "${rh}_client" "$TOOLS/bin/rathole" --client "$TMP/$rh-client.toml"
    wait_echo "${ECHO_OF[$rh]}" "$rh"
    server_pid="PID_${rh}_server" client_pid="PID_${rh}_client"
    PROCS_OF[$rh]="${!server_pid} ${!client_pid}"
done

if have_system bore; then
    # bore's control port is fixed at 7835. The public ports come from free_port, that is
    # from the kernel's ephemeral range (up to 60999 by default): a narrower range made the
    # server refuse one now and then, and that client exit at once.
    start bore_server "$TOOLS/bin/bore" server --bind-addr 127.0.0.1 --min-port 1024 --max-port 65535
    wait_lines bore_server 1 # "server listening" (its log goes to stdout)
    procs="$PID_bore_server"
    names=(sink echo iperf)
    for i in "${!LOCALS[@]}"; do
        port=$(free_port)
        local_port=${LOCALS[$i]##*:}
        start "bore_${names[$i]}" "$TOOLS/bin/bore" local "$local_port" --local-host 127.0.0.1 \
            --to 127.0.0.1 --port "$port"
        pidvar="PID_bore_${names[$i]}"
        procs="$procs ${!pidvar}"
        case ${names[$i]} in
            sink) SINK_OF[bore]=127.0.0.1:$port ;;
            echo) ECHO_OF[bore]=127.0.0.1:$port ;;
            iperf) IPERF_OF[bore]=127.0.0.1:$port ;;
        esac
    done
    wait_echo "${ECHO_OF[bore]}" bore
    PROCS_OF[bore]=$procs
fi

# Every process started must still run: one that exited at start (a port refused, a bind
# that failed) would otherwise fail a later run of the first round with a murkier error.
for s in $SYSTEMS; do
    for pid in ${PROCS_OF[$s]:-}; do
        kill -0 "$pid" 2>/dev/null || { echo "error: $s: process $pid exited during setup" >&2; exit 1; }
    done
done

{
    echo "date:    $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    for s in $SYSTEMS; do
        echo "$s: sink ${SINK_OF[$s]}, echo ${ECHO_OF[$s]}, iperf3 ${IPERF_OF[$s]:-none}, processes ${PROCS_OF[$s]:-none}"
    done
    echo "rounds $ROUNDS, bytes $BYTES, count $COUNT, conns $CONNS at $CONC; results in $OUT"
} >&2

# cpu_ticks PIDS...: user + system clock ticks used so far by these processes.
cpu_ticks() {
    local total=0 pid t
    for pid in "$@"; do
        t=$(awk '{ print $14 + $15 }' "/proc/$pid/stat")
        total=$((total + t))
    done
    echo "$total"
}
# rss_kib PIDS...: resident memory of these processes together.
rss_kib() {
    local total=0 pid t
    for pid in "$@"; do
        t=$(awk '/^VmRSS/ { print $2 }' "/proc/$pid/status")
        total=$((total + t))
    done
    echo "$total"
}
TICKS=$(getconf CLK_TCK)

# record SYSTEM ROUND CMD...: runs one test, tags its JSON line with the system, the round and
# the CPU seconds its tunnel processes used meanwhile, and appends it to $OUT.
record() {
    local system=$1 round=$2 line before after
    shift 2
    # shellcheck disable=SC2086
    before=$(cpu_ticks ${PROCS_OF[$system]})
    if ! line=$("$@") || [[ $line != "{"* ]]; then
        echo "error: $system round $round failed: $*" >&2
        exit 1
    fi
    # shellcheck disable=SC2086
    after=$(cpu_ticks ${PROCS_OF[$system]})
    local cpu
    cpu=$(python3 -c "print(($after - $before) / $TICKS)")
    echo "{\"system\":\"$system\",\"round\":$round,\"cpu_s\":$cpu,${line#\{}" | tee -a "$OUT" >&2
}

# The round trip once more with the echo server, the system's processes and the load tool
# on one CPU (every thread), then back on all: no wake-up then crosses CPUs, which on a
# virtual machine costs most of a loopback round trip and moves it by more than the systems
# differ (docs/performance.md), so this figure is the systems' own work per round trip. Needs
# taskset (util-linux) and more than one CPU.
ALL_CPUS=$(taskset -p -c $$ 2>/dev/null | sed 's/.*: //' || true)
ONE_CPU=''
[[ -n $ALL_CPUS && $(nproc) -gt 1 ]] && ONE_CPU=${ALL_CPUS%%[,-]*}
# pin CPUS PIDS...: every thread of these processes on CPUS.
pin() {
    local cpus=$1 pid
    shift
    for pid in "$@"; do
        taskset -a -p -c "$cpus" "$pid" >/dev/null
    done
}
# rtt_one_cpu ADDR: the round trip with the load tool on $ONE_CPU, as test "rtt_one_cpu" (set
# in the parsed line: a line left as "rtt" would count toward the round trip across CPUs).
rtt_one_cpu() {
    taskset -c "$ONE_CPU" "$LOADGEN" rtt --addr "$1" --count "$COUNT" --size "$RTT_SIZE" |
        python3 -c 'import json,sys; r=json.load(sys.stdin); r["test"]="rtt_one_cpu"; print(json.dumps(r, separators=(",",":")))'
}

# iperf_json ADDR STREAMS: one iperf3 run of BYTES, as a one-line JSON result.
iperf_json() {
    "$IPERF" -c "${1%:*}" -p "${1##*:}" -n "$BYTES" -P "$2" -J |
        python3 -c 'import json,sys; r=json.load(sys.stdin); e=r["end"]; print(json.dumps({"test":"iperf3","streams":int(sys.argv[1]),"gbit_s":e["sum_received"]["bits_per_second"]/1e9,"bytes":e["sum_received"]["bytes"]}, separators=(",",":")))' "$2"
}

: >"$OUT"
for ((round = 1; round <= ROUNDS; round++)); do
    echo "round $round/$ROUNDS" >&2
    ORDER=$SYSTEMS
    ((round % 2)) || ORDER=$(echo "$SYSTEMS" | tr ' ' '\n' | tac | tr '\n' ' ')
    for streams in 1 8; do
        for s in $ORDER; do
            record "$s" "$round" "$LOADGEN" throughput --addr "${SINK_OF[$s]}" --bytes "$BYTES" --streams "$streams"
        done
        if [[ -n $IPERF ]]; then
            for s in $ORDER; do
                record "$s" "$round" iperf_json "${IPERF_OF[$s]}" "$streams"
            done
        fi
    done
    for s in $ORDER; do
        record "$s" "$round" "$LOADGEN" rtt --addr "${ECHO_OF[$s]}" --count "$COUNT" --size "$RTT_SIZE"
    done
    if [[ -n $ONE_CPU ]]; then
        for s in $ORDER; do
            # shellcheck disable=SC2086
            pin "$ONE_CPU" "$PID_echo" ${PROCS_OF[$s]}
            record "$s" "$round" rtt_one_cpu "${ECHO_OF[$s]}"
            # shellcheck disable=SC2086
            pin "$ALL_CPUS" "$PID_echo" ${PROCS_OF[$s]}
        done
    fi
    if "$LOADGEN" connrate --help >/dev/null 2>&1; then
        for s in $ORDER; do
            record "$s" "$round" "$LOADGEN" connrate --addr "${ECHO_OF[$s]}" --connections "$CONNS" \
                --concurrency "$CONC" --size "$RTT_SIZE"
        done
    fi
done

# Idle connections: resident memory of each system's processes before and while holding N.
if "$LOADGEN" idle --help >/dev/null 2>&1; then
    for n in $IDLE; do
        for s in $SYSTEMS; do
            [[ $s == direct ]] && continue
            # shellcheck disable=SC2086
            before=$(rss_kib ${PROCS_OF[$s]})
            mkfifo "$TMP/idle.in"
            "$LOADGEN" idle --addr "${ECHO_OF[$s]}" --connections "$n" <"$TMP/idle.in" >"$TMP/idle.out" 2>"$TMP/idle.err" &
            idle_pid=$!
            exec {hold}>"$TMP/idle.in"
            for ((i = 0; i < WAIT_SECS * 10; i++)); do
                [[ -s $TMP/idle.out ]] && break
                kill -0 "$idle_pid" 2>/dev/null || break
                sleep 0.1
            done
            if [[ ! -s $TMP/idle.out ]]; then
                # A system that cannot hold N connections is a result, not a broken run.
                reason=$(tail -1 "$TMP/idle.err" | tr -d '"\\')
                echo "note: $s could not hold $n idle connections: $reason" >&2
                exec {hold}>&-
                wait "$idle_pid" || true
                rm -f "$TMP/idle.in" "$TMP/idle.out"
                echo "{\"system\":\"$s\",\"round\":0,\"test\":\"idle\",\"connections\":$n,\"error\":\"$reason\"}" >>"$OUT"
                continue
            fi
            # shellcheck disable=SC2086
            during=$(rss_kib ${PROCS_OF[$s]})
            exec {hold}>&-
            wait "$idle_pid" || true
            rm -f "$TMP/idle.in" "$TMP/idle.out"
            echo "{\"system\":\"$s\",\"round\":0,\"test\":\"idle\",\"connections\":$n,\"rss_before_kib\":$before,\"rss_during_kib\":$during}" | tee -a "$OUT" >&2
        done
    done
fi

python3 bench/summary.py "$OUT"
echo "results: $OUT"
