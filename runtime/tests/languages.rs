//! The tour plugins, one per language, built from `plugins/*-tour` with their
//! own toolchains and run through the signed API. Each reads a file through
//! the preopens, fetches a URL from a local server through the policy filter
//! and makes a shell call, as far as its language reaches the `task` world.

mod common;

use common::http_servers::LocalServer;
use common::{Setup, TestServer};
use serde_json::{Value, json};

const FILE_TEXT: &str = "Apex runs tasks in any language.\n";

/// Starts Apex with a policy that allows the work directory, `echo ` and
/// `allowed.test` on the local server's port, and writes the tour's file.
fn apex(http: &LocalServer) -> TestServer {
    let policy = format!(
        "paths_allow: [{{WORK}}]\n\
         shell_allow: [\"echo \"]\n\
         network:\n  http_allow_domains: [\"allowed.test:{port}\"]\n  \
         resolve: {{allowed.test: 127.0.0.1, denied.test: 127.0.0.1}}\n  \
         allow_private_addresses: true\n\
         timeouts: {{task_seconds: 30, shell_seconds: 10, http_seconds: 10}}\n",
        port = http.port
    );
    let server = TestServer::start_with(Setup { policy });
    std::fs::write(server.work().join("tour.txt"), FILE_TEXT).unwrap();
    server
}

fn tour_input(server: &TestServer, http: &LocalServer, host: &str) -> Value {
    json!({
        "file": server.work().join("tour.txt"),
        "url": format!("http://{host}:{}/", http.port),
        "command": "echo from the tour",
    })
}

/// Runs a task tour and returns its output.
fn run_task(server: &TestServer, name: &str, input: Value) -> Value {
    let result = server.run(name, json!({ "input": input }));
    assert_eq!(result["status"], "succeeded", "{result}");
    result["output"].clone()
}

/// Checks a task tour in one language: every step succeeds, a host not in
/// the policy is denied (in the run and the audit log), and a file outside
/// the preopens and a command outside `shell_allow` fail as steps.
fn check_task_tour(name: &str, language: &str) {
    let http = LocalServer::http();
    let server = apex(&http);
    server.upload_plugin(name);

    let output = run_task(&server, name, tour_input(&server, &http, "allowed.test"));
    assert_eq!(output["language"], language, "{output}");
    assert_eq!(output["file_bytes"], FILE_TEXT.len(), "{output}");
    assert_eq!(output["http_status"], 200, "{output}");
    assert_eq!(output["command_stdout"], "from the tour\n", "{output}");
    assert_eq!(http.requests(), 1);

    // An unlisted host: the host denies the request, the task reports it.
    let result = server.run(
        name,
        json!({ "input": tour_input(&server, &http, "denied.test") }),
    );
    assert_eq!(result["status"], "succeeded", "{result}");
    let status = &result["output"]["http_status"];
    assert!(status.is_string(), "a denied request is an error text: {result}");
    let denial = result["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["allowed"] == false)
        .unwrap_or_else(|| panic!("the denial is recorded in the run: {result}"));
    assert_eq!(denial["capability"], "http");
    assert!(
        denial["reason"].as_str().unwrap().contains("denied.test"),
        "{denial}"
    );
    assert!(
        server
            .audit()
            .iter()
            .any(|e| e["kind"] == "policy_denial" && e["reason"] == denial["reason"]),
        "the denial is audited"
    );
    assert_eq!(http.requests(), 1, "the denied request never reached the server");

    // Outside the policy: a file not under paths_allow, a command not in
    // shell_allow. Both fail as steps and leave the run successful.
    let output = run_task(
        &server,
        name,
        json!({ "file": "/etc/hostname", "command": "cat /etc/hostname" }),
    );
    assert!(output["file_bytes"].is_string(), "{output}");
    let command = output["command_stdout"].as_str().unwrap_or_default();
    assert!(command.contains("matches no shell_allow entry"), "{output}");
    assert_eq!(output["http_status"], Value::Null, "an absent key gives null");
}

#[test]
fn python_tour() {
    check_task_tour("python-tour", "python");
}

#[test]
fn javascript_tour() {
    check_task_tour("js-tour", "javascript");
}

#[test]
fn c_tour() {
    check_task_tour("c-tour", "c");
}

#[test]
fn go_tour_runs_as_a_preview1_command() {
    let http = LocalServer::http();
    let server = apex(&http);
    let wasm = std::fs::read(common::plugin("go-tour")).unwrap();
    let record = server.upload("go-tour", &wasm).json();
    assert_eq!(record["kind"], "command", "{record}");
    assert_eq!(record["format"], "wasip1-module", "{record}");

    let result = server.run(
        "go-tour",
        json!({ "input": tour_input(&server, &http, "allowed.test") }),
    );
    assert_eq!(result["status"], "succeeded", "{result}");
    let output: Value = serde_json::from_str(result["stdout"].as_str().unwrap().trim()).unwrap();
    assert_eq!(output["language"], "go", "{output}");
    assert_eq!(output["file_bytes"], FILE_TEXT.len(), "{output}");
    // Preview 1 has no HTTP and no shell interface: nothing reaches the host.
    assert!(
        output["http_status"].as_str().unwrap().starts_with("unavailable"),
        "{output}"
    );
    assert!(
        output["command_stdout"]
            .as_str()
            .unwrap()
            .starts_with("unavailable"),
        "{output}"
    );
    assert_eq!(http.requests(), 0);

    // The preopens bound a preview-1 module as they bound a component.
    let result = server.run("go-tour", json!({ "input": { "file": "/etc/hostname" } }));
    let output: Value = serde_json::from_str(result["stdout"].as_str().unwrap().trim()).unwrap();
    let error = output["file_bytes"].as_str().unwrap_or_default();
    assert!(error.contains("not inside a preopened directory"), "{output}");

    // A file larger than the module's initial memory is counted correctly.
    let big = vec![b'x'; 5 << 20];
    std::fs::write(server.work().join("big.bin"), &big).unwrap();
    let result = server.run(
        "go-tour",
        json!({ "input": { "file": server.work().join("big.bin") } }),
    );
    let output: Value = serde_json::from_str(result["stdout"].as_str().unwrap().trim()).unwrap();
    assert_eq!(output["file_bytes"], big.len(), "{output}");
}
