#!/usr/bin/env bash
# Builds the example plugins for wasm32-wasip2 and copies each component to
# target/plugins/NAME.wasm.
set -euo pipefail
cd "$(dirname "$0")/.."

rustup target add wasm32-wasip2 >/dev/null 2>&1 || rustup target add wasm32-wasip2

cargo build --quiet --manifest-path plugins/Cargo.toml --target wasm32-wasip2 --release \
    --target-dir target/plugins-build

mkdir -p target/plugins
for name in hello wordcount probe echo-cli fetch; do
    cp "target/plugins-build/wasm32-wasip2/release/$name.wasm" "target/plugins/$name.wasm"
done
