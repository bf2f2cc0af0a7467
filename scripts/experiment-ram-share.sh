#!/usr/bin/env bash
# Experiment (issue 20, item 1): can clones of a warm guest share its RAM
# copy-on-write in QEMU 10? Plain qemu, no nox: prints numbers, no pass/fail.
#   scripts/experiment-ram-share.sh [CLONES]        (root; default 10 clones)
#
# 1. boot the test image (512 MiB, TCG, no network) to its login prompt and
#    save it (stop + migrate) into STATE_A, as a warm commit does today;
# 2. "expand": a qemu whose RAM is a named file (memory-backend-file,
#    share=on) loads STATE_A, so the guest's RAM lands in RAM_FILE; it then
#    saves again with the x-ignore-shared capability: STATE_B holds only the
#    device state (shared named-file RAM is skipped);
# 3. each clone maps RAM_FILE privately (share=off,readonly=on,rom=off:
#    MAP_PRIVATE of an O_RDONLY file), loads STATE_B with x-ignore-shared
#    (no RAM pages in the stream, so RAM stays the file's pages) and runs;
#    it pays only for the pages it writes.
# Measures: resume time, per-clone RSS/PSS and their sum after 30 s idle,
# MemAvailable's drop, and that RAM_FILE's SHA-256 is unchanged after the
# clones ran (every clone wrote to its private copy only).
set -euo pipefail
cd "$(dirname "$0")/.."
CLONES=${1:-10}
IMG=${NOX_TEST_IMAGE:-$(scripts/build-test-image.sh | tail -n 1)}
W=$(mktemp -d /var/tmp/nox-ramshare.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$W"
}
trap cleanup EXIT
log() { printf '[ram-share %s] %s\n' "$(date +%T)" "$*" >&2; }

cat >"$W/qmp.py" <<'EOF'
import json, socket, sys, time
def conn(path):
    for _ in range(200):
        try:
            s = socket.socket(socket.AF_UNIX); s.connect(path); break
        except OSError:
            time.sleep(0.05)
    f = s.makefile('rw'); json.loads(f.readline()); cmd(f, 'qmp_capabilities'); return f
def cmd(f, name, **args):
    f.write(json.dumps({'execute': name, 'arguments': args}) + '\n'); f.flush()
    while True:
        r = json.loads(f.readline())
        if 'error' in r: sys.exit(f'{name}: {r["error"]}')
        if 'return' in r: return r['return']
def migrate(f, uri, ignore_shared=False):
    if ignore_shared:
        cmd(f, 'migrate-set-capabilities',
            capabilities=[{'capability': 'x-ignore-shared', 'state': True}])
    cmd(f, 'stop'); cmd(f, 'migrate', uri=uri)
    while (r := cmd(f, 'query-migrate'))['status'] not in ('completed', 'failed'):
        time.sleep(0.1)
    if r['status'] != 'completed': sys.exit(f'migrate: {r}')
    cmd(f, 'quit')
def load(f, uri, ignore_shared=False):
    if ignore_shared:
        cmd(f, 'migrate-set-capabilities',
            capabilities=[{'capability': 'x-ignore-shared', 'state': True}])
    t = time.time(); cmd(f, 'migrate-incoming', uri=uri)
    while cmd(f, 'query-status')['status'] == 'inmigrate':
        time.sleep(0.02)
    return time.time() - t
if __name__ == '__main__':
    f = conn(sys.argv[2])
    if sys.argv[1] == 'save': migrate(f, sys.argv[3])
    elif sys.argv[1] == 'expand':
        load(f, sys.argv[3]); migrate(f, sys.argv[4], ignore_shared=True)
    elif sys.argv[1] == 'clone':
        t = load(f, sys.argv[3], ignore_shared=True); cmd(f, 'cont'); print(f'{t:.2f}')
EOF

# The same machine everywhere (a serial port each, or the device state does
# not load): the RAM block keeps its legacy name pc.ram.
machine() { echo "-machine q35,accel=tcg$1 -m 512 -smp 1 -nodefaults -display none -nic none"; }
pss() { awk '/^Pss:/{print $2}' "/proc/$1/smaps_rollup"; }
rss() { awk '/^Rss:/{print $2}' "/proc/$1/smaps_rollup"; }
avail() { awk '/MemAvailable/{print $2}' /proc/meminfo; }

qemu-img convert -O qcow2 "$IMG" "$W/src.qcow2"
log "booting the source guest (512 MiB, TCG)"
# shellcheck disable=SC2046
qemu-system-x86_64 $(machine "") -drive "file=$W/src.qcow2,if=virtio,format=qcow2" \
    -serial "file:$W/src.log" -qmp "unix:$W/src.qmp,server=on,wait=off" \
    -daemonize -pidfile "$W/src.pid"
PIDS+=("$(cat "$W/src.pid")")
for _ in $(seq 600); do grep -q 'login:' "$W/src.log" && break; sleep 1; done
grep -q 'login:' "$W/src.log" || { echo "source guest never reached its login prompt" >&2; exit 1; }
sleep 5
log "source idle: RSS $(($(rss "${PIDS[0]}") / 1024)) MiB, PSS $(($(pss "${PIDS[0]}") / 1024)) MiB"
python3 "$W/qmp.py" save "$W/src.qmp" "exec:cat > $W/state-a"

log "expanding RAM into a named file"
t0=$(date +%s.%N)
# shellcheck disable=SC2046
qemu-system-x86_64 $(machine ",memory-backend=pc.ram") -drive "file=$W/src.qcow2,if=virtio,format=qcow2" \
    -object "memory-backend-file,id=pc.ram,size=512M,mem-path=$W/ram,share=on" \
    -serial null -qmp "unix:$W/exp.qmp,server=on,wait=off" -incoming defer -daemonize -pidfile "$W/exp.pid"
PIDS+=("$(cat "$W/exp.pid")")
python3 "$W/qmp.py" expand "$W/exp.qmp" "exec:cat $W/state-a" "exec:cat > $W/state-b"
log "expanded in $(echo "$(date +%s.%N) - $t0" | bc) s: state-a $(($(stat -c %s "$W/state-a") >> 20)) MiB," \
    "state-b $(($(stat -c %s "$W/state-b") >> 10)) KiB, ram file $(du -m "$W/ram" | cut -f1) MiB on disk"
sync
sum_before=$(sha256sum "$W/ram" | cut -d' ' -f1)

m0=$(avail)
CPIDS=()
for n in $(seq "$CLONES"); do
    qemu-img create -q -f qcow2 -b "$W/src.qcow2" -F qcow2 "$W/c$n.qcow2"
    # shellcheck disable=SC2046
    qemu-system-x86_64 $(machine ",memory-backend=pc.ram") -drive "file=$W/c$n.qcow2,if=virtio,format=qcow2" \
        -object "memory-backend-file,id=pc.ram,size=512M,mem-path=$W/ram,share=off,readonly=on,rom=off" \
        -serial "unix:$W/c$n.sock,server=on,wait=off" \
        -qmp "unix:$W/c$n.qmp,server=on,wait=off" -incoming defer -daemonize -pidfile "$W/c$n.pid"
    CPIDS+=("$(cat "$W/c$n.pid")")
    PIDS+=("$(cat "$W/c$n.pid")")
    log "clone $n resumed in $(python3 "$W/qmp.py" clone "$W/c$n.qmp" "exec:cat $W/state-b") s"
done
# Each clone answers on its serial console (a new login prompt).
for n in $(seq "$CLONES"); do
    python3 - "$W/c$n.sock" <<'EOF'
import socket, sys, time
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.settimeout(2); s.sendall(b'\r')
buf, t = b'', time.time()
while b'login:' not in buf and time.time() - t < 60:
    try: buf += s.recv(4096)
    except socket.timeout: pass
sys.exit(0 if b'login:' in buf else f'{sys.argv[1]}: no login prompt')
EOF
done
sleep 30
total=0
for n in $(seq "$CLONES"); do
    p=${CPIDS[$((n - 1))]}
    total=$((total + $(pss "$p")))
    log "clone $n: RSS $(($(rss "$p") / 1024)) MiB, PSS $(($(pss "$p") / 1024)) MiB"
done
m1=$(avail)
log "$CLONES idle clones: sum of PSS $((total / 1024)) MiB, MemAvailable dropped $(((m0 - m1) / 1024)) MiB"
for p in "${CPIDS[@]}"; do kill "$p"; done
sleep 1
[ "$(sha256sum "$W/ram" | cut -d' ' -f1)" = "$sum_before" ] && log "ram file unchanged (SHA-256)" \
    || { echo "the RAM file changed under its clones" >&2; exit 1; }
