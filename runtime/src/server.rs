//! Starting and stopping the API server.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde_json::json;

use crate::api::{self, AppState, BodyBudget, RunSlots, Throttle};
use crate::audit::AuditLog;
use crate::auth::{MIN_KEY_BYTES, Verifier};
use crate::engine::{Engine, EngineSettings};
use crate::grants::Grants;
use crate::history::History;
use crate::keys::KeySource;
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
    /// The keys file, if any.
    pub keys: Option<PathBuf>,
    /// TLS certificate chain (PEM); with `tls_key`, the API speaks HTTPS.
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM, mode 600).
    pub tls_key: Option<PathBuf>,
    /// Whether pool slots may be reset in place.
    pub reset_slots_in_place: bool,
}

/// Name of the file of environment variables read from the working directory.
pub const DOTENV_FILE: &str = ".env";

/// Reads `.env` from the working directory, if present, after checking that
/// only its owner can read it. The process environment wins over it.
///
/// # Errors
///
/// Fails when the file is readable by group or others, or does not parse.
pub fn read_dotenv() -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    let path = std::path::Path::new(DOTENV_FILE);
    let mut variables = std::collections::BTreeMap::new();
    if !path.exists() {
        return Ok(variables);
    }
    crate::keys::check_private(path, "the environment file")?;
    let describe = |error: dotenvy::Error| match error {
        dotenvy::Error::LineParse(line, at) => anyhow::anyhow!(
            "invalid line {line:?} in {DOTENV_FILE} (at character {at}); write NAME=value, one per line"
        ),
        dotenvy::Error::Io(e) => anyhow::anyhow!("cannot read {DOTENV_FILE}: {e}"),
        other => anyhow::anyhow!("cannot read {DOTENV_FILE}: {other}"),
    };
    for item in dotenvy::from_path_iter(path).map_err(describe)? {
        let (name, value) = item.map_err(describe)?;
        variables.insert(name, value);
    }
    Ok(variables)
}

/// Returns where the keys come from: `APEX_SHARED_KEY` (from the
/// environment, else `.env`) and the keys file.
///
/// # Errors
///
/// Fails when `.env` is unusable.
pub fn key_source(keys: Option<PathBuf>) -> anyhow::Result<KeySource> {
    let dotenv = read_dotenv()?;
    let shared = std::env::var("APEX_SHARED_KEY")
        .ok()
        .or_else(|| dotenv.get("APEX_SHARED_KEY").cloned());
    Ok(KeySource {
        shared,
        file: keys,
        dotenv,
    })
}

/// Checks that a shared key is usable, saying how to make one if not.
///
/// # Errors
///
/// Fails when the key is empty or shorter than [`MIN_KEY_BYTES`].
pub fn check_key(key: &str) -> anyhow::Result<()> {
    if key.is_empty() {
        anyhow::bail!(
            "APEX_SHARED_KEY is not set or empty; generate a key with `apex keygen` and export it as \
             APEX_SHARED_KEY, or put APEX_SHARED_KEY=KEY in .env (mode 600)"
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

/// Loads the policy, refusing allowed paths that overlap the `protected`
/// paths or `.env` in the working directory.
///
/// # Errors
///
/// Returns the policy error, which names the key and value at fault.
pub fn load_policy(config: &std::path::Path, mut protected: ProtectedPaths) -> anyhow::Result<Policy> {
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
    let key_source = key_source(options.keys.clone())?;
    let ring = key_source.load()?;
    hide_environment();

    // The policy is checked before anything is created, so a bad policy
    // leaves no data directory behind.
    let mut protected = ProtectedPaths {
        data_dir: Some(std::path::absolute(&options.data)?),
        files: Vec::new(),
    };
    if let Some(keys) = &options.keys {
        protected.files.push(std::path::absolute(keys)?);
    }
    let policy = load_policy(&options.config, protected)?;
    if let Err(e) = crate::keys::check_private(&policy.source, "the policy file") {
        tracing::warn!("{e}");
    }
    // Bound early, so a bad address also leaves nothing behind.
    let listener = listen(&options.listen).await.with_context(|| {
        format!(
            "cannot listen on {} (--listen takes a free address of this machine, such as 127.0.0.1:8080)",
            options.listen
        )
    })?;
    create_private_dir(&options.data)
        .with_context(|| format!("cannot use data directory {}", options.data.display()))?;
    let data = options.data.canonicalize()?;
    // Held until the server exits: a second server on the same directory
    // would mark this one's runs interrupted and race on every record.
    #[cfg(unix)]
    let _data_lock = lock_data_dir(&data)?;
    for line in policy.describe().lines() {
        tracing::info!("{line}");
    }
    match policy.shell.confinement.probe().await {
        Ok(what) => tracing::info!("shell children are confined: {what}"),
        Err(reason) if policy.shell.confinement.required => {
            anyhow::bail!(
                "shell_confinement is required, but shell children cannot be confined here: {reason}"
            )
        }
        Err(reason) => tracing::warn!(
            "shell children are NOT confined by the kernel ({reason}); set shell_confinement: required to refuse to start instead"
        ),
    }
    for warning in &policy.exposed_to_shell {
        tracing::warn!("{warning}");
    }
    match policy.shell.confinement.process_limit_gap() {
        Some(gap) if policy.shell.confinement.required => {
            anyhow::bail!("shell_confinement is required, but {gap}")
        }
        Some(gap) => tracing::warn!("{gap}; set shell_confinement: required to refuse to start instead"),
        None => {}
    }

    // Room for two maximal bodies; more waits, then gets a 503.
    let largest = policy.limits.upload_bytes.max(policy.limits.input_bytes);
    let body_budget = BodyBudget::new(largest.saturating_mul(2));
    raise_open_file_limit();
    let settings = EngineSettings {
        memory_bytes: policy.limits.memory_bytes,
        max_concurrent_runs: u32::try_from(policy.limits.max_concurrent_runs).unwrap_or(u32::MAX),
        reset_in_place: options.reset_slots_in_place,
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
    let registry = Registry::load(engine.clone(), store, policy.limits.compile_bytes as u64).await?;

    let local = listener.local_addr()?;
    let tls = match (&options.tls_cert, &options.tls_key) {
        (Some(cert), Some(key)) => Some(tls_acceptor(cert, key)?),
        (None, None) => None,
        _ => anyhow::bail!("give both --tls-cert and --tls-key, or neither"),
    };
    if tls.is_none() && !local.ip().is_loopback() {
        tracing::warn!(address = %local, "listening on a non-loopback address without TLS; give --tls-cert and --tls-key or put the API behind HTTPS");
    }

    audit.record(
        "policy_load",
        json!({ "path": policy.source, "sha256": policy.sha256 }),
    );
    audit.record(
        "keys_load",
        json!({ "keys": ring.ids(), "sha256": ring.file_sha256 }),
    );
    let shell_home = data.join("empty-home");
    if !shell_home.exists() {
        create_private_dir(&shell_home).with_context(|| format!("cannot create {}", shell_home.display()))?;
    }
    restrict_to_reading(&shell_home)?;
    let throttle = Throttle::new(
        policy.api.failures_max,
        policy.api.failures_window,
        policy.api.block,
    );
    // Plugins named in a section or an injection get grants of their own.
    let mut named: Vec<String> = policy.plugins.keys().cloned().collect();
    named.extend(
        policy
            .network
            .inject
            .iter()
            .flat_map(|i| i.plugins.iter().cloned()),
    );
    let mut plugin_grants = std::collections::HashMap::new();
    for plugin in named {
        let grants = Grants::for_plugin(&policy, &plugin, shell_home.clone())
            .with_context(|| format!("invalid network section for plugin {plugin}"))?;
        plugin_grants.insert(plugin, Arc::new(grants));
    }
    let grants = Arc::new(
        Grants::for_plugin(&policy, "", shell_home).context("invalid network section in the policy")?,
    );
    audit.record(
        "server_start",
        json!({ "listen": local.to_string(), "plugins": registry.records().len() }),
    );
    let state = Arc::new(AppState {
        engine,
        grants,
        plugin_grants,
        registry,
        verifier: Verifier::with_ring(ring, crate::unix_now()),
        audit,
        body_budget,
        run_slots,
        history: history.clone(),
        in_flight: Default::default(),
        key_source,
        throttle,
        detached_runs: tokio_util::task::TaskTracker::new(),
    });
    spawn_reload_on_hangup(state.clone());
    spawn_pruning(history.clone(), state.grants.policy.retention);

    let scheme = if tls.is_some() { "https" } else { "http" };
    println!("apex listening on {scheme}://{local}");
    tracing::info!(address = %local, data = %data.display(), "server started");

    accept_connections(
        listener,
        api::router(state.clone()),
        tls,
        policy.limits.max_connections,
        &state.detached_runs,
    )
    .await;

    state.audit.record("server_stop", json!({}));
    history.flush().await;
    tracing::info!("server stopped");
    Ok(())
}

/// How long a client may take to send the request line and headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How long shutdown waits for requests and runs in flight.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Serves HTTP/1.1 connections until SIGINT or SIGTERM, with a bound on
/// open connections and on the time a client may take to send its headers.
/// Then waits for the requests in flight and for `detached_runs`, up to
/// [`SHUTDOWN_GRACE`].
async fn accept_connections(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    max_connections: usize,
    detached_runs: &tokio_util::task::TaskTracker,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use tower::ServiceExt;

    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections));
    let mut shutdown = std::pin::pin!(shutdown_signal());
    let mut rejected: u64 = 0;

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
            rejected += 1;
            if rejected.is_power_of_two() {
                tracing::warn!(%remote, rejected, "too many open connections; closing new ones");
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
        let service = hyper_util::service::TowerToHyperService::new(service);
        let watcher = graceful.watcher();
        let tls = tls.clone();
        tokio::spawn(async move {
            let stream: Box<dyn Stream> = match tls {
                None => Box::new(stream),
                Some(acceptor) => {
                    match tokio::time::timeout(HEADER_READ_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => Box::new(stream),
                        Ok(Err(e)) => {
                            tracing::debug!(%remote, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%remote, "TLS handshake timed out");
                            return;
                        }
                    }
                }
            };
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = watcher.watch(connection).await {
                tracing::debug!(%remote, error = %e, "connection ended with an error");
            }
            drop(slot);
        });
    }

    drop(listener);
    // A waiting run whose client leaves now moves to `detached_runs`, so
    // the tracker closes only once the connections are done.
    let connections = graceful.shutdown();
    let runs = async {
        connections.await;
        detached_runs.close();
        if !detached_runs.is_empty() {
            tracing::info!(
                runs = detached_runs.len(),
                "waiting for runs without a client to finish"
            );
        }
        detached_runs.wait().await;
    };
    if tokio::time::timeout(SHUTDOWN_GRACE, runs).await.is_err() {
        tracing::warn!(
            runs_without_client = detached_runs.len(),
            "requests or runs still going after {} s; stopping anyway, and the next start marks those runs interrupted",
            SHUTDOWN_GRACE.as_secs()
        );
    }
}

/// A connection, plain or TLS.
trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Stream for T {}

/// Loads a certificate chain and private key (PEM) for the API.
///
/// # Errors
///
/// Fails when a file cannot be read or contains no certificate or key.
pub fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("cannot read the TLS certificate {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("invalid PEM in {}", cert.display()))?;
    if chain.is_empty() {
        anyhow::bail!("no certificate in {}", cert.display());
    }
    crate::keys::check_private(key, "the TLS private key")?;
    let private_key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("cannot read a private key from {}", key.display()))?;

    // `ring` builds without cmake or a C toolchain beyond the system compiler.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, private_key)
        .context("the TLS certificate and key do not match")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Makes `dir` readable and searchable by its owner only, with no write
/// permission, so a shell child that is not root cannot plant files there.
fn restrict_to_reading(dir: &std::path::Path) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o500))
            .with_context(|| format!("cannot restrict {}", dir.display()))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Does nothing: there is no SIGHUP; reload keys through the API.
#[cfg(not(unix))]
fn spawn_reload_on_hangup(_state: Arc<AppState>) {}

/// Reloads the keys file on SIGHUP.
#[cfg(unix)]
fn spawn_reload_on_hangup(state: Arc<AppState>) {
    let Ok(mut hangups) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP; reload keys with POST /v1/keys/reload");
        return;
    };
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            tracing::info!("SIGHUP received; reloading the keys");
            let _ = state.reload_keys();
        }
    });
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

/// Length of the queue of connections not yet accepted. Tokio's default of
/// 128 overflows when many clients connect at once. Linux caps this value at
/// `net.core.somaxconn`.
const LISTEN_BACKLOG: u32 = 4096;

/// Listens on the first address `address` resolves to that can be bound,
/// trying the next one after any error, as `TcpListener::bind` does.
async fn listen(address: &str) -> std::io::Result<tokio::net::TcpListener> {
    let mut last_error = None;
    for candidate in tokio::net::lookup_host(address).await? {
        match listen_on(candidate) {
            Ok(listener) => return Ok(listener),
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the address resolves to nothing",
        )
    }))
}

fn listen_on(address: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if address.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As `TcpListener::bind` does, so a restarted server can bind at once.
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(LISTEN_BACKLOG)
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
    #[cfg(unix)]
    {
        let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler can be installed");
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
    tracing::info!("shutting down");
}

/// Takes an exclusive lock on `DATA/server.lock`, failing at once when
/// another server holds it.
#[cfg(unix)]
fn lock_data_dir(data: &std::path::Path) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    use std::os::unix::fs::OpenOptionsExt;

    let path = data.join("server.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        anyhow::anyhow!(
            "data directory {} is in use by another apex server ({errno}); stop it or choose another --data",
            data.display()
        )
    })
}
