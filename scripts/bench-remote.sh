#!/usr/bin/env bash
# What `nox --host` adds: `nox list` (one stopped VM) run on the host itself
# against through `--host ssh://root@127.0.0.1:PORT`, with and without ssh
# connection sharing (ControlMaster), and one bare `ssh HOST true` for
# scale; RUNS runs each after a warm-up, medians in ms.
#   sudo scripts/bench-remote.sh [RUNS]        (default 10; root: sshd)
# Its own sshd on 127.0.0.1 (own host key, client key, configs; killed at
# the end), the "remote" nox on a private NOX_HOME; root's ~/.ssh untouched.
# NOX_BENCH_BIN=PATH uses that nox binary (else a release build).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-10}
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
[ -x /usr/sbin/sshd ] || { echo "no /usr/sbin/sshd: apt-get install openssh-server" >&2; exit 1; }
if [ -n "${NOX_BENCH_BIN:-}" ]; then
    NOX=$NOX_BENCH_BIN
else
    cargo build --release --quiet
    NOX=${CARGO_TARGET_DIR:-$PWD/target}/release/nox
fi
W=$(mktemp -d /tmp/nox-bench-remote.XXXXXX)
SSHD_PID=""
cleanup() {
    set +e
    ssh -F "$W/ssh_config_cm" -O exit -p "$PORT" root@127.0.0.1 2>/dev/null
    [ -n "$SSHD_PID" ] && kill "$SSHD_PID" 2>/dev/null
    rm -rf "$W"
}
trap cleanup EXIT
ssh-keygen -q -t ed25519 -N '' -f "$W/host_key"
ssh-keygen -q -t ed25519 -N '' -f "$W/id"
cp "$W/id.pub" "$W/authorized_keys"
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat > "$W/sshd_config" <<C
ListenAddress 127.0.0.1:$PORT
HostKey $W/host_key
PidFile $W/sshd.pid
AuthorizedKeysFile $W/authorized_keys
StrictModes no
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
LogLevel ERROR
C
echo "[127.0.0.1]:$PORT $(cat "$W/host_key.pub")" > "$W/known_hosts"
printf 'Host *\n  IdentityFile %s/id\n  IdentitiesOnly yes\n  UserKnownHostsFile %s/known_hosts\n  GlobalKnownHostsFile /dev/null\n' \
    "$W" "$W" > "$W/ssh_config"
cp "$W/ssh_config" "$W/ssh_config_cm"
printf '  ControlMaster auto\n  ControlPath %s/cm-%%C\n  ControlPersist 60\n' "$W" >> "$W/ssh_config_cm"
for v in "" _cm; do
    printf '#!/bin/sh\nexec ssh -F %s/ssh_config%s "$@"\n' "$W" "$v" > "$W/ssh$v"
    chmod 755 "$W/ssh$v"
    mkdir -m 700 "$W/local$v"
    echo "{\"binaries\": {\"ssh\": \"$W/ssh$v\"}}" > "$W/local$v/config.json"
    chmod 600 "$W/local$v/config.json"
done
mkdir -p /run/sshd
/usr/sbin/sshd -D -f "$W/sshd_config" 2> "$W/sshd.log" &
SSHD_PID=$!
for _ in $(seq 50); do
    ssh -F "$W/ssh_config" -o BatchMode=yes -p "$PORT" root@127.0.0.1 true 2>/dev/null && break
    sleep 0.1
done
mkdir -m 700 "$W/remote"
qemu-img create -q -f qcow2 "$W/small.qcow2" 1G
NOX_HOME=$W/remote $NOX create web --image "$W/small.qcow2" --network user --no-start > /dev/null
export NOX_REMOTE_BIN="env NOX_HOME=$W/remote $NOX"
URL=ssh://root@127.0.0.1:$PORT

# median LABEL COMMAND...: one warm-up, then RUNS timed runs.
median() {
    local label=$1 t0 t1 ts=()
    shift
    "$@" > /dev/null
    for _ in $(seq "$RUNS"); do
        t0=$(date +%s%N)
        "$@" > /dev/null
        t1=$(date +%s%N)
        ts+=($(((t1 - t0) / 1000000)))
    done
    mapfile -t ts < <(printf '%s\n' "${ts[@]}" | sort -n)
    local n=${#ts[@]}
    echo "$label: median $(((ts[(n - 1) / 2] + ts[n / 2]) / 2)) ms (min ${ts[0]}, max ${ts[n - 1]})"
}
median "nox list, on the host" env NOX_HOME="$W/remote" "$NOX" list
median "ssh HOST true" ssh -F "$W/ssh_config" -o BatchMode=yes -p "$PORT" root@127.0.0.1 true
median "nox --host URL list" env NOX_HOME="$W/local" "$NOX" --host "$URL" list
median "nox --host URL list, ControlMaster" env NOX_HOME="$W/local_cm" "$NOX" --host "$URL" list
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
