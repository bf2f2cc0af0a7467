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

# bench_create HOME BIN NAME ARGS...: `create NAME ARGS... --wait` timed
# (prints its seconds; the line and, with NOX_BENCH_TIMELINE=1, the warm
# timeline go to stderr).
bench_create() {
    local home=$1 bin=$2 name=$3 t0 s
    shift 3
    t0=$(bench_now)
    NOX_HOME=$home $bin create "$name" "$@" --wait --timeout 600 >/dev/null
    s=$(bench_secs "$t0" "$(bench_now)")
    echo "create $name --wait ($bin): $s s (load $(cut -d' ' -f1 /proc/loadavg))" >&2
    if [ -n "${NOX_BENCH_TIMELINE:-}" ]; then
        NOX_HOME=$home NOX=$bin scripts/warm-timeline.sh "$name" "$t0" >&2 || true
    fi
    echo "$s"
}

# bench_ab RUNS WHAT HOME_B: $NOX (in $NOX_HOME) against $NOX_BENCH_AB (in
# HOME_B), RUNS creates each through the caller's `create HOME BIN NAME`,
# interleaved, each VM deleted before the next (NOX_BENCH_KEEP=1: kept
# running); then both medians and the ratio B/A.
bench_ab() {
    local runs=$1 what=$2 home_b=$3 b=$NOX_BENCH_AB i x order ma mb
    local -a ta=() tb=()
    for i in $(seq "$runs"); do
        if [ $((i % 2)) = 1 ]; then order="a b"; else order="b a"; fi
        for x in $order; do
            if [ "$x" = a ]; then
                ta+=("$(create "$NOX_HOME" "$NOX" "a$i")")
                [ -n "${NOX_BENCH_KEEP:-}" ] || NOX_HOME=$NOX_HOME $NOX delete --force "a$i" >/dev/null
            else
                tb+=("$(create "$home_b" "$b" "b$i")")
                [ -n "${NOX_BENCH_KEEP:-}" ] || NOX_HOME=$home_b $b delete --force "b$i" >/dev/null
            fi
        done
    done
    ma=$(bench_median "${ta[@]}") mb=$(bench_median "${tb[@]}")
    echo "A $NOX: $what median $ma s (${ta[*]})"
    echo "B $b: $what median $mb s (${tb[*]})"
    awk -v a="$ma" -v b="$mb" 'BEGIN { printf "ratio B/A: %.2f\n", b / a }'
}
