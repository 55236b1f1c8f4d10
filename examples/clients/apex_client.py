#!/usr/bin/env python3
"""A small Apex client using only Python's standard library.

Signs each request as the server expects (see docs/signing.md) and can
upload and run a plugin:

    APEX_URL=http://127.0.0.1:8080 APEX_SHARED_KEY=... python3 apex_client.py upload hello hello.wasm
    APEX_URL=http://127.0.0.1:8080 APEX_SHARED_KEY=... python3 apex_client.py run hello '{"name": "Ada"}'
    python3 apex_client.py vectors ../../runtime/tests/data/extra-signing-vectors.json

Set APEX_KEY_ID to sign with a key from the server's keys file.
"""

import base64
import hashlib
import hmac
import json
import os
import secrets
import sys
import time
import urllib.error
import urllib.request


def string_to_sign(ts, method, target, nonce, body):
    """Returns the five signed lines joined by newlines."""
    digest = hashlib.sha256(body).hexdigest()
    return "\n".join([ts, method.upper(), target, nonce, digest])


def sign(key, text):
    """Returns the lowercase hex HMAC-SHA256 of text under key (both str)."""
    return hmac.new(key.encode("utf-8"), text.encode("utf-8"), hashlib.sha256).hexdigest()


def request(method, target, body=b""):
    """Sends one signed request; returns (status, parsed JSON body)."""
    url = os.environ.get("APEX_URL", "http://127.0.0.1:8080").rstrip("/")
    key = os.environ["APEX_SHARED_KEY"]
    ts = str(int(time.time()))
    nonce = secrets.token_hex(16)
    headers = {
        "X-TS": ts,
        "X-Nonce": nonce,
        "X-SIG": sign(key, string_to_sign(ts, method, target, nonce, body)),
    }
    if os.environ.get("APEX_KEY_ID"):
        headers["X-Key-Id"] = os.environ["APEX_KEY_ID"]

    req = urllib.request.Request(url + target, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def check_vectors(path):
    """Checks every vector of a file; returns the number of mismatches."""
    with open(path, encoding="utf-8") as file:
        vectors = json.load(file)["vectors"]
    failures = 0
    for index, vector in enumerate(vectors):
        if "body_base64" in vector:
            body = base64.b64decode(vector["body_base64"])
        else:
            body = vector["body"].encode("utf-8")
        text = string_to_sign(vector["ts"], vector["method"], vector["target"], vector["nonce"], body)
        matches = text == vector["string_to_sign"] and sign(vector["key"], text) == vector["signature"]
        if matches != vector.get("valid", True):
            failures += 1
            print(f"vector {index} ({vector['target']}): expected valid={vector.get('valid', True)}", file=sys.stderr)
    print(f"{len(vectors) - failures} of {len(vectors)} vectors as expected")
    return failures


def main(argv):
    if len(argv) == 3 and argv[0] == "upload":
        with open(argv[2], "rb") as file:
            status, body = request("PUT", f"/v1/plugins/{argv[1]}", file.read())
    elif len(argv) in (2, 3) and argv[0] == "run":
        payload = {"input": json.loads(argv[2]) if len(argv) == 3 else None}
        status, body = request("POST", f"/v1/plugins/{argv[1]}/run", json.dumps(payload).encode())
    elif len(argv) == 2 and argv[0] == "vectors":
        return 1 if check_vectors(argv[1]) else 0
    else:
        print(__doc__, file=sys.stderr)
        return 2
    print(json.dumps(body, indent=2))
    return 0 if 200 <= status < 300 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
