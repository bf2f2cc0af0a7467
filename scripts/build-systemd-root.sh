#!/bin/bash
# Build a Debian bookworm root directory that boots under systemd-nspawn with systemd as its
# PID 1, for nox's systemd tests (tests/systemd_pid1.rs): `nox systemd install`, `nox enable`
# and the nox@.service unit are exercised against a real systemd there.
#
# Usage: scripts/build-systemd-root.sh     (as root, no stdin needed)
# Progress goes to stderr; the last line of stdout is the absolute path of the root directory,
# cached as ${NOX_TEST_CACHE:-/var/cache/nox-test}/systemd-root-<sha256(this script)[:12]>.
# An existing cached root is reused at once. Tests must not boot it in place (that writes to it):
# they boot an overlay or a copy of it.
#
# Contents: bookworm minbase + systemd 252 (bookworm's own: it handles cgroup v1/hybrid hosts,
# trixie's does not), systemd-sysv, dbus, qemu-system-x86 + qemu-utils from bookworm-backports
# (10.0.x, as on the test hosts), seabios, ovmf, openssh-client, iproute2, procps. No nox: the
# test binds the freshly built binary in. Root is locked; the console gets no getty (the tests
# drive the container with nsenter). The Linux HA stack for the two-node cluster test
# (tests/cluster.rs): corosync, pacemaker (with its CLI tools), pcs (its CLI; pcsd is masked, the test writes
# corosync.conf itself) and resource-agents; corosync and pacemaker are disabled at boot (the
# test starts them once corosync.conf is written); openssh-server for `nox migrate` between the
# nodes.
#
# Build-host Debian packages (installed when missing): mmdebstrap debian-archive-keyring.
set -euo pipefail

SUITE=bookworm
MIRROR=http://deb.debian.org/debian

log() { printf '[build-systemd-root %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

SELF=$(readlink -f "${BASH_SOURCE[0]}")
[[ $# -eq 0 ]] || die "no arguments expected (usage: $0)"
[[ $EUID -eq 0 ]] || die "must run as root"

CACHE=${NOX_TEST_CACHE:-/var/cache/nox-test}
HASH=$(sha256sum "$SELF" | cut -c1-12)
OUT=$CACHE/systemd-root-$HASH
case $OUT in /*) ;; *) OUT=$PWD/$OUT ;; esac
if [[ -d $OUT ]]; then
    log "cached: $OUT"
    echo "$OUT"
    exit 0
fi

if ! command -v mmdebstrap >/dev/null || [[ ! -f /usr/share/keyrings/debian-archive-keyring.gpg ]]; then
    log "installing build tools: mmdebstrap debian-archive-keyring"
    export DEBIAN_FRONTEND=noninteractive
    # Beside the test images' builds (CI): one apt at a time.
    mkdir -p /run/lock
    (
        flock 9
        apt-get update -q >&2 </dev/null
        apt-get install -y -q --no-install-recommends mmdebstrap debian-archive-keyring >&2 </dev/null
    ) 9>/run/lock/nox-build-tools.lock
fi

# A private mount namespace: nothing mmdebstrap mounts can outlive the build.
if [[ -z ${NOX_SR_UNSHARED:-} ]]; then
    NOX_SR_UNSHARED=1 exec unshare -m --propagation private "$SELF" </dev/null
fi

START=$(date +%s)
mkdir -p "$CACHE"
WORK=$(mktemp -d "$CACHE/.build-systemd-root-XXXXXX")
cleanup() {
    local m
    if [[ -n ${WORK:-} && -d $WORK ]]; then
        awk -v w="$WORK/" 'index($5, w) == 1 { print $5 }' /proc/self/mountinfo | sort -r |
            while read -r m; do umount -l "$m" || true; done
        rm -rf --one-file-system "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

R=$WORK/root
log "mmdebstrap $SUITE into $R"
# qemu comes from backports with `-t` in a hook, so that nothing else (systemd above all) is
# taken from backports: bookworm's qemu 7.2 is older than the hosts' 10.0.x.
mmdebstrap --variant=minbase --mode=root \
    --include=systemd,systemd-sysv,dbus,iproute2,procps,openssh-client,seabios,ovmf,ca-certificates,corosync,pacemaker,pacemaker-cli-utils,pcs,resource-agents,openssh-server \
    --customize-hook='chroot "$1" apt-get install -y -q --no-install-recommends -t bookworm-backports qemu-system-x86 qemu-utils' \
    --customize-hook='chroot "$1" apt-get clean' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/usr/share/doc/* "$1"/usr/share/man/*' \
    "$SUITE" "$R" \
    "deb $MIRROR $SUITE main" \
    "deb $MIRROR $SUITE-updates main" \
    "deb $MIRROR $SUITE-backports main" >&2

# Container identity and a quiet, quick boot.
: >"$R/etc/machine-id"
echo nox-systemd-test >"$R/etc/hostname"
chroot "$R" passwd -l root >/dev/null
chroot "$R" systemctl mask console-getty.service getty@.service \
    systemd-timesyncd.service apt-daily.timer apt-daily-upgrade.timer >&2 2>&1 || true
# A container with nothing listening for network-online: make it reached at once.
chroot "$R" systemctl mask systemd-networkd-wait-online.service >&2 2>&1 || true
# The cluster stack starts when the cluster test has configured it; pcsd is not used.
chroot "$R" systemctl disable corosync.service pacemaker.service >&2 2>&1 || true
chroot "$R" systemctl mask pcsd.service pcsd-ruby.service >&2 2>&1 || true

"$R/usr/bin/qemu-system-x86_64" --version >/dev/null 2>&1 ||
    chroot "$R" qemu-system-x86_64 --version >&2 || die "qemu-system-x86_64 does not run in the root"
log "systemd $(chroot "$R" systemctl --version | head -n1 | cut -d' ' -f2), $(chroot "$R" qemu-system-x86_64 --version | head -n1)"
case $(chroot "$R" systemctl --version | head -n1 | cut -d' ' -f2) in
252*) ;;
*) die "systemd in the root is not bookworm's 252" ;;
esac

mv "$R" "$OUT"
log "built $OUT in $(($(date +%s) - START)) s ($(du -sh "$OUT" | cut -f1))"
echo "$OUT"
