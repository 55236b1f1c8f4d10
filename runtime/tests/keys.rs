//! The key ring: several keys, scopes, rotation, revocation, expiry and the
//! file permissions that keep keys private.

mod common;

use std::time::{Duration, Instant};

use common::{Request, Setup, TestServer};

const OLD: &str = "old-key-0123456789abcdef0123456789abcdef";
const NEW: &str = "new-key-0123456789abcdef0123456789abcdef";
const READER: &str = "reader-key-0123456789abcdef0123456789ab";
const RUNNER: &str = "runner-key-0123456789abcdef0123456789ab";

const ENV: [(&str, &str); 4] = [
    ("APEX_KEY_OLD", OLD),
    ("APEX_KEY_NEW", NEW),
    ("APEX_KEY_READER", READER),
    ("APEX_KEY_RUNNER", RUNNER),
];

fn keys_file(old_disabled: bool) -> String {
    format!(
        "keys:\n  - {{id: old, secret_env: APEX_KEY_OLD, scopes: [admin, run, read], disabled: {old_disabled}}}\n  \
         - {{id: new, secret_env: APEX_KEY_NEW, scopes: [admin, run, read]}}\n  \
         - {{id: reader, secret_env: APEX_KEY_READER, scopes: [read]}}\n  \
         - {{id: runner, secret_env: APEX_KEY_RUNNER, scopes: [run], plugins: [hello]}}\n"
    )
}

fn start() -> TestServer {
    let server = TestServer::start_with_keys(Setup::default(), &keys_file(false), &ENV);
    server.upload_plugin("hello");
    server.upload_plugin("probe");
    server
}

fn list(key_id: &str, secret: &str) -> Request {
    Request::new("GET", "/v1/plugins", "").signed_with(key_id, secret)
}

#[test]
fn two_keys_valid_at_once() {
    let server = start();
    assert_eq!(server.send(&list("old", OLD)).status, 200);
    assert_eq!(server.send(&list("new", NEW)).status, 200);
    // The shared key stays valid beside the file's keys.
    assert_eq!(
        server
            .send(&Request::new("GET", "/v1/plugins", "").signed())
            .status,
        200
    );
}

#[test]
fn wrong_key_id_fails_verification() {
    let server = start();
    for (id, secret) in [("old", NEW), ("nobody", OLD), ("new", OLD)] {
        let response = server.send(&list(id, secret));
        assert_eq!(response.status, 401, "{id}");
        assert_eq!(response.error_code(), "bad_signature");
    }
    let response = server.send(&list("bad id!", OLD));
    assert_eq!(response.error_code(), "invalid_key_id");
    let failure = server
        .audit()
        .into_iter()
        .find(|e| e["kind"] == "auth_failure")
        .unwrap();
    assert_eq!(failure["key_id"], "old", "the claimed key id is audited");
}

#[test]
fn reload_revokes_disabled_key() {
    let server = start();
    assert_eq!(server.send(&list("old", OLD)).status, 200);

    std::fs::write(server.dir.path().join("keys.yaml"), keys_file(true)).unwrap();
    let response = server.send(&Request::new("POST", "/v1/keys/reload", "").signed_with("new", NEW));
    assert_eq!(
        response.status,
        200,
        "{}",
        String::from_utf8_lossy(&response.body)
    );

    let response = server.send(&list("old", OLD));
    assert_eq!(response.status, 401);
    assert_eq!(response.error_code(), "key_disabled");
    assert_eq!(server.send(&list("new", NEW)).status, 200);
    assert!(server.audit().iter().filter(|e| e["kind"] == "keys_load").count() >= 2);
}

#[test]
fn sighup_reloads_keys() {
    let server = start();
    std::fs::write(server.dir.path().join("keys.yaml"), keys_file(true)).unwrap();
    let status = std::process::Command::new("kill")
        .arg("-HUP")
        .arg(server.pid().to_string())
        .status()
        .unwrap();
    assert!(status.success());

    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let response = server.send(&list("old", OLD));
        if response.status == 401 {
            assert_eq!(response.error_code(), "key_disabled");
            break;
        }
        assert!(Instant::now() < deadline, "SIGHUP did not reload the keys");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn bad_keys_file_keeps_old_ring() {
    let server = start();
    std::fs::write(server.dir.path().join("keys.yaml"), "keys: [ {id: broken").unwrap();
    let response = server.send(&Request::new("POST", "/v1/keys/reload", "").signed_with("new", NEW));
    assert_eq!(response.status, 422);
    assert_eq!(response.error_code(), "invalid_keys");
    assert_eq!(
        server.send(&list("old", OLD)).status,
        200,
        "the old keys stay in force"
    );
    assert!(server.audit().iter().any(|e| e["kind"] == "keys_load_failed"));
}

#[test]
fn expired_key_rejected() {
    let keys = "keys:\n  - {id: gone, secret_env: APEX_KEY_OLD, scopes: [read], not_after: 2020-01-01T00:00:00Z}\n  \
                - {id: later, secret_env: APEX_KEY_NEW, scopes: [read], not_after: 2999-01-01T00:00:00Z}\n";
    let server = TestServer::start_with_keys(Setup::default(), keys, &ENV);
    let response = server.send(&list("gone", OLD));
    assert_eq!(response.status, 401);
    assert_eq!(response.error_code(), "key_expired");
    assert_eq!(server.send(&list("later", NEW)).status, 200);
}

#[test]
fn scopes_enforced_with_403() {
    let server = start();
    let wasm = std::fs::read(common::plugin("hello")).unwrap();

    // read: may list, may not upload, run or reload.
    assert_eq!(server.send(&list("reader", READER)).status, 200);
    for request in [
        Request::new("PUT", "/v1/plugins/hello", wasm.clone()).signed_with("reader", READER),
        Request::new("DELETE", "/v1/plugins/hello", "").signed_with("reader", READER),
        Request::new("POST", "/v1/plugins/hello/run", "{}").signed_with("reader", READER),
        Request::new("POST", "/v1/keys/reload", "").signed_with("reader", READER),
    ] {
        let response = server.send(&request);
        assert_eq!(response.status, 403, "{} {}", request.method, request.target);
        assert_eq!(response.error_code(), "forbidden");
    }

    // run, limited to hello: may run hello only, may not read or upload.
    let hello =
        server.send(&Request::new("POST", "/v1/plugins/hello/run", "{}").signed_with("runner", RUNNER));
    assert_eq!(hello.status, 200);
    assert_eq!(hello.json()["key_id"], "runner", "the run records its key");
    for request in [
        Request::new("POST", "/v1/plugins/probe/run", r#"{"input":{"op":"echo"}}"#)
            .signed_with("runner", RUNNER),
        list("runner", RUNNER),
        Request::new("PUT", "/v1/plugins/other", wasm).signed_with("runner", RUNNER),
    ] {
        let response = server.send(&request);
        assert_eq!(response.status, 403, "{} {}", request.method, request.target);
    }

    let denials: Vec<_> = server
        .audit()
        .into_iter()
        .filter(|e| e["kind"] == "scope_denial")
        .collect();
    assert_eq!(denials.len(), 7, "every scope denial is audited");
    assert!(
        denials
            .iter()
            .any(|e| e["key_id"] == "runner" && e["reason"].as_str().unwrap().contains("probe"))
    );
}

#[test]
fn upload_records_key_id() {
    let server = start();
    let wasm = std::fs::read(common::plugin("hello")).unwrap();
    let response = server.send(&Request::new("PUT", "/v1/plugins/again", wasm).signed_with("new", NEW));
    assert_eq!(response.status, 201);
    let upload = server
        .audit()
        .into_iter()
        .rev()
        .find(|e| e["kind"] == "plugin_upload")
        .unwrap();
    assert_eq!(upload["key_id"], "new");
    assert_eq!(upload["plugin"], "again");
}

/// Runs `apex serve` in `dir` and returns its stderr, expecting it to fail.
fn serve_fails(dir: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> String {
    let output = common::serve_command(dir)
        .args(args)
        .env_remove("APEX_SHARED_KEY")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(!output.status.success());
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn readable_key_files_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("policy.yaml"), "").unwrap();

    std::fs::write(
        dir.path().join("keys.yaml"),
        "keys:\n  - {id: a, secret_file: a.key, scopes: [read]}\n",
    )
    .unwrap();
    std::fs::set_permissions(
        dir.path().join("keys.yaml"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let stderr = serve_fails(dir.path(), &["--keys", "keys.yaml"], &[]);
    assert!(
        stderr.contains("keys.yaml is readable by group or others") && stderr.contains("chmod 600"),
        "{stderr}"
    );

    std::fs::set_permissions(
        dir.path().join("keys.yaml"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    std::fs::write(dir.path().join("a.key"), format!("{OLD}\n")).unwrap();
    std::fs::set_permissions(dir.path().join("a.key"), std::fs::Permissions::from_mode(0o640)).unwrap();
    let stderr = serve_fails(dir.path(), &["--keys", "keys.yaml"], &[]);
    assert!(
        stderr.contains("a.key is readable by group or others"),
        "{stderr}"
    );

    std::fs::write(dir.path().join(".env"), format!("APEX_SHARED_KEY={OLD}\n")).unwrap();
    std::fs::set_permissions(dir.path().join(".env"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let stderr = serve_fails(dir.path(), &[], &[]);
    assert!(stderr.contains(".env is readable by group or others"), "{stderr}");
}

#[test]
fn dotenv_supplies_key_and_environment_wins() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("policy.yaml"), "").unwrap();
    std::fs::write(dir.path().join(".env"), format!("APEX_SHARED_KEY={OLD}\n")).unwrap();
    std::fs::set_permissions(dir.path().join(".env"), std::fs::Permissions::from_mode(0o600)).unwrap();

    let start = |env: &[(&str, &str)]| {
        let mut child = common::serve_command(dir.path())
            .env_remove("APEX_SHARED_KEY")
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        let addr = line
            .trim()
            .strip_prefix("apex listening on http://")
            .expect("started")
            .to_string();
        (child, addr)
    };

    let (mut child, addr) = start(&[]);
    let response = common::send_raw(&addr, &list("default", OLD));
    assert_eq!(response.status, 200, "the key comes from .env");
    child.kill().unwrap();
    child.wait().unwrap();

    let (mut child, addr) = start(&[("APEX_SHARED_KEY", NEW)]);
    assert_eq!(
        common::send_raw(&addr, &list("default", NEW)).status,
        200,
        "the environment wins over .env"
    );
    assert_eq!(common::send_raw(&addr, &list("default", OLD)).status, 401);
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn sign_command_names_key_from_environment() {
    let server = start();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_apex"))
        .args(["sign", "GET", "/v1/plugins"])
        .env("APEX_SHARED_KEY", READER)
        .env("APEX_KEY_ID", "reader")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut request = Request::new("GET", "/v1/plugins", "");
    for line in String::from_utf8(output.stdout).unwrap().lines() {
        let (name, value) = line.split_once(": ").unwrap();
        request = request.header(name, value);
    }
    assert_eq!(request.get_header("X-Key-Id"), "reader");
    assert_eq!(server.send(&request).status, 200);
}

/// Runs the `apex` client in `dir` with `args`, and with only the settings
/// of `env` in its environment.
fn client(dir: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_apex"))
        .args(args)
        .current_dir(dir)
        .env_remove("APEX_URL")
        .env_remove("APEX_SHARED_KEY")
        .env_remove("APEX_KEY_ID")
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

#[test]
fn client_reads_settings_from_dotenv() {
    use std::os::unix::fs::PermissionsExt;
    let server = start();
    let dir = tempfile::tempdir().unwrap();
    let dotenv = dir.path().join(".env");
    std::fs::write(
        &dotenv,
        format!(
            "APEX_URL=http://{}\nAPEX_SHARED_KEY={READER}\nAPEX_KEY_ID=reader\n",
            server.addr
        ),
    )
    .unwrap();
    std::fs::set_permissions(&dotenv, std::fs::Permissions::from_mode(0o600)).unwrap();
    let plugins = |env: &[(&str, &str)]| client(dir.path(), &["plugins"], env);

    let output = plugins(&[]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("hello"), "{stdout}");

    // The environment wins over .env: this key id is not the reader's.
    let output = plugins(&[("APEX_KEY_ID", "new")]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("401"), "{stderr}");
    assert!(
        stderr.contains("check APEX_SHARED_KEY and APEX_KEY_ID"),
        "{stderr}"
    );

    // A .env that others can read is not used.
    std::fs::set_permissions(&dotenv, std::fs::Permissions::from_mode(0o644)).unwrap();
    let output = plugins(&[]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(".env is readable by group or others"), "{stderr}");

    // With the key in the environment, .env is not the client's: not read.
    // Without a key id the request names `default`, which this server lacks.
    let url = format!("http://{}", server.addr);
    let output = plugins(&[("APEX_URL", &url), ("APEX_SHARED_KEY", READER)]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("readable by group"), "{stderr}");
    assert!(stderr.contains("401"), "{stderr}");
}

#[test]
fn client_errors_name_setting_and_fix() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let apex = |args: &[&str], env: &[(&str, &str)]| {
        let output = client(dir.path(), args, env);
        assert!(!output.status.success(), "{args:?} must fail");
        String::from_utf8_lossy(&output.stderr).into_owned()
    };

    // Nothing listens on port 1 of this machine.
    let stderr = apex(
        &["plugins"],
        &[("APEX_URL", "http://127.0.0.1:1"), ("APEX_SHARED_KEY", READER)],
    );
    assert!(stderr.contains("cannot reach the Apex server at"), "{stderr}");
    assert!(stderr.contains("Set APEX_URL"), "{stderr}");

    // A server that closes the connection without a response, as one that
    // is stopping does, was reached.
    let closing = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closing.local_addr().unwrap());
    let closer = std::thread::spawn(move || {
        if let Ok((mut stream, _)) = closing.accept() {
            let mut head = [0u8; 512];
            let _ = std::io::Read::read(&mut stream, &mut head);
        }
    });
    let stderr = apex(&["plugins"], &[("APEX_URL", &url), ("APEX_SHARED_KEY", READER)]);
    closer.join().unwrap();
    assert!(stderr.contains("did not answer"), "{stderr}");
    assert!(stderr.contains("apex runs"), "{stderr}");

    let stderr = apex(&["sign", "GET", "/v1/plugins"], &[("APEX_SHARED_KEY", "")]);
    assert!(stderr.contains("APEX_SHARED_KEY is not set or empty"), "{stderr}");
    assert!(stderr.contains(".env"), "{stderr}");

    let dotenv = dir.path().join(".env");
    std::fs::write(&dotenv, format!("APEX_SHARED_KEY={READER}\nnot a line\n")).unwrap();
    std::fs::set_permissions(&dotenv, std::fs::Permissions::from_mode(0o600)).unwrap();
    let stderr = apex(&["plugins"], &[]);
    assert!(stderr.contains("invalid line \"not a line\" in .env"), "{stderr}");
    assert!(stderr.contains("write NAME=value"), "{stderr}");
}
