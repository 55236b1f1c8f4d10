#!/usr/bin/env bash
# Builds c-tour as a WASI preview-1 reactor module that carries the
# `apex:task/task` world, and writes it to OUT.
#
# Usage: build.sh OUT
# The module is not a component yet: `apex component new OUT -o COMPONENT`
# wraps it with the preview-1 reactor adapter, and the component is what
# `apex upload` takes. ZIG and WIT_BINDGEN name the tools, defaulting to
# DIR/.../zig and DIR/bin/wit-bindgen of TOOLCHAIN (install-toolchain.sh DIR),
# else `zig` and `wit-bindgen` on PATH. Zig's caches go under
# ZIG_CACHE_DIR, default target/zig-cache at the repository root.
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 OUT" >&2
    exit 2
fi
mkdir -p "$(dirname "$1")"
out=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
here=$(cd "$(dirname "$0")" && pwd)

if [ -n "${TOOLCHAIN:-}" ]; then
    zig=${ZIG:-$("$TOOLCHAIN/bin/python" -c 'import ziglang, os; print(os.path.join(os.path.dirname(ziglang.__file__), "zig"))')}
    wit_bindgen=${WIT_BINDGEN:-$TOOLCHAIN/bin/wit-bindgen}
else
    zig=${ZIG:-zig}
    wit_bindgen=${WIT_BINDGEN:-wit-bindgen}
fi
cache=${ZIG_CACHE_DIR:-$here/../../target/zig-cache}
mkdir -p "$cache"

generated=$(mktemp -d)
trap 'rm -rf "$generated"' EXIT

# Writes task.c, task.h and task_component_type.o, the object that carries
# the world in a `component-type:task` custom section.
"$wit_bindgen" c --world apex:task/task --out-dir "$generated" "$here/../../wit" >/dev/null 2>&1

# A reactor module has no `main`: wasi-libc's `_initialize` runs the C
# constructors, and the component that wit-component makes of the module
# calls it at instantiation. `-s` strips debug info and names, and the
# linker keeps the component-type section.
ZIG_GLOBAL_CACHE_DIR=$cache ZIG_LOCAL_CACHE_DIR=$cache \
    "$zig" cc -target wasm32-wasi -mexec-model=reactor -Os -s -Wall -Wextra \
    -I "$generated" -o "$out" \
    "$here/tour.c" "$here/json.c" "$generated/task.c" "$generated/task_component_type.o"
