// Tour of the `apex:task/task` world from JavaScript: one file read, one
// HTTP GET and one host shell call, each on request.
//
// Input: `{"file": PATH, "url": URL, "command": CMD}`, every key optional.
// Output: `{"language": "javascript", "file_bytes": N, "http_status": N,
// "command_stdout": TEXT}`. A step whose key is absent reports null, and a
// step that fails reports its error text in place of the value. Input `null`
// (a run request without input) counts as `{}`. Input that is not a JSON
// object or null fails the run.
//
// StarlingMonkey, the engine inside componentize-js, has no file API, so the
// file is read through the `wasi:filesystem` imports of the world. Import
// specifiers carry the interface's package version: `apex:task/shell` without
// `@0.1.0` fails at build time with "Error loading module".

import { run as runShellCommand } from 'apex:task/shell@0.1.0';
import { getDirectories } from 'wasi:filesystem/preopens@0.2.12';

const READ_CHUNK_BYTES = 64 * 1024;

// Convert an error from a component import or from the engine to text.
// Imports that return `result<_, E>` throw a ComponentError whose `payload`
// is the `E` value: a string for an enum such as the filesystem
// `error-code`, or `{tag, val}` for a variant such as the shell `error`.
function errorText(error) {
  if (error === null || typeof error !== 'object') {
    return String(error);
  }
  if (!('payload' in error)) {
    return error instanceof Error ? error.message : String(error);
  }
  const payload = error.payload;
  if (payload !== null && typeof payload === 'object' && 'tag' in payload) {
    return payload.val === undefined ? payload.tag : `${payload.tag}: ${payload.val}`;
  }
  return String(payload);
}

// Find the preopened directory that contains `path` and return it with the
// rest of the path relative to it. The host names each preopen by its
// absolute host path, so the longest matching name wins.
function resolvePreopen(path) {
  let best = null;
  for (const [descriptor, name] of getDirectories()) {
    const prefix = name.endsWith('/') ? name : `${name}/`;
    let relative = null;
    if (path === name) {
      relative = '.';
    } else if (path.startsWith(prefix)) {
      relative = path.slice(prefix.length);
    }
    if (relative !== null && (best === null || name.length > best.name.length)) {
      best = { descriptor, name, relative };
    }
  }
  if (best === null) {
    throw new Error(`${path} is not inside a preopened directory`);
  }
  return best;
}

// Read the whole file at `path` and return its size in bytes.
function readFileBytes(path) {
  const { descriptor: directory, relative } = resolvePreopen(path);
  let file;
  try {
    file = directory.openAt({ symlinkFollow: true }, relative, {}, { read: true });
  } catch (error) {
    throw new Error(`opening ${path} failed: ${errorText(error)}`);
  }

  let total = 0;
  try {
    for (;;) {
      const [chunk, endOfFile] = file.read(BigInt(READ_CHUNK_BYTES), BigInt(total));
      total += chunk.length;
      if (endOfFile || chunk.length === 0) {
        return total;
      }
    }
  } catch (error) {
    throw new Error(`reading ${path} failed: ${errorText(error)}`);
  } finally {
    file[Symbol.dispose]();
  }
}

// GET `url` through `fetch`, which StarlingMonkey implements over
// `wasi:http/outgoing-handler`, and return the status code.
async function fetchStatus(url) {
  const response = await fetch(url);
  // Read the body so the response stream is finished before the run ends.
  await response.arrayBuffer();
  return response.status;
}

function runCommand(command) {
  const output = runShellCommand(command, { cwd: undefined, stdin: undefined });
  return new TextDecoder().decode(output.stdout);
}

// Run one step on `input[key]` and return its value, its error text, or null
// when the key is absent or null.
async function runStep(input, key, step) {
  const value = input[key];
  if (value === undefined || value === null) {
    return null;
  }
  if (typeof value !== 'string') {
    return `invalid ${key}: expected a string, got ${JSON.stringify(value)}`;
  }
  try {
    return await step(value);
  } catch (error) {
    return errorText(error);
  }
}

// Parse the run's input. A thrown string becomes the `err` of the export,
// while a thrown Error object makes the generated bindings trap with
// "expected a string, received [object]" (componentize-js 0.22.0).
function parseInput(inputJson) {
  const expected = 'a JSON object such as {"file": PATH, "url": URL, "command": CMD}';
  let input;
  try {
    input = JSON.parse(inputJson);
  } catch (error) {
    throw `invalid input: ${errorText(error)}. Expected ${expected}`;
  }
  if (input === null) {
    return {};
  }
  if (typeof input !== 'object' || Array.isArray(input)) {
    throw `invalid input ${inputJson}: expected ${expected}`;
  }
  return input;
}

export async function run(inputJson) {
  const input = parseInput(inputJson);

  const result = {
    language: 'javascript',
    file_bytes: await runStep(input, 'file', readFileBytes),
    http_status: await runStep(input, 'url', fetchStatus),
    command_stdout: await runStep(input, 'command', runCommand),
  };
  return JSON.stringify(result);
}
