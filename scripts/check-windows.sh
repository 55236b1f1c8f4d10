#!/usr/bin/env bash
# Checks that the runtime, including the Windows-only `cmd /C` path of the
# shell call, compiles for Windows. Needs the mingw-w64 C compiler, because
# some dependencies (ring, bundled SQLite) build C code for the target.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v x86_64-w64-mingw32-gcc >/dev/null; then
    if ! { apt-get install -y -q gcc-mingw-w64-x86-64 || { apt-get update -q && apt-get install -y -q gcc-mingw-w64-x86-64; }; } >/dev/null 2>&1; then
        echo "check-windows: cannot install gcc-mingw-w64-x86-64; the Windows build was NOT checked" >&2
        exit 1
    fi
fi
rustup target add x86_64-pc-windows-gnu >/dev/null 2>&1 || rustup target add x86_64-pc-windows-gnu
cargo check --locked -p apex-runtime --lib --bins --target x86_64-pc-windows-gnu \
    --target-dir target/windows-check
echo "check-windows: the runtime compiles for x86_64-pc-windows-gnu"
