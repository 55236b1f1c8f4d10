//! A task plugin that does one risky thing on request, so the tests can check
//! how the runtime confines it. It is an example of what a hostile or buggy
//! task might try, not a plugin to deploy.
//!
//! Input: `{"op": NAME, ...}` with one of these operations:
//! - `loop`: spins forever.
//! - `sleep` `{"ms": N}`: waits in a host call.
//! - `alloc` `{"mib": N}`: allocates and touches N MiB.
//! - `read` `{"path": P}`, `write` `{"path": P, "text": T}`, `list` `{"path": P}`.
//! - `fill` `{"path": P, "bytes": N}`: writes N bytes to file P in 64 KiB
//!   pieces, and stops at the first error. Returns the bytes written and the
//!   error.
//! - `touch` `{"path": P, "count": N}`: creates N empty files named P0, P1...,
//!   and stops at the first error. Returns the files created and the error.
//! - `sparse` `{"path": P, "count": N}`: writes one byte at the start of each
//!   of N 4 KiB blocks of file P, and stops at the first error. Returns the
//!   bytes written and the error.
//! - `grow` `{"path": P, "bytes": N}`: sets the length of file P to N bytes
//!   without writing them.
//! - `env`: returns the task's environment variables.
//! - `connect` `{"addr": "HOST:PORT"}`: opens a TCP connection.
//! - `resolve` `{"host": NAME}`: looks a name up.
//! - `print` `{"bytes": N, "byte": B}`: writes N bytes of value B (default
//!   `x`) to stdout and N to stderr.
//! - `config` `{"path": KEY}`: reads KEY from `wasi:config/store`.
//! - `fail` `{"message": M}`: returns an error.
//! - `echo`: returns the input text unchanged.
//! - `stain` `{"seed": N}`: fills 1 MiB of heap and a static buffer with a
//!   pattern made from N, then returns how many copies `residue` finds.
//! - `late-body` `{"addr": "HOST:PORT", "length": L, "bytes": N}`: sends
//!   `POST /` with `content-length: L` (default 0) through `wasi:http` and
//!   waits for the response. Only then it writes N bytes (default 0) of body
//!   and finishes it, as clients that send the body while they wait for the
//!   response may do. Returns the response status, or the first error.
//! - `residue` `{"seed": N}`: counts the places in all of linear memory where
//!   the pattern made from N begins; a fresh instance must have none.

use std::io::Write;
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

wit_bindgen::generate!({
    path: "../../wit",
    world: "apex:task/task",
    generate_all,
});

#[derive(serde::Deserialize)]
struct Input {
    op: String,
    ms: Option<u64>,
    mib: Option<usize>,
    path: Option<String>,
    text: Option<String>,
    addr: Option<String>,
    host: Option<String>,
    bytes: Option<usize>,
    byte: Option<u8>,
    message: Option<String>,
    seed: Option<u64>,
    length: Option<u64>,
    count: Option<u64>,
}

/// Length of the pattern `stain` writes.
const PATTERN_LEN: usize = 32;

/// A static buffer, so `stain` also marks the module's data pages.
static STAINED: std::sync::Mutex<[u8; 4096]> = std::sync::Mutex::new([0; 4096]);

/// Byte `index` of the pattern made from `seed`. Computed one byte at a time,
/// so `residue` never contains the whole pattern in linear memory itself.
#[inline(never)]
fn pattern_byte(seed: u64, index: usize) -> u8 {
    (seed >> (8 * (index % 8))) as u8 ^ 0x5a_u8.wrapping_add((index as u8).wrapping_mul(37))
}

/// Sends a request whose body of `bytes` bytes, declared as `length`, is
/// written after the response arrived.
fn late_body(addr: &str, length: u64, bytes: usize) -> Result<String, String> {
    use wasi::http::types::{Fields, Method, OutgoingBody, OutgoingRequest, Scheme};

    let headers = Fields::from_list(&[("content-length".to_string(), length.to_string().into_bytes())])
        .map_err(|e| format!("invalid header: {e:?}"))?;
    let request = OutgoingRequest::new(headers);
    request.set_method(&Method::Post).map_err(|()| "invalid method")?;
    request
        .set_scheme(Some(&Scheme::Http))
        .map_err(|()| "invalid scheme")?;
    request
        .set_authority(Some(addr))
        .map_err(|()| format!("invalid authority {addr:?}"))?;
    request
        .set_path_with_query(Some("/"))
        .map_err(|()| "invalid path")?;
    let body = request
        .body()
        .map_err(|()| "the request body was already taken")?;

    let pending = wasi::http::outgoing_handler::handle(request, None).map_err(|e| format!("send: {e:?}"))?;
    pending.subscribe().block();
    let response = match pending.get() {
        Some(Ok(Ok(response))) => response,
        Some(Ok(Err(e))) => return Err(format!("response: {e:?}")),
        other => return Err(format!("response not ready: {other:?}")),
    };

    let stream = body.write().map_err(|()| "the body stream was already taken")?;
    stream
        .check_write()
        .map_err(|e| format!("write to the request body: {e:?}"))?;
    stream
        .write(&[])
        .map_err(|e| format!("write to the request body: {e:?}"))?;
    let chunk = [b'x'; 4096];
    let mut left = bytes;
    while left > 0 {
        let size = left.min(chunk.len());
        stream
            .blocking_write_and_flush(&chunk[..size])
            .map_err(|e| format!("write to the request body after {} bytes: {e:?}", bytes - left))?;
        left -= size;
    }
    drop(stream);
    OutgoingBody::finish(body, None).map_err(|e| format!("finish the request body: {e:?}"))?;
    Ok(serde_json::json!({ "status": response.status() }).to_string())
}

/// Counts where the pattern made from `seed` begins in linear memory.
fn count_pattern(seed: u64) -> usize {
    let end = core::arch::wasm32::memory_size::<0>() * 65536;
    let mut found = 0;
    // The scan starts at 1 KiB, clear of the null address.
    for start in 1024..end - PATTERN_LEN {
        let matches = (0..PATTERN_LEN).all(|index| {
            // SAFETY: every address below `memory_size` is readable in wasm32.
            let byte = unsafe { core::ptr::read_volatile((start + index) as *const u8) };
            byte == pattern_byte(seed, index)
        });
        if matches {
            found += 1;
        }
    }
    found
}

fn required<T>(value: Option<T>, name: &str) -> Result<T, String> {
    value.ok_or_else(|| format!("missing field `{name}`"))
}

struct Probe;

impl Guest for Probe {
    fn run(raw: String) -> Result<String, String> {
        let input: Input = serde_json::from_str(&raw).map_err(|e| format!("invalid input: {e}"))?;

        match input.op.as_str() {
            "loop" => {
                let mut counter: u64 = 0;
                loop {
                    counter = std::hint::black_box(counter.wrapping_add(1));
                }
            }
            "sleep" => {
                std::thread::sleep(Duration::from_millis(required(input.ms, "ms")?));
                Ok("\"slept\"".to_string())
            }
            "alloc" => {
                let mib = required(input.mib, "mib")?;
                let mut blocks = Vec::new();
                for _ in 0..mib {
                    blocks.push(std::hint::black_box(vec![1u8; 1 << 20]));
                }
                Ok(serde_json::json!({ "allocated_mib": blocks.len() }).to_string())
            }
            "read" => {
                let path = required(input.path, "path")?;
                let text = std::fs::read_to_string(&path).map_err(|e| format!("read {path}: {e}"))?;
                Ok(serde_json::Value::String(text).to_string())
            }
            "write" => {
                let path = required(input.path, "path")?;
                let text = required(input.text, "text")?;
                std::fs::write(&path, text).map_err(|e| format!("write {path}: {e}"))?;
                Ok("\"written\"".to_string())
            }
            "fill" => {
                let path = required(input.path, "path")?;
                let total = required(input.bytes, "bytes")?;
                let mut file = std::fs::File::create(&path).map_err(|e| format!("create {path}: {e}"))?;
                let piece = vec![b'f'; 64 << 10];
                let mut written = 0;
                let mut error = None;
                while written < total {
                    let length = piece.len().min(total - written);
                    match file.write_all(&piece[..length]) {
                        Ok(()) => written += length,
                        Err(e) => {
                            error = Some(e.to_string());
                            break;
                        }
                    }
                }
                Ok(serde_json::json!({ "written": written, "error": error }).to_string())
            }
            "sparse" => {
                use std::io::{Seek, SeekFrom};
                let path = required(input.path, "path")?;
                let count = required(input.count, "count")?;
                let mut file = std::fs::File::create(&path).map_err(|e| format!("create {path}: {e}"))?;
                let mut written = 0;
                let mut error = None;
                for block in 0..count {
                    let wrote = file
                        .seek(SeekFrom::Start(block * 4096))
                        .and_then(|_| file.write_all(b"s"));
                    match wrote {
                        Ok(_) => written += 1,
                        Err(e) => {
                            error = Some(e.to_string());
                            break;
                        }
                    }
                }
                Ok(serde_json::json!({ "written": written, "error": error }).to_string())
            }
            "grow" => {
                let path = required(input.path, "path")?;
                let bytes = required(input.bytes, "bytes")?;
                let file = std::fs::File::create(&path).map_err(|e| format!("create {path}: {e}"))?;
                file.set_len(bytes as u64).map_err(|e| format!("grow {path}: {e}"))?;
                Ok("\"grown\"".to_string())
            }
            "touch" => {
                let path = required(input.path, "path")?;
                let count = required(input.count, "count")?;
                let mut created = 0;
                let mut error = None;
                for index in 0..count {
                    match std::fs::File::create(format!("{path}{index}")) {
                        Ok(_) => created += 1,
                        Err(e) => {
                            error = Some(e.to_string());
                            break;
                        }
                    }
                }
                Ok(serde_json::json!({ "created": created, "error": error }).to_string())
            }
            "list" => {
                let path = required(input.path, "path")?;
                let mut names = Vec::new();
                for entry in std::fs::read_dir(&path).map_err(|e| format!("list {path}: {e}"))? {
                    let entry = entry.map_err(|e| format!("list {path}: {e}"))?;
                    names.push(entry.file_name().to_string_lossy().into_owned());
                }
                names.sort();
                Ok(serde_json::json!(names).to_string())
            }
            "env" => {
                let vars: std::collections::BTreeMap<String, String> = std::env::vars().collect();
                Ok(serde_json::json!(vars).to_string())
            }
            "connect" => {
                let addr = required(input.addr, "addr")?;
                match TcpStream::connect(&addr) {
                    Ok(_) => Ok("\"connected\"".to_string()),
                    Err(e) => Err(format!("connect {addr}: {e}")),
                }
            }
            "resolve" => {
                let host = required(input.host, "host")?;
                match (host.as_str(), 80).to_socket_addrs() {
                    Ok(addrs) => {
                        Ok(serde_json::json!(addrs.map(|a| a.to_string()).collect::<Vec<_>>()).to_string())
                    }
                    Err(e) => Err(format!("resolve {host}: {e}")),
                }
            }
            "print" => {
                let bytes = required(input.bytes, "bytes")?;
                let chunk = vec![input.byte.unwrap_or(b'x'); bytes];
                // A task's exports return without the flush a `main` gets at
                // exit, so flush before returning.
                let mut stdout = std::io::stdout();
                stdout
                    .write_all(&chunk)
                    .and_then(|()| stdout.flush())
                    .map_err(|e| e.to_string())?;
                std::io::stderr().write_all(&chunk).map_err(|e| e.to_string())?;
                Ok(serde_json::json!({ "printed": bytes }).to_string())
            }
            "config" => {
                let key = required(input.path, "path")?;
                match wasi::config::store::get(&key) {
                    Ok(value) => Ok(serde_json::json!({ "value": value }).to_string()),
                    Err(e) => Err(format!("config {key}: {e:?}")),
                }
            }
            "fail" => Err(input.message.unwrap_or_else(|| "failed on request".to_string())),
            "echo" => Ok(raw),
            "stain" => {
                let seed = required(input.seed, "seed")?;
                let heap: Vec<u8> = (0..1 << 20)
                    .map(|index| pattern_byte(seed, index % PATTERN_LEN))
                    .collect();
                std::hint::black_box(&heap);
                let mut stained = STAINED.lock().unwrap();
                for (index, byte) in stained.iter_mut().enumerate() {
                    *byte = pattern_byte(seed, index % PATTERN_LEN);
                }
                drop(stained);
                Ok(serde_json::json!({ "found": count_pattern(seed) }).to_string())
            }
            "late-body" => late_body(
                &required(input.addr, "addr")?,
                input.length.unwrap_or(0),
                input.bytes.unwrap_or(0),
            ),
            "residue" => {
                let seed = required(input.seed, "seed")?;
                Ok(serde_json::json!({ "found": count_pattern(seed) }).to_string())
            }
            other => Err(format!("unknown op `{other}`")),
        }
    }
}

export!(Probe);
