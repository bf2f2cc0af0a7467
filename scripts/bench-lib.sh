# Sourced by the benchmarks (scripts/bench*.sh): what they share.

# Sets NOX: NOX_BENCH_BIN, else a release build of this tree.
bench_nox() {
    if [ -n "${NOX_BENCH_BIN:-}" ]; then
        NOX=$NOX_BENCH_BIN
    else
        cargo build --release --quiet
        NOX=${CARGO_TARGET_DIR:-$PWD/target}/release/nox
    fi
}

# bench_bridge BR NET DIR: bridge BR with NET.1/24 and a dnsmasq on it
# (no router: the guests reach nothing beyond it; leases in DIR/leases);
# sets DNSMASQ_PID. bench_bridge_down BR removes both.
bench_bridge() {
    ip link add "$1" type bridge
    ip addr add "$2.1/24" dev "$1"
    ip link set "$1" up
    dnsmasq --bind-interfaces --interface="$1" --port=0 --no-ping --dhcp-option=3 \
        --dhcp-range="$2.10,$2.250,1h" --dhcp-leasefile="$3/leases" --pid-file="$3/dnsmasq.pid"
    sleep 0.3
    DNSMASQ_PID=$(cat "$3/dnsmasq.pid")
}
bench_bridge_down() {
    [ -n "${DNSMASQ_PID:-}" ] && kill "$DNSMASQ_PID" 2>/dev/null
    ip link del "$1" 2>/dev/null
}

# Deletes every VM of $NOX_HOME (the benchmarks' clean-up, set +e).
bench_delete_vms() {
    local d
    for d in "$NOX_HOME"/vms/*/; do
        [ -d "$d" ] && $NOX delete --force "$(basename "$d")" >/dev/null 2>&1
    done
}

# bench_now: ns since the epoch; bench_secs A B: B - A in seconds, 2
# decimals; bench_median X...: the median of numbers.
bench_now() { date +%s%N; }
bench_secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b - a) / 1e9 }'; }
bench_median() {
    printf '%s\n' "$@" | sort -n |
        awk '{ a[NR] = $1 } END { if (NR % 2) print a[(NR + 1) / 2]; else printf "%.2f\n", (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}
