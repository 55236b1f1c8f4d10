//! The `apex` command: the server, policy checks and a signing client.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use apex::client::{Client, DEFAULT_URL, sign_request};
use apex::server::{ServeOptions, serve};
use clap::{Parser, Subcommand};
use reqwest::Method;
use serde_json::{Value, json};

/// Apex runs WebAssembly components as tasks, confined by a YAML policy.
#[derive(Parser)]
#[command(name = "apex", version, about)]
struct Cli {
    /// Log format on stderr: `text` for people, `json` for log collectors.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Start the API server.
    Serve {
        /// Policy file.
        #[arg(long, default_value = "config/policy.yaml")]
        config: PathBuf,
        /// Data directory for plugins and the audit log (created with mode 0700).
        #[arg(long, default_value = "./data")]
        data: PathBuf,
        /// Address to listen on, HOST:PORT (port 0 picks a free port).
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        /// Keys file (YAML) listing keys by id with their scopes; mode 600.
        #[arg(long)]
        keys: Option<PathBuf>,
        /// TLS certificate chain (PEM); with --tls-key the API speaks HTTPS.
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// TLS private key (PEM, mode 600).
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Reset pool slots by restoring only the pages a run wrote (Linux 6.7
        /// or later, no swap). Runs start about twice as fast, but a page
        /// the kernel is moving at that moment keeps its data for the next run.
        #[arg(long)]
        reset_slots_in_place: bool,
    },
    /// Manage the server's keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Validate policy files.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Build plugins from core modules.
    Component {
        #[command(subcommand)]
        command: ComponentCommand,
    },
    /// Print a new random shared key for APEX_SHARED_KEY.
    Keygen,
    /// Compile the component on stdin and write the compiled code to
    /// stdout; the server runs this for each upload, under limits.
    #[command(name = "compile-worker", hide = true)]
    CompileWorker,
    /// Print the signature headers for one request, for use with curl.
    Sign {
        /// HTTP method, e.g. POST.
        method: String,
        /// Path and query exactly as sent, e.g. /v1/plugins/hello/run.
        target: String,
        /// File holding the request body (default: empty body).
        #[arg(long, conflicts_with = "body")]
        body_file: Option<PathBuf>,
        /// Request body as text.
        #[arg(long)]
        body: Option<String>,
    },
    /// Upload a component as plugin NAME.
    Upload {
        /// Plugin name.
        name: String,
        /// The component (.wasm).
        file: PathBuf,
    },
    /// Run plugin NAME and print the result.
    Run {
        /// Plugin name.
        name: String,
        /// Input as JSON text.
        #[arg(long, conflicts_with = "input_file")]
        input: Option<String>,
        /// File holding the input as JSON, for inputs too long for the command line.
        #[arg(long)]
        input_file: Option<PathBuf>,
        /// Argument for a command plugin (repeatable).
        #[arg(long = "arg", allow_hyphen_values = true)]
        args: Vec<String>,
        /// Return the run id at once and let the run go on in the background.
        #[arg(long)]
        no_wait: bool,
    },
    /// List recent runs, newest first.
    Runs {
        /// Only runs of this plugin.
        #[arg(long)]
        plugin: Option<String>,
        /// Only runs with this status (queued, running, succeeded, failed, timed_out, cancelled, interrupted).
        #[arg(long)]
        status: Option<String>,
        /// Runs per page (1 to 1000).
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Show runs older than this run id (the `more:` hint of the previous page).
        #[arg(long)]
        before: Option<String>,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show the status, output, stdout and stderr of one run.
    Logs {
        /// Run id.
        run_id: String,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a queued or running run.
    Cancel {
        /// Run id.
        run_id: String,
    },
    /// List audit events, newest first.
    Audit {
        /// Only events at or after this time: Unix seconds, or UTC as printed
        /// in the table (`2026-12-04 22:54:28`) or RFC 3339.
        #[arg(long)]
        since: Option<String>,
        /// Only events of this kind (auth_failure, policy_denial, plugin_upload, ...).
        #[arg(long)]
        kind: Option<String>,
        /// Events to show (1 to 1000).
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the plugins on the server.
    Plugins,
    /// Delete plugin NAME.
    Delete {
        /// Plugin name.
        name: String,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Reload the server's keys file (the same as sending it SIGHUP).
    Reload,
}

#[derive(Subcommand)]
enum ComponentCommand {
    /// Make a component of a core module built for WASI preview 1 (wasi-libc,
    /// Zig, Go): a command when it exports `_start`, else a task from the WIT
    /// world that wit-bindgen embedded in it.
    New {
        /// The core module (.wasm).
        module: PathBuf,
        /// Output path of the component.
        #[arg(short, long)]
        output: PathBuf,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate a policy file and print the capabilities it grants.
    Check {
        /// Policy file.
        #[arg(default_value = "config/policy.yaml")]
        path: PathBuf,
        /// Data directory the server would use, checked for overlap.
        #[arg(long, default_value = "./data")]
        data: PathBuf,
    },
}

fn main() -> ExitCode {
    use std::io::IsTerminal;

    // Host errors reach tasks as text (wasi:io's `to-debug-string`), and
    // with RUST_BACKTRACE set they would carry a backtrace of the server,
    // with its source paths and crate versions. RUST_LIB_BACKTRACE governs
    // captured backtraces only, so panics still print theirs.
    // SAFETY: no other thread exists yet to read the environment.
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }

    let (filter, filter_error) = match tracing_subscriber::EnvFilter::try_from_env("APEX_LOG") {
        Ok(filter) => (filter, None),
        Err(e) => (
            tracing_subscriber::EnvFilter::new("info"),
            std::env::var("APEX_LOG").ok().map(|v| (v, e)),
        ),
    };
    let cli = Cli::parse();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => subscriber.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => subscriber.json().init(),
    }
    if let Some((value, error)) = filter_error {
        tracing::warn!("invalid APEX_LOG {value:?} ({error}); logging at info");
    }

    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match runtime.block_on(execute(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    };
    // A compile still running on a blocking thread cannot be interrupted;
    // the process exits without waiting for it.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    code
}

/// Writes to stdout; a closed pipe (`apex ... | head`) is not an error.
fn print_out(text: &str) {
    use std::io::Write;
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}

/// Rejects a plugin name before it is put into a URL.
fn check_name(name: &str) -> anyhow::Result<()> {
    if !apex::store::is_valid_name(name) {
        anyhow::bail!(
            "invalid plugin name {name:?}: use 1 to 63 characters from a-z, 0-9, `_` and `-`, starting with a letter or digit"
        );
    }
    Ok(())
}

/// Parses `--since`: Unix seconds, or a UTC time such as `2026-12-04 22:54:28`
/// or `2026-12-04T22:54:28Z`.
fn parse_since(text: &str) -> anyhow::Result<u64> {
    if let Ok(seconds) = text.parse::<u64>() {
        return Ok(seconds);
    }
    let time = humantime::parse_rfc3339_weak(text.trim_end_matches('Z')).with_context(|| {
        format!("invalid --since {text:?}: give Unix seconds or a UTC time such as 2026-12-04 22:54:28")
    })?;
    Ok(time.duration_since(std::time::UNIX_EPOCH)?.as_secs())
}

/// Rejects a run id before it is put into a URL.
fn check_run_id(id: &str) -> anyhow::Result<()> {
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        anyhow::bail!("invalid run id {id:?}: run ids are hexadecimal, as `apex runs` lists them");
    }
    Ok(())
}

/// Percent-encodes a query value (everything but unreserved characters).
fn encode_query_value(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Prints a successful reply with `format`, or as JSON when asked or on error.
fn print_formatted(
    reply: apex::client::Reply,
    json: bool,
    format: fn(&Value) -> String,
) -> anyhow::Result<ExitCode> {
    if json || !reply.status.is_success() {
        return print_reply(reply);
    }
    print_out(&format(&reply.body));
    Ok(ExitCode::SUCCESS)
}

/// The client's settings: each from the environment, else from `.env` in
/// the working directory, as the server reads its key.
struct Settings {
    dotenv: std::collections::BTreeMap<String, String>,
}

impl Settings {
    /// Reads `.env`, unless the key is in the environment: then `.env` is
    /// not the client's.
    fn load() -> anyhow::Result<Settings> {
        let dotenv = if std::env::var_os("APEX_SHARED_KEY").is_some() {
            Default::default()
        } else {
            apex::server::read_dotenv()?
        };
        Ok(Settings { dotenv })
    }

    /// Returns the setting `name`, if set.
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name)
            .ok()
            .or_else(|| self.dotenv.get(name).cloned())
    }
}

fn client() -> anyhow::Result<Client> {
    let settings = Settings::load()?;
    let url = settings
        .get("APEX_URL")
        .unwrap_or_else(|| DEFAULT_URL.to_string());
    let key = settings.get("APEX_SHARED_KEY").unwrap_or_default();
    let client = Client::new(&url, &key)?;
    match settings.get("APEX_KEY_ID") {
        Some(id) => client.with_key_id(&id),
        None => Ok(client),
    }
}

/// Prints a reply as JSON and maps its status to the exit code.
fn print_reply(reply: apex::client::Reply) -> anyhow::Result<ExitCode> {
    print_out(&format!("{}\n", serde_json::to_string_pretty(&reply.body)?));
    if !reply.status.is_success() {
        eprintln!("error: the server returned {}", reply.status);
        if reply.status == reqwest::StatusCode::UNAUTHORIZED {
            eprintln!(
                "hint: check APEX_SHARED_KEY and APEX_KEY_ID (from the environment, else .env) against the server's keys"
            );
        }
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

async fn execute(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve {
            config,
            data,
            listen,
            keys,
            tls_cert,
            tls_key,
            reset_slots_in_place,
        } => {
            serve(ServeOptions {
                config,
                data,
                listen,
                keys,
                tls_cert,
                tls_key,
                reset_slots_in_place,
            })
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Keys {
            command: KeysCommand::Reload,
        } => print_reply(
            client()?
                .send(Method::POST, "/v1/keys/reload", Vec::new())
                .await?,
        ),
        Command::Policy {
            command: PolicyCommand::Check { path, data },
        } => {
            let data = std::path::absolute(&data)?;
            let protected = apex::policy::ProtectedPaths {
                data_dir: Some(data),
                files: Vec::new(),
            };
            let policy = apex::server::load_policy(&path, protected)?;
            print_out(&policy.describe());
            match policy.shell.confinement.probe().await {
                Ok(what) => print_out(&format!("shell confinement: {what}\n")),
                Err(reason) => print_out(&format!("shell confinement: unavailable ({reason})\n")),
            }
            for warning in &policy.exposed_to_shell {
                print_out(&format!("warning: {warning}\n"));
            }
            if let Some(gap) = policy.shell.confinement.process_limit_gap() {
                print_out(&format!("shell process limit: none ({gap})\n"));
            }
            print_out(&policy.describe_plugins());
            Ok(ExitCode::SUCCESS)
        }
        Command::Component {
            command: ComponentCommand::New { module, output },
        } => {
            if output.exists() && std::fs::canonicalize(&output)? == std::fs::canonicalize(&module)? {
                anyhow::bail!(
                    "the output {} is the module itself; write the component to another file",
                    output.display()
                );
            }
            let bytes =
                std::fs::read(&module).with_context(|| format!("cannot read {}", module.display()))?;
            let component = apex::engine::adapt::component(&bytes)
                .map_err(|e| anyhow::anyhow!("cannot make a component of {}: {e}", module.display()))?;
            std::fs::write(&output, component)
                .with_context(|| format!("cannot write {}", output.display()))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Keygen => {
            print_out(&format!("{}\n", apex::auth::generate_key()));
            Ok(ExitCode::SUCCESS)
        }
        Command::CompileWorker => {
            use std::io::{Read, Write};
            let mut bytes = Vec::new();
            std::io::stdin()
                .read_to_end(&mut bytes)
                .context("cannot read the component from stdin")?;
            match apex::engine::precompile(&bytes) {
                Ok(compiled) => {
                    std::io::stdout()
                        .write_all(&compiled)
                        .context("cannot write the compiled code to stdout")?;
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("{e}");
                    Ok(ExitCode::from(apex::engine::worker::EXIT_INVALID as u8))
                }
            }
        }
        Command::Sign {
            method,
            target,
            body_file,
            body,
        } => {
            let settings = Settings::load()?;
            let key = settings.get("APEX_SHARED_KEY").unwrap_or_default();
            apex::server::check_key(&key)?;
            if !target.starts_with('/') {
                anyhow::bail!(
                    "the target is the path and query as sent, such as /v1/plugins, not {target:?}"
                );
            }
            let body = match (body_file, body) {
                (Some(path), _) => {
                    std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?
                }
                (None, Some(text)) => text.into_bytes(),
                (None, None) => Vec::new(),
            };
            let headers = sign_request(key.as_bytes(), &method, &target, &body);
            let mut lines = format!(
                "X-TS: {}\nX-Nonce: {}\nX-SIG: {}\n",
                headers.ts, headers.nonce, headers.signature
            );
            if let Some(id) = settings.get("APEX_KEY_ID") {
                if !apex::keys::is_valid_key_id(&id) {
                    anyhow::bail!(
                        "invalid APEX_KEY_ID {id:?}: use 1 to 64 characters from A-Z, a-z, 0-9, `_` and `-`"
                    );
                }
                lines.push_str(&format!("X-Key-Id: {id}\n"));
            }
            print_out(&lines);
            Ok(ExitCode::SUCCESS)
        }
        Command::Upload { name, file } => {
            check_name(&name)?;
            let wasm = std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let reply = client()?
                .send(Method::PUT, &format!("/v1/plugins/{name}"), wasm)
                .await?;
            print_reply(reply)
        }
        Command::Run {
            name,
            input,
            input_file,
            args,
            no_wait,
        } => {
            check_name(&name)?;
            let input: Value = match (input, input_file) {
                (Some(text), _) => serde_json::from_str(&text).with_context(|| {
                    format!("--input is not valid JSON: {}", apex::truncate_text(&text, 200))
                })?,
                (None, Some(path)) => {
                    let text =
                        std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
                    serde_json::from_slice(&text)
                        .with_context(|| format!("{} is not valid JSON", path.display()))?
                }
                (None, None) => Value::Null,
            };
            let mut body = json!({ "input": input });
            if !args.is_empty() {
                body["args"] = json!(args);
            }
            if no_wait {
                body["wait"] = json!(false);
                let reply = client()?
                    .send(
                        Method::POST,
                        &format!("/v1/plugins/{name}/run"),
                        serde_json::to_vec(&body)?,
                    )
                    .await?;
                return print_reply(reply);
            }
            let reply = client()?
                .send(
                    Method::POST,
                    &format!("/v1/plugins/{name}/run"),
                    serde_json::to_vec(&body)?,
                )
                .await?;
            let succeeded = reply.body.get("status").and_then(Value::as_str) == Some("succeeded");
            let code = print_reply(reply)?;
            Ok(if succeeded { code } else { ExitCode::FAILURE })
        }
        Command::Runs {
            plugin,
            status,
            limit,
            before,
            json,
        } => {
            let mut query = vec![format!("limit={limit}")];
            for (key, value) in [("plugin", plugin), ("status", status), ("before", before)] {
                if let Some(value) = value {
                    query.push(format!("{key}={}", encode_query_value(&value)));
                }
            }
            let reply = client()?
                .send(Method::GET, &format!("/v1/runs?{}", query.join("&")), Vec::new())
                .await?;
            print_formatted(reply, json, apex::client::tables::runs_table)
        }
        Command::Logs { run_id, json } => {
            check_run_id(&run_id)?;
            let reply = client()?
                .send(Method::GET, &format!("/v1/runs/{run_id}"), Vec::new())
                .await?;
            print_formatted(reply, json, apex::client::tables::run_logs)
        }
        Command::Cancel { run_id } => {
            check_run_id(&run_id)?;
            print_reply(
                client()?
                    .send(Method::POST, &format!("/v1/runs/{run_id}/cancel"), Vec::new())
                    .await?,
            )
        }
        Command::Audit {
            since,
            kind,
            limit,
            json,
        } => {
            let mut query = vec![format!("limit={limit}")];
            if let Some(since) = since {
                query.push(format!("since={}", parse_since(&since)?));
            }
            if let Some(kind) = kind {
                query.push(format!("kind={}", encode_query_value(&kind)));
            }
            let reply = client()?
                .send(Method::GET, &format!("/v1/audit?{}", query.join("&")), Vec::new())
                .await?;
            print_formatted(reply, json, apex::client::tables::audit_table)
        }
        Command::Plugins => print_reply(client()?.send(Method::GET, "/v1/plugins", Vec::new()).await?),
        Command::Delete { name } => {
            check_name(&name)?;
            print_reply(
                client()?
                    .send(Method::DELETE, &format!("/v1/plugins/{name}"), Vec::new())
                    .await?,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_accepts_seconds_and_utc_times() {
        assert_eq!(parse_since("1764806400").unwrap(), 1_764_806_400);
        assert_eq!(parse_since("2025-12-04 00:00:00").unwrap(), 1_764_806_400);
        assert_eq!(parse_since("2025-12-04T00:00:00Z").unwrap(), 1_764_806_400);
        assert!(parse_since("yesterday").is_err());
    }
}
