#!/usr/bin/env bash
# Warm create -> SSH on a bridge (issue 20 item 6), where a warm VM's MAC
# is its own: the guest re-probes its NIC and takes a new DHCP lease
# before it announces. A bridge with dnsmasq of this script's own
# (noxbench1, 10.79.0.0/24, no router: the guests reach nothing beyond
# it), one VM of the default shape booted cold on it and committed
# `--warm`, then RUNS `create --image T --network bridge:... --wait` in a
# row (the VMs kept running), each timed, and their median.
#   sudo scripts/bench-warm-bridge.sh [RUNS]      (default 5; root)
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
DNSMASQ_PID=""
cleanup() {
    set +e
    bench_delete_vms
    bench_bridge_down "$BR"
    rm -rf "$W"
}
trap cleanup EXIT
bench_bridge "$BR" "$NET" "$W"

now() { date +%s%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b - a) / 1e9 }'; }
echo "load: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
t0=$(now)
$NOX create base --image "$IMG" --network "bridge:$BR" --wait --timeout 900 >/dev/null
echo "cold create base --wait: $(secs "$t0" "$(now)") s" >&2
$NOX image commit base --as warm-br --warm >&2
T=()
for i in $(seq "$RUNS"); do
    t0=$(now)
    $NOX create "w$i" --image warm-br --network "bridge:$BR" --wait --timeout 600 >/dev/null
    s=$(secs "$t0" "$(now)")
    T+=("$s")
    echo "create w$i --wait: $s s (load $(cut -d' ' -f1 /proc/loadavg))" >&2
    if [ -n "${NOX_BENCH_TIMELINE:-}" ]; then
        NOX=$NOX scripts/warm-timeline.sh "w$i" "$t0" >&2 || true
    fi
done
median=$(printf '%s\n' "${T[@]}" | sort -n | awk '{ a[NR] = $1 } END { if (NR % 2) print a[(NR + 1) / 2]; else printf "%.2f\n", (a[NR / 2] + a[NR / 2 + 1]) / 2 }')
echo "warm create --network bridge --wait -> SSH: median $median s of $RUNS (${T[*]})"
echo "load at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
