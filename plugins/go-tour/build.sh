#!/usr/bin/env bash
# Builds go-tour as a WASI preview 1 command module (GOOS=wasip1 GOARCH=wasm)
# and writes it to OUT.
#
# Usage: build.sh OUT
# The go binary is $GO, else `go` on PATH, and install-toolchain.sh prints the
# pinned one. Go's build cache, module cache and telemetry counters
# (XDG_CONFIG_HOME) go under $GO_TOUR_CACHE_DIR, default target/go-tour-cache
# at the repository root, so nothing is written under $HOME.
# Set GO_TOUR_LDFLAGS to pass linker flags. For wasm, "-s -w" drops only the
# "name" custom section (function names in traps), about 2% of the module.
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 OUT" >&2
    exit 2
fi

# Resolve OUT against the caller's directory before changing directory.
out=$1
case $out in
    /*) ;;
    *) out=$PWD/$out ;;
esac
if [ -d "$out" ]; then
    # go build -o DIR would write DIR/go-tour.wasm instead of OUT.
    echo "build.sh: OUT must be a file path, but $out is a directory" >&2
    exit 2
fi
mkdir -p "$(dirname "$out")"

plugin_dir=$(cd "$(dirname "$0")" && pwd)
cache_dir=${GO_TOUR_CACHE_DIR:-$plugin_dir/../../target/go-tour-cache}
mkdir -p "$cache_dir"
cache_dir=$(cd "$cache_dir" && pwd)

cd "$plugin_dir"

# GOTOOLCHAIN=local stops the go command from downloading another toolchain,
# and GOPROXY=off stops it from fetching modules, because the module uses only
# the standard library. -trimpath and -buildvcs=false keep the checkout's path
# and git state out of the module, so the same sources give the same bytes.
GOOS=wasip1 GOARCH=wasm \
GOTOOLCHAIN=local GOPROXY=off GOFLAGS= \
GOCACHE="$cache_dir/build" GOPATH="$cache_dir/gopath" GOENV=off \
XDG_CONFIG_HOME="$cache_dir/config" \
    "${GO:-go}" build -trimpath -buildvcs=false -ldflags="${GO_TOUR_LDFLAGS:-}" -o "$out" .
