#!/usr/bin/env bash
# Runs go vet and the unit tests of go-tour on the host, not under wasip1.
# The tests cover the JSON handling and the file step through the host's file
# system. The script uses the same go binary ($GO) and cache directory
# ($GO_TOUR_CACHE_DIR) as build.sh.
set -euo pipefail

plugin_dir=$(cd "$(dirname "$0")" && pwd)
cache_dir=${GO_TOUR_CACHE_DIR:-$plugin_dir/../../target/go-tour-cache}
mkdir -p "$cache_dir"
cache_dir=$(cd "$cache_dir" && pwd)

cd "$plugin_dir"
unset GOOS GOARCH
export GOTOOLCHAIN=local GOPROXY=off GOFLAGS= GOENV=off
export GOCACHE="$cache_dir/build" GOPATH="$cache_dir/gopath" XDG_CONFIG_HOME="$cache_dir/config"
"${GO:-go}" vet .
"${GO:-go}" test .
