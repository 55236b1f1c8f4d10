#!/usr/bin/env bash
# Installs the pinned componentize-py into a virtual environment at DIR and
# prints the path of its componentize-py executable. Running it again with the
# same DIR reuses the environment when the pinned version is already there.
set -euo pipefail

COMPONENTIZE_PY_VERSION=0.25.1

if [ $# -ne 1 ]; then
    echo "usage: $0 DIR" >&2
    exit 2
fi
dir=$1
bin="$dir/bin/componentize-py"

installed=$("$dir/bin/python" -m pip show componentize-py 2>/dev/null | sed -n 's/^Version: //p' || true)
if [ "$installed" != "$COMPONENTIZE_PY_VERSION" ]; then
    python3 -m venv "$dir"
    "$dir/bin/python" -m pip install --quiet --disable-pip-version-check \
        "componentize-py==$COMPONENTIZE_PY_VERSION" >&2
fi

echo "$bin"
