//! Per-plugin grants, configuration values, and secrets injected into
//! outgoing requests that are never visible to the task.

mod common;

use common::http_servers::LocalServer;
use common::{Setup, TestServer};
use serde_json::{Value, json};

const SECRET: &str = "s3cr3t-injected-token-value";

/// Starts Apex with `policy` (after `{PORT}` is replaced) and `env`, and
/// uploads the fetch and probe components under several names.
fn apex(policy: &str, port: u16, env: &[(&str, &str)]) -> TestServer {
    let dir_policy = policy.replace("{PORT}", &port.to_string());
    let keys = "keys:\n  - {id: admin, secret_env: APEX_KEY_ADMIN, scopes: [admin, run, read]}\n".to_string();
    let mut all_env = vec![("APEX_KEY_ADMIN", common::KEY)];
    all_env.extend_from_slice(env);
    let server = TestServer::start_with_keys(Setup { policy: dir_policy }, &keys, &all_env);
    for (name, plugin) in [
        ("narrow", "probe"),
        ("wide", "probe"),
        ("summarize", "fetch"),
        ("other", "fetch"),
    ] {
        let wasm = std::fs::read(common::plugin(plugin)).unwrap();
        assert_eq!(server.upload(name, &wasm).status, 201, "{name}");
    }
    server
}

fn run(server: &TestServer, plugin: &str, input: Value) -> Value {
    server.run(plugin, json!({ "input": input }))
}

#[test]
fn narrowed_plugin_cannot_use_what_others_can() {
    let upstream = LocalServer::http();
    let policy = "paths_allow: [{WORK}]\nnetwork:\n  http_allow_domains: [\"a.test:{PORT}\", \"b.test:{PORT}\"]\n  \
                  resolve: {a.test: 127.0.0.1, b.test: 127.0.0.1}\n  allow_private_addresses: true\n\
                  plugins:\n  narrow:\n    paths_allow: []\n    http_allow_domains: [\"a.test:{PORT}\"]\n    timeouts: {task_seconds: 5}\n  \
                  other:\n    http_allow_domains: [\"a.test:{PORT}\"]\n";
    let server = apex(policy, upstream.port, &[]);
    std::fs::write(server.work().join("data.txt"), "shared").unwrap();
    let file = server.work().join("data.txt");

    let wide = run(&server, "wide", json!({ "op": "read", "path": file }));
    assert_eq!(wide["output"], "shared", "{wide}");
    let narrow = run(&server, "narrow", json!({ "op": "read", "path": file }));
    assert_eq!(
        narrow["status"], "failed",
        "the narrowed plugin has no directories: {narrow}"
    );

    let allowed = run(
        &server,
        "other",
        json!({ "url": format!("http://a.test:{}/", upstream.port) }),
    );
    assert_eq!(allowed["status"], "succeeded", "{allowed}");
    let denied = run(
        &server,
        "other",
        json!({ "url": format!("http://b.test:{}/", upstream.port) }),
    );
    assert!(
        denied["status"] == "failed"
            && denied["decisions"]
                .as_array()
                .unwrap()
                .iter()
                .any(|d| d["allowed"] == false),
        "{denied}"
    );
    let global = run(
        &server,
        "summarize",
        json!({ "url": format!("http://b.test:{}/", upstream.port) }),
    );
    assert_eq!(
        global["status"], "succeeded",
        "a plugin without a section keeps the global hosts: {global}"
    );

    let looping = run(&server, "narrow", json!({ "op": "sleep", "ms": 20_000 }));
    assert_eq!(looping["status"], "timed_out");
    assert!(looping["error"].as_str().unwrap().contains("5 s"), "{looping}");
}

#[test]
fn wider_sections_rejected_with_their_name() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("work/sub")).unwrap();
    std::fs::create_dir_all(dir.path().join("elsewhere")).unwrap();
    let base = "paths_allow: [./work]\nshell_allow: [\"git pull\"]\nnetwork: {http_allow_domains: [\"*.example.com\"]}\ntimeouts: {task_seconds: 30}\n";
    for (section, expected) in [
        (
            "plugins:\n  p: {paths_allow: [./elsewhere]}\n",
            "plugins.p.paths_allow[0]",
        ),
        (
            "plugins:\n  p: {http_allow_domains: [\"example.com\"]}\n",
            "plugins.p.http_allow_domains[0]",
        ),
        (
            "plugins:\n  p: {http_allow_domains: [\"api.example.com:8443\"]}\n",
            "plugins.p.http_allow_domains[0]",
        ),
        (
            "plugins:\n  p: {shell_allow: [\"git \"]}\n",
            "plugins.p.shell_allow[0]",
        ),
        (
            "plugins:\n  p: {timeouts: {task_seconds: 60}}\n",
            "plugins.p.timeouts.task_seconds",
        ),
        ("plugins:\n  p: {colour: red}\n", "unknown field `colour`"),
        (
            "plugins:\n  p: {config: {token: \"${APEX_TEST_UNSET_VARIABLE}\"}}\n",
            "APEX_TEST_UNSET_VARIABLE is not set",
        ),
        (
            "network: {inject: [{host: \"*.example.com\", header: A, value: b, plugins: [p]}]}\n",
            "network.inject[0].host",
        ),
        (
            "network: {inject: [{host: example.com, header: A, value: b, plugins: [Not_A_Name]}]}\n",
            "network.inject[0].plugins",
        ),
    ] {
        let file = dir.path().join("policy.yaml");
        let text = if section.starts_with("network") {
            format!("paths_allow: [./work]\n{section}")
        } else {
            format!("{base}{section}")
        };
        std::fs::write(&file, text).unwrap();
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_apex"))
            .args(["policy", "check"])
            .arg(&file)
            .env_remove("APEX_TEST_UNSET_VARIABLE")
            .output()
            .unwrap();
        assert!(!output.status.success(), "{section}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{section}: {stderr}");
    }

    // A real narrowing passes and `policy check` shows the effective grants.
    let file = dir.path().join("policy.yaml");
    std::fs::write(
        &file,
        format!("{base}plugins:\n  p: {{paths_allow: [./work/sub], http_allow_domains: [\"api.example.com\"], shell_allow: [\"git pull origin\"]}}\n"),
    )
    .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_apex"))
        .args(["policy", "check"])
        .arg(&file)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("plugin p:") && stdout.contains("api.example.com (default port)"),
        "{stdout}"
    );
}

#[test]
fn config_values_reach_task() {
    let policy = "plugins:\n  narrow:\n    config: {greeting: hello, token: \"${APEX_TEST_CONFIG}\"}\n";
    let server = apex(policy, 0, &[("APEX_TEST_CONFIG", "from-env")]);
    let greeting = run(&server, "narrow", json!({ "op": "config", "path": "greeting" }));
    assert_eq!(greeting["output"]["value"], "hello", "{greeting}");
    let token = run(&server, "narrow", json!({ "op": "config", "path": "token" }));
    assert_eq!(token["output"]["value"], "from-env");
    let other = run(&server, "wide", json!({ "op": "config", "path": "greeting" }));
    assert_eq!(
        other["output"]["value"],
        Value::Null,
        "another plugin gets no values: {other}"
    );
}

#[test]
fn injected_header_sent_only_over_https_by_default() {
    let (secure, ca_pem) = LocalServer::https(&["api.test"]);
    let plain = LocalServer::http();
    let ca = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(ca.path(), ca_pem).unwrap();
    let entry = |port: u16| {
        format!(
            "    - {{host: \"api.test:{port}\", header: Authorization, value: \"Bearer ${{APEX_TEST_SECRET}}\", plugins: [summarize]}}\n"
        )
    };
    let policy = format!(
        "network:\n  http_allow_domains: [\"api.test:{}\", \"api.test:{}\"]\n  resolve: {{api.test: 127.0.0.1}}\n  \
         allow_private_addresses: true\n  ca_file: {}\n  inject:\n{}{}",
        secure.port,
        plain.port,
        ca.path().display(),
        entry(secure.port),
        entry(plain.port)
    );
    let server = apex(&policy, plain.port, &[("APEX_TEST_SECRET", SECRET)]);

    // A task that picks plain HTTP must not carry the secret in clear text.
    let result = run(
        &server,
        "summarize",
        json!({ "url": format!("http://api.test:{}/", plain.port) }),
    );
    assert_eq!(result["status"], "succeeded", "{result}");
    assert_eq!(plain.requests(), 1);
    assert!(
        !plain.header_lines().iter().any(|l| l.contains(SECRET)),
        "{:?}",
        plain.header_lines()
    );
    let log = server.log();
    assert!(log.contains("set plain_http: true on the entry"), "{log}");
    assert!(!log.contains(SECRET), "{log}");
    // The run's caller and the audit log see it too.
    let held_back = json!({
        "capability": "inject",
        "target": format!("authorization on http://api.test:{}", plain.port),
        "allowed": false,
        "reason": "not sent over plain http; set plain_http: true on the inject entry to send it in clear text",
    });
    let decisions = result["decisions"].as_array().unwrap();
    assert!(decisions.contains(&held_back), "{result}");
    let audit = server
        .send(&common::Request::new("GET", "/v1/audit?kind=policy_denial", "").signed())
        .json();
    let events = audit["events"].as_array().unwrap();
    assert!(
        events.iter().any(|e| e["fields"]["capability"] == "inject"),
        "{audit}"
    );

    let result = run(
        &server,
        "summarize",
        json!({ "url": format!("https://api.test:{}/", secure.port) }),
    );
    assert_eq!(result["status"], "succeeded", "{result}");
    assert!(
        secure
            .header_lines()
            .contains(&format!("authorization: Bearer {SECRET}")),
        "{:?}",
        secure.header_lines()
    );
}

#[test]
fn injected_header_reaches_only_its_host() {
    let upstream = LocalServer::http();
    let other_host = LocalServer::http();
    let policy = format!(
        "network:\n  http_allow_domains: [\"api.test:{{PORT}}\", \"other.test:{}\"]\n  \
         resolve: {{api.test: 127.0.0.1, other.test: 127.0.0.1}}\n  allow_private_addresses: true\n  \
         inject:\n    - {{host: \"api.test:{{PORT}}\", header: Authorization, value: \"Bearer ${{APEX_TEST_SECRET}}\", \
         plugins: [summarize], plain_http: true}}\n",
        other_host.port
    );
    let server = apex(&policy, upstream.port, &[("APEX_TEST_SECRET", SECRET)]);
    let port = upstream.port;

    // The task sets its own Authorization; the host replaces it.
    let result = run(
        &server,
        "summarize",
        json!({ "url": format!("http://api.test:{port}/"), "headers": { "Authorization": "Bearer task-value" } }),
    );
    assert_eq!(result["status"], "succeeded", "{result}");
    let seen = upstream.header_lines();
    assert!(
        seen.contains(&format!("authorization: Bearer {SECRET}")),
        "{seen:?}"
    );
    assert!(
        !seen.iter().any(|l| l.contains("task-value")),
        "the task's header was replaced"
    );
    assert!(
        !result.to_string().contains(SECRET),
        "the run result never contains the secret"
    );

    // Not to another host, not after a redirect, not for another plugin.
    let location = format!("http://other.test:{}/", other_host.port);
    run(
        &server,
        "summarize",
        json!({ "url": format!("http://api.test:{port}/redirect?to={location}") }),
    );
    run(&server, "summarize", json!({ "url": location }));
    assert!(
        !other_host.header_lines().iter().any(|l| l.contains(SECRET)),
        "never sent to another host"
    );

    let before = upstream
        .header_lines()
        .iter()
        .filter(|l| l.contains(SECRET))
        .count();
    run(
        &server,
        "other",
        json!({ "url": format!("http://api.test:{port}/") }),
    );
    let after = upstream
        .header_lines()
        .iter()
        .filter(|l| l.contains(SECRET))
        .count();
    assert_eq!(before, after, "a plugin not listed gets no header");

    assert!(
        !server.log().contains(SECRET),
        "the logs never contain the secret"
    );
    let history = server.send(&common::Request::new("GET", "/v1/runs?limit=100", "").signed());
    assert!(!String::from_utf8_lossy(&history.body).contains(SECRET));
}
