//! Shell children with `network: true`: they reach the outside only through
//! the proxy Apex serves in their network namespace, which applies the
//! policy's outgoing-HTTP rules. Every other way out fails.

mod common;

use common::http_servers::{HELLO, LocalServer};
use common::{Setup, TestServer};
use serde_json::{Value, json};

/// Scripts the children run, written into the work directory.
const SCRIPTS: [(&str, &str); 4] = [
    (
        "get.py",
        "import sys, urllib.request\n\
         try:\n    print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())\n\
         except Exception as e:\n    print('failed:', e)\n    sys.exit(1)\n",
    ),
    (
        // Opens a tunnel with CONNECT and sends a plain HTTP request through it.
        "tunnel.py",
        "import socket, sys\n\
         s = socket.create_connection(('127.0.0.1', 3128), timeout=10)\n\
         s.sendall(('CONNECT %s HTTP/1.1\\r\\nHost: %s\\r\\n\\r\\n' % (sys.argv[1], sys.argv[1])).encode())\n\
         head = s.recv(4096).decode()\n\
         print(head.split('\\r\\n')[0])\n\
         if ' 200 ' in head:\n\
         \x20   s.sendall(b'GET / HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n')\n\
         \x20   data = b''\n\
         \x20   while True:\n\
         \x20       chunk = s.recv(4096)\n\
         \x20       if not chunk: break\n\
         \x20       data += chunk\n\
         \x20   print(data.decode().split('\\r\\n\\r\\n', 1)[1])\n",
    ),
    (
        // Sends N requests to the URL through the proxy, ignoring failures.
        "many.py",
        "import sys, urllib.request\n\
         for _ in range(int(sys.argv[2])):\n\
         \x20   try:\n        urllib.request.urlopen(sys.argv[1], timeout=10).read()\n\
         \x20   except Exception:\n        pass\n",
    ),
    (
        "direct.py",
        "import socket, sys\n\
         try:\n    socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=5)\n    print('connected')\n\
         except OSError as e:\n    print('failed:', e)\n",
    ),
];

/// Starts Apex with `python3 ` allowed with network access (`python3 -I `
/// without), `allowed.test` on the local server's port, and the scripts.
fn apex(http: &LocalServer) -> TestServer {
    let policy = format!(
        "paths_allow: [{{WORK}}]\n\
         shell_allow:\n  - {{prefix: \"python3 \", network: true}}\n  - \"python3 -I \"\n\
         network:\n  http_allow_domains: [\"allowed.test:{port}\"]\n  \
         resolve: {{allowed.test: 127.0.0.1, denied.test: 127.0.0.1}}\n  \
         allow_private_addresses: true\n\
         timeouts: {{http_seconds: 2}}\n",
        port = http.port
    );
    let server = TestServer::start_with(Setup { policy });
    for (name, text) in SCRIPTS {
        std::fs::write(server.work().join(name), text).unwrap();
    }
    server.upload_plugin("shell-run");
    server
}

/// Makes one shell call; returns the run result.
fn shell(server: &TestServer, command: &str) -> Value {
    let result = server.run("shell-run", json!({ "input": { "command": command } }));
    assert_eq!(result["status"], "succeeded", "{result}");
    result
}

fn stdout(result: &Value) -> &str {
    result["output"]["stdout"].as_str().unwrap_or_default()
}

fn http_decisions(result: &Value) -> Vec<&Value> {
    result["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["capability"] == "http")
        .collect()
}

#[test]
fn proxy_forwards_to_allowed_host() {
    let http = LocalServer::http();
    let server = apex(&http);

    let result = shell(
        &server,
        &format!("python3 get.py http://allowed.test:{}/", http.port),
    );
    assert_eq!(result["output"]["exit_code"], 0, "{result}");
    assert_eq!(stdout(&result).trim(), HELLO);
    assert_eq!(http.requests(), 1);

    let decisions = http_decisions(&result);
    assert_eq!(decisions.len(), 1, "{result}");
    assert_eq!(decisions[0]["allowed"], true);
    let reason = decisions[0]["reason"].as_str().unwrap();
    assert!(reason.contains("through the proxy"), "{reason}");
}

#[test]
fn proxy_tunnels_connect_to_allowed_host() {
    let http = LocalServer::http();
    let server = apex(&http);

    let result = shell(&server, &format!("python3 tunnel.py allowed.test:{}", http.port));
    let lines: Vec<&str> = stdout(&result).lines().collect();
    assert_eq!(
        lines.first(),
        Some(&"HTTP/1.1 200 Connection established"),
        "{result}"
    );
    assert!(lines.contains(&HELLO), "{result}");
    assert_eq!(http.requests(), 1);
}

#[test]
fn proxy_denies_unlisted_hosts_and_ports() {
    let http = LocalServer::http();
    let other = LocalServer::http();
    let server = apex(&http);

    let cases = [
        // Not in http_allow_domains.
        format!("python3 get.py http://denied.test:{}/", http.port),
        format!("python3 tunnel.py denied.test:{}", http.port),
        // The allowed name on another port.
        format!("python3 get.py http://allowed.test:{}/", other.port),
        format!("python3 tunnel.py allowed.test:{}", other.port),
        // A literal address, and user information before the allowed name.
        format!("python3 tunnel.py 127.0.0.1:{}", http.port),
        format!(
            "python3 get.py http://allowed.test:{}@denied.test:{}/",
            http.port, http.port
        ),
    ];
    for command in &cases {
        let result = shell(&server, command);
        let out = stdout(&result);
        assert!(
            out.contains("403") || out.starts_with("failed:"),
            "{command}: {result}"
        );
        let denials: Vec<&Value> = http_decisions(&result)
            .into_iter()
            .filter(|d| d["allowed"] == false)
            .collect();
        assert_eq!(denials.len(), 1, "{command}: {result}");
        let reason = denials[0]["reason"].as_str().unwrap();
        assert!(
            server
                .audit()
                .iter()
                .any(|e| e["kind"] == "policy_denial" && e["reason"] == reason),
            "{command}: the denial is audited"
        );
    }
    assert_eq!(http.requests(), 0, "no denied request reached the allowed server");
    assert_eq!(other.requests(), 0);
}

#[test]
fn networked_child_cannot_bypass_proxy() {
    let http = LocalServer::http();
    let server = apex(&http);

    // Straight to the server's port: loopback in the child's namespace is
    // not the host's, and Landlock allows only the proxy port.
    let result = shell(&server, &format!("python3 direct.py {}", http.port));
    assert!(stdout(&result).starts_with("failed:"), "{result}");

    // Without the proxy variables, urllib connects directly, and fails.
    let result = shell(
        &server,
        &format!(
            "python3 -c 'import os, runpy, sys; [os.environ.pop(k) for k in list(os.environ) if \"proxy\" in k.lower()]; sys.argv = [\"get.py\", \"http://allowed.test:{}/\"]; runpy.run_path(\"get.py\")'",
            http.port
        ),
    );
    assert!(stdout(&result).starts_with("failed:"), "{result}");
    assert_eq!(http.requests(), 0);
}

#[test]
fn child_without_network_has_no_proxy() {
    let http = LocalServer::http();
    let server = apex(&http);

    // `python3 -I ` has no network: no proxy listens in its namespace.
    let result = shell(&server, "python3 -I direct.py 3128");
    assert!(stdout(&result).starts_with("failed:"), "{result}");
    let result = shell(
        &server,
        &format!("python3 -I get.py http://allowed.test:{}/", http.port),
    );
    assert_ne!(result["output"]["exit_code"], 0, "{result}");
    assert!(http_decisions(&result).is_empty(), "{result}");
    assert_eq!(http.requests(), 0);
}

#[test]
fn decisions_per_run_are_capped() {
    let http = LocalServer::http();
    let server = apex(&http);

    let result = shell(
        &server,
        &format!("python3 many.py http://denied.test:{}/ 1100", http.port),
    );
    let decisions = result["decisions"].as_array().unwrap();
    assert_eq!(decisions.len(), 1001, "1000 kept and one note");
    let note = decisions.last().unwrap();
    assert_eq!(note["capability"], "decisions", "{note}");
    let reason = note["reason"].as_str().unwrap();
    // 1100 denials and the shell call itself: 101 over the limit.
    assert!(reason.starts_with("101 more decisions"), "{reason}");

    let log = server.log();
    assert_eq!(
        log.matches("outgoing request denied").count(),
        1000,
        "only recorded denials are logged"
    );
}

/// Writes a script into the work directory and runs it with network access;
/// returns its stdout.
fn run_script(server: &TestServer, name: &str, script: &str, args: &str) -> String {
    std::fs::write(server.work().join(name), script).unwrap();
    let result = shell(server, &format!("python3 {name} {args}"));
    assert_eq!(result["output"]["exit_code"], 0, "{result}");
    stdout(&result).to_string()
}

#[test]
fn proxy_rejects_malformed_requests() {
    let http = LocalServer::http();
    let server = apex(&http);

    // Each request goes on its own connection; the script prints the
    // status line of each response.
    let script = "import socket, sys\n\
        cases = [b'GET /relative HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n',\n\
                 b'CONNECT allowed.test HTTP/1.1\\r\\n\\r\\n',\n\
                 b'GET ftp://allowed.test/ HTTP/1.1\\r\\n\\r\\n',\n\
                 b'GET http://allowed.test/ HTTP/1.1\\r\\nX: ' + b'a' * 20000 + b'\\r\\n\\r\\n',\n\
                 b'NOT A REQUEST\\r\\n\\r\\n']\n\
        for case in cases:\n\
        \x20   s = socket.create_connection(('127.0.0.1', 3128), timeout=10)\n\
        \x20   s.sendall(case)\n\
        \x20   print(s.recv(4096).decode().split('\\r\\n')[0])\n";
    let out = run_script(&server, "malformed.py", script, "");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 5, "{out}");
    for line in lines {
        assert_eq!(line, "HTTP/1.1 400 Bad Request", "{out}");
    }
    assert_eq!(http.requests(), 0);
}

#[test]
fn proxy_connections_per_child_capped() {
    let http = LocalServer::http();
    let server = apex(&http);

    // 64 connections that send nothing fill the proxy's slots until the
    // 2 s head timeout answers them with 408. A 65th request is served only
    // after that, so by the time it has its answer the first idle one has
    // its 408.
    let script = format!(
        "import socket\n\
         idle = [socket.create_connection(('127.0.0.1', 3128), timeout=10) for _ in range(64)]\n\
         s = socket.create_connection(('127.0.0.1', 3128), timeout=10)\n\
         s.sendall(b'GET http://allowed.test:{port}/ HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n')\n\
         print(s.recv(4096).decode().split('\\r\\n')[0])\n\
         idle[0].setblocking(False)\n\
         print(idle[0].recv(4096).decode().split('\\r\\n')[0])\n",
        port = http.port
    );
    let out = run_script(&server, "crowd.py", &script, "");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        ["HTTP/1.1 200 OK", "HTTP/1.1 408 Request Timeout"],
        "{out}"
    );
}
