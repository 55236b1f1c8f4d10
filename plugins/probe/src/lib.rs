//! A task plugin that does one risky thing on request, so the tests can check
//! how the runtime confines it. It is an example of what a hostile or buggy
//! task might try, not a plugin to deploy.
//!
//! Input: `{"op": NAME, ...}` with one of these operations:
//! - `loop`: spins forever.
//! - `sleep` `{"ms": N}`: waits in a host call.
//! - `alloc` `{"mib": N}`: allocates and touches N MiB.
//! - `read` `{"path": P}`, `write` `{"path": P, "text": T}`, `list` `{"path": P}`.
//! - `env`: returns the task's environment variables.
//! - `connect` `{"addr": "HOST:PORT"}`: opens a TCP connection.
//! - `resolve` `{"host": NAME}`: looks a name up.
//! - `print` `{"bytes": N, "byte": B}`: writes N bytes of value B (default
//!   `x`) to stdout and N to stderr.
//! - `config` `{"path": KEY}`: reads KEY from `wasi:config/store`.
//! - `fail` `{"message": M}`: returns an error.
//! - `echo`: returns the input text unchanged.

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
            other => Err(format!("unknown op `{other}`")),
        }
    }
}

export!(Probe);
