#!/usr/bin/env bash
# create -> SSH + cloud-init done (`create --wait`), from the test image
# against from a template committed from it (`nox image commit`), RUNS pairs
# interleaved, then medians and the ratio template/image.
#   sudo scripts/bench-template.sh [RUNS]      (default 2; root)
# On a bridge this script creates (noxtpl0, 10.79.0.0/24, dnsmasq without a
# router: the guests reach nothing beyond it) and removes.
# NOX_BENCH_BIN=PATH uses that nox binary (else a release build).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-2}
BR=noxtpl0
NET=10.79.0
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
. scripts/bench-lib.sh
bench_nox
IMG=${NOX_TEST_IMAGE:-$(scripts/build-test-image.sh | tail -n 1)}
W=$(mktemp -d /tmp/nox-bench-template.XXXXXX)
export NOX_HOME=$W/nox
DNSMASQ_PID=""
cleanup() {
    set +e
    bench_delete_vms
    bench_bridge_down "$BR"
    rm -rf "$W"
}
trap cleanup EXIT

bench_bridge "$BR" "$NET" "$W"

now() { date +%s%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", (b - a) / 1e9 }'; }
create() { # NAME IMAGE -> seconds to SSH + cloud-init done
    local t0; t0=$(now)
    $NOX create "$1" --image "$2" --network "bridge:$BR" --wait --timeout 900 >/dev/null
    secs "$t0" "$(now)"
}

echo "preparing the template (boot, commit)" >&2
create prep "$IMG" >/dev/null
t0=$(now)
$NOX image commit prep --as bench-tpl >/dev/null
echo "image commit: $(secs "$t0" "$(now)") s" >&2
$NOX delete --force prep >/dev/null

IMG_T=() TPL_T=()
for i in $(seq "$RUNS"); do
    if [ $((i % 2)) = 1 ]; then order="image template"; else order="template image"; fi
    for what in $order; do
        if [ "$what" = image ]; then
            s=$(create "i$i" "$IMG"); IMG_T+=("$s"); $NOX delete --force "i$i" >/dev/null
        else
            s=$(create "t$i" bench-tpl); TPL_T+=("$s"); $NOX delete --force "t$i" >/dev/null
        fi
        echo "run $i $what: $s s" >&2
    done
done
median() { printf '%s\n' "$@" | sort -n | awk '{ a[NR] = $1 } END { if (NR % 2) print a[(NR + 1) / 2]; else printf "%.1f\n", (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
mi=$(median "${IMG_T[@]}"); mt=$(median "${TPL_T[@]}")
echo "create --wait from the image: median $mi s (${IMG_T[*]})"
echo "create --wait from the template: median $mt s (${TPL_T[*]})"
awk -v a="$mt" -v b="$mi" 'BEGIN { printf "ratio template/image: %.2f\n", a / b }'
