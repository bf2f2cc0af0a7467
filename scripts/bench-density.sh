#!/usr/bin/env bash
# What idle warm VMs cost the host (issue 20 item 1): a VM of 1 vCPU and
# 512 MiB booted cold and committed `--warm`, then warm VMs created from
# it one after another (`create --wait`, so each has taken its identity
# and answered one SSH login); at 1, 5 and 10 of them, after SETTLE
# seconds idle, the sum of their qemu processes' PSS (a page of the shared
# RAM image counts once in all) and how far the host's MemAvailable fell
# from before the first create.
#   sudo scripts/bench-density.sh [bridge|default]    (default bridge; root)
# bridge: a bridge with dnsmasq of this script's own (noxbench2,
# 10.77.0.0/24, no router: the guests reach nothing beyond it), where each
# VM has its own MAC and re-probes its NIC; default: nox's default network
# (user networking through passt where no br0 exists).
# NOX_BENCH_SETTLE=SECONDS (default 60); NOX_BENCH_BIN=PATH uses that nox
# binary (else a release build); NOX_TEST_IMAGE the image (else the test
# image built).
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-bridge}
SETTLE=${NOX_BENCH_SETTLE:-60}
BR=noxbench2
NET=10.77.0
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
case "$MODE" in bridge | default) ;; *) echo "bridge or default, not $MODE" >&2; exit 2 ;; esac
. scripts/bench-lib.sh
bench_nox
IMG=${NOX_TEST_IMAGE:-$(scripts/build-test-image.sh | tail -n 1)}
W=$(mktemp -d /tmp/nox-bench-density.XXXXXX)
export NOX_HOME=$W/nox
DNSMASQ_PID=""
cleanup() {
    set +e
    bench_delete_vms
    [ "$MODE" = bridge ] && bench_bridge_down "$BR"
    rm -rf "$W"
}
trap cleanup EXIT
NETARGS=()
if [ "$MODE" = bridge ]; then
    bench_bridge "$BR" "$NET" "$W"
    NETARGS=(--network "bridge:$BR")
fi
SHAPE=(--cpus 1 --memory 512M --disk 4G)

avail_kib() { awk '/^MemAvailable:/ { print $2 }' /proc/meminfo; }
field() { python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$NOX_HOME/vms/$1/state.json" "$2"; }
pss_kib() { awk '/^Pss:/ { print $2 }' "/proc/$1/smaps_rollup"; }
# The sums of PSS, in MiB, of VMs w1..w$1: their qemu processes, and all
# their processes (the supervisor and what it started: the jail's waiter,
# qemu, passt).
pss_mib() {
    local i pid q=0 all=0
    for i in $(seq "$1"); do
        q=$((q + $(pss_kib "$(field "w$i" qemu_pid)")))
        for pid in $(ps -e -o pid=,ppid= | awk -v root="$(field "w$i" pid)" '
            { parent[$1] = $2 }
            END { for (p in parent) { x = p; while (x != "" && x != root && x != 1 && x != 0) x = parent[x]; if (x == root) print p } }'); do
            all=$((all + $(pss_kib "$pid" 2>/dev/null || echo 0)))
        done
    done
    echo "$((q / 1024)) $((all / 1024))"
}

echo "load: $(cut -d' ' -f1-3 /proc/loadavg); network: $MODE" >&2
$NOX create src --image "$IMG" "${NETARGS[@]}" "${SHAPE[@]}" --wait --timeout 900 >/dev/null
$NOX image commit src --as dense --warm >&2
sync
echo 3 >/proc/sys/vm/drop_caches
sleep 5
before=$(avail_kib)
T=()
echo "| warm VMs | sum of qemu PSS | per VM | all their processes' PSS | MemAvailable fell by | create --wait (each) |"
echo "|---|---|---|---|---|---|"
n=0
for at in 1 5 10; do
    while [ "$n" -lt "$at" ]; do
        n=$((n + 1))
        t0=$(bench_now)
        $NOX create "w$n" --image dense "${NETARGS[@]}" "${SHAPE[@]}" --wait --timeout 600 >/dev/null
        T+=("$(bench_secs "$t0" "$(bench_now)")")
    done
    sleep "$SETTLE"
    read -r p all < <(pss_mib "$n")
    fell=$(((before - $(avail_kib)) / 1024))
    echo "| $n | $p MiB | $((p / n)) MiB | $all MiB | $fell MiB | ${T[*]} s |"
    T=()
done
echo "load at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
