#!/bin/bash
# Compares `nox` pull throughput with curl for the same file from the same loopback server
# (tests/support/http_server.py, which serves with sendfile).
# Usage: scripts/bench-download.sh [SIZE_MIB] [RUNS]   (default 1024 MiB, 3 runs)
# Needs: a release build of examples/pull (built here if missing), python3, curl, sha256sum.
set -euo pipefail
size=${1:-1024}
runs=${2:-3}
here=$(cd "$(dirname "$0")/.." && pwd)
target=${CARGO_TARGET_DIR:-$here/target}
pull=$target/release/examples/pull
[ -x "$pull" ] || (cd "$here" && cargo build --release --example pull)

work=$(mktemp -d)
srv_pid=
cleanup() { [ -n "$srv_pid" ] && kill "$srv_pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

# A raw disk (boot signature at 510) of incompressible data.
mkdir -p "$work/srv"
head -c $((size * 1048576)) /dev/urandom > "$work/srv/disk.img"
printf '\x55\xaa' | dd of="$work/srv/disk.img" bs=1 seek=510 conv=notrunc status=none
sha256=$(sha256sum "$work/srv/disk.img" | cut -d' ' -f1)
sha512=$(sha512sum "$work/srv/disk.img" | cut -d' ' -f1)

python3 "$here/tests/support/http_server.py" --dir "$work/srv" > "$work/port" &
srv_pid=$!
for _ in $(seq 50); do [ -s "$work/port" ] && break; sleep 0.1; done
url="http://127.0.0.1:$(cat "$work/port")/disk.img"

now() { date +%s.%N; }
rate() { awk -v s="$size" -v a="$1" -v b="$2" 'BEGIN { printf "%.0f MiB/s (%.2f s)", s / (b - a), b - a }'; }

echo "file: $size MiB on loopback; $runs runs each"
for i in $(seq "$runs"); do
  rm -f "$work/curl.out"
  t0=$(now); curl -sS -o "$work/curl.out" "$url"; t1=$(now)
  echo "curl -o file                  run $i: $(rate "$t0" "$t1")"
  rm -f "$work/curl.out"
  t0=$(now); curl -sS "$url" | sha256sum > /dev/null; t1=$(now)
  echo "curl | sha256sum              run $i: $(rate "$t0" "$t1")"
  rm -rf "$work/cache"
  t0=$(now); "$pull" "$work/cache" "$url" --checksum "sha256:$sha256" --quiet > /dev/null; t1=$(now)
  echo "nox pull (sha256)             run $i: $(rate "$t0" "$t1")"
  rm -rf "$work/cache"
  t0=$(now); "$pull" "$work/cache" "$url" --checksum "sha512:$sha512" --quiet > /dev/null; t1=$(now)
  echo "nox pull (sha256 + sha512)    run $i: $(rate "$t0" "$t1")"
done
