#!/usr/bin/env bash
# nox against libvirt/virt-install, side by side on one host and one image:
# create -> first SSH login and -> cloud-init done, cold (a fresh overlay and
# a first boot of cloud-init each time), RUNS runs each, interleaved (the
# order alternates), then medians and the ratio nox/libvirt.
#   sudo scripts/bench-vs-libvirt.sh [RUNS]      (default 3; root)
# Both get the same vCPUs and memory (NOX_BENCH_CPUS, NOX_BENCH_MEMORY_MIB),
# the same overlay on the same base, the same cloud-init seed (nox's, with
# its pinned host key) and the same MAC, on one bridge this script creates
# (noxbench0, 10.78.0.0/24, dnsmasq without a router: the guests reach
# nothing beyond it) and removes. SSH is polled the same way for both, at
# the address dnsmasq leased. libvirt: from bookworm-backports (see
# ../shared/TESTING.md); without systemd this script starts virtlogd and
# libvirtd itself and stops what it started.
# NOX_BENCH_NOX_NET=default: nox's VMs take nox's defaults instead (no
# --network: user networking through passt where it is installed) and are
# timed by `nox create --wait` itself (first SSH from the VM's boot
# report, cloud-init done when --wait returns), as a user gets them;
# libvirt's stay on the bridge. NOX_BENCH_BIN=PATH uses that nox binary
# (else a release build).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
CPUS=${NOX_BENCH_CPUS:-2}
MEM=${NOX_BENCH_MEMORY_MIB:-1024}
BR=noxbench0
NET=10.78.0
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
for t in virt-install virsh libvirtd virtlogd dnsmasq qemu-img ssh; do
    command -v "$t" >/dev/null || { echo "missing $t (libvirt: see shared/TESTING.md)" >&2; exit 1; }
done
. scripts/bench-lib.sh
bench_nox
IMG=${NOX_TEST_IMAGE:-$(scripts/build-test-image.sh | tail -n 1)}
W=$(mktemp -d /tmp/nox-vs-libvirt.XXXXXX)
export NOX_HOME=$W/nox
LV=/var/lib/libvirt/images/noxbench
STARTED_PIDS=()
DNSMASQ_PID=""
cleanup() {
    set +e
    bench_delete_vms
    for dom in $(virsh -c qemu:///system list --all --name 2>/dev/null | grep '^noxbench-'); do
        virsh -c qemu:///system destroy "$dom" >/dev/null 2>&1
        virsh -c qemu:///system undefine "$dom" --nvram >/dev/null 2>&1
    done
    bench_bridge_down "$BR"
    for p in "${STARTED_PIDS[@]}"; do kill "$p" 2>/dev/null; done
    rm -rf "$W" "$LV"
}
trap cleanup EXIT

# libvirt's daemons, unless already running.
if ! virsh -c qemu:///system version >/dev/null 2>&1; then
    if ! pgrep -x virtlogd >/dev/null; then
        virtlogd -d --pid-file "$W/virtlogd.pid"; sleep 0.5
        STARTED_PIDS+=("$(cat "$W/virtlogd.pid")")
    fi
    libvirtd -d --pid-file "$W/libvirtd.pid"
    for _ in $(seq 50); do virsh -c qemu:///system version >/dev/null 2>&1 && break; sleep 0.2; done
    STARTED_PIDS+=("$(cat "$W/libvirtd.pid")")
fi

bench_bridge "$BR" "$NET" "$W"

$NOX image import "$IMG" >/dev/null
mkdir -p "$LV"
# libvirt's qemu runs as its own user: give it a copy of the base it can read.
cp "$IMG" "$LV/base.qcow2"; chmod 0644 "$LV/base.qcow2"

now() { date +%s%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", (b - a) / 1e9 }'; }
lease_ip() { awk -v m="$1" '$2 == m { print $3 }' "$W/leases" | tail -n 1; }

# ssh_times NAME T0: prints "SSH_SECS CLOUD_INIT_SECS" (each from T0), using
# the nox VM NAME's key and pinned host key, at its MAC's leased address.
ssh_times() {
    local vm=$NOX_HOME/vms/$1 t0=$2 mac ip t_ssh t_ci
    mac=$(sed -n 's/.*"mac": "\(.*\)".*/\1/p' "$vm/spec.json")
    local ssh=(ssh -o UserKnownHostsFile="$vm/known_hosts" -o HostKeyAlias="nox-$1"
        -o StrictHostKeyChecking=yes -o BatchMode=yes -o ConnectTimeout=5 -o LogLevel=ERROR
        -o IdentitiesOnly=yes -i "$vm/id_ed25519")
    local deadline=$(( $(date +%s) + 900 ))
    while :; do
        ip=$(lease_ip "$mac")
        if [ -n "$ip" ] && "${ssh[@]}" "nox@$ip" true 2>/dev/null; then break; fi
        [ "$(date +%s)" -gt "$deadline" ] && { echo "timeout timeout"; return; }
        sleep 0.5
    done
    t_ssh=$(now)
    "${ssh[@]}" "nox@$ip" cloud-init status --wait >/dev/null 2>&1 || true
    t_ci=$(now)
    echo "$(secs "$t0" "$t_ssh") $(secs "$t0" "$t_ci")"
}

run_nox() {
    local name=nox-$1 t0
    t0=$(now)
    if [ "${NOX_BENCH_NOX_NET:-}" = default ]; then
        local t_ci started ssh_ms
        $NOX create "$name" --image "$IMG" --cpus "$CPUS" --memory "${MEM}M" --wait --timeout 900 >/dev/null
        t_ci=$(now)
        started=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["boots"][-1]["started_ms"])' "$NOX_HOME/vms/$name/boot.json")
        ssh_ms=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["ssh_ms"])' "$NOX_HOME/vms/$name/boot-guest.json")
        echo "$(secs "$t0" $(((started + ssh_ms) * 1000000))) $(secs "$t0" "$t_ci")"
    else
        $NOX create "$name" --image "$IMG" --network "bridge:$BR" --cpus "$CPUS" --memory "${MEM}M" >/dev/null
        ssh_times "$name" "$t0"
    fi
    $NOX delete --force "$name" >/dev/null
}

run_libvirt() {
    local name=lv-$1 dom=noxbench-$1 t0 mac
    # nox makes the overlay, keys and seed (not timed); libvirt boots them.
    $NOX create "$name" --image "$IMG" --network "bridge:$BR" --cpus "$CPUS" --memory "${MEM}M" --no-start >/dev/null
    mac=$(sed -n 's/.*"mac": "\(.*\)".*/\1/p' "$NOX_HOME/vms/$name/spec.json")
    qemu-img create -q -f qcow2 -b "$LV/base.qcow2" -F qcow2 "$LV/$dom.qcow2" 10G
    cp "$NOX_HOME/vms/$name/seed.img" "$LV/$dom-seed.img"
    t0=$(now)
    virt-install -q --connect qemu:///system --name "$dom" --virt-type qemu \
        --vcpus "$CPUS" --memory "$MEM" --import \
        --osinfo detect=on,require=off \
        --disk "$LV/$dom.qcow2,bus=virtio" --disk "$LV/$dom-seed.img,device=disk,bus=virtio" \
        --network "bridge=$BR,mac=$mac,model=virtio" --graphics none --noautoconsole >/dev/null
    ssh_times "$name" "$t0"
    [ "$1" = 1 ] && virsh -c qemu:///system dumpxml "$dom" \
        | grep -oE "<type arch[^>]*machine='[^']*'|<cpu mode='[^']*'|<model[^>]*>[^<]*" | tr '\n' ' ' >"$W/lvconf"
    virsh -c qemu:///system destroy "$dom" >/dev/null 2>&1 || true
    virsh -c qemu:///system undefine "$dom" >/dev/null
    rm -f "$LV/$dom.qcow2" "$LV/$dom-seed.img"
    $NOX delete --force "$name" >/dev/null
}

echo "nox${NOX_BENCH_NOX_NET:+ ($NOX_BENCH_NOX_NET network)} vs libvirt (bridge): $(uname -m), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg), guest ${CPUS} vCPU ${MEM} MiB, image $(basename "$IMG"), $RUNS runs"
: >"$W/res-nox"; : >"$W/res-libvirt"
for i in $(seq 1 "$RUNS"); do
    if [ $((i % 2)) = 1 ]; then order="nox libvirt"; else order="libvirt nox"; fi
    for who in $order; do
        r=$(run_"$who" "$i")
        echo "$r" >>"$W/res-$who"
        printf "run %s %-8s ssh %6s s  cloud-init done %6s s\n" "$i" "$who" $r
    done
done
[ -s "$W/lvconf" ] && echo "libvirt chose: $(cat "$W/lvconf")"
# Medians of the runs that finished; timed-out runs are counted apart.
median() {
    grep -v timeout | sort -n | awk '{a[NR]=$1} END {
        if (!NR) print "-"; else if (NR % 2) print a[(NR+1)/2]; else printf "%.1f\n", (a[NR/2] + a[NR/2+1]) / 2 }'
}
for col in 1 2; do
    what=$([ $col = 1 ] && echo "first SSH" || echo "cloud-init done")
    n=$(cut -d' ' -f$col "$W/res-nox" | median)
    l=$(cut -d' ' -f$col "$W/res-libvirt" | median)
    printf "%-16s nox %6s s   libvirt %6s s   ratio nox/libvirt %s\n" "$what:" "$n" "$l" \
        "$(awk -v n="$n" -v l="$l" 'BEGIN { if (n + 0 > 0 && l + 0 > 0) printf "%.2f", n / l; else print "-" }')"
done
for who in nox libvirt; do
    t=$(grep -c timeout "$W/res-$who" || true)
    [ "$t" != 0 ] && echo "$who: $t of $RUNS runs timed out (not in the medians)"
done
true
