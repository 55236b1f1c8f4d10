#!/usr/bin/env bash
# Builds the example plugins for wasm32-wasip2 and copies each component to
# target/plugins/NAME.wasm.
set -euo pipefail
cd "$(dirname "$0")/.."

rustup target add wasm32-wasip2 >/dev/null 2>&1 || rustup target add wasm32-wasip2

cargo build --quiet --manifest-path plugins/Cargo.toml --target wasm32-wasip2 --release \
    --target-dir target/plugins-build

mkdir -p target/plugins
built=target/plugins-build/wasm32-wasip2/release
for name in hello wordcount probe echo-cli fetch shell-run git-sync; do
    # A library's file name has `_` where the package name has `-`.
    source="$built/$name.wasm"
    [ -f "$source" ] || source="$built/${name//-/_}.wasm"
    cp "$source" "target/plugins/$name.wasm"
done
