#!/usr/bin/env node
// A small Apex client using only Node.js built-ins.
//
// Signs each request as the server expects (see docs/signing.md) and can
// upload and run a plugin:
//
//   APEX_URL=http://127.0.0.1:8080 APEX_SHARED_KEY=... node apex_client.mjs upload hello hello.wasm
//   APEX_URL=http://127.0.0.1:8080 APEX_SHARED_KEY=... node apex_client.mjs run hello '{"name": "Ada"}'
//   node apex_client.mjs vectors ../../runtime/tests/data/extra-signing-vectors.json
//
// Set APEX_KEY_ID to sign with a key from the server's keys file.

import { createHash, createHmac, randomBytes } from "node:crypto";
import { readFileSync } from "node:fs";
import { request as httpRequest } from "node:http";

/** Returns the five signed lines joined by newlines. */
export function stringToSign(ts, method, target, nonce, body) {
  const digest = createHash("sha256").update(body).digest("hex");
  return [ts, method.toUpperCase(), target, nonce, digest].join("\n");
}

/** Returns the lowercase hex HMAC-SHA256 of text under key (both strings, UTF-8). */
export function sign(key, text) {
  return createHmac("sha256", Buffer.from(key, "utf8")).update(Buffer.from(text, "utf8")).digest("hex");
}

/** Sends one signed request; resolves to { status, body } with the body parsed as JSON. */
export function send(method, target, body = Buffer.alloc(0)) {
  const url = new URL((process.env.APEX_URL ?? "http://127.0.0.1:8080").replace(/\/$/, "") + target);
  const key = process.env.APEX_SHARED_KEY;
  const ts = String(Math.floor(Date.now() / 1000));
  const nonce = randomBytes(16).toString("hex");
  const headers = {
    "X-TS": ts,
    "X-Nonce": nonce,
    "X-SIG": sign(key, stringToSign(ts, method, target, nonce, body)),
    "Content-Length": body.length,
  };
  if (process.env.APEX_KEY_ID) headers["X-Key-Id"] = process.env.APEX_KEY_ID;

  return new Promise((resolve, reject) => {
    const req = httpRequest(url, { method, headers }, (response) => {
      const chunks = [];
      response.on("data", (chunk) => chunks.push(chunk));
      response.on("end", () => {
        const text = Buffer.concat(chunks).toString("utf8");
        resolve({ status: response.statusCode, body: text ? JSON.parse(text) : null });
      });
    });
    req.on("error", reject);
    req.end(body);
  });
}

/** Checks every vector of a file; returns the number of mismatches. */
function checkVectors(path) {
  const { vectors } = JSON.parse(readFileSync(path, "utf8"));
  let failures = 0;
  vectors.forEach((vector, index) => {
    const body = "body_base64" in vector ? Buffer.from(vector.body_base64, "base64") : Buffer.from(vector.body, "utf8");
    const text = stringToSign(vector.ts, vector.method, vector.target, vector.nonce, body);
    const matches = text === vector.string_to_sign && sign(vector.key, text) === vector.signature;
    if (matches !== (vector.valid ?? true)) {
      failures += 1;
      console.error(`vector ${index} (${vector.target}): expected valid=${vector.valid ?? true}`);
    }
  });
  console.log(`${vectors.length - failures} of ${vectors.length} vectors as expected`);
  return failures;
}

async function main(args) {
  let reply;
  if (args.length === 3 && args[0] === "upload") {
    reply = await send("PUT", `/v1/plugins/${args[1]}`, readFileSync(args[2]));
  } else if ((args.length === 2 || args.length === 3) && args[0] === "run") {
    const payload = { input: args.length === 3 ? JSON.parse(args[2]) : null };
    reply = await send("POST", `/v1/plugins/${args[1]}/run`, Buffer.from(JSON.stringify(payload), "utf8"));
  } else if (args.length === 2 && args[0] === "vectors") {
    return checkVectors(args[1]) === 0 ? 0 : 1;
  } else {
    console.error("usage: apex_client.mjs upload NAME FILE | run NAME [JSON] | vectors FILE");
    return 2;
  }
  console.log(JSON.stringify(reply.body, null, 2));
  return reply.status >= 200 && reply.status < 300 ? 0 : 1;
}

process.exitCode = await main(process.argv.slice(2));
