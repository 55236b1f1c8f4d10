//! Starting and stopping the API server.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde_json::json;

use crate::api::{self, AppState, BodyBudget, RunSlots};
use crate::audit::AuditLog;
use crate::auth::{MIN_KEY_BYTES, Verifier};
use crate::engine::{Engine, EngineSettings};
use crate::grants::Grants;
use crate::history::History;
use crate::policy::Retention;
use crate::policy::{Policy, ProtectedPaths};
use crate::registry::Registry;
use crate::store::{PluginStore, create_private_dir};

/// Settings of `apex serve`.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The policy file.
    pub config: PathBuf,
    /// The data directory (plugins, audit log).
    pub data: PathBuf,
    /// Address to listen on; port 0 picks a free port.
    pub listen: String,
    /// The shared key, as text.
    pub key: String,
}

/// Checks that a shared key is usable, saying how to make one if not.
///
/// # Errors
///
/// Fails when the key is empty or shorter than [`MIN_KEY_BYTES`].
pub fn check_key(key: &str) -> anyhow::Result<()> {
    if key.is_empty() {
        anyhow::bail!(
            "APEX_SHARED_KEY is not set; generate a key with `apex keygen` and export it as APEX_SHARED_KEY"
        );
    }
    if key.len() < MIN_KEY_BYTES {
        anyhow::bail!(
            "APEX_SHARED_KEY is {} bytes long, and at least {MIN_KEY_BYTES} are required; generate a key with `apex keygen`",
            key.len()
        );
    }
    Ok(())
}

/// Loads the policy for a server whose data directory is `data`.
///
/// # Errors
///
/// Returns the policy error, which names the key and value at fault.
pub fn load_policy(config: &std::path::Path, data: &std::path::Path) -> anyhow::Result<Policy> {
    let mut protected = ProtectedPaths {
        data_dir: Some(data.to_path_buf()),
        files: Vec::new(),
    };
    let dotenv = std::path::Path::new(".env");
    if dotenv.exists() {
        protected.files.push(std::path::absolute(dotenv)?);
    }
    Ok(Policy::load(config, &protected)?)
}

/// Runs the server until SIGINT or SIGTERM.
///
/// Prints `apex listening on http://ADDR` to stdout once the socket is bound,
/// so scripts and tests that pass port 0 can find the address.
///
/// # Errors
///
/// Fails when the key, policy, data directory or listen address is unusable.
pub async fn serve(options: ServeOptions) -> anyhow::Result<()> {
    check_key(&options.key)?;
    hide_environment();

    // The policy is checked before anything is created, so a bad policy
    // leaves no data directory behind.
    let policy = load_policy(&options.config, &std::path::absolute(&options.data)?)?;
    create_private_dir(&options.data)
        .with_context(|| format!("cannot use data directory {}", options.data.display()))?;
    let data = options.data.canonicalize()?;
    for line in policy.describe().lines() {
        tracing::info!("{line}");
    }

    // Room for two maximal bodies; more waits, then gets a 503.
    let largest = policy.limits.upload_bytes.max(policy.limits.input_bytes);
    let body_budget = BodyBudget::new(largest.saturating_mul(2));
    raise_open_file_limit();
    let settings = EngineSettings {
        memory_bytes: policy.limits.memory_bytes,
        max_concurrent_runs: u32::try_from(policy.limits.max_concurrent_runs).unwrap_or(u32::MAX),
    };
    let run_slots = RunSlots::new(policy.limits.max_concurrent_runs, policy.limits.max_queued_runs);
    let engine = Arc::new(Engine::new(settings).context("cannot start the WebAssembly engine")?);
    let store = Arc::new(
        PluginStore::open(&data)
            .with_context(|| format!("cannot open the plugin store in {}", data.display()))?,
    );
    let history = Arc::new(
        History::open(&data).with_context(|| format!("cannot open the run history in {}", data.display()))?,
    );
    let audit = AuditLog::new(history.clone());
    let registry = Registry::load(engine.clone(), store).await?;

    let listener = tokio::net::TcpListener::bind(&options.listen)
        .await
        .with_context(|| format!("cannot listen on {}", options.listen))?;
    let local = listener.local_addr()?;
    if !local.ip().is_loopback() {
        tracing::warn!(address = %local, "listening on a non-loopback address without TLS; put the API behind HTTPS");
    }

    audit.record(
        "policy_load",
        json!({ "path": policy.source, "sha256": policy.sha256 }),
    );
    let shell_home = data.join("empty-home");
    create_private_dir(&shell_home).with_context(|| format!("cannot create {}", shell_home.display()))?;
    restrict_to_reading(&shell_home)?;
    let grants = Grants::new(policy, shell_home).context("invalid network section in the policy")?;
    audit.record(
        "server_start",
        json!({ "listen": local.to_string(), "plugins": registry.records().len() }),
    );
    let state = Arc::new(AppState {
        engine,
        grants,
        registry,
        verifier: Verifier::new(options.key.into_bytes(), crate::unix_now()),
        audit,
        body_budget,
        run_slots,
        history: history.clone(),
        in_flight: Default::default(),
    });
    spawn_pruning(history.clone(), state.grants.policy.retention);

    println!("apex listening on http://{local}");
    tracing::info!(address = %local, data = %data.display(), "server started");

    accept_connections(listener, api::router(state.clone())).await;

    state.audit.record("server_stop", json!({}));
    history.flush().await;
    tracing::info!("server stopped");
    Ok(())
}

/// Most connections served at once; more are closed at accept.
const MAX_CONNECTIONS: usize = 1024;

/// How long a client may take to send the request line and headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How long shutdown waits for requests in flight.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Serves HTTP/1.1 connections until SIGINT or SIGTERM, with a bound on
/// open connections and on the time a client may take to send its headers.
async fn accept_connections(listener: tokio::net::TcpListener, router: axum::Router) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use tower::ServiceExt;

    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut shutdown = std::pin::pin!(shutdown_signal());
    let mut refused: u64 = 0;

    loop {
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Usually out of file descriptors; wait for some to close.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };

        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refused += 1;
            if refused.is_power_of_two() {
                tracing::warn!(%remote, refused, "too many open connections; closing new ones");
            }
            continue;
        };

        let service = router.clone().map_request(
            move |mut request: axum::extract::Request<hyper::body::Incoming>| {
                request
                    .extensions_mut()
                    .insert(axum::extract::ConnectInfo(remote));
                request
            },
        );
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .serve_connection(
                TokioIo::new(stream),
                hyper_util::service::TowerToHyperService::new(service),
            );
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%remote, error = %e, "connection ended with an error");
            }
            drop(slot);
        });
    }

    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            "requests still running after {} s; stopping anyway",
            SHUTDOWN_GRACE.as_secs()
        );
    }
}

/// Makes `dir` readable and searchable by its owner only, with no write
/// permission, so a shell child that is not root cannot plant files there.
fn restrict_to_reading(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o500))
        .with_context(|| format!("cannot restrict {}", dir.display()))
}

/// How often history past its retention is removed.
const PRUNE_INTERVAL: Duration = Duration::from_secs(60 * 60);

/// Removes history past its retention now and every [`PRUNE_INTERVAL`].
fn spawn_pruning(history: Arc<History>, retention: Retention) {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(PRUNE_INTERVAL);
        loop {
            ticks.tick().await;
            history.prune(retention.runs_days, retention.audit_days);
        }
    });
}

/// Marks the process not dumpable, so processes of the same user (shell
/// children among them) cannot read its memory or `/proc/PID/environ`,
/// where the shared key is. Root can still read both.
fn hide_environment() {
    #[cfg(target_os = "linux")]
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        tracing::warn!(error = %e, "cannot mark the server not dumpable; shell children of the same user can read its environment");
    }
}

/// Raises the soft limit on open files to the hard limit: every connection,
/// preopened directory and shell pipe takes a descriptor.
fn raise_open_file_limit() {
    #[cfg(unix)]
    {
        use nix::sys::resource::{Resource, getrlimit, setrlimit};
        match getrlimit(Resource::RLIMIT_NOFILE) {
            Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                Ok(()) => tracing::debug!(from = soft, to = hard, "raised the open file limit"),
                Err(e) => tracing::warn!(error = %e, soft, "cannot raise the open file limit"),
            },
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot read the open file limit"),
        }
    }
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler can be installed");
    tokio::select! {
        _ = interrupt => {}
        _ = terminate.recv() => {}
    }
    tracing::info!("shutting down");
}
