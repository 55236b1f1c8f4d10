//! Clones a git repository into a directory, or pulls when it is already
//! there, through the host shell call; then lists the checked-out files with
//! WASI filesystem calls.
//!
//! Input: `{"repo": URL, "dir": DIR}`; DIR must be inside an allowed
//! directory. Output: `{"action": "clone" | "pull", "head": COMMIT, "files":
//! [...]}`, files relative to DIR and sorted, `.git` left out. The policy must
//! allow `git clone ` and `git pull`.

use std::fs;
use std::path::Path;

wit_bindgen::generate!({
    path: "../../wit",
    world: "apex:task/task",
    generate_all,
});

use apex::task::shell;

#[derive(serde::Deserialize)]
struct Input {
    repo: String,
    dir: String,
}

fn git(command: &str, cwd: Option<&str>) -> Result<(), String> {
    let options = shell::Options {
        cwd: cwd.map(str::to_owned),
        stdin: None,
    };
    match shell::run(command, &options) {
        Ok(output) if output.exit_code == 0 => Ok(()),
        Ok(output) => Err(format!(
            "`{command}` exited with {}: {}",
            output.exit_code,
            String::from_utf8_lossy(&output.stderr).trim()
        )),
        Err(shell::Error::Denied(m)) => Err(format!("`{command}` denied: {m}")),
        Err(shell::Error::TimedOut(m)) => Err(format!("`{command}` timed out: {m}")),
        Err(shell::Error::Failed(m)) => Err(format!("`{command}` failed: {m}")),
    }
}

/// Quotes a value for the shell call's POSIX splitting.
fn quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

/// Reads the commit HEAD points at, from `.git/HEAD` and the refs.
fn head(dir: &Path) -> Result<String, String> {
    let git_dir = dir.join(".git");
    let read =
        |path: &Path| fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()));
    let head = read(&git_dir.join("HEAD"))?;
    let Some(reference) = head.trim().strip_prefix("ref: ") else {
        return Ok(head.trim().to_string());
    };
    if let Ok(commit) = fs::read_to_string(git_dir.join(reference)) {
        return Ok(commit.trim().to_string());
    }
    let packed = read(&git_dir.join("packed-refs"))?;
    packed
        .lines()
        .filter_map(|line| line.split_once(' '))
        .find(|(_, name)| *name == reference)
        .map(|(commit, _)| commit.to_string())
        .ok_or_else(|| format!("cannot resolve {reference}"))
}

fn list_files(root: &Path, dir: &Path, files: &mut Vec<String>) -> Result<(), String> {
    let entries = fs::read_dir(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| e.to_string())?;
        let path = entry.path();
        if entry.file_name() == ".git" {
            continue;
        }
        let file_type = entry.file_type().map_err(|e| e.to_string())?;
        if file_type.is_dir() {
            list_files(root, &path, files)?;
        } else {
            let relative = path.strip_prefix(root).unwrap_or(&path);
            files.push(relative.display().to_string());
        }
    }
    Ok(())
}

struct GitSync;

impl Guest for GitSync {
    fn run(input: String) -> Result<String, String> {
        let input: Input = serde_json::from_str(&input)
            .map_err(|e| format!("invalid input: {e}; expected {{\"repo\": URL, \"dir\": DIR}}"))?;
        let dir = Path::new(&input.dir);

        let action = if dir.join(".git").is_dir() {
            git("git pull", Some(&input.dir))?;
            "pull"
        } else {
            git(
                &format!("git clone {} {}", quote(&input.repo), quote(&input.dir)),
                None,
            )?;
            "clone"
        };

        let mut files = Vec::new();
        list_files(dir, dir, &mut files)?;
        files.sort();
        let output = serde_json::json!({ "action": action, "head": head(dir)?, "files": files });
        Ok(output.to_string())
    }
}

export!(GitSync);
