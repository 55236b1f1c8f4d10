//! The example clients in `examples/clients` (Python standard library and
//! Node.js built-ins) reproduce the signing vectors and upload and run a
//! plugin against a live server.

mod common;

use std::process::Command;

use common::TestServer;

/// Returns each example client as its interpreter and script.
fn clients() -> [(&'static str, std::path::PathBuf); 2] {
    let dir = common::repo_root().join("examples/clients");
    [
        ("python3", dir.join("apex_client.py")),
        ("node", dir.join("apex_client.mjs")),
    ]
}

fn run(program: &str, script: &std::path::Path, args: &[&str], server: Option<&TestServer>) -> String {
    let mut command = Command::new(program);
    command.arg(script).args(args);
    if let Some(server) = server {
        command
            .env("APEX_URL", format!("http://{}", server.addr))
            .env("APEX_SHARED_KEY", common::KEY);
    }
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{program} is required for this test and could not start: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{program} {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[test]
fn clients_reproduce_vectors() {
    let data = common::repo_root().join("runtime/tests/data");
    for (program, script) in clients() {
        for file in ["signing-vectors.json", "extra-signing-vectors.json"] {
            let path = data.join(file);
            let out = run(program, &script, &["vectors", path.to_str().unwrap()], None);
            assert!(out.contains("vectors as expected"), "{program}: {out}");
        }
    }
}

#[test]
fn clients_upload_and_run() {
    let server = TestServer::start();
    let wasm = common::plugin("hello");
    for (program, script) in clients() {
        let name = format!("hello-{}", program.trim_end_matches('3'));
        let upload = run(
            program,
            &script,
            &["upload", &name, wasm.to_str().unwrap()],
            Some(&server),
        );
        assert!(upload.contains("\"sha256\""), "{program}: {upload}");

        let result = run(
            program,
            &script,
            &["run", &name, r#"{"name": "Ada"}"#],
            Some(&server),
        );
        assert!(result.contains("Hello, Ada!"), "{program}: {result}");
    }
}
