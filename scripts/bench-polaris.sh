#!/usr/bin/env bash
# The Polaris flow (issue 20 item 5): `nox image pull debian-13 --warm`
# (through a loopback catalog mirror serving the test image), then RUNS
# `nox create --image debian-13 --wait` of the default shape in a row (the
# VMs keep running), each timed create -> SSH; then the median and each.
#   sudo scripts/bench-polaris.sh [RUNS]      (default 10; root)
# NOX_BENCH_AB=PATH: A/B instead, this nox against that binary, each with
# its own warm template, RUNS creates of each interleaved (each VM deleted
# before the next; NOX_BENCH_KEEP=1 keeps them), medians and the ratio B/A.
# With NOX_BENCH_TIMELINE=1 each VM's warm-start timeline is printed too
# (scripts/warm-timeline.sh). User networking (passt), config.json's
# defaults (no config: 2 vCPUs at most, 1 GiB, 10G disk).
# NOX_BENCH_BIN=PATH uses that nox binary (else a release build);
# NOX_TEST_IMAGE the image served as debian-13 (else the test image built).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-10}
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
. scripts/bench-lib.sh
bench_nox
IMG=${NOX_TEST_IMAGE:-$(scripts/build-test-image.sh | tail -n 1)}
W=$(mktemp -d /tmp/nox-bench-polaris.XXXXXX)
export NOX_HOME=$W/nox
SERVER_PID=""
cleanup() {
    set +e
    bench_delete_vms
    for d in "$W"/nox-b/vms/*/; do
        [ -d "$d" ] && NOX_HOME=$W/nox-b ${NOX_BENCH_AB:-false} delete --force "$(basename "$d")" >/dev/null 2>&1
    done
    [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null
    rm -rf "$W"
}
trap cleanup EXIT

# The catalog's layout for debian-13 amd64: the image and its SHA512SUMS.
M=$W/mirror/trixie/latest
mkdir -p "$M"
cp --reflink=auto "$IMG" "$M/debian-13-genericcloud-amd64.qcow2"
(cd "$M" && sha512sum debian-13-genericcloud-amd64.qcow2 >SHA512SUMS)
python3 tests/support/http_server.py --dir "$W/mirror" >"$W/port" &
SERVER_PID=$!
for _ in $(seq 50); do [ -s "$W/port" ] && break; sleep 0.1; done
export NOX_MIRROR="http://127.0.0.1:$(head -n 1 "$W/port")/"


echo "load: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
pull() { # NOX_HOME NOX
    local t0; t0=$(bench_now)
    NOX_HOME=$1 $2 image pull debian-13 --arch amd64 --insecure --warm >&2
    echo "image pull --warm ($2): $(bench_secs "$t0" "$(bench_now)") s" >&2
}
create() { bench_create "$1" "$2" "$3" --image debian-13; } # NOX_HOME NOX NAME -> seconds to SSH

if [ -n "${NOX_BENCH_AB:-}" ]; then
    # A/B: this script's nox (A) against NOX_BENCH_AB (B), each with a warm
    # template of its own making, creates interleaved, each VM deleted
    # before the next create (the same load for both).
    B=$NOX_BENCH_AB
    HOME_B=$W/nox-b
    pull "$NOX_HOME" "$NOX"
    pull "$HOME_B" "$B"
    bench_ab "$RUNS" "create --wait (warm) -> SSH" "$HOME_B"
    NOX_HOME=$HOME_B $B image rm debian-13-warm >/dev/null 2>&1 || true
    echo "load at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
    exit 0
fi

pull "$NOX_HOME" "$NOX"
T=()
for i in $(seq "$RUNS"); do
    T+=("$(create "$NOX_HOME" "$NOX" "p$i")")
done
echo "create --image debian-13 --wait (warm) -> SSH: median $(bench_median "${T[@]}") s of $RUNS (${T[*]})"
echo "load at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
