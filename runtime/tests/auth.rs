//! Request authentication, from the attacker's side, against a real server.

mod common;

use common::{Request, TestServer};
use serde_json::Value;

/// Asserts a 401 with `code`, and that the message leaks no secret.
fn assert_rejected(server: &TestServer, request: &Request, code: &str) {
    let response = server.send(request);
    assert_eq!(
        response.status,
        401,
        "{code}: {}",
        String::from_utf8_lossy(&response.body)
    );
    assert_eq!(response.error_code(), code);
    let body = String::from_utf8_lossy(&response.body);
    assert!(
        !body.contains(common::KEY),
        "the error body must not echo the key"
    );
    if let Some(sig) = request.find_header("X-SIG") {
        assert!(!body.contains(&sig), "the error body must not echo the signature");
    }
}

fn list() -> Request {
    Request::new("GET", "/v1/plugins", "")
}

#[test]
fn healthz_needs_no_signature() {
    let server = TestServer::start();
    let response = server.send(&Request::new("GET", "/healthz", ""));
    assert_eq!(response.status, 200);
    assert_eq!(response.json()["status"], "ok");
}

#[test]
fn signed_request_is_accepted() {
    let server = TestServer::start();
    let response = server.send(&list().signed());
    assert_eq!(
        response.status,
        200,
        "{}",
        String::from_utf8_lossy(&response.body)
    );
    assert_eq!(response.json()["plugins"], serde_json::json!([]));
}

#[test]
fn missing_headers_rejected() {
    let server = TestServer::start();
    assert_rejected(&server, &list(), "missing_header");
    assert_rejected(&server, &list().signed().without_header("X-TS"), "missing_header");
    assert_rejected(
        &server,
        &list().signed().without_header("X-SIG"),
        "missing_header",
    );
}

#[test]
fn unknown_route_requires_signature() {
    let server = TestServer::start();
    assert_rejected(&server, &Request::new("GET", "/v1/nothing", ""), "missing_header");
    let response = server.send(&Request::new("GET", "/v1/nothing", "").signed());
    assert_eq!(response.status, 404);
}

#[test]
fn repeated_headers_rejected() {
    let server = TestServer::start();
    let request = list().signed();
    let ts = request.get_header("X-TS");
    assert_rejected(&server, &request.clone().header("X-TS", &ts), "repeated_header");

    let sig = request.get_header("X-SIG");
    assert_rejected(&server, &list().signed().header("X-SIG", &sig), "repeated_header");
    assert_rejected(
        &server,
        &list().signed().header("X-Nonce", "other"),
        "repeated_header",
    );
}

#[test]
fn malformed_timestamps_rejected() {
    let server = TestServer::start();
    let now = apex::unix_now();
    for bad in [
        format!("+{now}"),
        format!("-{now}"),
        format!("{now}.0"),
        format!("{now} 1"),
        format!("0x{now:x}"),
        format!("{now}e0"),
        String::from("abc"),
        String::from("99999999999999999999999"),
    ] {
        // Sign the bad value itself, so only the format check can reject it.
        let nonce = apex::auth::generate_nonce();
        let text = apex::auth::string_to_sign(&bad, "GET", "/v1/plugins", &nonce, b"");
        let sig = apex::auth::sign(common::KEY.as_bytes(), &text);
        let request = list()
            .header("X-TS", &bad)
            .header("X-Nonce", &nonce)
            .header("X-SIG", &sig);
        assert_rejected(&server, &request, "invalid_timestamp");
    }
}

#[test]
fn stale_timestamps_rejected_both_ways() {
    let server = TestServer::start();
    let now = apex::unix_now();
    // The message names the direction the client clock is off in.
    let cases = [
        (now - 301 - 5, "behind the server clock"),
        (now + 301 + 5, "ahead of the server clock"),
        // Milliseconds, a common slip.
        (now * 1000, "not milliseconds"),
    ];
    for (ts, hint) in cases {
        let response = server.send(&list().signed_at(ts));
        assert_eq!(response.status, 401);
        assert_eq!(response.error_code(), "stale_timestamp");
        assert!(
            response.error_message().contains(hint),
            "{ts}: {}",
            response.error_message()
        );
    }

    // Inside the window, with a margin for the clock moving during the test.
    assert_eq!(server.send(&list().signed_at(now + 290)).status, 200);
    // Earlier timestamps are inside the window too, but precede the server's
    // start; the signature-window check is covered by the unit tests.
    let response = server.send(&list().signed_at(now - 290));
    assert_eq!(response.status, 401);
    assert_eq!(response.error_code(), "timestamp_before_start");
    // How far, and what to check.
    let message = response.error_message();
    assert!(
        message.contains(" s earlier than the server's last start"),
        "{message}"
    );
    assert!(message.contains("client clock"), "{message}");
}

#[test]
fn replay_after_restart_rejected() {
    let mut server = TestServer::start();
    let request = list().signed();
    assert_eq!(server.send(&request).status, 200);

    // The restart empties the replay cache; the server's start time keeps
    // the old signature out.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    server.restart();
    assert_rejected(&server, &request, "timestamp_before_start");
    assert_eq!(server.send(&list().signed()).status, 200);
}

#[test]
fn absolute_form_target_rejected() {
    let server = TestServer::start();
    let target = format!("http://{}/v1/plugins", server.addr);
    let response = server.send(&Request::new("GET", &target, "").signed());
    assert_eq!(response.status, 400);
    assert_eq!(response.error_code(), "absolute_target");
}

#[test]
fn unauthenticated_body_not_read() {
    let server = TestServer::start();
    // Declare a large body and send none: the missing headers are reported
    // at once instead of the server waiting for (and buffering) the body.
    let mut stream = std::net::TcpStream::connect(&server.addr).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    use std::io::{Read, Write};
    write!(
        stream,
        "PUT /v1/plugins/big HTTP/1.1\r\nHost: x\r\nContent-Length: 50000000\r\n\r\n"
    )
    .unwrap();
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 401");
}

#[test]
fn declared_oversized_body_rejected_before_reading() {
    let server = common::TestServer::start_with(common::Setup {
        policy: "limits: {input_kib: 1}\n".into(),
    });
    let mut request = Request::new("POST", "/v1/plugins/x/run", "").signed();
    // Claim more than the route accepts, so the server responds without waiting.
    request.body = Vec::new();
    let mut stream = std::net::TcpStream::connect(&server.addr).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    use std::io::{Read, Write};
    let mut head = String::from("POST /v1/plugins/x/run HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n");
    for (name, value) in &request.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    let mut status = [0u8; 12];
    stream.read_exact(&mut status).unwrap();
    assert_eq!(&status, b"HTTP/1.1 413");
}

#[test]
fn long_targets_truncated_in_audit() {
    let server = TestServer::start();
    let target = format!("/v1/plugins?{}", "x".repeat(5000));
    assert_rejected(&server, &Request::new("GET", &target, ""), "missing_header");
    let event = server
        .audit()
        .into_iter()
        .find(|e| e["kind"] == "auth_failure")
        .unwrap();
    assert!(event["target"].as_str().unwrap().len() < 300, "{event}");
}

#[test]
fn bad_signatures_rejected() {
    let server = TestServer::start();
    let request = list().signed();
    let sig = request.get_header("X-SIG");

    // Not the encoding the scheme uses: the error names the expected one.
    for malformed in [
        sig.to_ascii_uppercase(),
        sig[..62].to_string(),
        "not hex at all".into(),
    ] {
        let response = server.send(&request.clone().set_header("X-SIG", &malformed));
        assert_eq!(response.status, 401);
        assert_eq!(response.error_code(), "invalid_signature", "{malformed}");
        assert!(
            response.error_message().contains("64 lowercase hex characters"),
            "{}",
            response.error_message()
        );
    }
    assert_rejected(
        &server,
        &request.clone().set_header("X-SIG", &"0".repeat(64)),
        "bad_signature",
    );

    // A signature made with another key.
    let ts = request.get_header("X-TS");
    let nonce = request.get_header("X-Nonce");
    let text = apex::auth::string_to_sign(&ts, "GET", "/v1/plugins", &nonce, b"");
    let forged = apex::auth::sign(b"another key of at least thirty-two bytes", &text);
    assert_rejected(&server, &request.set_header("X-SIG", &forged), "bad_signature");
}

#[test]
fn changes_after_signing_rejected() {
    let server = TestServer::start();
    server.upload_plugin("hello");

    let run = Request::new("POST", "/v1/plugins/hello/run", r#"{"input":{"name":"Ada"}}"#).signed();

    let mut body_changed = run.clone();
    body_changed.body = br#"{"input":{"name":"Eve"}}"#.to_vec();
    assert_rejected(&server, &body_changed, "bad_signature");

    let mut method_changed = run.clone();
    method_changed.method = "PUT".into();
    assert_rejected(&server, &method_changed, "bad_signature");

    let mut target_changed = run.clone();
    target_changed.target = "/v1/plugins/probe/run".into();
    assert_rejected(&server, &target_changed, "bad_signature");

    let mut query_added = run.clone();
    query_added.target = "/v1/plugins/hello/run?x=1".into();
    assert_rejected(&server, &query_added, "bad_signature");

    assert_rejected(
        &server,
        &run.clone().set_header("X-Nonce", "other-nonce"),
        "bad_signature",
    );
    assert_rejected(&server, &run.clone().without_header("X-Nonce"), "bad_signature");

    let ts: u64 = run.get_header("X-TS").parse().unwrap();
    assert_rejected(
        &server,
        &run.clone().set_header("X-TS", &(ts + 1).to_string()),
        "bad_signature",
    );

    // The untouched request still goes through.
    assert_eq!(server.send(&run).status, 200);
}

#[test]
fn replay_rejected() {
    let server = TestServer::start();
    let request = list().signed();
    assert_eq!(server.send(&request).status, 200);
    assert_rejected(&server, &request, "replay");
    assert_rejected(&server, &request, "replay");

    // The same request with a fresh nonce is a new request.
    assert_eq!(server.send(&list().signed()).status, 200);
}

#[test]
fn replay_of_rejected_request_still_rejected() {
    let server = TestServer::start();
    let request = list().signed();
    let tampered = request.clone().set_header("X-Nonce", "changed");
    assert_rejected(&server, &tampered, "bad_signature");
    // A failed attempt must not consume or poison the genuine signature.
    assert_eq!(server.send(&request).status, 200);
}

#[test]
fn targets_signed_as_sent() {
    let server = TestServer::start();
    for target in [
        "/v1/plugins?",
        "/v1/plugins?name=caf%C3%A9&x=%2F",
        "/v1/plugins?a=1&a=2",
    ] {
        let response = server.send(&Request::new("GET", target, "").signed());
        assert_eq!(
            response.status,
            200,
            "{target}: {}",
            String::from_utf8_lossy(&response.body)
        );
    }

    // Percent-encoding differently from what was signed breaks the signature.
    let mut request = Request::new("GET", "/v1/plugins?name=caf%C3%A9", "").signed();
    request.target = "/v1/plugins?name=caf%c3%a9".into();
    assert_rejected(&server, &request, "bad_signature");
}

#[test]
fn binary_body_signed() {
    let server = TestServer::start();
    let wasm = std::fs::read(common::plugin("hello")).unwrap();
    assert!(
        wasm.iter().any(|&b| b >= 0x80),
        "the component has non-UTF-8 bytes"
    );
    assert_eq!(server.upload("hello", &wasm).status, 201);
}

#[test]
fn failures_logged_and_audited() {
    let server = TestServer::start();
    assert_rejected(&server, &list(), "missing_header");
    assert_rejected(
        &server,
        &list().signed_at(apex::unix_now() - 1000),
        "stale_timestamp",
    );
    let request = list().signed();
    assert_rejected(
        &server,
        &request.clone().set_header("X-SIG", &"a".repeat(64)),
        "bad_signature",
    );
    server.send(&request);
    assert_rejected(&server, &request, "replay");

    let checks: Vec<String> = server
        .audit()
        .iter()
        .filter(|e| e["kind"] == "auth_failure")
        .map(|e| {
            assert!(e["remote"].as_str().unwrap().starts_with("127.0.0.1:"), "{e}");
            e["check"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(
        checks,
        ["missing_header", "stale_timestamp", "bad_signature", "replay"]
    );

    let log = server.log();
    assert_eq!(log.matches("authentication failed").count(), 4, "{log}");
    assert!(log.contains("127.0.0.1:"), "the log names the remote address");
    assert!(!log.contains(common::KEY), "the log must not contain the key");
}

#[test]
fn serve_rejects_short_or_missing_key() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("policy.yaml"), "").unwrap();

    for (key, expected) in [
        (None, "no key: set APEX_SHARED_KEY"),
        (Some("short"), "at least 32"),
    ] {
        let mut command = common::serve_command(dir.path());
        command.env_remove("APEX_SHARED_KEY");
        if let Some(key) = key {
            command.env("APEX_SHARED_KEY", key);
        }
        let output = command.output().unwrap();
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{stderr}");
        assert!(stderr.contains("apex keygen"), "{stderr}");
    }
}

#[test]
fn keygen_output_is_a_usable_key() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_apex"))
        .arg("keygen")
        .output()
        .unwrap();
    let key = String::from_utf8(output.stdout).unwrap();
    let key = key.trim();
    assert!(key.len() >= 32, "{key}");
    assert!(key.bytes().all(|b| b.is_ascii_hexdigit()));

    let again = std::process::Command::new(env!("CARGO_BIN_EXE_apex"))
        .arg("keygen")
        .output()
        .unwrap();
    assert_ne!(
        String::from_utf8(again.stdout).unwrap().trim(),
        key,
        "keys are random"
    );
}

#[test]
fn sign_command_matches_server() {
    let server = TestServer::start();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_apex"))
        .args(["sign", "GET", "/v1/plugins"])
        .env("APEX_SHARED_KEY", common::KEY)
        .output()
        .unwrap();
    assert!(output.status.success());

    let mut request = list();
    for line in String::from_utf8(output.stdout).unwrap().lines() {
        let (name, value) = line.split_once(": ").unwrap();
        request = request.header(name, value);
    }
    let response = server.send(&request);
    assert_eq!(
        response.status,
        200,
        "{}",
        String::from_utf8_lossy(&response.body)
    );
    let _: Value = response.json();
}
