#!/bin/bash
# Manual check of an image made by scripts/build-test-image.sh: boot it under TCG with a NoCloud
# seed (FAT, label cidata), wait for ssh with a fresh key, then `cloud-init status --wait`.
# Usage: scripts/test-image/boot-check.sh IMAGE.qcow2 [bios|uefi] [amd64|arm64]
# Prints the seconds from qemu start to ssh answering. Cleans up its qemu (by PID) and temp files.
set -euo pipefail
IMG=$(readlink -f "$1")
MODE=${2:-bios}
ARCH=${3:-amd64}
T=$(mktemp -d /tmp/nox-boot-check.XXXXXX)
QPID=
cleanup() {
    if [[ -n $QPID ]] && kill -0 "$QPID" 2>/dev/null; then
        kill "$QPID" 2>/dev/null || true
        wait "$QPID" 2>/dev/null || true
    fi
    rm -rf "$T"
}
trap cleanup EXIT

ssh-keygen -q -t ed25519 -N '' -f "$T/key"
cat >"$T/meta-data" <<EOF
instance-id: iid-nox-check-$$
local-hostname: noxcheck
EOF
cat >"$T/user-data" <<EOF
#cloud-config
users:
  - name: nox
    sudo: ALL=(ALL) NOPASSWD:ALL
    shell: /bin/bash
    ssh_authorized_keys: [ "$(cat "$T/key.pub")" ]
ssh_genkeytypes: [ed25519]
manage_etc_hosts: true
EOF
mkfs.vfat -n cidata -C "$T/seed.img" 2048 >/dev/null
mcopy -i "$T/seed.img" "$T/meta-data" "$T/user-data" ::/
qemu-img create -q -f qcow2 -b "$IMG" -F qcow2 "$T/ov.qcow2" 4G

PORT=$((20000 + RANDOM % 20000))
args=(-accel tcg -m 1024 -smp 2 -nodefaults -display none -serial "file:$T/console.log"
    -drive "if=virtio,file=$T/ov.qcow2" -drive "if=virtio,file=$T/seed.img,format=raw,readonly=on"
    -netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$PORT-:22" -device virtio-net-pci,netdev=n0)
case $ARCH/$MODE in
amd64/bios) QEMU=qemu-system-x86_64; args+=(-machine q35) ;;
amd64/uefi)
    QEMU=qemu-system-x86_64
    cp /usr/share/OVMF/OVMF_VARS_4M.fd "$T/vars.fd"
    args+=(-machine q35 -drive if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd
        -drive "if=pflash,format=raw,file=$T/vars.fd")
    ;;
arm64/uefi)
    QEMU=qemu-system-aarch64
    cp /usr/share/AAVMF/AAVMF_VARS.fd "$T/vars.fd"
    args+=(-machine virt -cpu max -drive if=pflash,format=raw,readonly=on,file=/usr/share/AAVMF/AAVMF_CODE.fd
        -drive "if=pflash,format=raw,file=$T/vars.fd")
    ;;
*) echo "unsupported $ARCH/$MODE" >&2; exit 2 ;;
esac

SSH=(ssh -q -o ConnectTimeout=3 -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null
    -o BatchMode=yes -i "$T/key" -p "$PORT" nox@127.0.0.1)
start=$(date +%s.%N)
"$QEMU" "${args[@]}" </dev/null &
QPID=$!
up=
for _ in $(seq 1 500); do
    kill -0 "$QPID" 2>/dev/null || { echo "qemu exited" >&2; break; }
    if "${SSH[@]}" true </dev/null 2>/dev/null; then up=$(date +%s.%N); break; fi
    sleep 1
done
if [[ -z $up ]]; then
    echo "no ssh; console tail:" >&2
    tail -40 "$T/console.log" >&2
    exit 1
fi
printf 'ssh up after %.1f s (%s/%s)\n' "$(echo "$up - $start" | bc)" "$ARCH" "$MODE"
"${SSH[@]}" 'cloud-init status --wait --long; echo; cat /proc/cmdline; hostname; df -h / | tail -1;
    findmnt -n /boot/efi; ls /etc/ssh/ssh_host_*; cat /etc/machine-id; locale 2>&1 | head -2;
    systemctl is-system-running; systemctl --failed --no-legend' </dev/null || true
printf 'cloud-init done after %.1f s\n' "$(echo "$(date +%s.%N) - $start" | bc)"
grep -E "GRUB|Linux version|Booting" "$T/console.log" | head -5 || true
