# bench/lib.sh: what the bench scripts share. Sourced after WAIT_SECS is set; makes $TMP
# (removed on exit), kills every process started with `start` on exit, and gives:
#   start NAME CMD...    run CMD in the background, stdout to $TMP/NAME.out, stderr to .err
#   wait_lines NAME N    wait (bounded by WAIT_SECS) for N stdout lines; die if NAME exited
#   wait_err NAME TEXT   wait (bounded by WAIT_SECS) for a stderr line of NAME containing TEXT
#   field NAME LINE WORD word WORD of line LINE of NAME's stdout
#   release_bin          BIN: the release tube and tube-loadgen (built unless BIN is set)
#   check_system         SYSTEM is tube or rathole (then $TOOLS/bin/rathole must exist)
#   start_tube "LOCAL..." [WRAP...]     tube's relay and an agent exposing the LOCAL services
#                                        (TUBE_NAME=x: a further instance, relayx/agentx)
#   start_chain_nodes NAME...           a hub (one intermediate per chain) and its nodes
#   start_rathole SINK PROBE [WRAP...]  rathole's server and client for one service to SINK
#                                        (RATHOLE_TLS=1: over its TLS transport;
#                                        RATHOLE_NAME=x: a further instance, serverx/clientx)
#   rathole_tls NAME                    a certificate and the configuration for rathole's TLS
#   start_system KIND [WRAP...]  a tube-loadgen KIND (echo or sink) and $SYSTEM in front of it
TMP=$(mktemp -d "${TMPDIR:-/tmp}/tube-bench.XXXXXX")
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start NAME CMD...: runs CMD in the background, stdout to $TMP/NAME.out, stderr to .err.
# Both files exist when it returns (made here, not by the job), so wait_lines can read them
# at once.
start() {
    local name=$1
    shift
    : >"$TMP/$name.out"
    : >"$TMP/$name.err"
    "$@" >>"$TMP/$name.out" 2>>"$TMP/$name.err" &
    PIDS+=("$!")
    eval "PID_$name=$!"
}

# wait_lines NAME N: waits (bounded) until NAME has printed N stdout lines; dies if it exited.
wait_lines() {
    local name=$1 n=$2 pidvar="PID_$1" i
    for ((i = 0; i < WAIT_SECS * 10; i++)); do
        if [[ $(wc -l <"$TMP/$name.out") -ge $n ]]; then
            return 0
        fi
        if ! kill -0 "${!pidvar}" 2>/dev/null; then
            echo "error: $name exited before printing $n lines; its stderr:" >&2
            cat "$TMP/$name.err" >&2
            exit 1
        fi
        sleep 0.1
    done
    echo "error: $name printed no $n lines within ${WAIT_SECS}s; its stderr:" >&2
    cat "$TMP/$name.err" >&2
    exit 1
}

# wait_err NAME TEXT: waits (bounded by WAIT_SECS) for a stderr line of NAME containing TEXT;
# dies if NAME exited first.
wait_err() {
    local name=$1 text=$2 pidvar="PID_$1" i
    for ((i = 0; i < WAIT_SECS * 10; i++)); do
        grep -qF -- "$text" "$TMP/$name.err" && return 0
        if ! kill -0 "${!pidvar}" 2>/dev/null; then
            echo "error: $name exited before logging \"$text\"; its stderr:" >&2
            cat "$TMP/$name.err" >&2
            exit 1
        fi
        sleep 0.1
    done
    echo "error: $name logged no \"$text\" within ${WAIT_SECS}s; its stderr:" >&2
    cat "$TMP/$name.err" >&2
    exit 1
}

# field NAME LINE WORD: word WORD of line LINE of NAME's stdout.
field() {
    sed -n "$2p" "$TMP/$1.out" | awk -v w="$3" '{ print $w }'
}


# release_bin: sets BIN to the directory of release `tube` and `tube-loadgen`: the one BIN
# already names, or target/release (CARGO_TARGET_DIR's) after building them.
release_bin() {
    if [[ -z ${BIN:-} ]]; then
        echo "building (release)..." >&2
        cargo build --release -p tube-cli -p tube-loadgen >&2
        BIN=${CARGO_TARGET_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/target}/release
    fi
}

# check_system: dies unless SYSTEM is tube or rathole, and for rathole unless
# $TOOLS/bin/rathole exists (bench/compare.sh installs it).
check_system() {
    case $SYSTEM in
    tube) ;;
    rathole)
        [[ -x $TOOLS/bin/rathole ]] || {
            echo "error: no $TOOLS/bin/rathole (bench/compare.sh installs it)" >&2
            exit 2
        }
        ;;
    *) echo "error: SYSTEM must be tube or rathole, got '$SYSTEM'" >&2; exit 2 ;;
    esac
}

# start_tube "LOCAL..." [WRAP...]: starts tube's relay (fresh data dir) and an agent exposing
# the local services of the first argument (addresses separated by spaces; each under the
# command WRAP, if given); sets PUBLIC (the first service's public address; the others' are
# `field agent N 2`), PID_relay and PID_agent. Returns once both printed their contract lines,
# bounded by WAIT_SECS; dies if a tunnel line names another service than asked. With
# TUBE_NAME=x set for the call, a further instance: relayx and agentx (PID_relayx,
# PID_agentx, its own data dir).
start_tube() {
    local token relay=relay${TUBE_NAME:-} agent=agent${TUBE_NAME:-} i
    local -a locals
    read -r -a locals <<<"$1"
    shift
    rm -rf "${TMP:?}/$relay"
    start "$relay" "$@" "$BIN/tube" relay --listen 127.0.0.1:0 --data-dir "$TMP/$relay"
    wait_lines "$relay" 2
    token=$("$BIN/tube" token --subject bench --data-dir "$TMP/$relay")
    start "$agent" "$@" "$BIN/tube" expose "${locals[@]}" --relay "$(field "$relay" 1 3)" \
        --token "$token" --fingerprint "$(field "$relay" 2 2)"
    wait_lines "$agent" "${#locals[@]}"
    for ((i = 0; i < ${#locals[@]}; i++)); do
        [[ $(field "$agent" $((i + 1)) 3) == "${locals[i]}" ]] || {
            echo "error: unexpected tunnel lines (asked for ${locals[*]}):" >&2
            cat "$TMP/$agent.out" >&2
            exit 1
        }
    done
    PUBLIC=$(field "$agent" 1 2)
}

# start_chain_nodes NAME...: starts a `tube hub --intermediates 1` (hub, fresh data dir) and
# one `tube node` per NAME (node_NAME, bound to 127.0.0.2, .3, ... in the order given, its front
# API on 127.0.0.1:0, its data in $TMP/node-NAME; the names listed in NO_RELAY refuse to relay
# for others). Returns once every node has logged in to the hub, bounded by WAIT_SECS. A node's
# front API: `field node_NAME 1 3`.
start_chain_nodes() {
    local name octet=2
    local -a extra
    start hub "$BIN/tube" hub --listen 127.0.0.1:0 --data-dir "$TMP/hub" --intermediates 1
    wait_lines hub 2
    for name in "$@"; do
        extra=()
        [[ " ${NO_RELAY:-} " == *" $name "* ]] && extra=(--no-relay)
        start "node_$name" "$BIN/tube" node --hub "$(field hub 1 3)" \
            --hub-fingerprint "$(field hub 2 2)" --name "$name" --bind "127.0.0.$octet" \
            --api 127.0.0.1:0 --data-dir "$TMP/node-$name" "${extra[@]}"
        octet=$((octet + 1))
    done
    for name in "$@"; do
        wait_lines "node_$name" 1
        wait_err "node_$name" "logged in to the hub"
    done
}

# rathole_tls NAME: a self-signed certificate for "localhost" ($TMP/NAME.pem, its key and a
# pkcs12 bundle, made with the openssl command) and the sections of rathole's configuration
# that put server and client on its TLS transport with it: RATHOLE_TLS_SERVER and
# RATHOLE_TLS_CLIENT (the client trusts the certificate).
rathole_tls() {
    local name=$1
    command -v openssl >/dev/null || { echo "error: rathole over TLS needs the openssl command" >&2; exit 1; }
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
        -subj /CN=localhost -addext subjectAltName=DNS:localhost \
        -keyout "$TMP/$name.key" -out "$TMP/$name.pem" 2>/dev/null
    openssl pkcs12 -export -inkey "$TMP/$name.key" -in "$TMP/$name.pem" \
        -passout pass:bench -out "$TMP/$name.pfx"
    RATHOLE_TLS_SERVER=$(printf '[server.transport]\ntype = "tls"\n[server.transport.tls]\npkcs12 = "%s"\npkcs12_password = "bench"\n' "$TMP/$name.pfx")
    RATHOLE_TLS_CLIENT=$(printf '[client.transport]\ntype = "tls"\n[client.transport.tls]\ntrusted_root = "%s"\nhostname = "localhost"\n' "$TMP/$name.pem")
}

# start_rathole SINK PROBE [WRAP...]: starts rathole's server and client (each under the
# command WRAP, if given) carrying one service to SINK over plain TCP; sets PUBLIC (its public
# address), PID_server and PID_client. Returns once a PROBE (throughput, for a sink, or rtt,
# for an echo server) has gone through it end to end, bounded by WAIT_SECS. With RATHOLE_TLS=1
# set for the call, server and client talk over rathole's TLS transport (OpenSSL through
# native-tls; a self-signed certificate for "localhost" made with the openssl command, which
# the client trusts) instead; with RATHOLE_NAME=x, a further instance: serverx and clientx
# (PID_serverx, PID_clientx).
start_rathole() {
    local sink=$1 probe=$2 control port i name=${RATHOLE_NAME:-} tls_server='' tls_client=''
    local server=server$name client=client$name
    shift 2
    free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
    control=$(free_port)
    port=$(free_port)
    if [[ -n ${RATHOLE_TLS:-} ]]; then
        rathole_tls "$server"
        tls_server=$RATHOLE_TLS_SERVER
        tls_client=$RATHOLE_TLS_CLIENT
    fi
    printf '[server]\nbind_addr = "127.0.0.1:%s"\n%s\n[server.services.s]\ntoken = "bench"\nbind_addr = "127.0.0.1:%s"\n' \
        "$control" "$tls_server" "$port" >"$TMP/$server.toml"
    printf '[client]\nremote_addr = "127.0.0.1:%s"\n%s\n[client.services.s]\ntoken = "bench"\nlocal_addr = "%s"\n' \
        "$control" "$tls_client" "$sink" >"$TMP/$client.toml"
    start "$server" "$@" "$TOOLS/bin/rathole" --server "$TMP/$server.toml"
    start "$client" "$@" "$TOOLS/bin/rathole" --client "$TMP/$client.toml"
    PUBLIC=127.0.0.1:$port
    local args=(rtt --addr "$PUBLIC" --count 1 --size 8)
    [[ $probe == throughput ]] && args=(throughput --addr "$PUBLIC" --bytes 1 --streams 1)
    for ((i = 0; ; i++)); do
        "$BIN/tube-loadgen" --timeout 5 "${args[@]}" >/dev/null 2>&1 && break
        ((i < WAIT_SECS * 4)) || { echo "error: rathole carried nothing within ${WAIT_SECS}s" >&2; exit 1; }
        sleep 0.25
    done
}

# start_system KIND [WRAP...]: starts `tube-loadgen KIND` (echo or sink) and, in front of it,
# the system SYSTEM names (tube's relay and agent, or rathole's server and client, each under
# the command WRAP, if given); sets SINK, PUBLIC and PROCS (the system's two process ids).
start_system() {
    local kind=$1 probe=rtt
    shift
    start sink "$BIN/tube-loadgen" "$kind" --listen 127.0.0.1:0
    wait_lines sink 1
    SINK=$(field sink 1 3)
    if [[ $SYSTEM == tube ]]; then
        start_tube "$SINK" "$@"
        PROCS=("$PID_relay" "$PID_agent")
    else
        [[ $kind == sink ]] && probe=throughput
        start_rathole "$SINK" "$probe" "$@"
        PROCS=("$PID_server" "$PID_client")
    fi
}
