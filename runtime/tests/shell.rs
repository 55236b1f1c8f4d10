//! The host shell call, from the task's side: real processes, each rule
//! tried by an attacker, and git run against a repository the test creates.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Setup, TestServer};
use serde_json::{Value, json};

const ENTRIES: &str = r#"shell_allow:
  - "echo "
  - "cat"
  - "env"
  - "seq "
  - "sleep "
  - "git clone "
  - "git pull"
  - "sh -c "
  - "dd "
  - "sort "
  - "timeout 20 git clone "
shell_env: {APEX_TEST_VALUE: from-policy}
"#;

fn apex(extra: &str) -> TestServer {
    let policy = format!("paths_allow:\n  - {{WORK}}\n  - {{path: {{RO}}, mode: ro}}\n{ENTRIES}{extra}");
    let server = TestServer::start_with(Setup { policy });
    server.upload_plugin("shell-run");
    server
}

/// Makes one shell call through the shell-run plugin; returns its output.
fn shell(server: &TestServer, command: &str, cwd: Option<&Path>) -> Value {
    let result = server.run(
        "shell-run",
        json!({ "input": { "command": command, "cwd": cwd } }),
    );
    assert_eq!(result["status"], "succeeded", "{result}");
    result["output"].clone()
}

/// Asserts the call was denied, with `reason` in the message, in the run's
/// decisions and in the audit log.
fn assert_denied(server: &TestServer, command: &str, cwd: Option<&Path>, reason: &str) {
    let result = server.run(
        "shell-run",
        json!({ "input": { "command": command, "cwd": cwd } }),
    );
    let output = &result["output"];
    assert_eq!(output["error"]["kind"], "denied", "{command:?}: {result}");
    let message = output["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(reason),
        "{command:?}: expected {reason:?} in {message:?}"
    );

    let decision = &result["decisions"][0];
    assert_eq!(decision["capability"], "shell");
    assert_eq!(decision["allowed"], false);
    assert!(
        server
            .audit()
            .iter()
            .any(|e| e["kind"] == "policy_denial" && e["capability"] == "shell" && e["reason"] == message),
        "the denial of {command:?} is audited"
    );
}

#[test]
fn allowed_command_runs() {
    let server = apex("");
    let result = server.run(
        "shell-run",
        json!({ "input": { "command": "echo hello 'two words'" } }),
    );
    assert_eq!(result["output"]["exit_code"], 0, "{result}");
    assert_eq!(result["output"]["stdout"], "hello two words\n");
    assert_eq!(result["output"]["truncated"], false);

    let decision = &result["decisions"][0];
    assert_eq!(decision["capability"], "shell");
    assert_eq!(decision["allowed"], true);
    assert_eq!(decision["target"], "echo hello 'two words'");
    assert_eq!(decision["exit_code"], 0);
    assert!(decision["duration_ms"].is_u64());
    assert!(server.log().contains("shell call finished"));
}

#[test]
fn stdin_and_exit_code_passed() {
    let server = apex("");
    let result = server.run(
        "shell-run",
        json!({ "input": { "command": "cat", "stdin": "from the task" } }),
    );
    assert_eq!(result["output"]["stdout"], "from the task", "{result}");

    let output = shell(&server, "sh -c 'exit 3'", None);
    assert_eq!(output["exit_code"], 3);
}

#[test]
fn shell_syntax_denied_not_interpreted() {
    let server = apex("");
    let work = server.work();
    let marker = work.join("pwned");
    for command in [
        format!("echo x; touch {}", marker.display()),
        format!("echo x | touch {}", marker.display()),
        format!("echo x & touch {}", marker.display()),
        format!("echo x && touch {}", marker.display()),
        format!("echo $(touch {})", marker.display()),
        format!("echo `touch {}`", marker.display()),
        format!("echo x > {}", marker.display()),
        "cat < /etc/passwd".to_string(),
        format!("echo x\ntouch {}", marker.display()),
        "echo *".to_string(),
        "echo ?".to_string(),
        "echo [ab]".to_string(),
        "echo ~".to_string(),
        format!("echo \"$(touch {})\"", marker.display()),
        "echo $HOME".to_string(),
    ] {
        assert_denied(&server, &command, None, "shell");
    }
    assert!(!marker.exists(), "nothing was interpreted");
}

#[test]
fn quoting_tricks_denied() {
    let server = apex("");
    // One quoted token is not the two tokens of the entry.
    assert_denied(&server, "'git pull'", None, "matches no shell_allow entry");
    assert_denied(&server, "git pull\\;id", None, "matches no shell_allow entry");
    assert_denied(&server, "'echo x; id'", None, "matches no shell_allow entry");
    assert_denied(&server, "echo 'unclosed", None, "cannot split");
    // Quoting that leaves the same tokens is the same command.
    assert_eq!(shell(&server, "'e'cho \"ok\"", None)["stdout"], "ok\n");
}

#[test]
fn commands_outside_list_denied() {
    let server = apex("");
    for command in [
        "rm -rf /",
        "git push",
        "git pullx",
        "git",
        "git clone",
        "python3 -c 1",
        "ech hi",
    ] {
        assert_denied(&server, command, None, "matches no shell_allow entry");
    }
    // `git clone` is the entry "git clone " without its required argument.
    assert_denied(
        &server,
        "git clone",
        None,
        "the entry \"git clone \" requires at least one more argument",
    );
}

#[test]
fn program_paths_denied() {
    let server = apex("");
    assert_denied(&server, "/bin/echo hi", None, "matches no shell_allow entry");

    // A path runs only when an entry names exactly that path.
    let policy = "paths_allow: [{WORK}]\nshell_allow: [\"./echo \", \"/usr/bin/env\"]\n";
    let named = TestServer::start_with(Setup {
        policy: policy.into(),
    });
    named.upload_plugin("shell-run");
    assert_denied(&named, "./echo hi", None, "is not an executable file");
    assert_eq!(shell(&named, "/usr/bin/env", None)["exit_code"], 0);
}

#[test]
fn working_directory_outside_denied() {
    let server = apex("");
    let work = server.work();
    let outside = server.dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, work.join("link-out")).unwrap();

    assert_denied(&server, "echo hi", Some(Path::new("/tmp")), "outside paths_allow");
    assert_denied(&server, "echo hi", Some(&work.join("..")), "outside paths_allow");
    assert_denied(
        &server,
        "echo hi",
        Some(&work.join("link-out")),
        "outside paths_allow",
    );
    assert_denied(
        &server,
        "echo hi",
        Some(Path::new("relative")),
        "must be an absolute path",
    );

    let inside = work.join("sub");
    std::fs::create_dir(&inside).unwrap();
    let output = shell(&server, "cat marker", Some(&inside));
    assert!(
        output["stderr"].as_str().unwrap().contains("marker"),
        "runs in the directory: {output}"
    );
}

#[test]
fn arguments_outside_denied() {
    let server = apex("");
    let work = server.work();
    let secret = server.dir.path().join("secret.txt");
    std::fs::write(&secret, "top secret").unwrap();
    std::os::unix::fs::symlink(&secret, work.join("link")).unwrap();
    std::fs::write(work.join("inside.txt"), "fine").unwrap();

    for command in [
        format!("cat {}", secret.display()),
        "cat /etc/passwd".to_string(),
        "cat ../secret.txt".to_string(),
        "cat link".to_string(),
        "echo --file=/etc/passwd".to_string(),
        "echo -C/etc".to_string(),
        "echo file:///etc/passwd".to_string(),
        format!("cat {}/../secret.txt", work.display()),
        format!("dd if={}", secret.display()),
        format!(
            "sort -uo{} inside.txt",
            server.dir.path().join("sorted.txt").display()
        ),
        "sort -uolink inside.txt".to_string(),
        format!("echo -d@{}", secret.display()),
        format!("echo @{}", secret.display()),
        format!("echo file://localhost{}", secret.display()),
        format!("echo file://{}/%2e%2e/secret.txt", work.display()),
    ] {
        assert_denied(&server, &command, None, "outside paths_allow");
    }
    assert!(!server.dir.path().join("sorted.txt").exists());

    let output = shell(
        &server,
        &format!("cat {}", work.join("inside.txt").display()),
        None,
    );
    assert_eq!(output["stdout"], "fine");
    let output = shell(&server, "cat inside.txt", None);
    assert_eq!(output["stdout"], "fine");
}

#[test]
fn environment_is_clean() {
    let server = apex("");
    let work = server.work();
    let output = shell(&server, "env", None);
    let env = output["stdout"].as_str().unwrap();
    assert!(!env.contains("APEX_SHARED_KEY"), "{env}");
    assert!(!env.contains(common::KEY), "{env}");
    let home = server.data().canonicalize().unwrap().join("empty-home");
    assert!(env.contains(&format!("HOME={}", home.display())), "{env}");
    assert!(
        !env.contains(&work.display().to_string()),
        "HOME is not the writable working directory: {env}"
    );
    assert!(env.contains("PYTHONNOUSERSITE=1"), "{env}");
    assert!(env.contains("PATH=/usr/local/bin:/usr/bin:/bin"), "{env}");
    assert!(env.contains("APEX_TEST_VALUE=from-policy"), "{env}");
    assert_eq!(
        env.lines().count(),
        7,
        "only the fixed variables and shell_env: {env}"
    );
}

/// Returns whether a process exists.
fn alive(pid: &str) -> bool {
    Path::new("/proc").join(pid.trim()).exists()
        && !std::fs::read_to_string(Path::new("/proc").join(pid.trim()).join("stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[test]
fn timeout_kills_whole_process_group() {
    let server = apex("timeouts: {shell_seconds: 1, task_seconds: 20}\n");
    let pid_file = server.work().join("grandchild.pid");
    let command = format!("sh -c 'sleep 60 & echo $! > {}; sleep 60'", pid_file.display());

    let started = Instant::now();
    let result = server.run("shell-run", json!({ "input": { "command": command } }));
    assert_eq!(result["output"]["error"]["kind"], "timed_out", "{result}");
    assert!(started.elapsed() < Duration::from_secs(10));

    let pid = std::fs::read_to_string(&pid_file).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(!alive(&pid), "the grandchild {pid} was killed with its group");
}

#[test]
fn run_deadline_kills_call_in_flight() {
    let server = apex("timeouts: {shell_seconds: 60, task_seconds: 1}\n");
    let pid_file = server.work().join("grandchild.pid");
    let command = format!("sh -c 'sleep 60 & echo $! > {}; sleep 60'", pid_file.display());

    let result = server.run("shell-run", json!({ "input": { "command": command } }));
    assert_eq!(result["status"], "timed_out", "{result}");
    std::thread::sleep(Duration::from_millis(300));
    let pid = std::fs::read_to_string(&pid_file).unwrap();
    assert!(
        !alive(&pid),
        "the grandchild {pid} was killed when the run timed out"
    );
}

#[test]
fn output_over_cap_cut() {
    let server = apex("limits: {shell_output_kib: 4}\n");
    let output = shell(&server, "seq 1 100000", None);
    assert_eq!(output["truncated"], true, "{output}");
    assert_eq!(output["stdout"].as_str().unwrap().len(), 4096);

    let output = shell(&server, "seq 1 10", None);
    assert_eq!(output["truncated"], false);
}

#[test]
fn process_limit_serialises_calls() {
    let server = apex("limits: {max_shell_processes: 1}\n");
    let started = Instant::now();
    let calls: Vec<_> = (0..2)
        .map(|_| {
            let addr = server.addr.clone();
            std::thread::spawn(move || {
                let body = json!({ "input": { "command": "sleep 1" } }).to_string();
                common::send_raw(
                    &addr,
                    &common::Request::new("POST", "/v1/plugins/shell-run/run", body).signed(),
                )
            })
        })
        .collect();
    for call in calls {
        assert_eq!(call.join().unwrap().json()["output"]["exit_code"], 0);
    }
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
}

/// Runs git in `dir` for the test's own setup.
fn git(dir: &Path, args: &[&str]) {
    let status = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "Test")
        .env("GIT_AUTHOR_EMAIL", "test@example.com")
        .env("GIT_COMMITTER_NAME", "Test")
        .env("GIT_COMMITTER_EMAIL", "test@example.com")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .status()
        .unwrap();
    assert!(status.success(), "git {args:?}");
}

/// Creates a bare repository `origin.git` in `work` with one commit, and
/// returns the path of a scratch clone used to push more commits.
fn origin(work: &Path) -> std::path::PathBuf {
    let seed = work.join("seed");
    std::fs::create_dir(&seed).unwrap();
    git(&seed, &["init", "-q", "-b", "main"]);
    std::fs::write(seed.join("README.md"), "first\n").unwrap();
    git(&seed, &["add", "."]);
    git(&seed, &["commit", "-q", "-m", "first"]);
    git(work, &["clone", "-q", "--bare", "seed", "origin.git"]);
    git(
        &seed,
        &[
            "remote",
            "add",
            "origin",
            work.join("origin.git").to_str().unwrap(),
        ],
    );
    seed
}

fn head_of(dir: &Path) -> String {
    let output = Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(dir)
        .output()
        .unwrap();
    String::from_utf8(output.stdout).unwrap().trim().to_string()
}

#[test]
fn git_sync_clones_then_pulls() {
    let server = apex("");
    server.upload_plugin("git-sync");
    let work = server.work();
    let seed = origin(&work);
    let checkout = work.join("checkout");
    let input = json!({ "input": { "repo": work.join("origin.git"), "dir": checkout } });

    let result = server.run("git-sync", input.clone());
    assert_eq!(result["status"], "succeeded", "{result}");
    assert_eq!(result["output"]["action"], "clone");
    assert_eq!(result["output"]["files"], json!(["README.md"]));
    assert_eq!(result["output"]["head"], head_of(&seed));

    std::fs::write(seed.join("NEW.md"), "second\n").unwrap();
    git(&seed, &["add", "."]);
    git(&seed, &["commit", "-q", "-m", "second"]);
    git(&seed, &["push", "-q", "origin", "main"]);

    let result = server.run("git-sync", input);
    assert_eq!(result["status"], "succeeded", "{result}");
    assert_eq!(result["output"]["action"], "pull");
    assert_eq!(result["output"]["files"], json!(["NEW.md", "README.md"]));
    assert_eq!(result["output"]["head"], head_of(&seed));
}

#[test]
fn git_options_and_transports_denied() {
    let server = apex("");
    let work = server.work();
    origin(&work);
    let marker = work.join("pwned");
    let repo = work.join("origin.git");
    for command in [
        format!(
            "git clone --upload-pack='touch {}' {} a",
            marker.display(),
            repo.display()
        ),
        format!(
            "git clone --upload-pack 'touch {}' {} b",
            marker.display(),
            repo.display()
        ),
        format!("git clone -u 'touch {}' {} c", marker.display(), repo.display()),
        format!("git clone -c core.hooksPath=x {} d", repo.display()),
        format!("git clone --config core.fsmonitor=x {} e", repo.display()),
        format!("git clone --template={} {} f", work.display(), repo.display()),
        format!("git clone 'ext::sh -c touch% {}' g", marker.display()),
        "git clone fd::3 h".to_string(),
        format!(
            "git clone --upload-pa='touch {}' {} i",
            marker.display(),
            repo.display()
        ),
        format!("git clone --conf=core.x=y {} j", repo.display()),
        format!("git clone --templa={} {} k", work.display(), repo.display()),
        format!("git clone --recurse-submodules {} l", repo.display()),
        format!(
            "timeout 20 git clone --upload-pack='touch {}' {} m",
            marker.display(),
            repo.display()
        ),
    ] {
        assert_denied(&server, &command, None, "git");
    }
    // Global options come before the subcommand, so they match no entry.
    assert_denied(
        &server,
        "git -c core.pager=x pull",
        None,
        "matches no shell_allow entry",
    );
    assert_denied(
        &server,
        &format!("git -C {} pull", work.display()),
        None,
        "matches no shell_allow entry",
    );
    assert!(!marker.exists());
}

#[test]
fn planted_repository_config_and_hooks_neutralised() {
    let server = apex("");
    let work = server.work();
    let seed = origin(&work);
    let checkout = work.join("checkout");
    git(&work, &["clone", "-q", "origin.git", "checkout"]);

    // What a task could plant in a repository it can write.
    let marker = work.join("pwned");
    let hook = format!("#!/bin/sh\ntouch {}\n", marker.display());
    for name in [
        "post-merge",
        "pre-merge-commit",
        "post-checkout",
        "reference-transaction",
    ] {
        let path = checkout.join(".git/hooks").join(name);
        std::fs::write(&path, &hook).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let mut config = std::fs::read_to_string(checkout.join(".git/config")).unwrap();
    config.push_str(&format!(
        "[core]\n\tfsmonitor = \"touch {m}-fsmonitor\"\n\thooksPath = .git/hooks\n\tsshCommand = \"touch {m}-ssh\"\n",
        m = marker.display()
    ));
    std::fs::write(checkout.join(".git/config"), config).unwrap();

    std::fs::write(seed.join("NEW.md"), "second\n").unwrap();
    git(&seed, &["add", "."]);
    git(&seed, &["commit", "-q", "-m", "second"]);
    git(&seed, &["push", "-q", "origin", "main"]);

    let output = shell(&server, "git pull", Some(&checkout));
    assert_eq!(output["exit_code"], 0, "{output}");
    assert!(checkout.join("NEW.md").exists(), "the pull itself worked");
    for suffix in ["", "-fsmonitor", "-ssh"] {
        let path = format!("{}{suffix}", marker.display());
        assert!(!Path::new(&path).exists(), "{path} must not be created");
    }
}

#[test]
fn invalid_shell_policy_rejected() {
    let dir = tempfile::tempdir().unwrap();
    for (policy, expected) in [
        ("shell_allow: [\"git pull; id\"]\n", "shell_allow[0]"),
        ("shell_allow: [\"echo $HOME\"]\n", "shell_allow[0]"),
        ("shell_env: {PATH: /tmp}\n", "shell_env.PATH"),
        ("shell_env: {GIT_DIR: x}\n", "shell_env.GIT_DIR"),
        ("shell_env: {\"A-B\": x}\n", "shell_env.A-B"),
        ("shell_path: [\"bin\"]\n", "shell_path[0]"),
        ("limits: {max_shell_processes: 0}\n", "limits.max_shell_processes"),
    ] {
        let file = dir.path().join("policy.yaml");
        std::fs::write(&file, policy).unwrap();
        let output = Command::new(env!("CARGO_BIN_EXE_apex"))
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
fn shell_path_inside_allowed_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir_all(work.join("bin")).unwrap();
    let file = dir.path().join("policy.yaml");
    std::fs::write(
        &file,
        format!(
            "paths_allow: [./work]\nshell_path: [\"{}\"]\n",
            work.join("bin").display()
        ),
    )
    .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_apex"))
        .args(["policy", "check"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("shell_path[0]"));
}

/// Starts Apex whose shell allows `sh -c ` and `python3 -c `, so a child can
/// try anything. Only the kernel confinement stops it.
fn open_shell() -> TestServer {
    let policy =
        "paths_allow:\n  - {WORK}\n  - {path: {RO}, mode: ro}\nshell_allow: [\"sh -c \", \"python3 -c \"]\n";
    let server = TestServer::start_with(Setup {
        policy: policy.into(),
    });
    server.upload_plugin("shell-run");
    server
}

#[test]
fn confined_child_cannot_read_outside() {
    let server = open_shell();
    let secret = server.dir.path().join("secret.txt");
    std::fs::write(&secret, "top secret").unwrap();
    std::os::unix::fs::symlink(&secret, server.work().join("link-out")).unwrap();
    std::fs::write(server.work().join("inside.txt"), "fine").unwrap();

    // The path hides inside one quoted argument, so only the kernel can stop it.
    for command in [
        format!("sh -c 'cat {}'", secret.display()),
        "sh -c 'cat link-out'".to_string(),
    ] {
        let output = shell(&server, &command, None);
        assert_ne!(output["exit_code"], 0, "{command}: {output}");
        assert!(
            !output["stdout"].as_str().unwrap().contains("top secret"),
            "{command}: {output}"
        );
    }
    let output = shell(&server, "sh -c 'cat inside.txt'", None);
    assert_eq!(output["stdout"], "fine", "{output}");
    let log = server.log();
    assert!(log.contains("shell children are confined"), "{log}");
}

#[test]
fn confined_child_cannot_write_read_only() {
    let server = open_shell();
    let target = server.ro().join("planted.txt");
    let output = shell(&server, &format!("sh -c 'echo x > {}'", target.display()), None);
    assert_ne!(output["exit_code"], 0, "{output}");
    assert!(!target.exists());

    let allowed = server.work().join("written.txt");
    let output = shell(&server, &format!("sh -c 'echo x > {}'", allowed.display()), None);
    assert_eq!(output["exit_code"], 0, "{output}");
    assert!(allowed.exists());
}

#[test]
fn confined_child_cannot_connect() {
    let server = open_shell();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let script = format!("import socket; socket.create_connection((\"127.0.0.1\", {port}), timeout=5)");
    let output = shell(&server, &format!("python3 -c '{script}'"), None);
    assert_ne!(output["exit_code"], 0, "{output}");
    assert!(
        output["stderr"].as_str().unwrap().contains("Permission"),
        "{output}"
    );
    assert!(listener.accept().is_err(), "no connection reached the listener");
}

#[test]
fn confined_child_cannot_use_unix_sockets() {
    let server = open_shell();
    // A socket in the read-write directory, the most the policy grants. A
    // service's socket under /run would be reached the same way.
    let path = server.work().join("service.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    listener.set_nonblocking(true).unwrap();
    let script = format!(
        "import socket; socket.socket(socket.AF_UNIX).connect(\"{}\")",
        path.display()
    );
    let output = shell(&server, &format!("python3 -c '{script}'"), None);
    assert_ne!(output["exit_code"], 0, "{output}");
    assert!(
        output["stderr"].as_str().unwrap().contains("PermissionError"),
        "{output}"
    );
    let accepted = listener.accept().map(|_| ()).map_err(|e| e.kind());
    assert_eq!(
        accepted,
        Err(std::io::ErrorKind::WouldBlock),
        "no connection arrived"
    );

    // A stream socket pair is connected to itself only, and still works.
    let output = shell(
        &server,
        "python3 -c 'import socket; a, b = socket.socketpair(); a.send(b\"x\"); print(b.recv(1))'",
        None,
    );
    assert_eq!(output["exit_code"], 0, "{output}");
    assert_eq!(output["stdout"], "b'x'\n", "{output}");
}

#[test]
fn confined_child_cannot_send_datagrams_by_path() {
    let server = open_shell();
    // Outside every allowed directory, as /dev/log is.
    let outside = tempfile::tempdir().unwrap();
    let path = outside.path().join("log.sock");
    let receiver = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    receiver.set_nonblocking(true).unwrap();

    // Either end of a datagram pair could send to any path.
    for kind in ["SOCK_DGRAM", "SOCK_RAW"] {
        let script = format!(
            "import socket; a, b = socket.socketpair(socket.AF_UNIX, socket.{kind}); a.sendto(b\"x\", \"{}\")",
            path.display()
        );
        let output = shell(&server, &format!("python3 -c '{script}'"), None);
        assert_ne!(output["exit_code"], 0, "{kind}: {output}");
        assert!(
            output["stderr"].as_str().unwrap().contains("PermissionError"),
            "{kind}: {output}"
        );
    }
    let mut buffer = [0u8; 8];
    let received = receiver.recv(&mut buffer).map_err(|e| e.kind());
    assert_eq!(
        received,
        Err(std::io::ErrorKind::WouldBlock),
        "no datagram arrived"
    );
}

#[test]
fn confined_child_cannot_reach_host_shared_memory() {
    let server = open_shell();
    // A System V segment of the server's user on the host, made by a process
    // outside the sandbox.
    let key = 0x4150_0000 + std::process::id() % 0xffff;
    let libc = "import ctypes; libc = ctypes.CDLL(None, use_errno=True)";
    let host = |code: String| {
        let output = std::process::Command::new("python3")
            .args(["-c", &format!("{libc}; {code}")])
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        String::from_utf8(output.stdout).unwrap().trim().to_string()
    };
    let id = host(format!("print(libc.shmget({key}, 4096, 0o1600))"));
    assert!(id.parse::<i64>().unwrap() >= 0, "segment {id}");

    let script = format!("{libc}; print(libc.shmget({key}, 0, 0), ctypes.get_errno())");
    let output = shell(&server, &format!("python3 -c '{script}'"), None);
    host(format!("libc.shmctl({id}, 0, None)"));
    // ENOENT: the child has an IPC namespace of its own.
    assert_eq!(output["exit_code"], 0, "{output}");
    assert_eq!(output["stdout"], "-1 2\n", "{output}");
}

#[test]
fn confined_child_cannot_bypass_the_socket_filter() {
    let server = open_shell();
    let call = |arguments: &str| {
        let script = format!(
            "import ctypes; libc = ctypes.CDLL(None, use_errno=True); \
             params = ctypes.create_string_buffer(120); \
             print(libc.syscall({arguments}), ctypes.get_errno())"
        );
        shell(&server, &format!("python3 -c '{script}'"), None)
    };
    // io_uring_setup (425), which could create and connect sockets without
    // the `socket` call, fails with ENOSYS (38).
    let output = call("425, 8, params");
    assert_eq!(output["exit_code"], 0, "{output}");
    assert_eq!(output["stdout"], "-1 38\n", "{output}");
    // On x86-64, `socket` through the x32 convention, which has its own
    // numbers, fails the same way.
    #[cfg(target_arch = "x86_64")]
    {
        let output = call("0x40000000 + 41, 1, 1, 0");
        assert_eq!(output["exit_code"], 0, "{output}");
        assert_eq!(output["stdout"], "-1 38\n", "{output}");
    }
}

#[test]
fn confined_child_has_no_network() {
    let server = open_shell();

    // Its own network namespace: loopback is the only interface.
    let output = shell(
        &server,
        "python3 -c 'import socket; print(socket.if_nameindex())'",
        None,
    );
    assert_eq!(output["exit_code"], 0, "{output}");
    assert_eq!(output["stdout"], "[(1, 'lo')]\n", "{output}");

    // UDP, which Landlock does not cover, reaches nothing either.
    let receiver = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    receiver
        .set_read_timeout(Some(std::time::Duration::from_millis(500)))
        .unwrap();
    let port = receiver.local_addr().unwrap().port();
    let script = format!(
        "import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b\"leak\", (\"127.0.0.1\", {port}))"
    );
    let output = shell(&server, &format!("python3 -c '{script}'"), None);
    assert_ne!(output["exit_code"], 0, "{output}");
    assert!(
        output["stderr"]
            .as_str()
            .unwrap()
            .contains("Network is unreachable"),
        "{output}"
    );
    let mut buffer = [0u8; 16];
    assert!(
        receiver.recv(&mut buffer).is_err(),
        "no datagram reached the host"
    );
}

#[test]
fn child_cannot_signal_server_or_change_host() {
    let server = open_shell();

    // Landlock's signal scope: the server is outside the child's domain.
    let output = shell(&server, "python3 -c 'import os; os.kill(os.getppid(), 0)'", None);
    assert_ne!(output["exit_code"], 0, "{output}");
    assert!(
        output["stderr"].as_str().unwrap().contains("PermissionError"),
        "{output}"
    );

    // The user namespace: even a child of a root server has no capability
    // over the host's hostname (or network, or devices).
    let output = shell(&server, "sh -c 'hostname \"$(hostname)\"'", None);
    assert_ne!(output["exit_code"], 0, "{output}");

    let health = server.send(&common::Request::new("GET", "/healthz", ""));
    assert_eq!(health.status, 200);
}

#[test]
fn child_open_files_limited() {
    let server = open_shell();
    let output = shell(
        &server,
        "python3 -c 'import resource; print(resource.getrlimit(resource.RLIMIT_NOFILE))'",
        None,
    );
    assert_eq!(output["stdout"], "(1024, 1024)\n", "{output}");
}

#[test]
fn inherited_descriptors_do_not_reach_children() {
    // The server starts with descriptor 7 open on a file outside paths_allow.
    let secrets = tempfile::tempdir().unwrap();
    let secret = secrets.path().join("secret.txt");
    std::fs::write(&secret, "inherited secret").unwrap();
    let wrapper = vec![
        "sh".to_string(),
        "-c".to_string(),
        format!("exec 7< '{}'; exec \"$0\" \"$@\"", secret.display()),
        env!("CARGO_BIN_EXE_apex").to_string(),
    ];
    let policy = "paths_allow: [{WORK}]\nshell_allow: [\"python3 -c \"]\n";
    let server = TestServer::start_wrapped(
        Setup {
            policy: policy.into(),
        },
        wrapper,
        |_| {},
    );
    server.upload_plugin("shell-run");

    let output = shell(&server, "python3 -c 'import os; print(os.read(7, 100))'", None);
    assert_ne!(output["exit_code"], 0, "{output}");
    assert!(
        !output["stdout"].as_str().unwrap().contains("inherited secret"),
        "{output}"
    );
    assert!(
        output["stderr"].as_str().unwrap().contains("Bad file descriptor"),
        "{output}"
    );
}

/// Returns the process ids whose command line contains `marker`.
fn processes_with(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if !name.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(marker) {
            found.push(name);
        }
    }
    found
}

#[test]
fn fork_bomb_contained() {
    let server = TestServer::start_with(Setup {
        policy: "paths_allow: [{WORK}]\nshell_allow: [\"python3 -c \"]\n\
                 shell_limits: {processes: 40}\ntimeouts: {shell_seconds: 20}\n"
            .into(),
    });
    server.upload_plugin("shell-run");
    let log = server.log();
    assert!(log.contains("a pids cgroup per call"), "{log}");

    // Forks until fork fails, then every process stays alive for a while.
    let bomb = "import os, time\nn = 0\nwhile True:\n    try:\n        os.fork(); n += 1\n    except OSError:\n        break\nprint(n, flush=True)\ntime.sleep(2)";
    let command = format!("python3 -c {}", shell_words::quote(bomb));
    let started = Instant::now();
    let output = shell(&server, &command, None);
    assert!(started.elapsed() < Duration::from_secs(20), "{output}");
    // Each process prints how many forks it made before the limit stopped
    // it; together they never exceed the limit.
    let stdout = output["stdout"].as_str().unwrap();
    let processes = stdout.lines().count();
    assert!((1..=40).contains(&processes), "{processes} processes: {output}");

    let health = server.send(&common::Request::new("GET", "/healthz", ""));
    assert_eq!(health.status, 200, "the server keeps serving");
    assert!(
        processes_with("import os, time").is_empty(),
        "every process was killed"
    );
}

#[test]
fn setsid_child_killed_with_call() {
    let server = open_shell();
    // `setsid` leaves the process group, but the child stays in the cgroup.
    let output = shell(&server, "sh -c 'setsid sleep 1234.5 & echo started'", None);
    assert_eq!(output["stdout"], "started\n", "{output}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !processes_with("1234.5").is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(processes_with("1234.5").is_empty(), "the setsid child was killed");
}

/// Id of the user `nobody` on Debian and most Linux systems.
const NOBODY: u32 = 65534;

#[test]
fn unprivileged_server_confines_children() {
    // A server that is not root needs a user namespace to create the
    // network namespace. Tests running as root start the server as the user
    // `nobody`.
    let as_root = nix::unistd::geteuid().is_root();
    // That user may not reach the build directory, so it runs a copy.
    let bin = tempfile::tempdir().unwrap();
    let apex = bin.path().join("apex");
    std::fs::copy(env!("CARGO_BIN_EXE_apex"), &apex).unwrap();
    std::fs::set_permissions(bin.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let wrapper = if as_root {
        let apex = apex.to_str().unwrap();
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            apex,
        ]
        .map(String::from)
        .to_vec()
    } else {
        Vec::new()
    };
    let policy = "paths_allow: [{WORK}]\nshell_allow: [\"python3 -c \"]\n";
    let server = TestServer::start_wrapped(
        Setup {
            policy: policy.into(),
        },
        wrapper,
        |dir| {
            if as_root {
                let status = Command::new("chown")
                    .args(["-R", "65534:65534"])
                    .arg(dir)
                    .status()
                    .unwrap();
                assert!(status.success());
            }
        },
    );
    server.upload_plugin("shell-run");
    let log = server.log();
    assert!(
        log.contains("shell children are confined: network and IPC namespaces"),
        "{log}"
    );

    let script = "import os, socket; open(\\\"created\\\", \\\"w\\\").close(); print(socket.if_nameindex(), os.getuid())";
    let output = shell(&server, &format!("python3 -c \"{script}\""), None);
    assert_eq!(output["exit_code"], 0, "{output}");
    let uid = if as_root {
        NOBODY
    } else {
        nix::unistd::geteuid().as_raw()
    };
    assert_eq!(output["stdout"], format!("[(1, 'lo')] {uid}\n"), "{output}");

    // The user id maps to itself, so files keep the server's owner.
    let created = std::fs::metadata(server.work().join("created")).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&created), uid);
}

#[test]
fn required_confinement_needs_process_limit() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("policy.yaml"), "shell_confinement: required\n").unwrap();
    let mut server = common::serve_command(dir.path())
        .env("APEX_SHARED_KEY", common::KEY)
        .env("APEX_TEST_NO_CGROUP", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();

    if nix::unistd::geteuid().is_root() {
        // Root is exempt from RLIMIT_NPROC: without a cgroup, no limit is left.
        let output = server.wait_with_output().unwrap();
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("no process limit"), "{stderr}");
    } else {
        // RLIMIT_NPROC applies, so the server starts.
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(server.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        server.kill().unwrap();
        server.wait().unwrap();
        assert!(line.starts_with("apex listening on "), "{line}");
    }
}

#[test]
fn required_confinement_refuses_to_start_without_support() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("policy.yaml"), "shell_confinement: required\n").unwrap();
    let output = common::serve_command(dir.path())
        .env("APEX_SHARED_KEY", common::KEY)
        .env("APEX_TEST_NO_LANDLOCK", "1")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("shell_confinement is required"), "{stderr}");

    let check = Command::new(env!("CARGO_BIN_EXE_apex"))
        .args(["policy", "check", "policy.yaml"])
        .current_dir(dir.path())
        .env("APEX_TEST_NO_LANDLOCK", "1")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&check.stdout).contains("shell confinement: unavailable"));
}

#[test]
fn trusted_files_under_system_paths_warned() {
    let dir = tempfile::tempdir().unwrap();
    let policy = format!(
        "shell_allow: [\"echo \"]\nshell_system_paths: [{}, /usr, /lib, /lib64, /bin]\n",
        dir.path().display()
    );
    std::fs::write(dir.path().join("policy.yaml"), policy).unwrap();
    let check = Command::new(env!("CARGO_BIN_EXE_apex"))
        .args(["policy", "check", "policy.yaml"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&check.stdout);
    let expected = format!(
        "warning: shell_system_paths entry {} contains the policy file",
        dir.path().display()
    );
    assert!(stdout.contains(&expected), "{stdout}");
}
