#!/bin/bash
# Build a real Debian cloud image (like Debian's "genericcloud" images) from Debian packages, for
# nox's end-to-end tests. The guest boots through firmware + GRUB (SeaBIOS or OVMF on amd64, AAVMF
# on arm64), exactly like a downloaded cloud image; cloud-init reads a NoCloud seed (FAT, label cidata).
#
# Usage: scripts/build-test-image.sh [--arch amd64|arm64]     (as root, no stdin needed)
# Progress goes to stderr; the last line of stdout is the absolute path of the qcow2, cached as
#   ${NOX_TEST_CACHE:-/var/cache/nox-test}/debian-<suite>-<arch>-<sha256(this script)[:12]>.qcow2
# An existing cached image is reused at once.
#
# Guest: trixie, linux-image-cloud-<arch>, cloud-init (NoCloud first), netplan.io rendering for
# systemd-networkd + systemd-resolved, openssh-server (no host keys baked in), cloud-guest-utils (growpart), empty
# /etc/machine-id, locked root, fstab by UUID, C.UTF-8/en_US.UTF-8 generated, no docs/man pages.
# amd64: GPT p14 BIOS boot (GRUB i386-pc) + p15 ESP (EFI/BOOT/BOOTX64.EFI) + p1 ext4 root,
# console=ttyS0,115200. arm64: p15 ESP (EFI/BOOT/BOOTAA64.EFI) + p1 root, console=ttyAMA0,115200.
# Build time here (2 shared cores): amd64 ~3.5-4.5 min, arm64 (under qemu-user) ~21 min.
#
# Build-host Debian packages (missing ones are apt-get installed automatically):
#   mmdebstrap debian-archive-keyring gdisk dosfstools mtools e2fsprogs qemu-utils util-linux
#   arm64 on a non-arm64 host also: qemu-user-static binfmt-support arch-test (or backports'
#   qemu-user + qemu-user-binfmt, whose binfmt.d entry the script registers itself)
#
# Why it is built this way (this host's kernel: no partition scanning on loop devices, no
# device-mapper, no vfat): no loop device or mount is used at all. The root is populated into an
# ext4 image file with `mkfs.ext4 -d`, the ESP is a FAT image file made with mkfs.vfat + mtools,
# and both are dd'd into a GPT disk file at their offsets. GRUB images are made with the guest's
# own grub-mkimage (inside the chroot) and the BIOS stage is written by the guest's grub-bios-setup.
set -euo pipefail

SUITE=trixie
MIRROR=http://deb.debian.org/debian
SECURITY_MIRROR=http://deb.debian.org/debian-security

# Disk layout in 512-byte sectors (genericcloud order: root is partition 1 but last on disk, so
# growpart can grow it).
DISK_SECTORS=$((2 * 1024 * 1024 * 2))      # 2 GiB virtual
BIOS_START=2048 BIOS_END=10239             # p14: 4 MiB BIOS boot (EF02), amd64 only
ESP_START=10240 ESP_END=215039             # p15: 100 MiB EFI system partition (EF00)
ROOT_START=215040                          # p1: ext4 root up to 1 MiB before the end
ROOT_END=$((DISK_SECTORS - 2048 - 1))

log() { printf '[build-test-image %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

SELF=$(readlink -f "${BASH_SOURCE[0]}")

# ---------------------------------------------------------------------------------------------
# mmdebstrap customize hook: runs on the host with $1 = the guest root directory (proc/sys/dev
# are mounted there by mmdebstrap). Everything it needs comes through exported NOX_TI_* variables.
hook_customize() {
    local R=$1
    [[ -d $R/etc ]] || die "hook: $R is not a root directory"
    log "customizing the guest root"

    # Cloud-image identity: no machine id, no host keys, no fixed hostname, no root password.
    : >"$R/etc/machine-id"
    rm -f "$R/var/lib/dbus/machine-id" "$R"/etc/ssh/ssh_host_*_key "$R"/etc/ssh/ssh_host_*_key.pub
    echo localhost >"$R/etc/hostname"
    cat >"$R/etc/hosts" <<'EOF'
127.0.0.1	localhost
::1		localhost ip6-localhost ip6-loopback
ff02::1		ip6-allnodes
ff02::2		ip6-allrouters
EOF
    chroot "$R" passwd -l root >/dev/null

    mkdir -p "$R/boot/efi"
    cat >"$R/etc/fstab" <<EOF
# <file system> <mount point> <type> <options> <dump> <pass>
UUID=$NOX_TI_ROOT_UUID / ext4 rw,discard,errors=remount-ro,x-systemd.growfs 0 1
UUID=$NOX_TI_ESP_UUID /boot/efi vfat umask=0077 0 0
EOF

    # Network: netplan.io + systemd-networkd + systemd-resolved, as in Debian 13's cloud images:
    # cloud-init renders /etc/netplan/50-cloud-init.yaml, and netplan's generator turns it into
    # /run/systemd/network/10-netplan-*.network, which matches the NIC by its permanent MAC.
    # Not ifupdown + isc-dhcp-client: cloud-init 25's fallback config asks for DHCPv6 too, and
    # `ifup` then blocks the boot for dhclient's 300 s timeout on any network without a DHCPv6
    # server (slirp, nox's bridges).
    chroot "$R" systemctl enable systemd-networkd.service >&2
    ln -sfn ../run/systemd/resolve/stub-resolv.conf "$R/etc/resolv.conf"

    # Locales: cloud-init reports an error when its locale is not generated.
    sed -i -e 's/^# *\(en_US.UTF-8 UTF-8\)/\1/' -e 's/^# *\(C.UTF-8 UTF-8\)/\1/' "$R/etc/locale.gen"
    grep -q '^en_US.UTF-8 UTF-8' "$R/etc/locale.gen" || echo 'en_US.UTF-8 UTF-8' >>"$R/etc/locale.gen"
    chroot "$R" locale-gen >&2
    echo 'LANG=C.UTF-8' >"$R/etc/default/locale"

    # cloud-init: make sure NoCloud is looked for (ds-identify finds a FAT volume labelled cidata).
    cat >"$R/etc/cloud/cloud.cfg.d/90_dpkg.cfg" <<'EOF'
# to update this file, run dpkg-reconfigure cloud-init
datasource_list: [ NoCloud, ConfigDrive, OpenStack, Ec2, GCE, Azure, None ]
EOF

    # GRUB defaults like Debian's cloud images: serial console, no menu delay.
    mkdir -p "$R/etc/default/grub.d"
    cat >"$R/etc/default/grub.d/15_nox_cloud.cfg" <<EOF
GRUB_TIMEOUT=0
GRUB_DISABLE_OS_PROBER=true
GRUB_CMDLINE_LINUX_DEFAULT=""
GRUB_CMDLINE_LINUX="$NOX_TI_CMDLINE"
GRUB_TERMINAL="$NOX_TI_GRUB_TERMINAL"
GRUB_SERIAL_COMMAND="serial --speed=115200"
EOF

    install_grub "$R"

    chroot "$R" apt-get clean
    rm -rf "$R"/var/lib/apt/lists/* "$R"/var/cache/debconf/*-old "$R"/var/log/*.log \
        "$R"/var/log/apt/* "$R"/root/.bash_history
}

# GRUB the way grub-install would set it up, without grub-install (it cannot see the ESP or the
# root partition as devices here): modules in /boot/grub/<platform>, an image with an embedded
# config that finds the root by filesystem UUID, and grub.cfg from update-grub.
install_grub() {
    local R=$1 p out=$R/tmp/nox-grub
    mkdir -p "$out"
    cat >"$out/early.cfg" <<EOF
search.fs_uuid $NOX_TI_ROOT_UUID root hd0,gpt1
set prefix=(\$root)'/boot/grub'
EOF
    for p in $NOX_TI_GRUB_PLATFORMS; do
        mkdir -p "$R/boot/grub/$p"
        cp "$R/usr/lib/grub/$p/"*.mod "$R/usr/lib/grub/$p/"*.lst "$R/boot/grub/$p/"
        case $p in
        i386-pc)
            log "grub: i386-pc core.img"
            chroot "$R" grub-mkimage -d /usr/lib/grub/i386-pc -O i386-pc -o /tmp/nox-grub/core.img \
                -c /tmp/nox-grub/early.cfg -p /boot/grub biosdisk part_gpt ext2 search_fs_uuid
            cp "$out/core.img" "$R/usr/lib/grub/i386-pc/boot.img" "$NOX_TI_WORK/"
            ;;
        x86_64-efi | arm64-efi)
            log "grub: $p $NOX_TI_EFI_NAME"
            chroot "$R" grub-mkimage -d "/usr/lib/grub/$p" -O "$p" -o "/tmp/nox-grub/$NOX_TI_EFI_NAME" \
                -c /tmp/nox-grub/early.cfg -p /boot/grub part_gpt part_msdos ext2 fat search_fs_uuid
            cp "$out/$NOX_TI_EFI_NAME" "$NOX_TI_WORK/$NOX_TI_EFI_NAME"
            ;;
        *) die "unknown grub platform $p" ;;
        esac
    done

    # update-grub probes the device of / (here: the build host's disk) and skips roots it cannot
    # map. Answer its probes the way the booted guest would, just for this run.
    mv "$R/usr/sbin/grub-probe" "$R/usr/sbin/grub-probe.nox-real"
    cat >"$R/usr/sbin/grub-probe" <<EOF
#!/bin/sh
target=
for a in "\$@"; do case \$a in --target=*) target=\${a#--target=} ;; esac; done
case \$target in
device) echo /dev/vda1 ;;
disk) echo /dev/vda ;;
fs) echo ext2 ;;
fs_uuid) echo $NOX_TI_ROOT_UUID ;;
partuuid) echo $NOX_TI_ROOT_PARTUUID ;;
partmap) echo gpt ;;
abstraction|fs_label|cryptodisk_uuid) ;;
drive) echo '(hd0,gpt1)' ;;
compatibility_hint) echo hd0,gpt1 ;;
hints_string) echo '--hint-bios=hd0,gpt1 --hint-efi=hd0,gpt1 --hint-baremetal=ahci0,gpt1' ;;
*) exit 1 ;;
esac
EOF
    chmod 755 "$R/usr/sbin/grub-probe"
    # 10_linux only uses root=UUID= when /dev/disk/by-uuid/<uuid> exists.
    mkdir -p "$R/dev/disk/by-uuid"
    ln -sf ../../null "$R/dev/disk/by-uuid/$NOX_TI_ROOT_UUID"
    log "grub: update-grub"
    chroot "$R" update-grub >&2
    rm -rf "$R/dev/disk"
    mv -f "$R/usr/sbin/grub-probe.nox-real" "$R/usr/sbin/grub-probe"
    grep -q "root=UUID=$NOX_TI_ROOT_UUID" "$R/boot/grub/grub.cfg" ||
        die "update-grub wrote no boot entry with root=UUID=$NOX_TI_ROOT_UUID"
    rm -rf "$out"
}

# Little-endian bytes of $1, $2 bytes wide, on stdout.
le_bytes() {
    local v=$1 n=$2 i out=
    for ((i = 0; i < n; i++)); do
        out+=$(printf '\\x%02x' $(((v >> (8 * i)) & 255)))
    done
    printf "$out"
}

# Write GRUB's BIOS stages the way grub-bios-setup does when it embeds core.img in a GPT BIOS boot
# partition (grub-bios-setup itself insists on guessing the device of its module directory, which
# cannot work for a disk image file). Offsets from grub's include/grub/i386/pc/boot.h:
# kernel sector 0x5c, boot drive 0x64, drive check 0x66, BPB 0x03..0x5a, partition table
# 0x1b8..0x1fe; the first blocklist entry {u64 start, u16 len, u16 segment} ends core.img's first
# sector. No Reed-Solomon codes are added (as with grub-install --no-rs-codes).
embed_grub_bios() {
    local disk=$1 core=$2 boot=$3 w=$WORK/bios
    local size nsec
    mkdir -p "$w"
    size=$(stat -c %s "$core")
    nsec=$(((size + 511) / 512))
    ((nsec <= BIOS_END - BIOS_START + 1)) || die "core.img ($nsec sectors) does not fit the BIOS boot partition"
    cp "$core" "$w/core.img"
    truncate -s $((nsec * 512)) "$w/core.img"
    # Sectors 2..n of core.img follow the first one contiguously; then a zero terminator entry.
    { le_bytes 0 12; le_bytes $((BIOS_START + 1)) 8; le_bytes $((nsec - 1)) 2; } |
        dd of="$w/core.img" bs=1 seek=488 count=22 conv=notrunc status=none
    dd if="$boot" of="$w/boot.img" bs=512 count=1 status=none
    dd if="$disk" of="$w/mbr.img" bs=512 count=1 status=none
    dd if="$w/mbr.img" of="$w/boot.img" bs=1 skip=$((0x03)) seek=$((0x03)) count=$((0x5a - 0x03)) conv=notrunc status=none
    dd if="$w/mbr.img" of="$w/boot.img" bs=1 skip=$((0x1b8)) seek=$((0x1b8)) count=$((0x1fe - 0x1b8)) conv=notrunc status=none
    le_bytes "$BIOS_START" 8 | dd of="$w/boot.img" bs=1 seek=$((0x5c)) conv=notrunc status=none
    printf '\xff' | dd of="$w/boot.img" bs=1 seek=$((0x64)) conv=notrunc status=none
    printf '\x90\x90' | dd of="$w/boot.img" bs=1 seek=$((0x66)) conv=notrunc status=none
    dd if="$w/core.img" of="$disk" bs=512 seek="$BIOS_START" conv=notrunc status=none
    dd if="$w/boot.img" of="$disk" bs=512 count=1 conv=notrunc status=none
    rm -rf "$w"
}

if [[ ${1:-} == --hook-customize ]]; then
    hook_customize "$2"
    exit 0
fi

# ---------------------------------------------------------------------------------------------
ARCH=amd64
while [[ $# -gt 0 ]]; do
    case $1 in
    --arch) ARCH=${2:-}; shift 2 || die "--arch needs a value" ;;
    --arch=*) ARCH=${1#--arch=}; shift ;;
    -h | --help) sed -n '2,9p' "$SELF" | sed 's/^# \{0,1\}//' >&2; exit 0 ;;
    *) die "unknown argument: $1 (usage: $0 [--arch amd64|arm64])" ;;
    esac
done
case $ARCH in amd64 | arm64) ;; *) die "unsupported --arch $ARCH (amd64 or arm64)" ;; esac
[[ $EUID -eq 0 ]] || die "must run as root"

CACHE=${NOX_TEST_CACHE:-/var/cache/nox-test}
HASH=$(sha256sum "$SELF" | cut -c1-12)
OUT=$CACHE/debian-$SUITE-$ARCH-$HASH.qcow2
case $OUT in /*) ;; *) OUT=$PWD/$OUT ;; esac
if [[ -f $OUT ]]; then
    log "cached: $OUT"
    echo "$OUT"
    exit 0
fi

# Build-host tools, installed from Debian when missing.
ensure_tools() {
    local -a need=() pkgs=()
    local t
    declare -A pkg_of=(
        [mmdebstrap]=mmdebstrap [sgdisk]=gdisk [mkfs.vfat]=dosfstools [mmd]=mtools [mcopy]=mtools
        [mkfs.ext4]=e2fsprogs [e2fsck]=e2fsprogs [qemu-img]=qemu-utils [unshare]=util-linux
    )
    for t in "${!pkg_of[@]}"; do
        command -v "$t" >/dev/null || need+=("${pkg_of[$t]}")
    done
    [[ -f /usr/share/keyrings/debian-archive-keyring.gpg ]] || need+=(debian-archive-keyring)
    if [[ $ARCH == arm64 && $(dpkg --print-architecture) != arm64 ]]; then
        [[ -e /usr/bin/qemu-aarch64-static || -e /usr/bin/qemu-aarch64 ]] || need+=(qemu-user-static)
        command -v update-binfmts >/dev/null || need+=(binfmt-support)
        command -v arch-test >/dev/null || need+=(arch-test)
    fi
    [[ ${#need[@]} -eq 0 ]] && return 0
    mapfile -t pkgs < <(printf '%s\n' "${need[@]}" | sort -u)
    log "installing build tools: ${pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # CI builds both arches at once: apt's own lock would fail the second
    # build at once, so the builds take turns (flock waits).
    mkdir -p /run/lock
    (
        flock 9
        apt-get update -q >&2 </dev/null
        apt-get install -y -q --no-install-recommends "${pkgs[@]}" >&2 </dev/null
    ) 9>/run/lock/nox-build-tools.lock
}

# Registers binfmt_misc entry $1 from its systemd-binfmt file (binfmt.d(5): /etc over /run over
# /usr/lib, by file name; comment lines start with # or ;), unless binfmt_misc has it already (a
# disabled one is enabled). Backports' qemu-user + qemu-user-binfmt register only this way, and
# nothing runs systemd-binfmt where systemd is not PID 1. The line is written as systemd-binfmt
# writes it: the kernel decodes its \x escapes. NOX_TI_BINFMT_MISC / NOX_TI_BINFMT_D: other places
# (for checking this function by hand).
register_from_binfmt_d() {
    local name=$1 misc=${NOX_TI_BINFMT_MISC:-/proc/sys/fs/binfmt_misc} dir conf line
    if [[ -e $misc/$name ]]; then
        [[ $(head -n 1 "$misc/$name") == enabled ]] || echo 1 >"$misc/$name"
        return 0
    fi
    for dir in ${NOX_TI_BINFMT_D:-/etc/binfmt.d /run/binfmt.d /usr/lib/binfmt.d}; do
        conf=$dir/$name.conf
        [[ -f $conf ]] || continue
        line=$(grep -v -e '^[[:space:]]*[#;]' -e '^[[:space:]]*$' "$conf" | head -n 1)
        [[ -n $line ]] || return 1
        log "registering $name in binfmt_misc from $conf"
        printf '%s' "$line" >"$misc/register"
        return
    done
    return 1
}

# Running arm64 maintainer scripts on another architecture needs qemu-user registered in
# binfmt_misc (which is not mounted on hosts where systemd is not PID 1): bookworm's
# qemu-user-static through update-binfmts, backports' qemu-user-binfmt through binfmt.d.
ensure_foreign_exec() {
    [[ $ARCH != "$(dpkg --print-architecture)" ]] || return 0
    arch-test "$ARCH" >/dev/null 2>&1 && return 0
    mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
    update-binfmts --enable qemu-aarch64 >&2 || true
    register_from_binfmt_d qemu-aarch64 || true
    arch-test "$ARCH" >&2 || die "this host cannot execute $ARCH binaries (binfmt_misc + qemu-user-static, or qemu-user + qemu-user-binfmt)"
}

# Work in a private mount namespace so nothing mounted during the build (by mmdebstrap) can
# outlive it or be kept busy by another process.
if [[ -z ${NOX_TI_UNSHARED:-} ]]; then
    ensure_tools
    ensure_foreign_exec
    NOX_TI_UNSHARED=1 exec unshare -m --propagation private "$SELF" --arch "$ARCH" </dev/null
fi

START=$(date +%s)
mkdir -p "$CACHE"
WORK=$(mktemp -d "$CACHE/.build-$ARCH-XXXXXX")
cleanup() {
    local m
    if [[ -n ${WORK:-} && -d $WORK ]]; then
        # Unmount leftovers below WORK (deepest first), then delete without crossing mounts.
        awk -v w="$WORK/" 'index($5, w) == 1 { print $5 }' /proc/self/mountinfo | sort -r |
            while read -r m; do umount -l "$m" || true; done
        rm -rf --one-file-system "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

export NOX_TI_WORK=$WORK
export NOX_TI_ROOT_UUID NOX_TI_ROOT_PARTUUID NOX_TI_ESP_UUID
NOX_TI_ROOT_UUID=$(cat /proc/sys/kernel/random/uuid)
NOX_TI_ROOT_PARTUUID=$(cat /proc/sys/kernel/random/uuid)
ESP_SERIAL=$(od -An -N4 -tx4 /dev/urandom | tr -d ' \n' | tr a-f A-F)
NOX_TI_ESP_UUID=${ESP_SERIAL:0:4}-${ESP_SERIAL:4:4}

case $ARCH in
amd64)
    KERNEL=linux-image-cloud-amd64
    GRUB_PKGS=(grub-efi-amd64 grub-pc-bin)
    export NOX_TI_GRUB_PLATFORMS="i386-pc x86_64-efi" NOX_TI_EFI_NAME=BOOTX64.EFI
    export NOX_TI_CMDLINE="console=tty0 console=ttyS0,115200 earlyprintk=ttyS0,115200 consoleblank=0"
    export NOX_TI_GRUB_TERMINAL="console serial"
    ;;
arm64)
    KERNEL=linux-image-cloud-arm64
    GRUB_PKGS=(grub-efi-arm64)
    export NOX_TI_GRUB_PLATFORMS="arm64-efi" NOX_TI_EFI_NAME=BOOTAA64.EFI
    export NOX_TI_CMDLINE="console=tty0 console=ttyAMA0,115200 consoleblank=0"
    export NOX_TI_GRUB_TERMINAL="console"
    ;;
esac

PACKAGES=(
    systemd-sysv udev dbus "$KERNEL" initramfs-tools cloud-init cloud-guest-utils fdisk
    openssh-server e2fsprogs locales systemd-resolved iproute2 netbase sudo ca-certificates
    procps less netplan.io "${GRUB_PKGS[@]}"
)

# The empty GPT disk (grub-bios-setup writes into it during the hook).
log "partitioning a $((DISK_SECTORS / 2048)) MiB GPT disk"
truncate -s $((DISK_SECTORS * 512)) "$WORK/disk.raw"
sgdisk_args=()
[[ $ARCH == amd64 ]] && sgdisk_args+=(-n "14:$BIOS_START:$BIOS_END" -t 14:EF02 -c 14:bios)
sgdisk_args+=(-n "15:$ESP_START:$ESP_END" -t 15:EF00 -c 15:efi
    -n "1:$ROOT_START:$ROOT_END" -t 1:8300 -c 1:root -u "1:$NOX_TI_ROOT_PARTUUID")
# Not -q: with -q this sgdisk exits 0 without writing anything.
sgdisk "${sgdisk_args[@]}" "$WORK/disk.raw" >&2

log "mmdebstrap $SUITE/$ARCH: ${PACKAGES[*]}"
mmdebstrap --mode=root --variant=apt --arch="$ARCH" --format=directory \
    --include="$(IFS=,; echo "${PACKAGES[*]}")" \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/lintian/*' \
    --customize-hook="\"$SELF\" --hook-customize \"\$1\"" \
    "$SUITE" "$WORK/root" \
    "deb $MIRROR $SUITE main" "deb $MIRROR $SUITE-updates main" \
    "deb $SECURITY_MIRROR $SUITE-security main" >&2

[[ -f $WORK/$NOX_TI_EFI_NAME ]] || die "no $NOX_TI_EFI_NAME was built"

log "root filesystem (ext4, UUID $NOX_TI_ROOT_UUID)"
ROOT_BYTES=$(((ROOT_END - ROOT_START + 1) * 512))
mkfs.ext4 -q -F -U "$NOX_TI_ROOT_UUID" -d "$WORK/root" "$WORK/root.img" "$((ROOT_BYTES / 1024))k" >&2
rc=0
e2fsck -f -y "$WORK/root.img" >&2 || rc=$?
[[ $rc -le 1 ]] || die "e2fsck of the root image failed ($rc)"
rm -rf --one-file-system "$WORK/root"

log "EFI system partition (FAT, $NOX_TI_ESP_UUID)"
truncate -s $(((ESP_END - ESP_START + 1) * 512)) "$WORK/esp.img"
mkfs.vfat -F 32 -n EFI -i "$ESP_SERIAL" "$WORK/esp.img" >&2
mmd -i "$WORK/esp.img" ::/EFI ::/EFI/BOOT
mcopy -i "$WORK/esp.img" "$WORK/$NOX_TI_EFI_NAME" "::/EFI/BOOT/$NOX_TI_EFI_NAME"

log "assembling the disk"
dd if="$WORK/esp.img" of="$WORK/disk.raw" bs=512 seek=$ESP_START conv=notrunc,sparse status=none
dd if="$WORK/root.img" of="$WORK/disk.raw" bs=1M seek=$((ROOT_START / 2048)) conv=notrunc,sparse status=none
rm -f "$WORK/esp.img" "$WORK/root.img"
if [[ $ARCH == amd64 ]]; then
    [[ -f $WORK/core.img && -f $WORK/boot.img ]] || die "no GRUB BIOS images were built"
    embed_grub_bios "$WORK/disk.raw" "$WORK/core.img" "$WORK/boot.img"
fi
sgdisk -v "$WORK/disk.raw" >&2

log "converting to a compressed qcow2"
qemu-img convert -c -O qcow2 "$WORK/disk.raw" "$WORK/image.qcow2"
mv -f "$WORK/image.qcow2" "$OUT"

log "done in $(($(date +%s) - START)) s: $OUT ($(du -h "$OUT" | cut -f1), $(stat -c %s "$OUT") bytes)"
echo "$OUT"
