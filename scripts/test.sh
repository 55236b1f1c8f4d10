#!/usr/bin/env bash
# Runs the whole test suite: unit tests, signing vectors, and integration
# tests that start the real server on 127.0.0.1 with real components, the
# tours in every language among them. Ends with one line that totals every
# test binary: "N passed, N failed".
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/build-plugins.sh
# The tours need their own toolchains (PyPI, npm), installed under target/.
scripts/build-tours.sh

log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --locked --no-fail-fast "$@" 2>&1 | tee "$log" || status=$?

awk '/^test result:/ {
    for (i = 2; i <= NF; i++) {
        if ($i == "passed;") passed += $(i - 1)
        if ($i == "failed;") failed += $(i - 1)
    }
}
END { printf "%d passed, %d failed\n", passed, failed }' "$log"
exit "$status"
