//! Uploading, listing, running and deleting plugins through the signed API.

mod common;

use common::{Request, Setup, TestServer};
use serde_json::json;

#[test]
fn hello_greets_by_name() {
    let server = TestServer::start();
    server.upload_plugin("hello");

    let result = server.run("hello", json!({ "input": { "name": "Ada" } }));
    assert_eq!(result["status"], "succeeded", "{result}");
    assert!(
        result["output"]["greeting"].as_str().unwrap().contains("Ada"),
        "{result}"
    );
    assert!(result["duration_ms"].is_u64());
    assert_eq!(result["stdout"], "");
}

#[test]
fn wordcount_counts_work_directory() {
    let server = TestServer::start();
    server.upload_plugin("wordcount");
    let work = server.work();
    std::fs::write(work.join("a.txt"), "one two three\nfour\n").unwrap();
    std::fs::create_dir(work.join("sub")).unwrap();
    std::fs::write(work.join("sub/b.txt"), "five six\n").unwrap();

    let result = server.run("wordcount", json!({ "input": { "path": work } }));
    assert_eq!(result["status"], "succeeded", "{result}");
    assert_eq!(
        result["output"],
        json!({ "files": 2, "lines": 3, "words": 6, "bytes": 28 })
    );
}

#[test]
fn wordcount_outside_preopens_fails_cleanly() {
    let server = TestServer::start();
    server.upload_plugin("wordcount");

    for path in ["/etc", "/", "relative"] {
        let result = server.run("wordcount", json!({ "input": { "path": path } }));
        assert_eq!(result["status"], "failed", "{path}: {result}");
        assert!(
            result["error"].as_str().unwrap().contains("cannot read"),
            "{path}: {result}"
        );
    }
}

#[test]
fn upload_returns_digest_size_and_kind() {
    let server = TestServer::start();
    let wasm = std::fs::read(common::plugin("hello")).unwrap();
    let response = server.upload("hello", &wasm);
    assert_eq!(response.status, 201);

    let record = response.json();
    assert_eq!(record["name"], "hello");
    assert_eq!(record["sha256"], apex::auth::sha256_hex(&wasm));
    assert_eq!(record["size"], wasm.len() as u64);
    assert_eq!(record["kind"], "task");

    let echo = std::fs::read(common::plugin("echo-cli")).unwrap();
    assert_eq!(server.upload("echo-cli", &echo).json()["kind"], "command");

    let audit = server.audit();
    let uploads: Vec<_> = audit.iter().filter(|e| e["kind"] == "plugin_upload").collect();
    assert_eq!(uploads.len(), 2);
    assert_eq!(uploads[0]["sha256"], record["sha256"]);
}

#[test]
fn list_show_and_delete() {
    let server = TestServer::start();
    server.upload_plugin("wordcount");
    server.upload_plugin("hello");

    let list = server
        .send(&Request::new("GET", "/v1/plugins", "").signed())
        .json();
    let names: Vec<&str> = list["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["hello", "wordcount"]);

    let show = server.send(&Request::new("GET", "/v1/plugins/hello", "").signed());
    assert_eq!(show.status, 200);
    assert_eq!(show.json()["kind"], "task");

    let delete = server.send(&Request::new("DELETE", "/v1/plugins/hello", "").signed());
    assert_eq!(delete.status, 200);
    assert_eq!(delete.json()["deleted"], "hello");
    // Deleting again points to the list, not to an upload.
    let again = server.send(&Request::new("DELETE", "/v1/plugins/hello", "").signed());
    assert!(
        again.error_message().contains("nothing to delete"),
        "{}",
        again.error_message()
    );

    for (method, target) in [
        ("GET", "/v1/plugins/hello"),
        ("DELETE", "/v1/plugins/hello"),
        ("POST", "/v1/plugins/hello/run"),
    ] {
        let response = server.send(&Request::new(method, target, "").signed());
        assert_eq!(response.status, 404, "{method} {target}");
        assert_eq!(response.error_code(), "plugin_not_found");
    }
    assert!(
        server
            .audit()
            .iter()
            .any(|e| e["kind"] == "plugin_delete" && e["plugin"] == "hello")
    );
}

#[test]
fn upload_replaces_existing_plugin() {
    let server = TestServer::start();
    server.upload_plugin("hello");
    let probe = std::fs::read(common::plugin("probe")).unwrap();
    assert_eq!(server.upload("hello", &probe).status, 201);

    let result = server.run("hello", json!({ "input": { "op": "echo" } }));
    assert_eq!(
        result["output"],
        json!({ "op": "echo" }),
        "the new component runs under the old name"
    );
    let blobs = blob_files(&server);
    assert_eq!(
        blobs.len(),
        2,
        "one component and its compiled code; the replaced ones are removed: {blobs:?}"
    );
}

#[test]
fn invalid_names_rejected() {
    let server = TestServer::start();
    let wasm = std::fs::read(common::plugin("hello")).unwrap();
    for name in [
        "Hello",
        "-x",
        "_x",
        "a.b",
        "a%2Fb",
        "..",
        "%2E%2E",
        "a%20b",
        &"a".repeat(64),
    ] {
        let response = server.upload(name, &wasm);
        assert_eq!(response.status, 400, "{name}");
        assert_eq!(response.error_code(), "invalid_name", "{name}");
    }
    let longest = "a".repeat(63);
    assert_eq!(server.upload(&longest, &wasm).status, 201);
}

#[test]
fn garbage_upload_rejected() {
    let server = TestServer::start();
    let response = server.upload("junk", b"");
    assert_eq!(response.status, 400);
    assert_eq!(response.error_code(), "invalid_component");
    assert!(
        response.error_message().contains("the upload is empty"),
        "{}",
        response.error_message()
    );

    for body in [&b"hello"[..], b"\0asm", b"\x7fELF\x02\x01\x01\0\0\0\0\0"] {
        let response = server.upload("junk", body);
        assert_eq!(response.status, 400, "{body:?}");
        assert_eq!(response.error_code(), "invalid_component");
        assert!(
            response.json()["error"]["message"]
                .as_str()
                .unwrap()
                .contains("not a WebAssembly binary")
        );
    }

    // A component header followed by garbage: the reason is named once.
    let response = server.upload("junk", b"\0asm\x0d\0\x01\0\xff\xff\xff");
    assert_eq!(response.status, 400);
    let message = response.error_message();
    assert!(message.starts_with("invalid component: "), "{message}");
    assert_eq!(message.matches("invalid component").count(), 1, "{message}");

    let list = server
        .send(&Request::new("GET", "/v1/plugins", "").signed())
        .json();
    assert_eq!(
        list["plugins"],
        json!([]),
        "nothing is stored after a rejected upload"
    );
}

#[test]
fn core_module_rejected_with_hint() {
    let server = TestServer::start();
    // The smallest valid core module: magic and version 1, no sections.
    let response = server.upload("core", b"\0asm\x01\0\0\0");
    assert_eq!(response.status, 400);
    let message = response.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(message.contains("core module"), "{message}");
    assert!(message.contains("component"), "{message}");
}

#[test]
fn unsupported_import_named() {
    let server = TestServer::start();
    // A component that imports an interface the runtime does not provide.
    let wat = r#"(component (import "acme:missing/thing" (instance (export "f" (func)))))"#;
    let wasm = wat::parse_str(wat).unwrap();
    let response = server.upload("importer", &wasm);
    assert_eq!(
        response.status,
        400,
        "{}",
        String::from_utf8_lossy(&response.body)
    );
    let message = response.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(message.contains("acme:missing/thing"), "{message}");
}

#[test]
fn component_without_entry_point_rejected() {
    let server = TestServer::start();
    let wasm = wat::parse_str("(component)").unwrap();
    let response = server.upload("empty", &wasm);
    assert_eq!(response.status, 400);
    assert!(
        response.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("wasi:cli/run")
    );
}

#[test]
fn upload_over_two_mib_reaches_validation() {
    let server = TestServer::start();
    // A valid component of 3 MiB with no entry point: the body limit must let
    // it through to validation (componentize-py components are about 20 MB).
    let data = "a".repeat(3 << 20);
    let wasm = wat::parse_str(format!(
        "(component (core module (memory 64) (data (i32.const 0) \"{data}\")))"
    ))
    .unwrap();
    let response = server.upload("large", &wasm);
    assert_eq!(
        response.status,
        400,
        "{}",
        String::from_utf8_lossy(&response.body)
    );
    assert!(
        response.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("exports neither")
    );
}

#[test]
fn task_output_over_limit_fails_run() {
    let server = TestServer::start_with(Setup {
        policy: "limits: {output_kib: 4}\n".into(),
    });
    server.upload_plugin("probe");
    let padding = "p".repeat(5000);
    let result = server.run("probe", json!({ "input": { "op": "echo", "message": padding } }));
    assert_eq!(result["status"], "failed", "{result}");
    assert!(
        result["error"].as_str().unwrap().contains("more than the 4 KiB"),
        "{result}"
    );

    let small = server.run("probe", json!({ "input": { "op": "echo", "message": "short" } }));
    assert_eq!(small["status"], "succeeded");
}

#[test]
fn oversized_upload_rejected() {
    let server = TestServer::start_with(Setup {
        policy: "limits: {upload_mib: 1}\n".into(),
    });
    let response = server.upload("big", &vec![0u8; (1 << 20) + 1]);
    assert_eq!(
        response.status,
        413,
        "{}",
        String::from_utf8_lossy(&response.body)
    );
}

#[test]
fn malformed_run_requests_rejected() {
    let server = TestServer::start();
    server.upload_plugin("hello");

    for body in [
        "{",
        "[1,2]",
        "{\"input\": }",
        "{\"inptu\": 1}",
        "{\"args\": \"x\"}",
        "\u{ff}",
    ] {
        let response = server.send(&Request::new("POST", "/v1/plugins/hello/run", body).signed());
        assert_eq!(response.status, 400, "{body}");
        assert_eq!(response.error_code(), "invalid_json", "{body}");
    }

    let response = server.send(&Request::new("POST", "/v1/plugins/hello/run", r#"{"args":["x"]}"#).signed());
    assert_eq!(response.status, 400);
    assert_eq!(response.error_code(), "args_not_supported");

    // An empty body is a run without input.
    let response = server.send(&Request::new("POST", "/v1/plugins/hello/run", "").signed());
    assert_eq!(response.status, 200);
    assert_eq!(response.json()["output"]["greeting"], "Hello, world!");
}

#[test]
fn oversized_input_rejected() {
    let server = TestServer::start_with(Setup {
        policy: "limits: {input_kib: 1}\n".into(),
    });
    server.upload_plugin("hello");
    let name = "x".repeat(2000);
    let response = server.send(
        &Request::new(
            "POST",
            "/v1/plugins/hello/run",
            json!({"input": {"name": name}}).to_string(),
        )
        .signed(),
    );
    assert_eq!(response.status, 413);
}

#[test]
fn task_error_fails_run() {
    let server = TestServer::start();
    server.upload_plugin("probe");
    let result = server.run(
        "probe",
        json!({ "input": { "op": "fail", "message": "no such repo" } }),
    );
    assert_eq!(result["status"], "failed");
    assert_eq!(result["error"], "no such repo");
    assert_eq!(result["output"], serde_json::Value::Null);
}

#[test]
fn output_that_is_not_json_returned_as_string() {
    let server = TestServer::start();
    server.upload_plugin("probe");
    let work = server.work();
    std::fs::write(work.join("note.txt"), "plain text").unwrap();
    let result = server.run(
        "probe",
        json!({ "input": { "op": "read", "path": work.join("note.txt") } }),
    );
    // The probe returns the text as a JSON string.
    assert_eq!(result["output"], "plain text");
}

#[test]
fn command_plugin_gets_args_and_stdin() {
    let server = TestServer::start();
    server.upload_plugin("echo-cli");

    let result = server.run(
        "echo-cli",
        json!({ "input": { "x": 1 }, "args": ["--flag", "value"] }),
    );
    assert_eq!(result["status"], "succeeded", "{result}");
    assert_eq!(result["exit_code"], 0);
    let line: serde_json::Value = serde_json::from_str(result["stdout"].as_str().unwrap().trim()).unwrap();
    assert_eq!(line["args"], json!(["echo-cli", "--flag", "value"]));
    assert_eq!(line["stdin"], r#"{"x":1}"#);
    assert_eq!(result["stderr"], "echo-cli: 3 argument(s)\n");

    let failed = server.run("echo-cli", json!({ "args": ["--exit", "3"] }));
    assert_eq!(failed["status"], "failed");
    assert_eq!(failed["exit_code"], 1, "WASI 0.2 reports failure as exit code 1");

    let no_input = server.run("echo-cli", json!({}));
    let line: serde_json::Value = serde_json::from_str(no_input["stdout"].as_str().unwrap().trim()).unwrap();
    assert_eq!(line["stdin"], "", "a run without input has empty stdin");
}

#[test]
fn restart_keeps_plugins() {
    let mut server = TestServer::start();
    server.upload_plugin("hello");
    server.upload_plugin("echo-cli");
    server.restart();

    let result = server.run("hello", json!({ "input": { "name": "Grace" } }));
    assert_eq!(result["output"]["greeting"], "Hello, Grace!");
    let result = server.run("echo-cli", json!({}));
    assert_eq!(result["status"], "succeeded");

    let kinds: Vec<_> = server
        .audit()
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_string())
        .collect();
    assert!(kinds.contains(&"server_stop".to_string()), "{kinds:?}");
    assert_eq!(
        kinds.iter().filter(|k| *k == "server_start").count(),
        2,
        "{kinds:?}"
    );
}

/// Returns the files in the blob directory, sorted.
fn blob_files(server: &TestServer) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(server.data().join("plugins/blobs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
}

fn blob_with_extension(server: &TestServer, extension: &str) -> std::path::PathBuf {
    blob_files(server)
        .into_iter()
        .find(|p| p.extension().is_some_and(|e| e == extension))
        .unwrap_or_else(|| panic!("no .{extension} file in the blob directory"))
}

#[test]
fn altered_component_not_loaded_on_restart() {
    let mut server = TestServer::start();
    server.upload_plugin("hello");
    server.stop();

    // Without compiled code the component must be compiled again, and its
    // digest no longer matches.
    std::fs::remove_file(blob_with_extension(&server, "cwasm")).unwrap();
    let probe = std::fs::read(common::plugin("probe")).unwrap();
    std::fs::write(blob_with_extension(&server, "wasm"), probe).unwrap();

    server.spawn();
    let response = server.send(&Request::new("POST", "/v1/plugins/hello/run", "{}").signed());
    assert_eq!(response.status, 404, "an altered component must not run");
    assert!(server.log().contains("the file was altered"), "{}", server.log());
}

#[test]
fn cached_compiled_code_used_after_restart() {
    let mut server = TestServer::start();
    server.upload_plugin("hello");
    server.restart();

    assert!(
        server.log().contains("loaded plugin from cached compiled code"),
        "{}",
        server.log()
    );
    let result = server.run("hello", json!({ "input": { "name": "Ada" } }));
    assert_eq!(result["output"]["greeting"], "Hello, Ada!");
}

#[test]
fn corrupt_compiled_code_recompiled() {
    let mut server = TestServer::start();
    server.upload_plugin("hello");
    server.stop();

    let artifact = blob_with_extension(&server, "cwasm");
    let mut bytes = std::fs::read(&artifact).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&artifact, bytes).unwrap();

    server.spawn();
    let log = server.log();
    assert!(
        log.contains("stored compiled code was altered; compiling again"),
        "{log}"
    );
    assert!(log.contains("loaded plugin after compiling it"), "{log}");
    let result = server.run("hello", json!({ "input": { "name": "Ada" } }));
    assert_eq!(result["status"], "succeeded");

    // The fresh code is cached again.
    server.restart();
    assert_eq!(
        server
            .log()
            .matches("loaded plugin from cached compiled code")
            .count(),
        1,
        "{}",
        server.log()
    );
}

#[test]
fn wrong_method_and_unknown_paths_answer_json() {
    let server = TestServer::start();
    server.upload_plugin("hello");

    let response = server.send(&Request::new("GET", "/v1/plugins/hello/run", "").signed());
    assert_eq!(response.status, 405);
    assert_eq!(response.error_code(), "method_not_allowed");

    // Paths outside the API are not found, signed or not.
    let response = server.send(&Request::new("GET", "/nope", ""));
    assert_eq!(response.status, 404);
    assert_eq!(response.error_code(), "route_not_found");
}

#[test]
fn client_rejects_invalid_names_before_sending() {
    let server = TestServer::start();
    server.upload_plugin("hello");
    for name in ["hello?x=1", "a/b", "../etc", "", "Hello"] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_apex"))
            .args(["delete", name])
            .env("APEX_URL", format!("http://{}", server.addr))
            .env("APEX_SHARED_KEY", common::KEY)
            .output()
            .unwrap();
        assert!(!output.status.success(), "{name}");
        assert!(
            String::from_utf8_lossy(&output.stderr).contains("invalid plugin name"),
            "{name}"
        );
    }
    let list = server
        .send(&Request::new("GET", "/v1/plugins", "").signed())
        .json();
    assert_eq!(
        list["plugins"].as_array().unwrap().len(),
        1,
        "nothing was deleted"
    );
}

#[test]
fn client_keeps_path_prefix_of_url() {
    let server = TestServer::start();
    // No proxy strips the prefix here, so the server gets it and returns 404.
    // The test checks only that the client sent and signed it.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_apex"))
        .args(["plugins"])
        .env("APEX_URL", format!("http://{}/prefix/", server.addr))
        .env("APEX_SHARED_KEY", common::KEY)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("route_not_found"), "{stdout}");

    let output = std::process::Command::new(env!("CARGO_BIN_EXE_apex"))
        .args(["plugins"])
        .env("APEX_URL", server.addr.clone())
        .env("APEX_SHARED_KEY", common::KEY)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&output.stderr).contains("http://HOST:PORT"));
}

#[test]
fn timeout_message_names_the_key_used() {
    let server = TestServer::start_with(Setup {
        policy: "timeouts: {python_seconds: 1}\n".into(),
    });
    server.upload_plugin("probe");
    let result = server.run("probe", json!({ "input": { "op": "loop" } }));
    assert_eq!(result["status"], "timed_out");
    assert!(
        result["error"]
            .as_str()
            .unwrap()
            .contains("timeouts.python_seconds"),
        "{result}"
    );
}

#[test]
fn each_request_logged_with_duration() {
    let server = TestServer::start();
    server.upload_plugin("hello");
    server.run("hello", json!({}));
    let log = server.log();
    let finished: Vec<&str> = log.lines().filter(|l| l.contains("request finished")).collect();
    assert_eq!(finished.len(), 2, "{log}");
    assert!(
        finished[1].contains("status=200") && finished[1].contains("key_id=default"),
        "{log}"
    );
    assert!(finished[1].contains("duration_ms="), "{log}");
    assert!(
        finished[1].contains("/v1/plugins/hello/run"),
        "the span names the target: {log}"
    );
}

#[test]
fn command_with_wrong_run_type_rejected() {
    let server = TestServer::start();
    // `wasi:cli/run` whose `run` returns s32 instead of `result`.
    let wat = r#"(component
        (core module $m (func (export "run") (result i32) i32.const 0))
        (core instance $i (instantiate $m))
        (func $run (result s32) (canon lift (core func $i "run")))
        (instance $command (export "run" (func $run)))
        (export "wasi:cli/run@0.2.12" (instance $command)))"#;
    let response = server.upload("wrong-run", &wat::parse_str(wat).unwrap());
    assert_eq!(
        response.status,
        400,
        "{}",
        String::from_utf8_lossy(&response.body)
    );
    let message = response.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(
        message.contains("must export `run: func() -> result`"),
        "{message}"
    );
}

#[test]
fn run_body_must_be_an_object() {
    let server = TestServer::start();
    server.upload_plugin("hello");
    for body in ["[]", "[{\"name\": \"Ada\"}]", "\"text\"", "null", "5"] {
        let response = server.send(&common::Request::new("POST", "/v1/plugins/hello/run", body).signed());
        assert_eq!(response.status, 400, "{body}");
        assert_eq!(response.error_code(), "invalid_json", "{body}");
    }
}

#[test]
fn busy_or_invalid_listen_address_rejected() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = busy.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("policy.yaml"), "").unwrap();

    for (address, cause) in [
        (busy.as_str(), "in use"),
        ("127.0.0.1:99999", "invalid port"),
        ("nonsense", "invalid socket address"),
    ] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_apex"))
            .args([
                "serve",
                "--config",
                "policy.yaml",
                "--data",
                "data",
                "--listen",
                address,
            ])
            .current_dir(dir.path())
            .env("APEX_SHARED_KEY", common::KEY)
            .output()
            .unwrap();
        assert!(!output.status.success(), "{address}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains(&format!("cannot listen on {address}")),
            "{stderr}"
        );
        assert!(stderr.contains("such as 127.0.0.1:8080"), "{stderr}");
        assert!(stderr.contains(cause), "{stderr}");
        // The address is checked before anything is created.
        assert!(!dir.path().join("data").exists(), "{address}");
    }
}

#[test]
fn second_server_on_same_data_refused() {
    let server = TestServer::start();
    let output = common::serve_command(server.dir.path())
        .env("APEX_SHARED_KEY", common::KEY)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("in use by another apex server"), "{stderr}");
    // The first server still serves.
    let health = server.send(&common::Request::new("GET", "/healthz", ""));
    assert_eq!(health.status, 200);
}

#[test]
fn compile_over_memory_limit_rejected() {
    // 256 MiB of address space is enough for `hello`, not for CPython.
    let server = TestServer::start_with(Setup {
        policy: "limits: {compile_mib: 256}\n".into(),
    });
    let python = std::fs::read(common::plugin("python-tour")).unwrap();
    let response = server.upload("python", &python);
    assert_eq!(
        response.status,
        400,
        "{}",
        String::from_utf8_lossy(&response.body)
    );
    assert_eq!(response.error_code(), "compile_limit");
    assert!(
        response
            .error_message()
            .contains("more than 256 MiB of memory (limits.compile_mib)"),
        "{}",
        response.error_message()
    );

    // Rejected uploads are audited with the reason.
    let audited = server
        .audit()
        .into_iter()
        .find(|e| e["kind"] == "plugin_upload_rejected")
        .expect("an audit event for the rejected upload");
    assert_eq!(audited["plugin"], "python", "{audited}");
    assert_eq!(audited["code"], "compile_limit", "{audited}");
    assert_eq!(audited["size"], python.len(), "{audited}");

    // The worker ended, not the server, and nothing was stored.
    server.upload_plugin("hello");
    let list = server
        .send(&Request::new("GET", "/v1/plugins", "").signed())
        .json();
    assert_eq!(list["plugins"].as_array().unwrap().len(), 1, "{list}");
}

#[test]
fn upload_works_after_executable_replaced() {
    // As an upgrade does: a new executable renamed over the running one.
    let bin = tempfile::tempdir().unwrap();
    let apex = bin.path().join("apex");
    std::fs::copy(env!("CARGO_BIN_EXE_apex"), &apex).unwrap();
    let server =
        TestServer::start_wrapped(Setup::default(), vec![apex.to_str().unwrap().to_string()], |_| {});
    let replacement = bin.path().join("apex.new");
    std::fs::copy(env!("CARGO_BIN_EXE_apex"), &replacement).unwrap();
    std::fs::rename(&replacement, &apex).unwrap();

    // The compile worker still starts from the running server's executable.
    server.upload_plugin("hello");
    let result = server.run("hello", json!({ "input": { "name": "Ada" } }));
    assert_eq!(result["status"], "succeeded", "{result}");
}
