//! Makes one host shell call and returns what it produced.
//!
//! Input: `{"command": "...", "cwd": DIR, "stdin": TEXT}`, `cwd` and `stdin`
//! optional. Output: `{"exit_code", "stdout", "stderr", "truncated"}` when the
//! command ran, or `{"error": {"kind": "denied" | "timed_out" | "failed",
//! "message"}}` when it did not. Operators use it to run one allowed command
//! through the API.

wit_bindgen::generate!({
    path: "../../wit",
    world: "apex:task/task",
    generate_all,
});

use apex::task::shell;

#[derive(serde::Deserialize)]
struct Input {
    command: String,
    cwd: Option<String>,
    stdin: Option<String>,
}

struct ShellRun;

impl Guest for ShellRun {
    fn run(input: String) -> Result<String, String> {
        let input: Input = serde_json::from_str(&input)
            .map_err(|e| format!("invalid input: {e}; expected {{\"command\": \"...\"}}"))?;
        let options = shell::Options {
            cwd: input.cwd,
            stdin: input.stdin.map(String::into_bytes),
        };

        let output = match shell::run(&input.command, &options) {
            Ok(output) => serde_json::json!({
                "exit_code": output.exit_code,
                "stdout": String::from_utf8_lossy(&output.stdout),
                "stderr": String::from_utf8_lossy(&output.stderr),
                "truncated": output.truncated,
            }),
            Err(error) => {
                let (kind, message) = match error {
                    shell::Error::Denied(m) => ("denied", m),
                    shell::Error::TimedOut(m) => ("timed_out", m),
                    shell::Error::Failed(m) => ("failed", m),
                };
                serde_json::json!({ "error": { "kind": kind, "message": message } })
            }
        };
        Ok(output.to_string())
    }
}

export!(ShellRun);
