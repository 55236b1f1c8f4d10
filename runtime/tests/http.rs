//! Outgoing HTTP from tasks, through the policy filter, to servers the tests
//! start on 127.0.0.1. Host names such as `api.test` reach them through
//! `network.resolve`, the same path an operator's pinned name takes.

mod common;

use std::time::{Duration, Instant};

use common::http_servers::{HELLO, LocalServer};
use common::{Setup, TestServer};
use serde_json::{Value, json};

/// Starts Apex with the fetch plugin and a `network` section built from
/// `allow` (entries of `http_allow_domains`) and `extra` (more YAML lines
/// under `network`), with `api.test`, `other.test` and friends pinned to
/// 127.0.0.1.
fn apex(allow: &[String], extra: &str, top: &str) -> TestServer {
    let allow: Vec<String> = allow.iter().map(|a| format!("{a:?}")).collect();
    let policy = format!(
        "network:\n  http_allow_domains: [{}]\n  resolve:\n    api.test: 127.0.0.1\n    other.test: 127.0.0.1\n    \
         a.wild.test: 127.0.0.1\n    wild.test: 127.0.0.1\n    evilwild.test: 127.0.0.1\n    secure.test: 127.0.0.1\n{extra}{top}",
        allow.join(", ")
    );
    let server = TestServer::start_with(Setup { policy });
    server.upload_plugin("fetch");
    server
}

fn fetch(server: &TestServer, input: Value) -> Value {
    server.run("fetch", json!({ "input": input }))
}

/// Asserts the run failed because the host denied the request, and that the
/// denial is in the result, the audit log and the server log.
fn assert_denied(server: &TestServer, result: &Value, reason: &str) {
    assert_eq!(result["status"], "failed", "{result}");
    assert!(denied_by_host(result), "{result}");

    let denials: Vec<&Value> = result["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["allowed"] == false)
        .collect();
    assert_eq!(denials.len(), 1, "{result}");
    assert_eq!(denials[0]["capability"], "http");
    let recorded = denials[0]["reason"].as_str().unwrap();
    assert!(recorded.contains(reason), "expected {reason:?} in {recorded:?}");

    assert!(
        server
            .audit()
            .iter()
            .any(|e| e["kind"] == "policy_denial" && e["reason"] == recorded),
        "the denial is audited"
    );
    assert!(
        server.log().contains("outgoing request denied"),
        "the denial is logged"
    );
}

/// Returns whether a failed fetch was denied by the host. The task usually
/// gets the `HttpRequestDenied` error code, but wstd sometimes reports the
/// closed request body first, so the run's decisions decide.
fn denied_by_host(result: &Value) -> bool {
    let error = result["error"].as_str().unwrap_or_default();
    let recorded = result["decisions"]
        .as_array()
        .is_some_and(|d| d.iter().any(|d| d["allowed"] == false));
    result["status"] == "failed"
        && recorded
        && (error.contains("HttpRequestDenied") || error.contains("connection reset"))
}

fn allowed_private() -> &'static str {
    "  allow_private_addresses: true\n"
}

#[test]
fn allowed_host_succeeds_end_to_end() {
    let upstream = LocalServer::http();
    let server = apex(&[format!("api.test:{}", upstream.port)], allowed_private(), "");

    let result = fetch(
        &server,
        json!({ "url": format!("http://api.test:{}/", upstream.port) }),
    );
    assert_eq!(result["status"], "succeeded", "{result}");
    assert_eq!(result["output"]["status"], 200);
    assert_eq!(result["output"]["bytes"], HELLO.len());
    assert_eq!(
        result["output"]["sha256"],
        apex::auth::sha256_hex(HELLO.as_bytes())
    );
    assert_eq!(result["output"]["content_type"], "text/plain");

    let decisions = result["decisions"].as_array().unwrap();
    assert_eq!(decisions.len(), 1);
    assert_eq!(decisions[0]["allowed"], true);
    assert_eq!(
        decisions[0]["target"],
        format!("http://api.test:{}", upstream.port)
    );
    assert!(decisions[0]["reason"].as_str().unwrap().contains("127.0.0.1"));
    assert_eq!(upstream.requests(), 1);
}

#[test]
fn empty_body_writable_after_response() {
    let upstream = LocalServer::http();
    let server = apex(&[format!("api.test:{}", upstream.port)], allowed_private(), "");
    server.upload_plugin("probe");

    // hyper sends a request with `content-length: 0` without reading its
    // body, and the response arrives before the task writes that body.
    let result = server.run(
        "probe",
        json!({ "input": { "op": "late-body", "addr": format!("api.test:{}", upstream.port) } }),
    );
    assert_eq!(result["status"], "succeeded", "{result}");
    assert_eq!(result["output"]["status"], 200);
    assert_eq!(upstream.requests(), 1);
}

#[test]
fn data_beyond_empty_body_rejected() {
    let upstream = LocalServer::http();
    let server = apex(&[format!("api.test:{}", upstream.port)], allowed_private(), "");
    server.upload_plugin("probe");

    // The body is declared empty and kept open after hyper dropped it. A task
    // that writes into it must still get an error for the unsent bytes.
    let result = server.run(
        "probe",
        json!({ "input": {
            "op": "late-body", "addr": format!("api.test:{}", upstream.port), "length": 0, "bytes": 4096
        } }),
    );
    assert_eq!(result["status"], "failed", "{result}");
    let error = result["error"].as_str().unwrap();
    assert!(error.contains("write to the request body"), "{error}");
}

#[test]
fn unlisted_host_denied_before_connecting() {
    let upstream = LocalServer::http();
    let server = apex(&[format!("api.test:{}", upstream.port)], allowed_private(), "");

    let result = fetch(
        &server,
        json!({ "url": format!("http://other.test:{}/", upstream.port) }),
    );
    assert_denied(&server, &result, "not in network.http_allow_domains");
    assert_eq!(
        upstream.requests(),
        0,
        "no connection is made for a denied request"
    );
}

#[test]
fn nothing_allowed_by_default() {
    let upstream = LocalServer::http();
    let server = apex(&[], allowed_private(), "");
    let result = fetch(
        &server,
        json!({ "url": format!("http://api.test:{}/", upstream.port) }),
    );
    assert_denied(&server, &result, "not in network.http_allow_domains");
}

#[test]
fn wildcard_matches_subdomains_only() {
    let upstream = LocalServer::http();
    let port = upstream.port;
    let server = apex(&[format!("*.wild.test:{port}")], allowed_private(), "");

    let result = fetch(&server, json!({ "url": format!("http://a.wild.test:{port}/") }));
    assert_eq!(result["status"], "succeeded", "{result}");

    for host in ["wild.test", "evilwild.test"] {
        let result = fetch(&server, json!({ "url": format!("http://{host}:{port}/") }));
        assert_eq!(result["status"], "failed", "{host}: {result}");
        assert!(denied_by_host(&result), "{host}: {result}");
    }
    assert_eq!(upstream.requests(), 1);
}

#[test]
fn wildcard_skips_hosts_under_public_suffix_below_it() {
    let upstream = LocalServer::http();
    let port = upstream.port;
    // `s3.amazonaws.com` is a public suffix: its buckets belong to anyone.
    let pins = "    bucket.s3.amazonaws.com: 127.0.0.1\n    sts.amazonaws.com: 127.0.0.1\n";
    let server = apex(
        &[format!("*.amazonaws.com:{port}")],
        &format!("{pins}{}", allowed_private()),
        "",
    );

    let result = fetch(
        &server,
        json!({ "url": format!("http://sts.amazonaws.com:{port}/") }),
    );
    assert_eq!(result["status"], "succeeded", "{result}");
    let result = fetch(
        &server,
        json!({ "url": format!("http://bucket.s3.amazonaws.com:{port}/") }),
    );
    assert_denied(&server, &result, "under the public suffix s3.amazonaws.com");
    assert_eq!(upstream.requests(), 1);
}

#[test]
fn wrong_port_denied() {
    let upstream = LocalServer::http();
    let other = LocalServer::http();
    let server = apex(
        &[format!("api.test:{}", upstream.port), "other.test".into()],
        allowed_private(),
        "",
    );

    let result = fetch(
        &server,
        json!({ "url": format!("http://api.test:{}/", other.port) }),
    );
    assert_denied(&server, &result, "not in network.http_allow_domains");

    // An entry without a port allows the scheme's default port only.
    let result = fetch(
        &server,
        json!({ "url": format!("http://other.test:{}/", other.port) }),
    );
    assert_eq!(result["status"], "failed");
    assert_eq!(other.requests(), 0);
}

#[test]
fn case_and_trailing_dot_ignored() {
    let upstream = LocalServer::http();
    let port = upstream.port;
    let server = apex(&[format!("api.test:{port}")], allowed_private(), "");

    for host in ["API.TEST", "Api.Test.", "api.test."] {
        let result = fetch(&server, json!({ "url": format!("http://{host}:{port}/") }));
        assert_eq!(result["status"], "succeeded", "{host}: {result}");
    }
    let result = fetch(&server, json!({ "url": format!("http://api.test..:{port}/") }));
    assert_eq!(
        result["status"], "failed",
        "two trailing dots are not the same name"
    );
}

#[test]
fn userinfo_trick_denied() {
    let upstream = LocalServer::http();
    let port = upstream.port;
    let server = apex(&[format!("api.test:{port}")], allowed_private(), "");

    for url in [
        format!("http://user@api.test:{port}/"),
        format!("http://api.test:{port}@other.test:{port}/"),
        format!("http://user:pass@api.test:{port}/"),
    ] {
        let result = fetch(&server, json!({ "url": url }));
        assert_eq!(result["status"], "failed", "{url}: {result}");
    }
    assert_eq!(upstream.requests(), 0);
    let reasons: Vec<String> = server
        .audit()
        .iter()
        .filter(|e| e["kind"] == "policy_denial")
        .map(|e| e["reason"].as_str().unwrap().to_string())
        .collect();
    assert!(
        reasons.iter().any(|r| r.contains("user information")),
        "{reasons:?}"
    );
}

#[test]
fn ip_literal_spellings_denied() {
    let upstream = LocalServer::http();
    let port = upstream.port;
    let server = apex(&[format!("api.test:{port}")], allowed_private(), "");

    for host in [
        "127.0.0.1",
        "2130706433",
        "0x7f.1",
        "0x7f000001",
        "127.1",
        "0177.0.0.1",
        "[::1]",
        "[::ffff:127.0.0.1]",
    ] {
        let result = fetch(&server, json!({ "url": format!("http://{host}:{port}/") }));
        assert_eq!(result["status"], "failed", "{host}: {result}");
        assert!(denied_by_host(&result), "{host}: {result}");
    }
    assert_eq!(upstream.requests(), 0);
}

#[test]
fn listed_ip_literal_allowed_even_when_loopback() {
    let upstream = LocalServer::http();
    let port = upstream.port;
    // No allow_private_addresses: the operator named the literal address.
    let server = apex(&[format!("127.0.0.1:{port}")], "", "");

    let result = fetch(&server, json!({ "url": format!("http://127.0.0.1:{port}/") }));
    assert_eq!(result["status"], "succeeded", "{result}");
    let result = fetch(&server, json!({ "url": format!("http://2130706433:{port}/") }));
    assert_eq!(
        result["status"], "failed",
        "an odd spelling of a listed literal is still denied"
    );
}

#[test]
fn name_resolving_to_loopback_denied() {
    let upstream = LocalServer::http();
    let port = upstream.port;
    let server = apex(&[format!("api.test:{port}"), format!("localhost:{port}")], "", "");

    // Pinned through network.resolve.
    let result = fetch(&server, json!({ "url": format!("http://api.test:{port}/") }));
    assert_denied(&server, &result, "not a public address");
    assert!(
        result["decisions"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("allow_private_addresses")
    );

    // Resolved by the system resolver.
    let result = fetch(&server, json!({ "url": format!("http://localhost:{port}/") }));
    assert_eq!(result["status"], "failed", "{result}");
    assert!(
        result["decisions"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("loopback"),
        "{result}"
    );
    assert_eq!(upstream.requests(), 0);
}

#[test]
fn redirect_to_unlisted_host_not_followed() {
    let upstream = LocalServer::http();
    let port = upstream.port;
    let server = apex(&[format!("api.test:{port}")], allowed_private(), "");

    let location = format!("http://other.test:{port}/");
    let result = fetch(
        &server,
        json!({ "url": format!("http://api.test:{port}/redirect?to={location}") }),
    );
    assert_eq!(
        result["status"], "succeeded",
        "the task sees the redirect itself: {result}"
    );
    assert_eq!(result["output"]["status"], 302);
    assert_eq!(result["output"]["location"], location.as_str());
    assert_eq!(upstream.requests(), 1, "the host did not follow the redirect");

    let result = fetch(&server, json!({ "url": location }));
    assert_denied(&server, &result, "not in network.http_allow_domains");
}

#[test]
fn other_schemes_denied() {
    let upstream = LocalServer::http();
    let port = upstream.port;
    let server = apex(&[format!("api.test:{port}")], allowed_private(), "");

    for scheme in ["ftp", "file", "gopher"] {
        let result = fetch(&server, json!({ "url": format!("{scheme}://api.test:{port}/") }));
        assert_eq!(result["status"], "failed", "{scheme}: {result}");
        assert!(denied_by_host(&result), "{scheme}: {result}");
    }
    assert_eq!(upstream.requests(), 0);
}

#[test]
fn hanging_server_times_out_at_http_seconds() {
    let upstream = LocalServer::http();
    let port = upstream.port;
    let server = apex(
        &[format!("api.test:{port}")],
        allowed_private(),
        "timeouts: {http_seconds: 1, task_seconds: 20}\n",
    );

    let started = Instant::now();
    let result = fetch(
        &server,
        json!({ "url": format!("http://api.test:{port}/hang"), "timeout_ms": 60_000 }),
    );
    let elapsed = started.elapsed();
    assert_eq!(result["status"], "failed", "{result}");
    assert!(result["error"].as_str().unwrap().contains("Timeout"), "{result}");
    assert!(
        elapsed < Duration::from_secs(5),
        "a task cannot extend http_seconds: took {elapsed:?}"
    );

    // The server keeps serving.
    let result = fetch(&server, json!({ "url": format!("http://api.test:{port}/") }));
    assert_eq!(result["status"], "succeeded");
}

#[test]
fn task_may_shorten_http_timeout() {
    let upstream = LocalServer::http();
    let port = upstream.port;
    let server = apex(
        &[format!("api.test:{port}")],
        allowed_private(),
        "timeouts: {http_seconds: 30, task_seconds: 20}\n",
    );

    let started = Instant::now();
    let result = fetch(
        &server,
        json!({ "url": format!("http://api.test:{port}/hang"), "timeout_ms": 300 }),
    );
    assert_eq!(result["status"], "failed", "{result}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn response_within_limit_obeyed() {
    let upstream = LocalServer::http();
    let port = upstream.port;
    let server = apex(
        &[format!("api.test:{port}")],
        allowed_private(),
        "limits: {response_mib: 1}\n",
    );
    let result = fetch(
        &server,
        json!({ "url": format!("http://api.test:{port}/big?bytes=1048576") }),
    );
    assert_eq!(result["status"], "succeeded", "{result}");
    assert_eq!(result["output"]["bytes"], 1_048_576);
}

#[test]
fn oversized_response_cut() {
    let upstream = LocalServer::http();
    let port = upstream.port;
    let server = apex(
        &[format!("api.test:{port}")],
        allowed_private(),
        "limits: {response_mib: 1}\n",
    );
    let result = fetch(
        &server,
        json!({ "url": format!("http://api.test:{port}/big?bytes=3000000") }),
    );
    assert_eq!(result["status"], "failed", "{result}");
    let error = result["error"].as_str().unwrap();
    assert!(
        error.contains("body size exceeds limit: 1048576 bytes"),
        "{error}"
    );
}

#[test]
fn https_with_test_ca_succeeds() {
    let (upstream, ca_pem) = LocalServer::https(&["secure.test"]);
    let port = upstream.port;
    let ca = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(ca.path(), ca_pem).unwrap();

    let extra = format!(
        "  allow_private_addresses: true\n  ca_file: {}\n",
        ca.path().display()
    );
    let server = apex(&[format!("secure.test:{port}")], &extra, "");
    let result = fetch(&server, json!({ "url": format!("https://secure.test:{port}/") }));
    assert_eq!(result["status"], "succeeded", "{result}");
    assert_eq!(result["output"]["bytes"], HELLO.len());
}

#[test]
fn https_without_test_ca_fails() {
    let (upstream, _ca_pem) = LocalServer::https(&["secure.test"]);
    let port = upstream.port;
    let server = apex(&[format!("secure.test:{port}")], allowed_private(), "");
    let result = fetch(&server, json!({ "url": format!("https://secure.test:{port}/") }));
    assert_eq!(result["status"], "failed", "{result}");
    assert!(result["error"].as_str().unwrap().contains("Tls"), "{result}");
}

#[test]
fn invalid_network_policy_rejected() {
    let dir = tempfile::tempdir().unwrap();
    for (policy, expected) in [
        (
            "network: {http_allow_domains: [\"a.*.com\"]}\n",
            "network.http_allow_domains[0]",
        ),
        ("network: {http_allow_domains: [\"*.com\"]}\n", "top-level domain"),
        (
            "network: {http_allow_domains: [\"api.test\", \"*.co.uk\"]}\n",
            "network.http_allow_domains[1]",
        ),
        (
            "network: {http_allow_domains: [\"*.github.io\"]}\n",
            "a public suffix",
        ),
        (
            "network: {http_allow_domains: [\"host:99999\"]}\n",
            "invalid port",
        ),
        (
            "network: {resolve: {api.test: not-an-ip}}\n",
            "network.resolve.api.test",
        ),
        ("network: {ca_file: missing.pem}\n", "network.ca_file"),
        (
            "network: {http_allow_domains: [\"API.test\", \"api.test.\"]}\n",
            "allows the same as",
        ),
    ] {
        let file = dir.path().join("policy.yaml");
        std::fs::write(&file, policy).unwrap();
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_apex"))
            .args(["policy", "check"])
            .arg(&file)
            .output()
            .unwrap();
        assert!(!output.status.success(), "{policy}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{policy}: {stderr}");
    }
}

#[test]
fn host_backtraces_never_reach_tasks() {
    // With RUST_BACKTRACE set, host errors would capture a backtrace, and
    // wasi:io hands a task the error's debug text.
    let upstream = LocalServer::http();
    let port = upstream.port;
    let policy = format!(
        "network:\n  http_allow_domains: [\"api.test:{port}\"]\n  resolve: {{api.test: 127.0.0.1}}\n  \
         allow_private_addresses: true\nlimits: {{response_mib: 1}}\n"
    );
    let wrapper = ["env", "RUST_BACKTRACE=1", env!("CARGO_BIN_EXE_apex")]
        .map(String::from)
        .to_vec();
    let server = TestServer::start_wrapped(Setup { policy }, wrapper, |_| {});
    server.upload_plugin("fetch");
    let result = fetch(
        &server,
        json!({ "url": format!("http://api.test:{port}/big?bytes=3000000") }),
    );
    let error = result["error"].as_str().unwrap();
    assert!(error.contains("body size exceeds limit"), "{error}");
    assert!(!error.contains("backtrace"), "{error}");
    assert!(!error.contains(".rs:"), "{error}");
}
