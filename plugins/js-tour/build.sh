#!/usr/bin/env bash
# Builds the js-tour component for the `task` world of ../../wit and writes
# it to OUT.
#
# Usage: build.sh OUT
#
# The jco binary is taken from $JCO when set (install-toolchain.sh prints its
# path), else from node_modules/.bin/jco beside this script (after `npm ci`
# here), else from PATH.
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 OUT (path of the .wasm component to write)" >&2
    exit 2
fi

plugin_dir="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "$(dirname "$1")"
out="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"

if [ -n "${JCO:-}" ]; then
    jco="$JCO"
elif [ -x "$plugin_dir/node_modules/.bin/jco" ]; then
    jco="$plugin_dir/node_modules/.bin/jco"
elif command -v jco >/dev/null; then
    jco="$(command -v jco)"
else
    echo "error: jco not found. Run install-toolchain.sh DIR and set JCO to the path it prints." >&2
    exit 1
fi

cd "$plugin_dir"
# Features stay at their defaults: `--disable http` (or `all`) replaces the
# engine's wasi:http calls with traps even though the world imports
# wasi:http, so fetch() would abort the run instead of failing.
"$jco" componentize app.js --wit ../../wit --world-name task -o "$out"
