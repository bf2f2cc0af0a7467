#!/usr/bin/env bash
# A/B of boot levers: each CONFIG is a nox binary plus create options; every
# round boots one VM per config *at the same time* (a paired comparison: on a
# loaded host all configs share the same load), cold, to `create --wait`
# (SSH and cloud-init done), and reads the boot timeline (`info --boot`).
#   sudo scripts/bench-boot.sh ROUNDS LABEL=BIN[,OPTION...] ...
# e.g. scripts/bench-boot.sh 2 base=/tmp/nox-main new=./target/release/nox \
#        new-bios=./target/release/nox,--firmware,bios
# Prints per config: create -> ready, kernel started, SSH (median of rounds).
set -euo pipefail
ROUNDS=$1; shift
IMG=${NOX_TEST_IMAGE:?set NOX_TEST_IMAGE}
W=$(mktemp -d /tmp/nox-bench-boot.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for d in "$W"/*/home; do
        [ -d "$d/vms" ] || continue
        for v in "$d"/vms/*/; do
            [ -d "$v" ] && NOX_HOME=$d "$(cat "$d/../bin")" delete --force "$(basename "$v")" >/dev/null 2>&1 || true
        done
    done
    rm -rf "$W"
}
trap cleanup EXIT
now() { date +%s%N; }
one() { # LABEL ROUND BIN OPTS...
    local label=$1 r=$2 bin=$3; shift 3
    local d=$W/$label-$r; mkdir -p "$d/home"; echo "$bin" >"$d/bin"
    local t0 t1
    t0=$(now)
    NOX_HOME=$d/home "$bin" create "b$r" --image "$IMG" --network user --cpus 2 --memory 1G \
        --wait --timeout 1800 "$@" >"$d/out" 2>&1 || echo "failed" >>"$d/out"
    t1=$(now)
    NOX_HOME=$d/home "$bin" info "b$r" --boot --json >"$d/boot.json" 2>/dev/null || true
    NOX_HOME=$d/home "$bin" delete --force "b$r" >/dev/null 2>&1 || true
    python3 - "$d/boot.json" "$t0" "$t1" "$label" <<'EOF' >"$d/result"
import json, sys
path, t0, t1, label = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
try:
    b = json.load(open(path)).get("boot", [{}])[-1]
except Exception:
    b = {}
ph = dict(b.get("phases", []))
g = b.get("guest") or {}
f = lambda ms: "%.1f" % (ms / 1000) if ms is not None else "-"
print(label, "%.1f" % ((t1 - t0) / 1e9), f(ph.get("kernel")), f(ph.get("root_switched")),
      f(g.get("ssh_ms")), f(g.get("cloud_init_done_ms")), b.get("method", "-"))
EOF
}
echo "boot levers: $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg), $ROUNDS rounds, configs: $*"
printf "%-10s %8s %8s %8s %8s %8s %s\n" config ready kernel root ssh ci method
for r in $(seq 1 "$ROUNDS"); do
    PIDS=()
    for c in "$@"; do
        label=${c%%=*}; rest=${c#*=}
        IFS=, read -r -a parts <<<"$rest"
        one "$label" "$r" "${parts[@]}" &
        PIDS+=($!)
    done
    wait "${PIDS[@]}"
    for c in "$@"; do
        label=${c%%=*}
        printf "%-10s %8s %8s %8s %8s %8s %s\n" $(cat "$W/$label-$r/result")
    done
done
echo "medians (s):"
for c in "$@"; do
    label=${c%%=*}
    printf "%-10s" "$label"
    for col in 2 3 4 5 6; do
        cat "$W/$label"-*/result | awk -v c=$col '{print $c}' | grep -v -- - | sort -n \
            | awk '{a[NR]=$1} END {printf " %8s", (NR ? a[int((NR+1)/2)] : "-")}'
    done
    echo
done
