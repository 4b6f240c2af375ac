#!/usr/bin/env bash
# Fuzz smoke: every cargo-fuzz target over tube-proto for FUZZ_SECONDS seconds each, one after
# another, on the stable toolchain (`-s none`: AddressSanitizer needs nightly; see
# shared/DEPENDENCIES.md section 2.4). Stops at the first finding with a non-zero exit.
#
#   fuzz/smoke.sh                      every target, 30 s each
#   FUZZ_SECONDS=600 fuzz/smoke.sh     the pre-release run, 10 minutes each
#   fuzz/smoke.sh frame mailbox        only these targets
#
# Extra libFuzzer flags can be passed in FUZZ_ARGS (e.g. FUZZ_ARGS="-max_len=65536").
# Findings land in fuzz/artifacts/<target>/, new corpus entries in fuzz/corpus/<target>/
# (both ignored by git), logs in fuzz/target/smoke/<target>.log. See fuzz/README.md.
set -euo pipefail

fuzz_dir="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$fuzz_dir")"
seconds="${FUZZ_SECONDS:-30}"
if ! [[ "$seconds" =~ ^[1-9][0-9]*$ ]]; then
    echo "smoke: FUZZ_SECONDS must be a positive whole number of seconds, got '$seconds'" >&2
    exit 2
fi
# shellcheck disable=SC2206 # word splitting of FUZZ_ARGS is the point
extra_args=(${FUZZ_ARGS:-})

# The fuzz crate is its own workspace with its own target dir, whatever the caller's setting.
export CARGO_TARGET_DIR="$fuzz_dir/target"
cargo=(cargo)
if command -v rustup >/dev/null 2>&1; then
    cargo=(cargo +stable)
fi

if ! "${cargo[@]}" fuzz --version >/dev/null 2>&1; then
    echo "smoke: installing cargo-fuzz"
    "${cargo[@]}" install cargo-fuzz --locked
fi

cd "$root"
fuzz=("${cargo[@]}" fuzz)
opts=(--fuzz-dir "$fuzz_dir" -s none --debug-assertions)

if [[ $# -gt 0 ]]; then
    targets=("$@")
else
    mapfile -t targets < <("${fuzz[@]}" list --fuzz-dir "$fuzz_dir")
fi
if [[ ${#targets[@]} -eq 0 ]]; then
    echo "smoke: no fuzz targets found" >&2
    exit 2
fi

echo "smoke: building ${#targets[@]} targets"
"${fuzz[@]}" build "${opts[@]}"

logs="$fuzz_dir/target/smoke"
mkdir -p "$logs"
summary=()
status=0
for t in "${targets[@]}"; do
    corpus=("$fuzz_dir/corpus/$t")
    mkdir -p "${corpus[0]}"
    [[ -d "$fuzz_dir/seeds/$t" ]] && corpus+=("$fuzz_dir/seeds/$t")
    flags=(-max_total_time="$seconds" -print_final_stats=1 -timeout=25)
    [[ -f "$fuzz_dir/dict/$t.dict" ]] && flags+=(-dict="$fuzz_dir/dict/$t.dict")
    log="$logs/$t.log"

    echo "smoke: $t for ${seconds}s"
    rc=0
    "${fuzz[@]}" run "${opts[@]}" "$t" "${corpus[@]}" -- "${flags[@]}" "${extra_args[@]}" \
        >"$log" 2>&1 || rc=$?

    runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)"
    artifact="$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)"
    if [[ $rc -eq 0 ]]; then
        result="ok"
    elif [[ -n "$artifact" ]]; then
        result="FINDING $artifact"
    else
        result="FAILED (exit $rc, see $log)"
    fi
    line="$(printf '%-18s runs %12s  %s' "$t" "${runs:-?}" "$result")"
    summary+=("$line")
    echo "smoke: $line"
    if [[ $rc -ne 0 ]]; then
        echo "---- last lines of $log"
        tail -n 40 "$log"
        status=1
        break
    fi
done

echo
echo "== fuzz smoke summary (${seconds}s per target)"
printf '%s\n' "${summary[@]}"
if [[ $status -ne 0 ]]; then
    echo "smoke: stopped at the first finding; reproduce with:"
    echo "  cargo +stable fuzz run --fuzz-dir fuzz -s none $t ${artifact:-<input>}"
fi
exit "$status"
