#!/usr/bin/env bash
# The main job of Apex on a fresh machine: build the example plugins, start
# the server with the bundled policy and a generated key, upload both
# plugins and run them through the signed API, then stop the server.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "==> building the example plugins (wasm32-wasip2)"
scripts/build-plugins.sh
echo "==> building apex"
cargo build --locked --quiet
apex="${CARGO_TARGET_DIR:-target}/debug/apex"

# The bundled policy allows ./work; give wordcount something to count.
mkdir -p work
printf 'Apex runs every task as a WebAssembly component.\nThe policy decides what it may touch.\n' > work/readme.txt

APEX_SHARED_KEY=${APEX_SHARED_KEY:-$("$apex" keygen)}
export APEX_SHARED_KEY
# The demo server accepts only the shared key, `default`.
unset APEX_KEY_ID

log=$(mktemp -d)
"$apex" serve --config config/policy.yaml --data data --listen 127.0.0.1:0 >"$log/stdout" 2>"$log/stderr" &
server=$!
stop() {
    kill "$server" 2>/dev/null
    wait "$server" 2>/dev/null || true
    # Warnings would otherwise leave with the log, such as a policy file
    # that others can read or shell children the kernel cannot confine.
    if grep -q ' WARN ' "$log/stderr" 2>/dev/null; then
        echo "==> the server's warnings" >&2
        grep ' WARN ' "$log/stderr" >&2
    fi
    rm -rf "$log"
}
trap stop EXIT

for _ in $(seq 1 300); do
    grep -q '^apex listening on ' "$log/stdout" 2>/dev/null && break
    if ! kill -0 "$server" 2>/dev/null; then
        echo "the server failed to start:" >&2
        cat "$log/stderr" >&2
        exit 1
    fi
    sleep 0.1
done
APEX_URL=$(sed -n 's/^apex listening on //p' "$log/stdout")
export APEX_URL
echo "==> server listening on $APEX_URL"

echo "==> uploading plugins"
"$apex" upload hello target/plugins/hello.wasm
"$apex" upload wordcount target/plugins/wordcount.wasm

echo "==> running hello"
"$apex" run hello --input '{"name": "Ada"}'

echo "==> running wordcount over $PWD/work"
"$apex" run wordcount --input "{\"path\": \"$PWD/work\"}"

echo "==> the same run with curl and apex sign"
body="{\"input\": {\"path\": \"$PWD/work\"}}"
headers=()
while read -r line; do headers+=(-H "$line"); done < <("$apex" sign POST /v1/plugins/wordcount/run --body "$body")
curl -sS -X POST "$APEX_URL/v1/plugins/wordcount/run" "${headers[@]}" \
    -H 'Content-Type: application/json' --data-binary "$body"
echo
