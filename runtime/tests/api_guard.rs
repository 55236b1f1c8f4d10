//! API access guards: the address allowlist, throttling of failed
//! authentication, the header timeout, and TLS.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Request, Setup, TestServer};

fn list() -> Request {
    Request::new("GET", "/v1/plugins", "")
}

#[test]
fn incomplete_headers_closed_after_timeout() {
    use std::io::{Read, Write};
    let server = TestServer::start();
    let mut stream = std::net::TcpStream::connect(&server.addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();

    // A client that never finishes its headers must not keep the connection.
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").unwrap();
    let started = std::time::Instant::now();
    let mut response = Vec::new();
    let read = stream.read_to_end(&mut response);
    let waited = started.elapsed();

    assert!(read.is_ok(), "the server must close the connection: {read:?}");
    assert!(
        waited >= Duration::from_secs(9),
        "closed after {waited:?}, before the 10 s header timeout"
    );
    let text = String::from_utf8_lossy(&response);
    assert!(text.is_empty() || text.starts_with("HTTP/1.1 408"), "{text}");
}

#[test]
fn connections_beyond_limit_closed() {
    use std::io::{Read, Write};
    let server = TestServer::start_with(Setup {
        policy: "limits: {max_connections: 2}\n".into(),
    });
    let idle: Vec<_> = (0..2)
        .map(|_| std::net::TcpStream::connect(&server.addr).unwrap())
        .collect();

    // The third connection is accepted and closed at once, before any request.
    let mut third = std::net::TcpStream::connect(&server.addr).unwrap();
    third.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut response = Vec::new();
    let read = third.read_to_end(&mut response);
    assert!(read.is_ok(), "the server must close the connection: {read:?}");
    assert!(response.is_empty(), "{}", String::from_utf8_lossy(&response));
    let log = server.log();
    assert!(log.contains("too many open connections"), "{log}");

    // Closing the idle connections frees their slots.
    drop(idle);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let mut stream = std::net::TcpStream::connect(&server.addr).unwrap();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut response = Vec::new();
        let _ = stream.read_to_end(&mut response);
        if response.starts_with(b"HTTP/1.1 200") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "slots were not released");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn address_outside_ip_allow_forbidden() {
    let server = TestServer::start_with(Setup {
        policy: "api: {ip_allow: [127.0.0.1/32]}\n".into(),
    });
    assert_eq!(
        common::send_raw_from("127.0.0.1", &server.addr, &list().signed()).status,
        200
    );

    // The signature is valid, but no signature work is done for this address.
    let response = common::send_raw_from("127.0.0.2", &server.addr, &list().signed());
    assert_eq!(response.status, 403);
    assert_eq!(response.error_code(), "address_not_allowed");
    let denial = server
        .audit()
        .into_iter()
        .find(|e| e["kind"] == "ip_denial")
        .unwrap();
    assert!(denial["remote"].as_str().unwrap().starts_with("127.0.0.2:"));
}

#[test]
fn repeated_failures_throttled() {
    let policy = "api: {auth_failures: {max: 3, window_seconds: 60, block_seconds: 2}}\n";
    let server = TestServer::start_with(Setup {
        policy: policy.into(),
    });

    for _ in 0..3 {
        let response = common::send_raw_from("127.0.0.1", &server.addr, &list().signed_at(1));
        assert_eq!(response.status, 401);
    }
    // Even a valid request is refused while the address is blocked.
    let response = common::send_raw_from("127.0.0.1", &server.addr, &list().signed());
    assert_eq!(response.status, 429);
    assert_eq!(response.error_code(), "too_many_failures");
    let retry: u64 = response
        .headers
        .iter()
        .find(|(n, _)| n == "retry-after")
        .unwrap()
        .1
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry), "{retry}");

    // Another address is not affected.
    assert_eq!(
        common::send_raw_from("127.0.0.3", &server.addr, &list().signed()).status,
        200
    );

    std::thread::sleep(Duration::from_millis(2100));
    assert_eq!(
        common::send_raw_from("127.0.0.1", &server.addr, &list().signed()).status,
        200,
        "the block ends"
    );
    assert_eq!(
        server
            .audit()
            .iter()
            .filter(|e| e["kind"] == "auth_throttled")
            .count(),
        1
    );
}

#[test]
fn invalid_api_policy_rejected() {
    let dir = tempfile::tempdir().unwrap();
    for (policy, expected) in [
        ("api: {ip_allow: [10.0.0.0/33]}\n", "api.ip_allow[0]"),
        ("api: {ip_allow: [example.com]}\n", "api.ip_allow[0]"),
        ("api: {auth_failures: {max: 0}}\n", "api.auth_failures.max"),
    ] {
        let file = dir.path().join("policy.yaml");
        std::fs::write(&file, policy).unwrap();
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_apex"))
            .args(["policy", "check"])
            .arg(&file)
            .output()
            .unwrap();
        assert!(!output.status.success(), "{policy}");
        assert!(
            String::from_utf8_lossy(&output.stderr).contains(expected),
            "{policy}"
        );
    }
}

/// Writes a test CA and a certificate for 127.0.0.1 signed by it; returns
/// the CA certificate (DER).
fn certificates(dir: &std::path::Path) -> rustls::pki_types::CertificateDer<'static> {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();

    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    std::fs::write(dir.join("server.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
    std::fs::set_permissions(
        dir.join("server.key"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    ca.der().clone()
}

#[test]
fn tls_round_trip() {
    let mut server = TestServer::start();
    let ca = certificates(server.dir.path());
    let cert = server.dir.path().join("server.pem");
    let key = server.dir.path().join("server.key");
    server.stop();
    server.extra_args = vec![
        "--tls-cert".into(),
        cert.display().to_string(),
        "--tls-key".into(),
        key.display().to_string(),
    ];
    server.spawn();

    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).unwrap();
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let connection = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let tcp = std::net::TcpStream::connect(&server.addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let stream = rustls::StreamOwned::new(connection, tcp);

    let response = common::exchange(stream, &server.addr, &list().signed());
    assert_eq!(
        response.status,
        200,
        "{}",
        String::from_utf8_lossy(&response.body)
    );

    // Plain HTTP to the TLS port gets no HTTP response.
    let mut plain = std::net::TcpStream::connect(&server.addr).unwrap();
    plain.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    use std::io::{Read, Write};
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut response = Vec::new();
    let _ = plain.read_to_end(&mut response);
    assert!(
        !response.starts_with(b"HTTP/1.1 200"),
        "plain HTTP must not be served"
    );

    // A client that never starts the handshake is closed after the timeout.
    let mut silent = std::net::TcpStream::connect(&server.addr).unwrap();
    silent.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let started = std::time::Instant::now();
    let mut received = Vec::new();
    let read = silent.read_to_end(&mut received);
    let waited = started.elapsed();
    assert!(read.is_ok(), "the server must close the connection: {read:?}");
    assert!(
        waited >= Duration::from_secs(9),
        "closed after {waited:?}, before the 10 s handshake timeout"
    );
    assert!(received.is_empty(), "{}", String::from_utf8_lossy(&received));
}

#[test]
fn readable_tls_key_refused() {
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    std::fs::set_permissions(
        dir.path().join("server.key"),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    std::fs::write(dir.path().join("policy.yaml"), "").unwrap();
    let output = common::serve_command(dir.path())
        .args(["--tls-cert", "server.pem", "--tls-key", "server.key"])
        .env("APEX_SHARED_KEY", common::KEY)
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("chmod 600"));
}

#[test]
fn trusted_proxy_header_only_from_proxy() {
    // The header value is only text here; no traffic goes to that address.
    let policy =
        "api:\n  ip_allow: [10.9.9.9/32]\n  trusted_proxy: {header: X-Forwarded-For, from: [127.0.0.1/32]}\n";
    let server = TestServer::start_with(Setup {
        policy: policy.into(),
    });

    let forwarded = || list().header("X-Forwarded-For", "192.0.2.1, 10.9.9.9").signed();
    assert_eq!(
        common::send_raw_from("127.0.0.1", &server.addr, &forwarded()).status,
        200,
        "the proxy's header is believed"
    );
    assert_eq!(
        common::send_raw_from("127.0.0.1", &server.addr, &list().signed()).status,
        403,
        "without it, the proxy itself is outside"
    );
    assert_eq!(
        common::send_raw_from("127.0.0.2", &server.addr, &forwarded()).status,
        403,
        "a header from anyone but the proxy is ignored"
    );
    let spoofed = list().header("X-Forwarded-For", "10.9.9.9, 192.0.2.7").signed();
    assert_eq!(
        common::send_raw_from("127.0.0.1", &server.addr, &spoofed).status,
        403,
        "only the last entry counts"
    );
}
