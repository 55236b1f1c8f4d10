//! Policy files: each invalid fixture must fail with the message beside it,
//! and each valid one must load. Fixtures live in `tests/data/policy/`:
//! `bad/NAME.yaml` is paired with `bad/NAME.err`, whose lines must all appear
//! in the error message.

use std::path::{Path, PathBuf};

use apex::policy::{PathMode, Policy, ProtectedPaths};

fn fixtures(kind: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/policy")
        .join(kind);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no fixtures in {}", dir.display());
    files
}

fn protected() -> ProtectedPaths {
    ProtectedPaths {
        data_dir: Some(std::env::temp_dir().join("apex-policy-test-data")),
        files: Vec::new(),
    }
}

#[test]
fn invalid_fixtures_fail_with_expected_message() {
    for file in fixtures("bad") {
        let expected = std::fs::read_to_string(file.with_extension("err"))
            .unwrap_or_else(|_| panic!("{} has no .err file", file.display()));
        let error = match Policy::load(&file, &protected()) {
            Ok(_) => panic!("{} loaded, but must fail", file.display()),
            Err(e) => e.to_string(),
        };
        assert!(
            error.contains(file.file_name().unwrap().to_str().unwrap()),
            "the message names the file: {error}"
        );
        for line in expected.lines().filter(|l| !l.is_empty()) {
            assert!(
                error.contains(line),
                "{}: expected {line:?} in:\n{error}",
                file.display()
            );
        }
    }
}

#[test]
fn valid_fixtures_load() {
    for file in fixtures("good") {
        if let Err(e) = Policy::load(&file, &protected()) {
            panic!("{}: {e}", file.display());
        }
    }
}

#[test]
fn operators_format_loads_unchanged() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/policy");
    let policy = Policy::load(&dir.join("good/operators-format.yaml"), &protected()).unwrap();

    assert_eq!(policy.shell_allow, ["git clone ", "git pull", "python "]);
    assert_eq!(policy.http_allow_domains, ["api.github.com", "pypi.org"]);
    assert_eq!(
        policy.timeouts.task.as_secs(),
        120,
        "python_seconds is the run deadline"
    );
    assert_eq!(policy.timeouts.shell.as_secs(), 120);
    assert_eq!(policy.timeouts.http.as_secs(), 30);

    // Relative paths resolve against the policy file's directory, not the working directory.
    assert_eq!(policy.paths_allow.len(), 1);
    assert_eq!(
        policy.paths_allow[0].path,
        dir.join("dir").canonicalize().unwrap()
    );
    assert_eq!(policy.paths_allow[0].mode, PathMode::Rw);
}

#[test]
fn empty_policy_grants_nothing() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/policy");
    let policy = Policy::load(&dir.join("good/empty.yaml"), &protected()).unwrap();
    assert!(policy.paths_allow.is_empty());
    assert!(policy.shell_allow.is_empty());
    assert!(policy.http_allow_domains.is_empty());
    assert_eq!(policy.limits.memory_bytes, 256 << 20);
}

#[test]
fn read_only_mode_parsed() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/policy");
    let policy = Policy::load(&dir.join("good/task-seconds-same.yaml"), &protected()).unwrap();
    assert_eq!(policy.paths_allow[0].mode, PathMode::Ro);
    assert_eq!(policy.timeouts.task.as_secs(), 90);
}

#[test]
fn overlap_with_data_directory_rejected() {
    let root = tempfile::tempdir().unwrap();
    let work = root.path().join("work");
    std::fs::create_dir_all(work.join("data")).unwrap();
    let policy_file = root.path().join("policy.yaml");
    std::fs::write(&policy_file, "paths_allow: [./work]\n").unwrap();

    // The data directory inside an allowed path.
    let inside = ProtectedPaths {
        data_dir: Some(work.join("data")),
        files: Vec::new(),
    };
    let error = Policy::load(&policy_file, &inside).unwrap_err().to_string();
    assert!(error.contains("overlaps the data directory"), "{error}");

    // An allowed path inside the data directory.
    let outside = ProtectedPaths {
        data_dir: Some(root.path().to_path_buf()),
        files: Vec::new(),
    };
    let error = Policy::load(&policy_file, &outside).unwrap_err().to_string();
    assert!(error.contains("overlaps"), "{error}");

    // A trusted file such as `.env` inside an allowed path.
    std::fs::write(work.join(".env"), "APEX_SHARED_KEY=x").unwrap();
    let dotenv = ProtectedPaths {
        data_dir: None,
        files: vec![work.join(".env")],
    };
    let error = Policy::load(&policy_file, &dotenv).unwrap_err().to_string();
    assert!(error.contains("overlaps a file the server trusts"), "{error}");

    // A symlink to the data directory is resolved before the check.
    let data = root.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::os::unix::fs::symlink(&data, root.path().join("alias")).unwrap();
    std::fs::write(&policy_file, "paths_allow: [./alias]\n").unwrap();
    let aliased = ProtectedPaths {
        data_dir: Some(data),
        files: Vec::new(),
    };
    let error = Policy::load(&policy_file, &aliased).unwrap_err().to_string();
    assert!(error.contains("overlaps the data directory"), "{error}");
}

#[test]
fn policy_check_command_prints_grants() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/policy");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_apex"))
        .args(["policy", "check"])
        .arg(dir.join("good/operators-format.yaml"))
        .current_dir(std::env::temp_dir())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(
        text.contains(&format!(
            "{} (read-write)",
            dir.join("dir").canonicalize().unwrap().display()
        )),
        "{text}"
    );
    assert!(text.contains("api.github.com (default port)"), "{text}");
    assert!(text.contains("task 120 s"), "{text}");

    let output = std::process::Command::new(env!("CARGO_BIN_EXE_apex"))
        .args(["policy", "check"])
        .arg(dir.join("bad/conflicting-timeouts.yaml"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("differs from timeouts.python_seconds"));
}

#[test]
fn policy_reachable_through_symlink_rejected() {
    let root = tempfile::tempdir().unwrap();
    let share = root.path().join("share");
    std::fs::create_dir(&share).unwrap();
    let real = root.path().join("real-policy.yaml");
    std::fs::write(&real, "paths_allow: [./share]\n").unwrap();
    // The policy is loaded through a symlink that lives in the allowed directory.
    std::os::unix::fs::symlink(&real, share.join("policy.yaml")).unwrap();

    // Relative paths resolve against the real file's directory, so ./share is allowed.
    let error = Policy::load(&share.join("policy.yaml"), &protected())
        .unwrap_err()
        .to_string();
    assert!(error.contains("overlaps a file the server trusts"), "{error}");

    // The data directory given through a symlink inside an allowed path.
    std::os::unix::fs::symlink(root.path().join("elsewhere"), share.join("datalink")).unwrap();
    let data_link = ProtectedPaths {
        data_dir: Some(share.join("datalink")),
        files: Vec::new(),
    };
    let error = Policy::load(&real, &data_link).unwrap_err().to_string();
    assert!(error.contains("overlaps the data directory"), "{error}");

    // A data directory that does not exist yet inside an allowed path.
    let missing = ProtectedPaths {
        data_dir: Some(share.join("not-yet/data")),
        files: Vec::new(),
    };
    let error = Policy::load(&real, &missing).unwrap_err().to_string();
    assert!(error.contains("overlaps the data directory"), "{error}");
}

#[test]
fn hard_linked_policy_rejected() {
    let root = tempfile::tempdir().unwrap();
    let policy = root.path().join("policy.yaml");
    std::fs::write(&policy, "").unwrap();
    std::fs::hard_link(&policy, root.path().join("second-name.yaml")).unwrap();

    let error = Policy::load(&policy, &protected()).unwrap_err().to_string();
    assert!(error.contains("2 hard links"), "{error}");
}
