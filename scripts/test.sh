#!/usr/bin/env bash
# The test command: unit tests, then the end-to-end tests against a real
# Debian guest (built once by build-test-image.sh and cached outside the repo).
# With NOX_E2E=require a missing prerequisite fails instead of skipping.
# NOX_SKIP_ARM64=1 skips the arm64 guest (its image takes ~17 min to build):
# the image is not built and its test prints a skip, even under
# NOX_E2E=require, since skipping it was asked for explicitly.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ]; then
    # Built once per script version, cached under /var/cache/nox-test.
    if [ -z "${NOX_TEST_IMAGE:-}" ]; then
        NOX_TEST_IMAGE=$(scripts/build-test-image.sh --arch amd64 | tail -n 1)
        export NOX_TEST_IMAGE
    fi
    if [ -z "${NOX_TEST_IMAGE_ARM64:-}" ] && [ "${NOX_SKIP_ARM64:-}" != 1 ]; then
        NOX_TEST_IMAGE_ARM64=$(scripts/build-test-image.sh --arch arm64 | tail -n 1)
        export NOX_TEST_IMAGE_ARM64
    fi
    # A bookworm root that systemd-nspawn boots with systemd as PID 1
    # (tests/systemd_pid1.rs, and with its cluster stack tests/cluster.rs),
    # cached the same way.
    if [ -z "${NOX_SYSTEMD_ROOT:-}" ]; then
        NOX_SYSTEMD_ROOT=$(scripts/build-systemd-root.sh | tail -n 1)
        export NOX_SYSTEMD_ROOT
    fi
fi
exec cargo nextest run --no-fail-fast "$@"
