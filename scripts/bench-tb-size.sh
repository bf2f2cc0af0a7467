#!/usr/bin/env bash
# A/B of TCG's translation-block cache size (issue 20, item 2): boots the
# test image under TCG with each `-accel tcg,tb-size=N` (MiB; "default" is
# qemu's own) and prints the time to the login prompt and qemu's RSS/PSS
# 20 s later. Interleaved rounds, so load drifts hit every variant alike.
#   scripts/bench-tb-size.sh [ROUNDS] [SIZES...]   (root; default 2 rounds: default 32 128 256)
# Numbers only, no pass/fail. An idle machine gives comparable figures.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-2}
shift || true
SIZES=("$@")
[ ${#SIZES[@]} -gt 0 ] || SIZES=(default 32 128 256)
IMG=${NOX_TEST_IMAGE:-$(scripts/build-test-image.sh | tail -n 1)}
W=$(mktemp -d /var/tmp/nox-tbsize.XXXXXX)
PID=""
cleanup() {
    [ -n "$PID" ] && kill "$PID" 2>/dev/null || true
    rm -rf "$W"
}
trap cleanup EXIT
qemu-img convert -O qcow2 "$IMG" "$W/base.qcow2"
printf '%-8s %-6s %10s %9s %9s\n' size round login_s rss_mib pss_mib
for r in $(seq "$ROUNDS"); do
    for size in "${SIZES[@]}"; do
        accel=tcg
        [ "$size" = default ] || accel="tcg,tb-size=$size"
        qemu-img create -q -f qcow2 -b "$W/base.qcow2" -F qcow2 "$W/o.qcow2"
        rm -f "$W/serial.log"
        t0=$(date +%s.%N)
        qemu-system-x86_64 -machine q35 -accel "$accel" -cpu max -m 1024 -smp 2 -nodefaults \
            -display none -nic none -serial "file:$W/serial.log" \
            -drive "file=$W/o.qcow2,if=virtio,format=qcow2" -daemonize -pidfile "$W/pid"
        PID=$(cat "$W/pid")
        for _ in $(seq 1200); do grep -q 'login:' "$W/serial.log" 2>/dev/null && break; sleep 0.5; done
        t1=$(date +%s.%N)
        sleep 20
        rss=$(awk '/^Rss:/{print int($2/1024)}' "/proc/$PID/smaps_rollup")
        pss=$(awk '/^Pss:/{print int($2/1024)}' "/proc/$PID/smaps_rollup")
        kill "$PID"
        while kill -0 "$PID" 2>/dev/null; do sleep 0.1; done
        PID=""
        printf '%-8s %-6s %10.1f %9s %9s\n' "$size" "$r" "$(echo "$t1 - $t0" | bc)" "$rss" "$pss"
    done
done
