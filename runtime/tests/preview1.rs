//! WASI preview-1 core modules uploaded as command plugins: wrapped with the
//! preview-1 adapter at upload, then run like any component, under the same
//! limits. Modules that are not preview-1 commands are rejected with a
//! message that gives the reason.

mod common;

use common::{Setup, TestServer};
use serde_json::json;

/// Builds a preview-1 command that writes `text` to stdout and exits with `code`.
fn writer(text: &str, code: u32) -> Vec<u8> {
    let len = text.len();
    let text = text.replace('\n', "\\0a");
    wat::parse_str(format!(
        r#"(module
            (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
            (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
            (memory (export "memory") 1)
            (data (i32.const 16) "{text}")
            (func (export "_start")
                (i32.store (i32.const 0) (i32.const 16))
                (i32.store (i32.const 4) (i32.const {len}))
                (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
                (if (i32.ne (i32.const {code}) (i32.const 0))
                    (then (call $proc_exit (i32.const {code}))))))"#
    ))
    .unwrap()
}

fn upload_error(server: &TestServer, wasm: &[u8]) -> String {
    let response = server.upload("module", wasm);
    assert_eq!(
        response.status,
        400,
        "{}",
        String::from_utf8_lossy(&response.body)
    );
    response.json()["error"]["message"].as_str().unwrap().to_string()
}

#[test]
fn preview1_command_runs_and_lists_its_format() {
    let mut server = TestServer::start();
    let response = server.upload("p1", &writer("hello from preview 1\n", 0));
    assert_eq!(
        response.status,
        201,
        "{}",
        String::from_utf8_lossy(&response.body)
    );
    let record = response.json();
    assert_eq!(record["kind"], "command");
    assert_eq!(record["format"], "wasip1-module");

    let result = server.run("p1", json!({}));
    assert_eq!(result["status"], "succeeded", "{result}");
    assert_eq!(result["stdout"], "hello from preview 1\n");

    // The stored module is adapted again (or its cached code loaded) after a
    // restart, and the listing still shows what was uploaded.
    server.restart();
    let listing = server
        .send(&common::Request::new("GET", "/v1/plugins", "").signed())
        .json();
    assert_eq!(listing["plugins"][0]["format"], "wasip1-module", "{listing}");
    let result = server.run("p1", json!({}));
    assert_eq!(result["stdout"], "hello from preview 1\n", "{result}");

    // Components are listed as such.
    server.upload_plugin("hello");
    let listing = server
        .send(&common::Request::new("GET", "/v1/plugins", "").signed())
        .json();
    assert_eq!(listing["plugins"][0]["name"], "hello");
    assert_eq!(listing["plugins"][0]["format"], "component");
}

#[test]
fn preview1_exit_code_fails_the_run() {
    let server = TestServer::start();
    assert_eq!(server.upload("p1", &writer("bye\n", 3)).status, 201);
    let result = server.run("p1", json!({}));
    assert_eq!(result["status"], "failed", "{result}");
    assert_eq!(result["exit_code"], 1, "{result}");
    assert_eq!(result["stdout"], "bye\n");
}

#[test]
fn preview1_loop_hits_the_deadline() {
    let server = TestServer::start_with(Setup {
        policy: "timeouts: {task_seconds: 1}\n".into(),
    });
    let wasm = wat::parse_str(
        r#"(module
            (memory (export "memory") 1)
            (func (export "_start") (loop $l (br $l))))"#,
    )
    .unwrap();
    assert_eq!(server.upload("spin", &wasm).status, 201);
    let result = server.run("spin", json!({}));
    assert_eq!(result["status"], "timed_out", "{result}");
}

#[test]
fn preview1_memory_is_limited_per_run() {
    let server = TestServer::start_with(Setup {
        policy: "limits: {memory_mib: 64}\n".into(),
    });
    // Tries to grow its memory by 128 MiB (2048 pages) and exits with code 7
    // when `memory.grow` returns -1, the refusal.
    let wasm = wat::parse_str(
        r#"(module
            (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
            (memory (export "memory") 1)
            (func (export "_start")
                (if (i32.eq (memory.grow (i32.const 2048)) (i32.const -1))
                    (then (call $proc_exit (i32.const 7))))))"#,
    )
    .unwrap();
    assert_eq!(server.upload("grow", &wasm).status, 201);
    let result = server.run("grow", json!({}));
    assert_eq!(result["status"], "failed", "the growth must be refused: {result}");
}

#[test]
fn preview1_stdin_and_args_reach_the_module() {
    let server = TestServer::start();
    // Copies stdin to stdout, then writes argv[1] on its own line.
    let wasm = wat::parse_str(
        r#"(module
            (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
            (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
            (import "wasi_snapshot_preview1" "args_sizes_get" (func $sizes (param i32 i32) (result i32)))
            (import "wasi_snapshot_preview1" "args_get" (func $args (param i32 i32) (result i32)))
            (memory (export "memory") 1)
            (func (export "_start")
                ;; iovec at 0: buffer at 1024, 4096 bytes; count read at 8.
                (i32.store (i32.const 0) (i32.const 1024))
                (i32.store (i32.const 4) (i32.const 4096))
                (drop (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
                (i32.store (i32.const 4) (i32.load (i32.const 8)))
                (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 12)))
                ;; argv pointers at 256, strings at 8192; argc at 16.
                (drop (call $sizes (i32.const 16) (i32.const 20)))
                (drop (call $args (i32.const 256) (i32.const 8192)))
                ;; Write argv[1] with its terminating NUL turned into a newline:
                ;; its length is argv[2] - argv[1] when there are three.
                (i32.store (i32.const 0) (i32.load (i32.const 260)))
                (i32.store (i32.const 4)
                    (i32.sub (i32.load (i32.const 264)) (i32.load (i32.const 260))))
                (i32.store8
                    (i32.sub (i32.load (i32.const 264)) (i32.const 1))
                    (i32.const 10))
                (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 12)))))"#,
    )
    .unwrap();
    assert_eq!(server.upload("cat", &wasm).status, 201);
    let result = server.run("cat", json!({ "input": { "n": 1 }, "args": ["first", "second"] }));
    assert_eq!(result["status"], "succeeded", "{result}");
    assert_eq!(result["stdout"], "{\"n\":1}first\n", "{result}");
}

#[test]
fn module_with_foreign_import_is_rejected_by_name() {
    let server = TestServer::start();
    let wasm = wat::parse_str(
        r#"(module
            (import "env" "host_secret" (func))
            (memory (export "memory") 1)
            (func (export "_start")))"#,
    )
    .unwrap();
    let message = upload_error(&server, &wasm);
    assert!(message.contains("`env::host_secret`"), "{message}");
    assert!(message.contains("preview-1"), "{message}");
}

#[test]
fn module_without_start_is_rejected() {
    let server = TestServer::start();
    let wasm = wat::parse_str(r#"(module (memory (export "memory") 1) (func (export "run")))"#).unwrap();
    let message = upload_error(&server, &wasm);
    assert!(message.contains("no `_start`"), "{message}");
    assert!(message.contains("apex component new"), "{message}");

    let listing = server
        .send(&common::Request::new("GET", "/v1/plugins", "").signed())
        .json();
    assert_eq!(
        listing["plugins"],
        json!([]),
        "nothing is stored after a rejection"
    );
}

#[test]
fn module_without_exported_memory_is_rejected() {
    let server = TestServer::start();
    let wasm = wat::parse_str(r#"(module (memory 1) (func (export "_start")))"#).unwrap();
    let message = upload_error(&server, &wasm);
    assert!(message.contains("no memory named `memory`"), "{message}");
}

#[test]
fn module_with_world_rejected_at_upload() {
    let server = TestServer::start();
    let mut wasm = writer("x", 0);
    // A custom section as wit-bindgen names it; its contents do not matter
    // for the check.
    wasm.extend_from_slice(&[0, 21, 20]);
    wasm.extend_from_slice(b"component-type:world");
    let message = upload_error(&server, &wasm);
    assert!(message.contains("apex component new"), "{message}");
}

#[test]
fn invalid_module_is_rejected() {
    let server = TestServer::start();
    let mut wasm = writer("x", 0);
    // A section with an unknown id.
    wasm.extend_from_slice(&[42, 1, 0]);
    let message = upload_error(&server, &wasm);
    assert!(message.contains("core module"), "{message}");
}

#[test]
fn component_new_wraps_a_command_module() {
    let dir = tempfile::tempdir().unwrap();
    let module = dir.path().join("writer.wasm");
    let output = dir.path().join("writer.component.wasm");
    std::fs::write(&module, writer("wrapped\n", 0)).unwrap();

    let status = std::process::Command::new(env!("CARGO_BIN_EXE_apex"))
        .args(["component", "new"])
        .arg(&module)
        .arg("-o")
        .arg(&output)
        .status()
        .unwrap();
    assert!(status.success());

    let server = TestServer::start();
    let record = server.upload("wrapped", &std::fs::read(&output).unwrap()).json();
    assert_eq!(record["kind"], "command", "{record}");
    assert_eq!(record["format"], "component", "{record}");
    let result = server.run("wrapped", json!({}));
    assert_eq!(result["stdout"], "wrapped\n", "{result}");
}

#[test]
fn component_new_rejects_what_it_cannot_wrap() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, Vec<u8>, &str); 5] = [
        ("text", b"not wasm at all".to_vec(), "not a WebAssembly binary"),
        (
            "component",
            std::fs::read(common::plugin("hello")).unwrap(),
            "a component already",
        ),
        (
            "library",
            wat::parse_str(r#"(module (memory (export "memory") 1))"#).unwrap(),
            "no `_start` and carries no WIT world",
        ),
        (
            "no-memory",
            wat::parse_str(r#"(module (func (export "_start")))"#).unwrap(),
            "exports no memory named `memory`",
        ),
        (
            "env-import",
            wat::parse_str(
                r#"(module (import "env" "f" (func)) (memory (export "memory") 1) (func (export "_start")))"#,
            )
            .unwrap(),
            "imports `env::f`",
        ),
    ];
    for (name, bytes, expected) in cases {
        let input = dir.path().join(format!("{name}.wasm"));
        let output = dir.path().join(format!("{name}.out.wasm"));
        std::fs::write(&input, bytes).unwrap();
        let result = std::process::Command::new(env!("CARGO_BIN_EXE_apex"))
            .args(["component", "new"])
            .arg(&input)
            .arg("-o")
            .arg(&output)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert!(!result.status.success(), "{name}: {stderr}");
        assert!(stderr.contains(expected), "{name}: {stderr}");
        assert!(!output.exists(), "{name}: nothing is written on failure");
    }
}

#[test]
fn module_with_too_many_imports_is_rejected() {
    // Duplicate imports are valid, but wit-component handles them in time
    // quadratic in their number.
    let imports: String = (0..300)
        .map(|_| r#"(import "wasi_snapshot_preview1" "sched_yield" (func (result i32)))"#)
        .collect();
    let wasm = wat::parse_str(format!(
        r#"(module {imports} (memory (export "memory") 1) (func (export "_start")))"#
    ))
    .unwrap();
    let server = TestServer::start();
    let message = upload_error(&server, &wasm);
    assert!(message.contains("300 imports"), "{message}");
}

#[test]
fn trap_text_is_capped() {
    // Recursion until the stack overflows, through functions whose names
    // (in the name section, chosen by the module) are 50,000 bytes long.
    let name = "x".repeat(50_000);
    let wasm = wat::parse_str(format!(
        r#"(module
            (memory (export "memory") 1)
            (func ${name}a (call ${name}b))
            (func ${name}b (call ${name}a))
            (func (export "_start") (call ${name}a)))"#
    ))
    .unwrap();
    let server = TestServer::start();
    assert_eq!(server.upload("deep", &wasm).status, 201);
    let result = server.run("deep", json!({}));
    assert_eq!(result["status"], "failed", "{}", &result.to_string()[..500]);
    let error = result["error"].as_str().unwrap();
    assert!(
        error.len() <= 16 * 1024 + 64,
        "{} bytes of error text",
        error.len()
    );
    assert!(
        error.ends_with(" bytes)"),
        "the text was cut: {}",
        &error[error.len() - 100..]
    );
}

#[test]
fn stop_does_not_wait_for_a_slow_compile() {
    // Deeply nested blocks take Cranelift minutes to compile.
    let depth = 100_000;
    let wat = format!(
        r#"(module (memory (export "memory") 1) (func (export "_start") {} {}))"#,
        "(block ".repeat(depth),
        ")".repeat(depth)
    );
    let wasm = wat::parse_str(wat).unwrap();
    let mut server = TestServer::start();
    let addr = server.addr.clone();
    // The client gives up after a second; the compile goes on without it.
    std::thread::spawn(move || {
        let request = common::Request::new("PUT", "/v1/plugins/slow", wasm).signed();
        let stream = std::net::TcpStream::connect(&addr).unwrap();
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(1)))
            .unwrap();
        let _ = std::panic::catch_unwind(|| common::exchange(stream, &addr, &request));
    })
    .join()
    .unwrap();

    let started = std::time::Instant::now();
    server.stop();
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "the server took {:?} to stop",
        started.elapsed()
    );
}

#[test]
fn trap_in_adapter_explained() {
    // Makes one WASI call, so the adapter sets up its state in the module's
    // memory, overwrites all of memory as a runtime that assumes it owns it
    // would, and makes another call.
    let wasm = wat::parse_str(
        r#"(module
            (import "wasi_snapshot_preview1" "clock_time_get" (func $now (param i32 i64 i32) (result i32)))
            (memory (export "memory") 1)
            (func (export "_start")
                (drop (call $now (i32.const 1) (i64.const 0) (i32.const 0)))
                (memory.fill (i32.const 16) (i32.const 255)
                    (i32.sub (i32.mul (memory.size) (i32.const 65536)) (i32.const 16)))
                (drop (call $now (i32.const 1) (i64.const 0) (i32.const 0)))))"#,
    )
    .unwrap();
    let server = TestServer::start();
    assert_eq!(server.upload("clobber", &wasm).status, 201);
    let result = server.run("clobber", json!({}));
    assert_eq!(result["status"], "failed", "{result}");
    let error = result["error"].as_str().unwrap();
    assert!(error.contains("inside the WASI preview-1 adapter"), "{error}");
}

#[test]
fn memory_over_limit_names_the_policy_key() {
    let server = TestServer::start_with(Setup {
        policy: "limits: {memory_mib: 64}\n".into(),
    });
    // A minimum of 10,000 pages (625 MiB).
    let wasm =
        wat::parse_str(r#"(module (memory (export "memory") 10000) (func (export "_start")))"#).unwrap();
    let message = upload_error(&server, &wasm);
    assert!(message.contains("limits.memory_mib"), "{message}");
}

#[test]
fn path_operation_denials_recorded() {
    // Descriptor 3 is the first preopen (the work directory, read-write) and
    // 4 the second (read-only). Each call tries to leave its directory or to
    // write where it may only read.
    let wasm = wat::parse_str(
        r#"(module
            (import "wasi_snapshot_preview1" "path_filestat_get" (func $stat (param i32 i32 i32 i32 i32) (result i32)))
            (import "wasi_snapshot_preview1" "path_create_directory" (func $mkdir (param i32 i32 i32) (result i32)))
            (import "wasi_snapshot_preview1" "path_unlink_file" (func $unlink (param i32 i32 i32) (result i32)))
            (import "wasi_snapshot_preview1" "path_readlink" (func $readlink (param i32 i32 i32 i32 i32 i32) (result i32)))
            (memory (export "memory") 1)
            (data (i32.const 16) "../stat-target")
            (data (i32.const 48) "made-in-ro")
            (data (i32.const 80) "../unlink-target")
            (data (i32.const 112) "../readlink-target")
            (func (export "_start")
                (drop (call $stat (i32.const 3) (i32.const 0) (i32.const 16) (i32.const 14) (i32.const 1024)))
                (drop (call $mkdir (i32.const 4) (i32.const 48) (i32.const 10)))
                (drop (call $unlink (i32.const 3) (i32.const 80) (i32.const 16)))
                (drop (call $readlink (i32.const 3) (i32.const 112) (i32.const 18) (i32.const 2048) (i32.const 64) (i32.const 4096)))))"#,
    )
    .unwrap();
    let server = TestServer::start();
    assert_eq!(server.upload("paths", &wasm).status, 201);
    let result = server.run("paths", json!({}));
    assert_eq!(result["status"], "succeeded", "{result}");
    assert!(!server.ro().join("made-in-ro").exists());

    let denied: Vec<&str> = result["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["capability"] == "file" && d["allowed"] == false)
        .map(|d| d["target"].as_str().unwrap())
        .collect();
    for target in [
        "../stat-target",
        "made-in-ro",
        "../unlink-target",
        "../readlink-target",
    ] {
        assert!(denied.contains(&target), "{target} is not recorded: {result}");
    }
    let audited: Vec<serde_json::Value> = server
        .audit()
        .into_iter()
        .filter(|e| e["kind"] == "policy_denial" && e["capability"] == "file")
        .collect();
    assert_eq!(audited.len(), 4, "{audited:?}");
}

#[test]
fn component_new_keeps_its_input() {
    let dir = tempfile::tempdir().unwrap();
    let module = dir.path().join("writer.wasm");
    let bytes = writer("kept\n", 0);
    std::fs::write(&module, &bytes).unwrap();

    let result = std::process::Command::new(env!("CARGO_BIN_EXE_apex"))
        .args(["component", "new"])
        .arg(&module)
        .arg("-o")
        .arg(&module)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(!result.status.success(), "{stderr}");
    assert!(stderr.contains("is the module itself"), "{stderr}");
    assert_eq!(std::fs::read(&module).unwrap(), bytes, "the module is unchanged");
}
