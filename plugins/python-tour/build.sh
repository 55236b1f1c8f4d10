#!/usr/bin/env bash
# Builds the python-tour component into OUT (a .wasm path).
# Uses COMPONENTIZE_PY when set, else componentize-py from PATH; run
# ./install-toolchain.sh DIR to get the pinned version.
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 OUT.wasm" >&2
    exit 2
fi
out=$(realpath -m "$1")
componentize_py=${COMPONENTIZE_PY:-componentize-py}

cd "$(dirname "$0")"
mkdir -p "$(dirname "$out")"

# componentize-py writes __pycache__ into the directories it imports from, so
# build from a copy to keep the source folder clean.
staging=$(mktemp -d)
trap 'rm -rf "$staging"' EXIT
cp app.py "$staging/"

"$componentize_py" -d ../../wit -w apex:task/task componentize app -p "$staging" -o "$out"
