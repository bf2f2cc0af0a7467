#!/usr/bin/env bash
# Warm create -> SSH on a bridge (issue 20 item 6), where a warm VM's MAC
# is its own: the guest re-probes its NIC and takes a new DHCP lease
# before it announces. A bridge with dnsmasq of this script's own
# (noxbench1, 10.79.0.0/24, no router: the guests reach nothing beyond
# it), one VM of the default shape booted cold on it and committed
# `--warm`, then RUNS `create --image T --network bridge:... --wait` in a
# row (the VMs kept running), each timed, and their median.
#   sudo scripts/bench-warm-bridge.sh [RUNS]      (default 5; root)
# NOX_BENCH_AB=PATH: A/B instead, this nox against that binary, each with
# a template of its own making (its own identity hook), RUNS creates of
# each interleaved (each VM deleted before the next; with NOX_BENCH_KEEP=1
# kept running, as without NOX_BENCH_AB), medians and the ratio B/A.
# NOX_BENCH_BIN=PATH uses that nox binary (else a release build);
# NOX_BENCH_TIMELINE=1 prints each create's timeline
# (scripts/warm-timeline.sh); NOX_TEST_IMAGE the image (else the test
# image built).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-5}
BR=noxbench1
NET=10.79.0
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
. scripts/bench-lib.sh
bench_nox
IMG=${NOX_TEST_IMAGE:-$(scripts/build-test-image.sh | tail -n 1)}
W=$(mktemp -d /tmp/nox-bench-warm-bridge.XXXXXX)
export NOX_HOME=$W/nox
HOME_B=$W/nox-b
DNSMASQ_PID=""
cleanup() {
    set +e
    bench_delete_vms
    [ -n "${NOX_BENCH_AB:-}" ] && NOX_HOME=$HOME_B NOX=$NOX_BENCH_AB bench_delete_vms
    bench_bridge_down "$BR"
    rm -rf "$W"
}
trap cleanup EXIT
bench_bridge "$BR" "$NET" "$W"

# template HOME BIN: a VM booted cold on the bridge, committed as warm-br.
template() {
    local t0; t0=$(bench_now)
    NOX_HOME=$1 $2 create base --image "$IMG" --network "bridge:$BR" --wait --timeout 900 >/dev/null
    echo "cold create base --wait ($2): $(bench_secs "$t0" "$(bench_now)") s" >&2
    NOX_HOME=$1 $2 image commit base --as warm-br --warm >&2
}
# create HOME BIN VM: one timed warm create on the bridge; prints its seconds.
create() { bench_create "$1" "$2" "$3" --image warm-br --network "bridge:$BR"; }
echo "load: $(cut -d' ' -f1-3 /proc/loadavg)" >&2

if [ -n "${NOX_BENCH_AB:-}" ]; then
    B=$NOX_BENCH_AB
    template "$NOX_HOME" "$NOX"
    template "$HOME_B" "$B"
    bench_ab "$RUNS" "warm create --network bridge --wait -> SSH" "$HOME_B"
    echo "load at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
    exit 0
fi

template "$NOX_HOME" "$NOX"
T=()
for i in $(seq "$RUNS"); do
    T+=("$(create "$NOX_HOME" "$NOX" "w$i")")
done
echo "warm create --network bridge --wait -> SSH: median $(bench_median "${T[@]}") s of $RUNS (${T[*]})"
echo "load at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
