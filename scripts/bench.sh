#!/usr/bin/env bash
# Benchmarks nox on the test image and prints the numbers (no pass/fail).
#   scripts/bench.sh [--bridge]     (root; builds nox in release mode)
# --bridge also measures bridged networking inside a private namespace:
# qemu start -> IP known, and IP known -> SSH ready.
# NOX_BENCH_BIN=PATH benchmarks that binary instead (e.g. an older build, to
# compare in one run); NOX_BENCH_QUICK=1 skips the guest boots.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench-lib.sh
bench_nox
IMG=${NOX_TEST_IMAGE:-$(scripts/build-test-image.sh | tail -n 1)}
ACCEL=${NOX_BENCH_ACCEL:-auto}
export NOX_HOME; NOX_HOME=$(mktemp -d /tmp/nox-bench.XXXXXX)
NS=""
cleanup() {
    # Control sockets are files: this works for VMs inside the namespace too.
    for d in "$NOX_HOME"/vms/*/; do
        [ -d "$d" ] && $NOX delete --force "$(basename "$d")" >/dev/null 2>&1 || true
    done
    if [ -n "$NS" ]; then
        [ -n "${DNSMASQ_PID:-}" ] && kill "$DNSMASQ_PID" 2>/dev/null || true
        ip netns del "$NS" 2>/dev/null || true
    fi
    rm -rf "$NOX_HOME"
}
trap cleanup EXIT
now() { date +%s%N; }
ms() { echo $(( ($2 - $1) / 1000000 )); }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

echo "nox benchmark: $(uname -m), $(nproc) CPUs, accel=$ACCEL, image $(basename "$IMG")"
$NOX image import "$IMG" >/dev/null   # first import hashes the image once

# create --no-start (cached image), 10 runs
for i in $(seq 1 10); do
    t0=$(now); $NOX create "b-$i" --image "$IMG" --no-start --accel "$ACCEL" >/dev/null; t1=$(now)
    ms "$t0" "$t1"
done | median | xargs printf "create --no-start:        %s ms (median of 10)\n"
printf "per-VM disk after create: %s KiB\n" "$(du -sk "$NOX_HOME/vms/b-1" | cut -f1)"

# list with 50 defined VMs
for i in $(seq 11 50); do $NOX create "b-$i" --image "$IMG" --no-start >/dev/null; done
for i in $(seq 1 10); do t0=$(now); $NOX list >/dev/null; t1=$(now); ms "$t0" "$t1"; done \
    | median | xargs printf "list with 50 VMs:         %s ms (median of 10)\n"
for i in $(seq 2 50); do $NOX delete "b-$i" >/dev/null; done

# start -> QMP running
t0=$(now); $NOX start b-1 >/dev/null; t1=$(now)
printf "start -> running (QMP):   %s ms\n" "$(ms "$t0" "$t1")"
sup=$($NOX info b-1 --json | sed -n 's/.*"pid": \([0-9]*\).*/\1/p')
printf "supervisor RSS:           %s KiB\n" "$(awk '/VmRSS/ {print $2}' /proc/"$sup"/status)"
$NOX delete --force b-1 >/dev/null
[ "${NOX_BENCH_QUICK:-}" = 1 ] && exit 0

# create -> SSH ready and cloud-init done
t0=$(now); $NOX create b-ssh --image "$IMG" --accel "$ACCEL" --wait --timeout 900 >/dev/null; t1=$(now)
printf "create -> SSH + cloud-init done: %s ms\n" "$(ms "$t0" "$t1")"
printf "per-VM disk after first boot:    %s KiB\n" "$(du -sk "$NOX_HOME/vms/b-ssh" | cut -f1)"
t0=$(now); $NOX stop b-ssh >/dev/null; t1=$(now)
printf "stop (ACPI powerdown):     %s ms\n" "$(ms "$t0" "$t1")"
t0=$(now); $NOX start b-ssh --wait >/dev/null; t1=$(now)
printf "start -> SSH (2nd boot):   %s ms\n" "$(ms "$t0" "$t1")"
$NOX delete --force b-ssh >/dev/null

if [ "${1:-}" = --bridge ]; then
    NS=nox-bench-$$
    ip netns add "$NS"
    ip netns exec "$NS" ip link set lo up
    ip netns exec "$NS" ip link add brb type bridge
    ip netns exec "$NS" ip addr add 10.91.0.1/24 dev brb
    ip netns exec "$NS" ip link set brb up
    ip netns exec "$NS" dnsmasq --bind-interfaces --interface=brb --port=0 --no-ping --no-resolv \
        --dhcp-range=10.91.0.100,10.91.0.199,1h --dhcp-leasefile="$NOX_HOME/leases" --pid-file="$NOX_HOME/dnsmasq.pid"
    DNSMASQ_PID=$(cat "$NOX_HOME/dnsmasq.pid")
    ip netns exec "$NS" $NOX create b-br --image "$IMG" --accel "$ACCEL" --network bridge:brb --no-start >/dev/null
    t0=$(now)
    ip netns exec "$NS" $NOX start b-br >/dev/null
    ip netns exec "$NS" $NOX ip b-br --wait --timeout 600 >/dev/null; t1=$(now)
    ip netns exec "$NS" $NOX start b-br --wait --timeout 600 >/dev/null; t2=$(now)
    printf "bridge: start -> IP known:  %s ms\n" "$(ms "$t0" "$t1")"
    printf "bridge: IP known -> SSH:    %s ms\n" "$(ms "$t1" "$t2")"
    ip netns exec "$NS" $NOX delete --force b-br >/dev/null
fi
