#!/usr/bin/env bash
# Installs what nox needs on a Debian 12/13 host (qemu, firmware, ssh client,
# sshd for the `nox --host` tests (tests/remote.rs runs its own on 127.0.0.1),
# dnsmasq for the network tests, the test-image builder's tools, systemd-nspawn
# for the systemd-as-PID-1 tests, pytest for the Python client's tests,
# resource-agents for the OCF agent and its ocf-tester test, virtiofsd for
# `--mount` shares: Debian 13's package, else built from crates.io into
# /usr/local/bin), then builds and
# installs nox to /usr/local/bin and its OCF resource agent (deploy/ocf/nox) as
# /usr/lib/ocf/resource.d/nox/vm (ocf:nox:vm). Run as root. Non-interactive.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive

. /etc/os-release
apt_t=()
if [ "${VERSION_CODENAME:-}" = bookworm ]; then
    # bookworm's qemu (7.2) conflicts with the qemu-utils from backports that
    # these machines carry; take qemu from backports too.
    echo "deb http://deb.debian.org/debian bookworm-backports main" \
        > /etc/apt/sources.list.d/nox-bookworm-backports.list
    apt_t=(-t bookworm-backports)
fi
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${apt_t[@]}" \
    qemu-system-x86 qemu-system-arm qemu-utils ovmf qemu-efi-aarch64
apt-get install -y -qq --no-install-recommends \
    openssh-client openssh-server dnsmasq-base iproute2 mtools dosfstools systemd \
    busybox-static python3 python3-pytest util-linux coreutils passt bash-completion \
    systemd-container mmdebstrap debian-archive-keyring resource-agents libxml2-utils gdisk

# virtiofsd (docs/shared-folders.md): Debian packages it from 13 on
# (/usr/libexec/virtiofsd); Debian 12 has only qemu's old C one, so build
# the Rust one (the same project's) from crates.io, pinned.
VIRTIOFSD_VERSION=1.14.0
if [ -n "$(apt-cache policy virtiofsd 2>/dev/null | awk '/Candidate:/ && $2 != "(none)"')" ]; then
    apt-get install -y -qq --no-install-recommends virtiofsd
elif ! /usr/local/bin/virtiofsd --version 2>/dev/null | grep -qF "$VIRTIOFSD_VERSION"; then
    apt-get install -y -qq --no-install-recommends libseccomp-dev libcap-ng-dev pkg-config
    cargo install --locked --quiet --root /usr/local --version "$VIRTIOFSD_VERSION" virtiofsd
    echo "installed /usr/local/bin/virtiofsd $VIRTIOFSD_VERSION"
fi

if [ "${NOX_SKIP_INSTALL:-}" != 1 ]; then
    cargo build --release --locked
    install -m 0755 target/release/nox /usr/local/bin/nox
    echo "installed /usr/local/bin/nox"
    # Bash completion (loaded on demand by bash-completion; it calls nox back
    # for VM and image names) and the man pages nox.1, nox-COMMAND.1.
    install -d /usr/share/bash-completion/completions /usr/local/share/man/man1
    /usr/local/bin/nox completions bash > /usr/share/bash-completion/completions/nox
    /usr/local/bin/nox man --dir /usr/local/share/man/man1 > /dev/null
    echo "installed /usr/share/bash-completion/completions/nox and /usr/local/share/man/man1/nox.1"
    # The pacemaker resource agent ocf:nox:vm (docs/multi-host.md, "Cluster managers").
    install -D -m 0755 deploy/ocf/nox /usr/lib/ocf/resource.d/nox/vm
    echo "installed /usr/lib/ocf/resource.d/nox/vm"
fi
