#!/usr/bin/env bash
# Installs the toolchain that build.sh uses into DIR and prints the path of
# the `zig` binary; progress goes to stderr. The toolchain is Zig from the
# `ziglang` package on PyPI, whose `zig cc` is clang with wasi-libc for
# wasm32-wasi, and wit-bindgen-cli from crates.io, with only its C
# generator, in DIR/bin.
#
# Usage: install-toolchain.sh DIR
# Running it again installs only what is missing or at another version.
# Building wit-bindgen takes a few minutes on two cores the first time.
set -euo pipefail

ZIGLANG_VERSION=0.17.1
WIT_BINDGEN_VERSION=0.57.1

if [ $# -ne 1 ]; then
    echo "usage: $0 DIR" >&2
    exit 2
fi
mkdir -p "$1"
dir=$(cd "$1" && pwd)

installed=$("$dir/bin/python" -m pip show ziglang 2>/dev/null | sed -n 's/^Version: //p' || true)
if [ "$installed" != "$ZIGLANG_VERSION" ]; then
    [ -x "$dir/bin/python" ] || python3 -m venv "$dir" >&2
    "$dir/bin/python" -m pip install --quiet --disable-pip-version-check \
        "ziglang==$ZIGLANG_VERSION" >&2
fi

if [ "$("$dir/bin/wit-bindgen" --version 2>/dev/null || true)" != "wit-bindgen-cli $WIT_BINDGEN_VERSION" ]; then
    cargo install wit-bindgen-cli --locked --quiet --version "$WIT_BINDGEN_VERSION" \
        --no-default-features --features c --root "$dir" >&2
fi

"$dir/bin/python" -c 'import ziglang, os; print(os.path.join(os.path.dirname(ziglang.__file__), "zig"))'
