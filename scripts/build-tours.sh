#!/usr/bin/env bash
# Builds the tour plugins, one per language, into target/plugins/NAME.wasm.
# Each plugin folder pins its toolchain in install-toolchain.sh, which
# installs it from PyPI, npm or crates.io under target/toolchains/LANGUAGE
# the first time. A tour is rebuilt only when a file of its folder, of wit/ or of its
# toolchain is newer than the built file.
#
# Usage: scripts/build-tours.sh [NAME...]   (default: every tour)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

tours=("$@")
if [ ${#tours[@]} -eq 0 ]; then
    for dir in plugins/*-tour; do tours+=("$(basename "$dir")"); done
fi

mkdir -p target/plugins target/toolchains

# Prints the path of the tool that a tour's install-toolchain.sh installs.
toolchain() {
    local name=$1 dir=$root/target/toolchains/${1%-tour}
    "plugins/$name/install-toolchain.sh" "$dir"
}

# Succeeds when OUT exists and nothing it is built from is newer.
fresh() {
    local out=$1
    shift
    [ -f "$out" ] || return 1
    [ -z "$(find "$@" -newer "$out" -not -path '*/node_modules/*' -print -quit)" ]
}

for name in "${tours[@]}"; do
    out=$root/target/plugins/$name.wasm
    [ -d "plugins/$name" ] || { echo "no such tour: plugins/$name" >&2; exit 2; }
    tool=$(toolchain "$name")
    if fresh "$out" "plugins/$name" wit "$tool"; then
        continue
    fi
    echo "==> building $name" >&2
    start=$SECONDS
    case $name in
        python-tour) COMPONENTIZE_PY=$tool "plugins/$name/build.sh" "$out.tmp" ;;
        js-tour) JCO=$tool "plugins/$name/build.sh" "$out.tmp" ;;
        c-tour)
            # A preview-1 module with the world embedded, which the apex CLI
            # wraps into a component.
            ZIG=$tool TOOLCHAIN=$root/target/toolchains/c "plugins/$name/build.sh" "$out.module"
            cargo build --locked --quiet --bin apex
            "${CARGO_TARGET_DIR:-target}/debug/apex" component new "$out.module" -o "$out.tmp"
            rm "$out.module"
            ;;
        go-tour) GO=$tool "plugins/$name/build.sh" "$out.tmp" ;;
        *) echo "no build rule for $name" >&2; exit 2 ;;
    esac
    mv "$out.tmp" "$out"
    echo "    $name: $(stat -c %s "$out") bytes in $((SECONDS - start)) s" >&2
done
