#!/usr/bin/env bash
# Installs the pinned JavaScript toolchain of this plugin (jco and
# componentize-js, exact versions from package-lock.json) into DIR with
# `npm ci`, then prints the path of the jco binary.
#
# Usage: install-toolchain.sh DIR
#
# Running it again with the same lock file does nothing but print the path.
# Needs Node.js ^20.19.0 or >=22.12.0 and npm.
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 DIR (the directory that receives node_modules)" >&2
    exit 2
fi

plugin_dir="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "$1"
install_dir="$(cd "$1" && pwd)"
jco="$install_dir/node_modules/.bin/jco"
# Copy of the lock file that the last complete install used.
installed_lock="$install_dir/.installed-package-lock.json"

if [ -x "$jco" ] && cmp -s "$plugin_dir/package-lock.json" "$installed_lock"; then
    echo "$jco"
    exit 0
fi

cp "$plugin_dir/package.json" "$plugin_dir/package-lock.json" "$install_dir/"
rm -f "$installed_lock"
# npm ci installs exactly what the lock file lists, and fails when the lock
# file does not match package.json. Its progress goes to stderr, so stdout
# carries only the path.
(cd "$install_dir" && npm ci --no-audit --no-fund --engine-strict) >&2
cp "$plugin_dir/package-lock.json" "$installed_lock"
echo "$jco"
