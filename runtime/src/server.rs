//! Starting and stopping the API server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use serde_json::json;

use crate::api::{self, AppState};
use crate::audit::AuditLog;
use crate::auth::{MIN_KEY_BYTES, Verifier};
use crate::engine::Engine;
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
    create_private_dir(&options.data)
        .with_context(|| format!("cannot use data directory {}", options.data.display()))?;
    let data = options.data.canonicalize()?;

    let policy = load_policy(&options.config, &data)?;
    for line in policy.describe().lines() {
        tracing::info!("{line}");
    }

    let egress =
        Arc::new(crate::net::egress_for(&policy).context("invalid network section in the policy")?);
    let engine = Arc::new(Engine::new().context("cannot start the WebAssembly engine")?);
    let store = Arc::new(
        PluginStore::open(&data)
            .with_context(|| format!("cannot open the plugin store in {}", data.display()))?,
    );
    let audit = AuditLog::open(&data)
        .with_context(|| format!("cannot open the audit log in {}", data.display()))?;
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
    audit.record(
        "server_start",
        json!({ "listen": local.to_string(), "plugins": registry.records().len() }),
    );
    let state = Arc::new(AppState {
        engine,
        policy,
        egress,
        registry,
        verifier: Verifier::new(options.key.into_bytes()),
        audit,
    });

    println!("apex listening on http://{local}");
    tracing::info!(address = %local, data = %data.display(), "server started");

    let app = api::router(state.clone()).into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await?;

    state.audit.record("server_stop", json!({}));
    tracing::info!("server stopped");
    Ok(())
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
