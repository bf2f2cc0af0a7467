#!/usr/bin/env bash
# The timeline of one warm create, in ms from the create's start:
#   scripts/warm-timeline.sh VM CREATE_START_NS
# (CREATE_START_NS: `date +%s%N` just before `nox create VM ... --wait`).
# Host side from the supervisor's nox.log (its lines carry UTC timestamps)
# and the boot timeline (boot.json: qemu resumed; boot-guest.json: SSH
# answered); guest side from the guest's journal over SSH, monotonic, put
# on the host's clock by taking the kernel's vmgenid reseed ("crng
# reseeded due to virtual machine fork", at resume) as the moment `cont`
# returned (amd64; else the hook's first line). NOX: the nox binary;
# NOX_TIMELINE_ALL=1: every journal line of the guest, not only the hook's,
# networkd's, sshd's and logind's.
set -euo pipefail
VM=$1 T0=$2
NOX=${NOX:-nox}
D=${NOX_HOME:-/var/lib/nox}/vms/$VM
t0_ms=$((T0 / 1000000))
LINES=60
[ -n "${NOX_TIMELINE_ALL:-}" ] && LINES=400
ms() { echo $(($1 - t0_ms)); }
stamp_ms() { date -d "$1" +%s%3N; }
while read -r ts rest; do
    case "$rest" in
    *"resuming warm template"*) echo "$(ms "$(stamp_ms "$ts")") host: state checked, qemu argv ready" ;;
    *"loaded warm template"*) echo "$(ms "$(stamp_ms "$ts")") host: ${rest#*INFO }" ;;
    *" running (qemu pid"*) echo "$(ms "$(stamp_ms "$ts")") host: running (cont done)" ;;
    esac
done < <(grep -E 'resuming warm template|loaded warm template| running \(qemu pid' "$D/nox.log" | tail -n 3)
cont=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["boots"][-1]["started_ms"])' "$D/boot.json")
ssh_ms=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get("ssh_ms", ""))' "$D/boot-guest.json" 2>/dev/null || true)
echo "$(ms "$cont") host: boot timeline starts (after cont)"
[ -n "$ssh_ms" ] && echo "$(ms $((cont + ssh_ms))) host: --wait's SSH probe succeeded"
$NOX ssh "$VM" -- sudo journalctl -b -o short-monotonic --no-pager 2>/dev/null |
    grep -E "${NOX_TIMELINE_ALL:+.|}"'crng reseeded|nox-warm|systemd-networkd\[|sshd(-session)?\[|systemd-logind\[|User Manager|user@|dhcp|DHCP' |
    awk -v cont="$(ms "$cont")" '
        { t = substr($0, index($0, "[") + 1); t = substr(t, 1, index(t, "]") - 1) + 0 }
        /crng reseeded due to virtual machine fork/ && !anchor { anchor = t }
        /nox-warm/ && !anchor { anchor = t }
        anchor && t >= anchor {
            line = substr($0, index($0, "]") + 2)
            sub(/^[^ ]+ /, "", line)
            printf "%d guest: %s\n", cont + (t - anchor) * 1000, substr(line, 1, 110)
        }' | head -n "$LINES"
