#!/usr/bin/env bash
# Runs the whole test suite: unit tests, signing vectors, and integration
# tests that start the real server on 127.0.0.1 with real components.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/build-plugins.sh
cargo test --workspace --locked "$@"
