//! Run history, background runs, cancellation and the audit log, kept in
//! SQLite across restarts.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::{Request, Setup, TestServer};
use serde_json::{Value, json};

fn start_background(server: &TestServer, plugin: &str, input: Value) -> String {
    let body = json!({ "input": input, "wait": false }).to_string();
    let response = server.send(&Request::new("POST", &format!("/v1/plugins/{plugin}/run"), body).signed());
    assert_eq!(
        response.status,
        202,
        "{}",
        String::from_utf8_lossy(&response.body)
    );
    let body = response.json();
    assert_eq!(body["status"], "queued");
    body["run_id"].as_str().unwrap().to_string()
}

fn get_run(server: &TestServer, id: &str) -> Value {
    let response = server.send(&Request::new("GET", &format!("/v1/runs/{id}"), "").signed());
    assert_eq!(
        response.status,
        200,
        "{}",
        String::from_utf8_lossy(&response.body)
    );
    response.json()
}

/// Polls a run until its status is one of `statuses`, for at most `limit`.
fn wait_for(server: &TestServer, id: &str, statuses: &[&str], limit: Duration) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let run = get_run(server, id);
        if statuses.contains(&run["status"].as_str().unwrap()) {
            return run;
        }
        assert!(
            Instant::now() < deadline,
            "run {id} still {} after {limit:?}",
            run["status"]
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn background_run_polled_to_completion() {
    let server = TestServer::start();
    server.upload_plugin("hello");
    let id = start_background(&server, "hello", json!({ "name": "Ada" }));

    let run = wait_for(&server, &id, &["succeeded", "failed"], Duration::from_secs(10));
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["output"]["greeting"], "Hello, Ada!");
    assert_eq!(run["input"], json!({ "name": "Ada" }));
    assert_eq!(run["plugin"], "hello");
    assert_eq!(run["key_id"], "default");
    assert!(run["queued_at_ms"].as_i64().unwrap() <= run["started_at_ms"].as_i64().unwrap());
    assert!(run["started_at_ms"].as_i64().unwrap() <= run["finished_at_ms"].as_i64().unwrap());
}

#[test]
fn waiting_run_returns_its_id() {
    let server = TestServer::start();
    server.upload_plugin("hello");
    let result = server.run("hello", json!({ "input": { "name": "Grace" } }));
    let id = result["run_id"].as_str().unwrap();
    let stored = get_run(&server, id);
    assert_eq!(stored["output"], result["output"]);
    assert_eq!(stored["status"], "succeeded");
}

#[test]
fn cancel_stops_looping_task() {
    let server = TestServer::start_with(Setup {
        policy: "timeouts: {task_seconds: 60}\n".into(),
    });
    server.upload_plugin("probe");
    let id = start_background(&server, "probe", json!({ "op": "loop" }));
    wait_for(&server, &id, &["running"], Duration::from_secs(10));

    let started = Instant::now();
    let response = server.send(&Request::new("POST", &format!("/v1/runs/{id}/cancel"), "").signed());
    assert_eq!(response.status, 202);
    let run = wait_for(&server, &id, &["cancelled"], Duration::from_secs(5));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    assert!(run["error"].as_str().unwrap().contains("cancelled"));

    let again = server.send(&Request::new("POST", &format!("/v1/runs/{id}/cancel"), "").signed());
    assert_eq!(again.status, 409, "a finished run cannot be cancelled");
    let missing = server.send(&Request::new("POST", "/v1/runs/00ff/cancel", "").signed());
    assert_eq!(missing.status, 404);
    assert!(
        server
            .audit()
            .iter()
            .any(|e| e["kind"] == "run_cancel" && e["run_id"] == id.as_str())
    );
}

#[test]
fn cancel_kills_shell_children() {
    let policy =
        "paths_allow: [{WORK}]\nshell_allow: [\"sh -c \"]\ntimeouts: {task_seconds: 60, shell_seconds: 60}\n";
    let server = TestServer::start_with(Setup {
        policy: policy.into(),
    });
    server.upload_plugin("shell-run");
    let pid_file = server.work().join("child.pid");
    let command = format!("sh -c 'sleep 60 & echo $! > {}; sleep 60'", pid_file.display());
    let id = start_background(&server, "shell-run", json!({ "command": command }));

    let deadline = Instant::now() + Duration::from_secs(10);
    while !pid_file.exists() || std::fs::read_to_string(&pid_file).unwrap().trim().is_empty() {
        assert!(Instant::now() < deadline, "the shell call did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let response = server.send(&Request::new("POST", &format!("/v1/runs/{id}/cancel"), "").signed());
    assert_eq!(response.status, 202);
    wait_for(&server, &id, &["cancelled"], Duration::from_secs(5));

    std::thread::sleep(Duration::from_millis(300));
    let pid = std::fs::read_to_string(&pid_file).unwrap();
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())).unwrap_or_default();
    assert!(
        stat.is_empty() || stat.contains(") Z "),
        "the grandchild {pid} was killed"
    );
}

#[test]
fn history_survives_restart() {
    let mut server = TestServer::start();
    server.upload_plugin("hello");
    let result = server.run("hello", json!({ "input": { "name": "Ada" } }));
    let id = result["run_id"].as_str().unwrap().to_string();
    server.restart();

    let run = get_run(&server, &id);
    assert_eq!(run["output"]["greeting"], "Hello, Ada!");
    let kinds: Vec<String> = server
        .audit()
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_string())
        .collect();
    assert!(kinds.contains(&"server_stop".to_string()), "{kinds:?}");
}

#[test]
fn run_in_flight_at_kill_is_interrupted() {
    let mut server = TestServer::start_with(Setup {
        policy: "timeouts: {task_seconds: 60}\n".into(),
    });
    server.upload_plugin("probe");
    let id = start_background(&server, "probe", json!({ "op": "loop" }));
    wait_for(&server, &id, &["running"], Duration::from_secs(10));

    server.kill();
    server.spawn();
    let run = get_run(&server, &id);
    assert_eq!(run["status"], "interrupted", "{run}");
    assert!(run["finished_at_ms"].is_i64());
    assert!(
        server
            .log()
            .contains("marked runs in flight at the last stop as interrupted")
    );
}

/// Sends `request` and reads until the connection ends, ignoring errors: for
/// a request whose server is killed before it responds.
fn send_until_closed(addr: &str, request: &Request) {
    let Ok(mut stream) = std::net::TcpStream::connect(addr) else {
        return;
    };
    let _ = stream.write_all(common::request_head(addr, request).as_bytes());
    let _ = stream.write_all(&request.body);
    let _ = stream.read_to_end(&mut Vec::new());
}

#[test]
fn accepted_run_survives_kill() {
    let mut server = TestServer::start();
    server.upload_plugin("probe");

    // The server is killed right after each 202, before any other change
    // could commit the run's record.
    for _ in 0..3 {
        let id = start_background(&server, "probe", json!({ "op": "sleep", "ms": 5000 }));
        server.kill();
        server.spawn();
        let run = get_run(&server, &id);
        assert_eq!(run["status"], "interrupted", "{run}");
    }
}

#[test]
fn background_run_survives_client_hang_up() {
    let server = TestServer::start();
    server.upload_plugin("hello");
    let body = json!({ "input": {}, "wait": false }).to_string();

    // Each client hangs up a little later, some before their 202.
    for attempt in 0..200u64 {
        let request = Request::new("POST", "/v1/plugins/hello/run", body.clone()).signed();
        let mut stream = std::net::TcpStream::connect(&server.addr).unwrap();
        stream
            .write_all(common::request_head(&server.addr, &request).as_bytes())
            .unwrap();
        stream.write_all(&request.body).unwrap();
        std::thread::sleep(Duration::from_micros(attempt * 20));
        drop(stream);
    }

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let page = server
            .send(&Request::new("GET", "/v1/runs?limit=1000", "").signed())
            .json();
        let runs = page["runs"].as_array().unwrap();
        let unfinished: Vec<&Value> = runs.iter().filter(|run| run["status"] != "succeeded").collect();
        if unfinished.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "runs left unfinished: {unfinished:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until a run of `probe` is listed as running, and returns its id.
fn first_running_probe(server: &TestServer) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let page = server
            .send(&Request::new("GET", "/v1/runs?plugin=probe&status=running", "").signed())
            .json();
        if let Some(run) = page["runs"].as_array().unwrap().first() {
            return run["run_id"].as_str().unwrap().to_string();
        }
        assert!(
            Instant::now() < deadline,
            "the waiting run is not listed as running"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends a waiting run of `probe` with `input`, hangs up once the run is
/// listed as running, and returns its id.
fn hang_up_while_running(server: &TestServer, input: Value) -> String {
    let body = json!({ "input": input }).to_string();
    let request = Request::new("POST", "/v1/plugins/probe/run", body).signed();
    let mut stream = std::net::TcpStream::connect(&server.addr).unwrap();
    stream
        .write_all(common::request_head(&server.addr, &request).as_bytes())
        .unwrap();
    stream.write_all(&request.body).unwrap();

    // A waiting run is listed once it has run for a few milliseconds.
    let id = first_running_probe(server);
    drop(stream);
    id
}

#[test]
fn waiting_run_survives_client_hang_up() {
    let server = TestServer::start();
    server.upload_plugin("probe");

    let id = hang_up_while_running(&server, json!({ "op": "sleep", "ms": 1000 }));
    let run = wait_for(&server, &id, &["succeeded"], Duration::from_secs(10));
    assert_eq!(run["status"], "succeeded", "{run}");
}

#[test]
fn stop_waits_for_runs_without_client() {
    let mut server = TestServer::start();
    server.upload_plugin("probe");
    // The waiting run first, since the helper finds it as the first probe
    // listed as running.
    let detached = hang_up_while_running(&server, json!({ "op": "sleep", "ms": 1500 }));
    let background = start_background(&server, "probe", json!({ "op": "sleep", "ms": 1500 }));

    server.stop();
    let log = server.log();
    assert!(
        log.contains("waiting for runs without a client to finish"),
        "{log}"
    );
    server.restart();
    for id in [detached, background] {
        let run = get_run(&server, &id);
        assert_eq!(run["status"], "succeeded", "{run}");
    }
}

#[test]
fn waiting_run_cancelled_after_client_hang_up() {
    let server = TestServer::start();
    server.upload_plugin("probe");

    let id = hang_up_while_running(&server, json!({ "op": "loop" }));
    let response = server.send(&Request::new("POST", &format!("/v1/runs/{id}/cancel"), "").signed());
    assert_eq!(
        response.status,
        202,
        "{}",
        String::from_utf8_lossy(&response.body)
    );
    let run = wait_for(&server, &id, &["cancelled"], Duration::from_secs(10));
    assert_eq!(run["status"], "cancelled", "{run}");
}

#[test]
fn failed_commit_reported_to_client() {
    let server = TestServer::start();
    server.upload_plugin("hello");
    let locker = rusqlite::Connection::open(server.data().join("history.db")).unwrap();
    locker.execute_batch("BEGIN IMMEDIATE").unwrap();

    // The writer gives up after its 5 s busy timeout.
    let body = json!({ "input": { "name": "Ada" }, "wait": false }).to_string();
    let response = server.send(&Request::new("POST", "/v1/plugins/hello/run", body.clone()).signed());
    assert_eq!(
        response.status,
        503,
        "{}",
        String::from_utf8_lossy(&response.body)
    );
    assert_eq!(response.error_code(), "history_unavailable");

    let waited = server.run("hello", json!({ "input": { "name": "Ada" } }));
    assert_eq!(waited["status"], "succeeded", "{waited}");
    let warning = waited["warning"].as_str().unwrap_or_default();
    assert!(warning.contains("could not record"), "{waited}");

    // Reads return what is stored after about 2 s, while each try of the
    // writer waits out its 5 s busy timeout.
    let requested = Instant::now();
    let page = server.send(&Request::new("GET", "/v1/runs", "").signed());
    assert_eq!(page.status, 200);
    assert!(
        page.json()["runs"].as_array().unwrap().is_empty(),
        "nothing is stored yet"
    );
    assert!(
        requested.elapsed() < Duration::from_secs(4),
        "the read waited {:?} for the writer",
        requested.elapsed()
    );

    locker.execute_batch("ROLLBACK").unwrap();
    // The finished run is written once the database is free again, and the
    // rejected background run never is.
    let id = waited["run_id"].as_str().unwrap();
    let run = wait_for(&server, id, &["succeeded"], Duration::from_secs(20));
    assert_eq!(run["output"]["greeting"], "Hello, Ada!");
    let page = server.send(&Request::new("GET", "/v1/runs", "").signed()).json();
    assert_eq!(page["runs"].as_array().unwrap().len(), 1, "{page}");
    let id = start_background(&server, "hello", json!({ "name": "Ada" }));
    let run = wait_for(&server, &id, &["succeeded"], Duration::from_secs(10));
    assert_eq!(run["output"]["greeting"], "Hello, Ada!");
}

#[test]
fn waiting_run_recorded_while_running() {
    let mut server = TestServer::start_with(Setup {
        policy: "timeouts: {task_seconds: 60}\n".into(),
    });
    server.upload_plugin("probe");

    // A waiting run with a free slot is written to the history when it ends,
    // or after a few milliseconds when it is still running.
    let request = Request::new(
        "POST",
        "/v1/plugins/probe/run",
        json!({ "input": { "op": "loop" } }).to_string(),
    )
    .signed();
    let addr = server.addr.clone();
    let client = std::thread::spawn(move || send_until_closed(&addr, &request));

    let id = first_running_probe(&server);

    server.kill();
    client.join().unwrap();
    server.spawn();
    let run = get_run(&server, &id);
    assert_eq!(run["status"], "interrupted", "{run}");
    assert_eq!(run["plugin"], "probe");
}

#[test]
fn runs_listed_newest_first_in_pages() {
    let server = TestServer::start();
    server.upload_plugin("hello");
    server.upload_plugin("probe");
    let mut ids = Vec::new();
    for index in 0..5 {
        let result = server.run("hello", json!({ "input": { "name": format!("n{index}") } }));
        ids.push(result["run_id"].as_str().unwrap().to_string());
    }
    server.run("probe", json!({ "input": { "op": "fail" } }));

    let mut seen = Vec::new();
    let mut target = "/v1/runs?plugin=hello&limit=2".to_string();
    loop {
        let page = server.send(&Request::new("GET", &target, "").signed()).json();
        for run in page["runs"].as_array().unwrap() {
            seen.push(run["run_id"].as_str().unwrap().to_string());
        }
        match page["next_before"].as_str() {
            Some(cursor) => target = format!("/v1/runs?plugin=hello&limit=2&before={cursor}"),
            None => break,
        }
    }
    ids.reverse();
    assert_eq!(seen, ids, "every run once, newest first");

    let failed = server
        .send(&Request::new("GET", "/v1/runs?status=failed", "").signed())
        .json();
    let failed = failed["runs"].as_array().unwrap();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["plugin"], "probe");

    for bad in [
        "/v1/runs?limit=0",
        "/v1/runs?limit=x",
        "/v1/runs?colour=red",
        "/v1/audit?since=yesterday",
    ] {
        let response = server.send(&Request::new("GET", bad, "").signed());
        assert_eq!(response.status, 400, "{bad}");
        assert_eq!(response.error_code(), "invalid_query");
    }
    let missing = server.send(&Request::new("GET", "/v1/runs/0123", "").signed());
    assert_eq!(missing.status, 404);
}

#[test]
fn concurrent_runs_all_recorded() {
    let server = TestServer::start();
    server.upload_plugin("hello");
    let threads: Vec<_> = (0..40)
        .map(|index| {
            let addr = server.addr.clone();
            std::thread::spawn(move || {
                let body = json!({ "input": { "name": format!("c{index}") } }).to_string();
                let response = common::send_raw(
                    &addr,
                    &Request::new("POST", "/v1/plugins/hello/run", body).signed(),
                );
                response.json()["run_id"].as_str().unwrap().to_string()
            })
        })
        .collect();
    let mut ids: Vec<String> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    ids.sort();

    let page = server
        .send(&Request::new("GET", "/v1/runs?limit=100", "").signed())
        .json();
    let mut listed: Vec<String> = page["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["run_id"].as_str().unwrap().to_string())
        .collect();
    listed.sort();
    assert_eq!(listed, ids, "no run is lost");
    assert!(
        page["runs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["status"] == "succeeded")
    );
}

#[test]
fn audit_records_every_kind() {
    let policy = "paths_allow: [{WORK}]\nshell_allow: [\"echo \"]\n";
    let server = TestServer::start_with(Setup {
        policy: policy.into(),
    });
    server.upload_plugin("shell-run");
    server.upload_plugin("hello");
    server.send(&Request::new("GET", "/v1/plugins", ""));
    server.run("shell-run", json!({ "input": { "command": "rm -rf /" } }));
    server.send(&Request::new("DELETE", "/v1/plugins/hello", "").signed());

    let events = server.audit();
    let kinds: Vec<&str> = events.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    for kind in [
        "policy_load",
        "server_start",
        "plugin_upload",
        "auth_failure",
        "policy_denial",
        "plugin_delete",
    ] {
        assert!(kinds.contains(&kind), "{kind} missing from {kinds:?}");
    }
    let denial = events.iter().find(|e| e["kind"] == "policy_denial").unwrap();
    assert_eq!(denial["capability"], "shell");
    assert!(denial["run_id"].is_string());

    let filtered = server
        .send(&Request::new("GET", "/v1/audit?kind=plugin_upload", "").signed())
        .json();
    assert_eq!(filtered["events"].as_array().unwrap().len(), 2);
}

#[test]
fn filters_with_unknown_values_rejected() {
    let server = TestServer::start();
    // An unknown kind would match nothing, which looks like no events.
    let response = server.send(&Request::new("GET", "/v1/audit?kind=cancel", "").signed());
    assert_eq!(response.status, 400);
    assert_eq!(response.error_code(), "invalid_query");
    assert!(
        response.error_message().contains("run_cancel"),
        "{}",
        response.error_message()
    );

    let response = server.send(&Request::new("GET", "/v1/runs?plugin=BAD!", "").signed());
    assert_eq!(response.status, 400);
    assert_eq!(response.error_code(), "invalid_name");
}

#[test]
fn retention_prunes_old_history() {
    let mut server = TestServer::start_with(Setup {
        policy: "retention: {runs_days: 1, audit_days: 1}\n".into(),
    });
    server.upload_plugin("hello");
    let recent = server.run("hello", json!({}))["run_id"]
        .as_str()
        .unwrap()
        .to_string();
    server.stop();

    // Age one run and one audit event past the retention.
    let db = rusqlite::Connection::open(server.data().join("history.db")).unwrap();
    let old_ms = apex::history::now_ms() - 3 * 24 * 60 * 60 * 1000;
    db.execute(
        "INSERT INTO runs (id, plugin, sha256, key_id, queued_at, finished_at, status) VALUES ('0000old', 'hello', 'x', 'default', ?1, ?1, 'succeeded')",
        [old_ms],
    )
    .unwrap();
    db.execute(
        "INSERT INTO audit (time, kind, fields) VALUES (?1, 'ancient', '{}')",
        [old_ms / 1000],
    )
    .unwrap();
    drop(db);

    server.spawn();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let old = server.send(&Request::new("GET", "/v1/runs/0000old", "").signed());
        let ancient = server.audit().iter().any(|e| e["kind"] == "ancient");
        if old.status == 404 && !ancient {
            break;
        }
        assert!(Instant::now() < deadline, "old history was not pruned");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        get_run(&server, &recent)["status"],
        "succeeded",
        "recent runs are kept"
    );
}

#[test]
fn cli_lists_runs_logs_and_audit() {
    let server = TestServer::start();
    server.upload_plugin("hello");
    let apex = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_apex"))
            .args(args)
            .env("APEX_URL", format!("http://{}", server.addr))
            .env("APEX_SHARED_KEY", common::KEY)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    };

    let started: Value = serde_json::from_str(&apex(&[
        "run",
        "hello",
        "--input",
        r#"{"name":"Ada"}"#,
        "--no-wait",
    ]))
    .unwrap();
    let id = started["run_id"].as_str().unwrap().to_string();
    wait_for(&server, &id, &["succeeded"], Duration::from_secs(10));

    let table = apex(&["runs"]);
    assert!(table.starts_with("RUN"), "{table}");
    assert!(table.contains(&id), "{table}");
    assert!(table.contains("succeeded"), "{table}");
    let logs = apex(&["logs", &id]);
    assert!(logs.contains("succeeded"), "{logs}");
    assert!(logs.contains("Hello, Ada!"), "{logs}");
    let audit = apex(&["audit", "--kind", "plugin_upload"]);
    assert!(audit.contains("plugin_upload"), "{audit}");
    assert!(audit.contains("plugin=hello"), "{audit}");
    let json: Value = serde_json::from_str(&apex(&["runs", "--json"])).unwrap();
    assert_eq!(json["runs"][0]["run_id"], id.as_str());
}

#[test]
fn json_log_format_writes_json_lines() {
    let mut server = TestServer::start();
    server.stop();
    server.extra_args = vec!["--log-format".into(), "json".into()];
    std::fs::write(server.dir.path().join("server.log"), "").unwrap();
    server.spawn();
    server.upload_plugin("hello");
    server.run("hello", json!({ "input": { "name": "Ada" } }));

    let log = server.log();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(
        lines.iter().any(|l| l["fields"]["message"] == "run finished"),
        "{log}"
    );
    assert!(
        lines.iter().any(|l| l["fields"]["message"] == "request finished"),
        "{log}"
    );
    assert!(!log.contains("Ada"), "inputs never reach the logs");
}
