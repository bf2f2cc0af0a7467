#!/usr/bin/env bash
# The test command: unit tests, then the end-to-end tests against a real
# Debian guest (built once by build-test-image.sh and cached outside the repo).
# With NOX_E2E=require a missing prerequisite fails instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${NOX_TEST_IMAGE:-}" ] && [ "$(id -u)" = 0 ]; then
    NOX_TEST_IMAGE=$(scripts/build-test-image.sh | tail -n 1)
    export NOX_TEST_IMAGE
fi
exec cargo nextest run --no-fail-fast "$@"
