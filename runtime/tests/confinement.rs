//! What a task can and cannot reach: files, environment, sockets, time,
//! memory and output, each tested from the task's side.

mod common;

use std::net::TcpListener;
use std::time::{Duration, Instant};

use common::{Request, Setup, TestServer};
use serde_json::{Value, json};

fn probe(server: &TestServer, input: Value) -> Value {
    server.run("probe", json!({ "input": input }))
}

fn assert_denied(result: &Value, what: &str) {
    assert_eq!(result["status"], "failed", "{what} must be denied: {result}");
}

fn server_with_probe() -> TestServer {
    let server = TestServer::start();
    server.upload_plugin("probe");
    server
}

#[test]
fn allowed_directory_readable_and_writable() {
    let server = server_with_probe();
    let file = server.work().join("out.txt");
    let result = probe(
        &server,
        json!({ "op": "write", "path": file, "text": "written by a task" }),
    );
    assert_eq!(result["status"], "succeeded", "{result}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "written by a task");

    let result = probe(&server, json!({ "op": "read", "path": file }));
    assert_eq!(result["output"], "written by a task");
}

#[test]
fn read_only_directory_not_writable() {
    let server = server_with_probe();
    let ro = server.ro();
    std::fs::write(ro.join("ref.txt"), "reference").unwrap();

    let result = probe(&server, json!({ "op": "read", "path": ro.join("ref.txt") }));
    assert_eq!(result["output"], "reference", "{result}");

    let result = probe(
        &server,
        json!({ "op": "write", "path": ro.join("new.txt"), "text": "x" }),
    );
    assert_denied(&result, "writing into a read-only directory");
    assert!(!ro.join("new.txt").exists());

    let result = probe(
        &server,
        json!({ "op": "write", "path": ro.join("ref.txt"), "text": "changed" }),
    );
    assert_denied(&result, "overwriting a read-only file");
    assert_eq!(std::fs::read_to_string(ro.join("ref.txt")).unwrap(), "reference");
}

#[test]
fn paths_outside_allowed_denied() {
    let server = server_with_probe();
    let work = server.work();
    // A secret beside the work directory, which a task must never read.
    let secret = server.dir.path().join("secret.txt");
    std::fs::write(&secret, "top secret").unwrap();
    let secret = secret.canonicalize().unwrap();

    let attempts = [
        json!(secret),
        json!(format!("{}/../secret.txt", work.display())),
        json!(format!("{}/./../../{}", work.display(), secret.display())),
        json!("/etc/passwd"),
        json!("../secret.txt"),
        json!("secret.txt"),
        json!(server.data().join("history.db")),
        json!(server.dir.path().join("policy.yaml")),
        json!("/proc/self/environ"),
    ];
    for path in attempts {
        let result = probe(&server, json!({ "op": "read", "path": path }));
        assert_denied(&result, &format!("reading {path}"));
        assert!(!result.to_string().contains("top secret"));
    }

    let result = probe(
        &server,
        json!({ "op": "write", "path": format!("{}/../escaped.txt", work.display()), "text": "x" }),
    );
    assert_denied(&result, "writing through ..");
    assert!(!server.dir.path().join("escaped.txt").exists());

    let result = probe(&server, json!({ "op": "list", "path": "/" }));
    assert_denied(&result, "listing /");
}

#[test]
fn symlinks_out_of_allowed_denied() {
    let server = server_with_probe();
    let work = server.work();
    let secret = server.dir.path().join("secret.txt");
    std::fs::write(&secret, "top secret").unwrap();

    std::os::unix::fs::symlink(&secret, work.join("link-to-file")).unwrap();
    std::os::unix::fs::symlink(server.dir.path(), work.join("link-to-dir")).unwrap();
    std::os::unix::fs::symlink("../secret.txt", work.join("relative-link")).unwrap();

    for path in [
        work.join("link-to-file"),
        work.join("link-to-dir/secret.txt"),
        work.join("relative-link"),
    ] {
        let result = probe(&server, json!({ "op": "read", "path": path }));
        assert_denied(&result, &format!("reading through symlink {}", path.display()));
        assert!(!result.to_string().contains("top secret"));
    }

    let result = probe(
        &server,
        json!({ "op": "write", "path": work.join("link-to-dir/planted.txt"), "text": "x" }),
    );
    assert_denied(&result, "writing through a symlinked directory");
    assert!(!server.dir.path().join("planted.txt").exists());

    // A symlink that stays inside the allowed directory works.
    std::fs::write(work.join("inside.txt"), "fine").unwrap();
    std::os::unix::fs::symlink("inside.txt", work.join("inside-link")).unwrap();
    let result = probe(&server, json!({ "op": "read", "path": work.join("inside-link") }));
    assert_eq!(result["output"], "fine", "{result}");
}

#[test]
fn empty_policy_grants_no_directory() {
    let server = TestServer::start_with(Setup {
        policy: "paths_allow: []\n".into(),
    });
    server.upload_plugin("probe");
    let work = server.work();
    std::fs::write(work.join("a.txt"), "data").unwrap();
    let result = probe(&server, json!({ "op": "read", "path": work.join("a.txt") }));
    assert_denied(&result, "reading with no allowed paths");
}

#[test]
fn environment_is_empty() {
    let server = server_with_probe();
    let result = probe(&server, json!({ "op": "env" }));
    assert_eq!(result["status"], "succeeded");
    assert_eq!(
        result["output"],
        json!({}),
        "the server's environment, its key above all, never reaches a task"
    );
    assert!(!result.to_string().contains(common::KEY));
}

#[test]
fn sockets_denied() {
    let server = server_with_probe();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();

    for target in [addr.to_string(), server.addr.clone()] {
        let result = probe(&server, json!({ "op": "connect", "addr": target }));
        assert_denied(&result, &format!("connecting to {target}"));
    }
    assert!(listener.accept().is_err(), "no connection may reach the listener");

    let result = probe(&server, json!({ "op": "resolve", "host": "localhost" }));
    assert_denied(&result, "name lookup");
}

#[test]
fn infinite_loop_times_out_and_server_keeps_serving() {
    let server = TestServer::start_with(Setup {
        policy: "timeouts: {task_seconds: 2}\n".into(),
    });
    server.upload_plugin("probe");

    let addr = server.addr.clone();
    let looping = std::thread::spawn(move || {
        let body = json!({ "input": { "op": "loop" } }).to_string();
        common::send_raw(
            &addr,
            &Request::new("POST", "/v1/plugins/probe/run", body).signed(),
        )
    });

    // While the task loops, the API answers promptly.
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..5 {
        let started = Instant::now();
        let response = server.send(&Request::new("GET", "/healthz", ""));
        assert_eq!(response.status, 200);
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "healthz took {:?}",
            started.elapsed()
        );
        let list = server.send(&Request::new("GET", "/v1/plugins", "").signed());
        assert_eq!(list.status, 200);
    }

    let response = looping.join().unwrap();
    let result = response.json();
    assert_eq!(result["status"], "timed_out", "{result}");
    assert!(result["error"].as_str().unwrap().contains("2 s"), "{result}");
    let duration = result["duration_ms"].as_u64().unwrap();
    assert!((2000..4000).contains(&duration), "{duration} ms");
}

#[test]
fn deadline_fires_inside_host_call() {
    let server = TestServer::start_with(Setup {
        policy: "timeouts: {task_seconds: 1}\n".into(),
    });
    server.upload_plugin("probe");

    let started = Instant::now();
    let result = probe(&server, json!({ "op": "sleep", "ms": 60_000 }));
    assert_eq!(result["status"], "timed_out", "{result}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );

    let result = probe(&server, json!({ "op": "sleep", "ms": 10 }));
    assert_eq!(
        result["status"], "succeeded",
        "a short sleep is within the deadline: {result}"
    );
}

#[test]
fn memory_limit_obeyed() {
    let server = TestServer::start_with(Setup {
        policy: "limits: {memory_mib: 64}\n".into(),
    });
    server.upload_plugin("probe");
    let result = probe(&server, json!({ "op": "alloc", "mib": 16 }));
    assert_eq!(result["status"], "succeeded", "{result}");
    assert_eq!(result["output"]["allocated_mib"], 16);
}

/// Returns the resident memory of process `pid` in MiB.
fn resident_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib >> 10
}

/// Asserts that the server logs whether it resets slots in place, or why not.
fn assert_reset_in_place_reported(server: &TestServer) {
    let log = server.log();
    assert!(
        log.contains("pool slots are reset in place") || log.contains("--reset-slots-in-place is ignored"),
        "{log}"
    );
}

#[test]
fn finished_runs_release_memory() {
    let server = TestServer::start_with_args(
        Setup {
            policy: "limits: {max_concurrent_runs: 1, memory_mib: 256}\n".into(),
        },
        &["--reset-slots-in-place"],
    );
    server.upload_plugin("probe");
    assert_reset_in_place_reported(&server);
    let idle = resident_mib(server.pid());

    // 15 runs of 200 MiB: 3 GiB in total if slots kept what runs touched.
    for _ in 0..15 {
        let result = probe(&server, json!({ "op": "alloc", "mib": 200 }));
        assert_eq!(result["status"], "succeeded", "{result}");
    }
    let after = resident_mib(server.pid());
    assert!(
        after < idle + 256,
        "{after} MiB resident after the runs, {idle} MiB before"
    );
}

#[test]
fn memory_limit_violated() {
    let server = TestServer::start_with(Setup {
        policy: "limits: {memory_mib: 64}\n".into(),
    });
    server.upload_plugin("probe");
    let result = probe(&server, json!({ "op": "alloc", "mib": 200 }));
    assert_eq!(result["status"], "failed", "{result}");
    let error = result["error"].as_str().unwrap();
    assert!(error.contains("memory limit exceeded"), "{error}");
    assert!(error.contains("64 MiB"), "{error}");

    // The server is fine afterwards.
    let result = probe(&server, json!({ "op": "alloc", "mib": 1 }));
    assert_eq!(result["status"], "succeeded");
}

#[test]
fn output_within_cap_kept_whole() {
    let server = TestServer::start_with(Setup {
        policy: "limits: {output_kib: 4}\n".into(),
    });
    server.upload_plugin("probe");
    let result = probe(&server, json!({ "op": "print", "bytes": 4096 }));
    assert_eq!(result["status"], "succeeded");
    assert_eq!(result["stdout"].as_str().unwrap().len(), 4096);
    assert_eq!(result["stdout_truncated"], false);
    assert!(result.get("warning").is_none());
}

#[test]
fn output_beyond_cap_truncated_and_flagged() {
    let server = TestServer::start_with(Setup {
        policy: "limits: {output_kib: 4}\n".into(),
    });
    server.upload_plugin("probe");
    let result = probe(&server, json!({ "op": "print", "bytes": 1_000_000 }));
    assert_eq!(
        result["status"], "succeeded",
        "the task finishes its work: {result}"
    );
    assert_eq!(result["stdout"].as_str().unwrap().len(), 4096);
    assert_eq!(result["stderr"].as_str().unwrap().len(), 4096);
    assert_eq!(result["stdout_truncated"], true);
    assert_eq!(result["stderr_truncated"], true);
    assert!(
        result["warning"].as_str().unwrap().contains("1000000 bytes"),
        "{result}"
    );
}

#[test]
fn invalid_utf8_output_is_valid_json() {
    let server = server_with_probe();
    let result = probe(&server, json!({ "op": "print", "bytes": 3, "byte": 255 }));
    assert_eq!(result["status"], "succeeded", "{result}");
    assert_eq!(result["stdout"], "\u{fffd}\u{fffd}\u{fffd}");
}

#[test]
fn later_run_sees_no_earlier_memory() {
    for args in [&[][..], &["--reset-slots-in-place"][..]] {
        check_no_memory_left(args);
    }
}

/// Starts a server with `args` and checks that no run finds what an earlier
/// run wrote to its memory.
fn check_no_memory_left(args: &[&str]) {
    // With one run slot, each run is likely to reuse the memory slot of the
    // run before it.
    let server = TestServer::start_with_args(
        Setup {
            policy: "limits: {max_concurrent_runs: 1}\n".into(),
        },
        args,
    );
    server.upload_plugin("probe");
    if !args.is_empty() {
        assert_reset_in_place_reported(&server);
    }
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;

    for round in 0..3 {
        let stained = probe(&server, json!({ "op": "stain", "seed": seed }));
        let found = stained["output"]["found"].as_u64().unwrap_or(0);
        // The pattern begins 32,768 times in the 1 MiB of heap and 128 times
        // in the static buffer. The run that wrote them must find them all.
        assert!(
            found >= 32_768 + 128,
            "the scan cannot find the pattern it wrote: {stained}"
        );

        for _ in 0..3 {
            let later = probe(&server, json!({ "op": "residue", "seed": seed }));
            assert_eq!(
                later["output"]["found"], 0,
                "round {round}: a run found memory left by an earlier run: {later}"
            );
        }
    }
}

#[test]
fn full_queue_answers_503_and_healthz_stays_fast() {
    let server = TestServer::start_with(Setup {
        policy: "timeouts: {task_seconds: 3}\nlimits: {max_concurrent_runs: 1, max_queued_runs: 1}\n".into(),
    });
    server.upload_plugin("probe");

    // One run loops in the only slot, one waits in the queue.
    let looping: Vec<_> = (0..2)
        .map(|_| {
            let addr = server.addr.clone();
            std::thread::spawn(move || {
                let body = json!({ "input": { "op": "loop" } }).to_string();
                common::send_raw(
                    &addr,
                    &Request::new("POST", "/v1/plugins/probe/run", body).signed(),
                )
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));

    let response =
        server.send(&Request::new("POST", "/v1/plugins/probe/run", r#"{"input":{"op":"echo"}}"#).signed());
    assert_eq!(
        response.status,
        503,
        "{}",
        String::from_utf8_lossy(&response.body)
    );
    assert_eq!(response.error_code(), "queue_full");
    let retry = response
        .headers
        .iter()
        .find(|(n, _)| n == "retry-after")
        .map(|(_, v)| v.clone());
    assert_eq!(retry.as_deref(), Some("1"));

    let started = Instant::now();
    assert_eq!(server.send(&Request::new("GET", "/healthz", "")).status, 200);
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "healthz took {:?}",
        started.elapsed()
    );

    for run in looping {
        assert_eq!(run.join().unwrap().json()["status"], "timed_out");
    }
    // With the slot free again, runs go through.
    assert_eq!(probe(&server, json!({ "op": "echo" }))["status"], "succeeded");
}

#[test]
fn component_larger_than_run_budget_rejected_at_upload() {
    let server = TestServer::start();
    // 65 core instances, one more than a run may create.
    let mut wat = String::from("(component (core module $m)");
    for index in 0..65 {
        wat.push_str(&format!(" (core instance $i{index} (instantiate $m))"));
    }
    wat.push(')');
    let wasm = wat::parse_str(&wat).unwrap();
    let response = server.upload("greedy", &wasm);
    assert_eq!(
        response.status,
        400,
        "{}",
        String::from_utf8_lossy(&response.body)
    );
    let message = response.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(message.contains("64"), "{message}");
}

#[test]
fn fifo_and_socket_files_not_opened() {
    let server = server_with_probe();
    let work = server.work();
    let status = std::process::Command::new("mkfifo")
        .arg(work.join("pipe"))
        .status()
        .unwrap();
    assert!(status.success());
    let _socket = std::os::unix::net::UnixListener::bind(work.join("socket")).unwrap();
    std::os::unix::fs::symlink("pipe", work.join("link-to-pipe")).unwrap();

    // Opening a FIFO waits for its other end, so it must fail at once instead,
    // for reading and for writing, also through a symlink.
    let cases = [
        (json!({ "op": "read", "path": work.join("pipe") }), "FIFO"),
        (
            json!({ "op": "write", "path": work.join("pipe"), "text": "x" }),
            "FIFO",
        ),
        (json!({ "op": "read", "path": work.join("link-to-pipe") }), "FIFO"),
        (json!({ "op": "read", "path": work.join("socket") }), "socket"),
    ];
    for (input, kind) in cases {
        let started = Instant::now();
        let result = probe(&server, input.clone());
        assert_denied(&result, &input.to_string());
        assert!(started.elapsed() < Duration::from_secs(3), "{input}: {result}");
        let denial = result["decisions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["capability"] == "file" && d["allowed"] == false)
            .cloned()
            .unwrap_or_else(|| panic!("no file denial for {input}: {result}"));
        assert!(denial["reason"].as_str().unwrap().contains(kind), "{denial}");
    }
    let audit = server.audit();
    let denials = audit
        .iter()
        .filter(|e| e["kind"] == "policy_denial" && e["capability"] == "file")
        .count();
    assert_eq!(denials, 4, "{audit:?}");
}

#[test]
fn file_denials_recorded_and_audited() {
    let server = server_with_probe();
    let work = server.work();
    let secret = server.dir.path().join("secret.txt");
    std::fs::write(&secret, "top secret").unwrap();
    std::os::unix::fs::symlink(&secret, work.join("link-to-file")).unwrap();

    let cases = [
        (format!("{}/../secret.txt", work.display()), "`..`"),
        (format!("{}/link-to-file", work.display()), "symlink"),
    ];
    for (path, reason) in cases {
        let result = probe(&server, json!({ "op": "read", "path": path }));
        assert_denied(&result, &path);
        let decisions = result["decisions"].as_array().unwrap();
        let denial = decisions
            .iter()
            .find(|d| d["capability"] == "file" && d["allowed"] == false)
            .unwrap_or_else(|| panic!("no file denial for {path}: {result}"));
        assert!(denial["reason"].as_str().unwrap().contains(reason), "{denial}");
    }

    let write = probe(
        &server,
        json!({ "op": "write", "path": server.ro().join("new.txt"), "text": "x" }),
    );
    assert_denied(&write, "writing into a read-only directory");
    let denial = write["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["capability"] == "file")
        .cloned();
    assert!(
        denial.is_some_and(|d| d["reason"].as_str().unwrap().contains("only reading")),
        "{write}"
    );

    // A missing file inside the directory is an ordinary failure, not a denial.
    let missing = probe(&server, json!({ "op": "read", "path": work.join("missing.txt") }));
    assert_eq!(missing["decisions"], json!([]), "{missing}");

    let audited = server
        .audit()
        .into_iter()
        .filter(|e| e["kind"] == "policy_denial" && e["capability"] == "file")
        .count();
    assert_eq!(audited, 3);
}

/// Starts Apex with the probe and a write budget of 1 MiB per run.
fn server_with_write_budget() -> TestServer {
    let server = TestServer::start_with(Setup {
        policy: "paths_allow:\n  - {WORK}\nlimits: {write_mib: 1}\n".into(),
    });
    server.upload_plugin("probe");
    server
}

/// Returns the run's denials that name the write budget.
fn budget_denials(result: &Value) -> Vec<Value> {
    result["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["capability"] == "file" && d["reason"].as_str().unwrap().contains("limits.write_mib"))
        .cloned()
        .collect()
}

#[test]
fn write_budget_stops_filling_disk() {
    let server = server_with_write_budget();
    let path = server.work().join("big.bin");
    let result = probe(&server, json!({ "op": "fill", "path": path, "bytes": 4 << 20 }));
    assert_eq!(result["status"], "succeeded", "{result}");

    // Writes fail once the task has written its 1 MiB, less the block its
    // file cost. Through a stream, wasi-libc reports this failure as EIO.
    let written = result["output"]["written"].as_u64().unwrap();
    assert!(written <= (1 << 20) - 4096, "{result}");
    assert!(written >= 1 << 19, "{result}");
    let error = result["output"]["error"].as_str().unwrap_or_default();
    assert!(error.contains("I/O error"), "{result}");
    assert!(std::fs::metadata(&path).unwrap().len() <= 1 << 20);

    // One denial however often the task retries, naming the file, and it is
    // audited.
    let denials = budget_denials(&result);
    assert_eq!(denials.len(), 1, "{result}");
    assert!(
        denials[0]["target"].as_str().unwrap().ends_with("big.bin"),
        "{result}"
    );
    let audit = server
        .send(&Request::new("GET", "/v1/audit?kind=policy_denial", "").signed())
        .json();
    assert!(audit.to_string().contains("limits.write_mib"), "{audit}");

    // Writing exactly the budget, less the file's block, succeeds.
    let exact = probe(
        &server,
        json!({ "op": "fill", "path": server.work().join("exact.bin"), "bytes": (1 << 20) - 4096 }),
    );
    assert_eq!(exact["output"]["written"], (1 << 20) - 4096, "{exact}");
    assert_eq!(exact["output"]["error"], Value::Null, "{exact}");
    assert!(budget_denials(&exact).is_empty(), "{exact}");

    // The budget belongs to one run: the next one may write again.
    let next = probe(
        &server,
        json!({ "op": "fill", "path": server.work().join("next.bin"), "bytes": 256 << 10 }),
    );
    assert_eq!(next["output"]["written"], 256 << 10, "{next}");
    assert_eq!(next["output"]["error"], Value::Null, "{next}");
}

#[test]
fn write_budget_counts_created_files() {
    let server = server_with_write_budget();
    // Each file costs a 4 KiB block, so 1 MiB allows 256 of them.
    let prefix = server.work().join("empty-");
    let result = probe(&server, json!({ "op": "touch", "path": prefix, "count": 1000 }));
    assert_eq!(result["status"], "succeeded", "{result}");
    assert_eq!(result["output"]["created"], 256, "{result}");
    let error = result["output"]["error"].as_str().unwrap_or_default();
    assert!(error.contains("No space left"), "{result}");
    assert_eq!(budget_denials(&result).len(), 1, "{result}");
}

#[test]
fn write_budget_charges_holes() {
    let server = server_with_write_budget();
    // One byte in each 4 KiB block would take a whole block on disk each:
    // a write past the end costs the hole it leaves too.
    let path = server.work().join("sparse.bin");
    let result = probe(&server, json!({ "op": "sparse", "path": path, "count": 1000 }));
    assert_eq!(result["status"], "succeeded", "{result}");
    let written = result["output"]["written"].as_u64().unwrap();
    assert!(written <= 256, "{result}");
    assert!(result["output"]["error"].is_string(), "{result}");
    assert_eq!(budget_denials(&result).len(), 1, "{result}");

    // Growing a file without writing costs what writing the bytes would.
    let path = server.work().join("grown.bin");
    let result = probe(&server, json!({ "op": "grow", "path": path, "bytes": 4 << 20 }));
    assert_eq!(result["status"], "failed", "{result}");
    assert!(
        result["error"].as_str().unwrap().contains("No space left"),
        "{result}"
    );
    assert_eq!(budget_denials(&result).len(), 1, "{result}");
    let result = probe(&server, json!({ "op": "grow", "path": path, "bytes": 512 << 10 }));
    assert_eq!(result["status"], "succeeded", "{result}");
}
