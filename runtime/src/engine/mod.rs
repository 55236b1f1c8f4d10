//! The WebAssembly engine: compiles components once, runs each request in a
//! fresh instance under the policy.
//!
//! Phases are kept apart: [`Engine::compile`] validates, compiles and links a
//! component once (at upload or startup); [`Engine::run`] only instantiates
//! and calls it.

pub mod adapt;
mod files;
mod limiter;
mod output;
mod pool;
pub mod worker;
mod writes;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use wasmtime::component::{
    Component, ComponentExportIndex, InstancePre, Linker, ResourceTable, types::ComponentItem,
};
use wasmtime::{Config, Store, UpdateDeadline};
use wasmtime_wasi::p2::bindings::CommandPre;
use wasmtime_wasi::p2::pipe::MemoryInputPipe;
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

pub use self::limiter::RunLimiter;
pub use self::output::{CappedOutput, Captured};
use crate::decision::{Decision, Decisions};
use crate::grants::Grants;
use crate::net::HttpHooks;
use crate::policy::{PathMode, Policy};
use crate::shell::ShellCalls;

/// Interval between epoch ticks. A running task yields to the async executor
/// at every tick, so this bounds how long one task keeps a worker thread.
const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Name of the function a `task` world component exports.
const TASK_EXPORT: &str = "run";

/// Prefix of the interface a command component exports.
const COMMAND_EXPORT_PREFIX: &str = "wasi:cli/run@0.2";

/// Errors that make an upload unusable, each with what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CompileError {
    /// Compiling needed more memory or time than allowed.
    #[error("{0}")]
    Limit(String),
    /// The compile worker rejected the upload, for the reason given.
    #[error("{0}")]
    Rejected(String),
    /// The compile worker failed or did not start: a fault of the host.
    #[error("{0}")]
    Worker(String),
    /// The upload has no bytes.
    #[error("the upload is empty: send the component's bytes as the request body")]
    Empty,
    /// The bytes are not WebAssembly at all.
    #[error("not a WebAssembly binary: the upload must start with the `\\0asm` magic bytes")]
    NotWasm,
    /// A core module was uploaded that is not a WASI preview-1 command.
    #[error(
        "a WebAssembly core module was uploaded, but it is not a WASI preview-1 command: {0}. Apex runs components and preview-1 commands; build for wasm32-wasip2, or make the module a component with `apex component new`"
    )]
    CoreModule(String),
    /// The component failed to validate or compile.
    #[error("invalid component: {0}")]
    Invalid(String),
    /// The component imports something the runtime does not provide.
    #[error("unsupported import: {0}")]
    UnsupportedImport(String),
    /// The component exports neither entry point.
    #[error(
        "the component exports neither `run: func(input: string) -> result<string, string>` (the apex:task/task world) nor `wasi:cli/run` (a command)"
    )]
    NoEntryPoint,
}

/// What a plugin exports, which decides how it is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PluginKind {
    /// Exports `run` of the `apex:task/task` world.
    Task,
    /// Exports `wasi:cli/run`: a program with a `main`.
    Command,
}

/// The format of the uploaded bytes, before the runtime made them a component.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SourceFormat {
    /// A WebAssembly component.
    #[default]
    Component,
    /// A WASI preview-1 core module, wrapped with the preview-1 adapter.
    Wasip1Module,
}

impl SourceFormat {
    /// Returns the format of bytes that [`Engine::compile`] accepted.
    pub fn of(wasm: &[u8]) -> SourceFormat {
        match wasm.get(6..8) {
            Some([0, 0]) => SourceFormat::Wasip1Module,
            _ => SourceFormat::Component,
        }
    }
}

/// A component compiled and linked against the host, ready to instantiate.
pub struct CompiledPlugin {
    kind: PluginKind,
    component: Component,
    prepared: Prepared,
}

enum Prepared {
    Task {
        pre: InstancePre<RunState>,
        run: ComponentExportIndex,
    },
    Command(CommandPre<RunState>),
}

impl CompiledPlugin {
    /// Returns the plugin's kind.
    pub fn kind(&self) -> PluginKind {
        self.kind
    }

    /// Serialises the compiled native code, to store beside the component.
    ///
    /// # Errors
    ///
    /// Fails when wasmtime cannot serialise the component.
    pub fn artifact(&self) -> anyhow::Result<Vec<u8>> {
        Ok(self.component.serialize()?)
    }
}

/// Settings the engine is built with, from the policy's `limits`.
#[derive(Debug, Clone, Copy)]
pub struct EngineSettings {
    /// Limit for all linear memories of one run, in bytes.
    pub memory_bytes: usize,
    /// Runs that may execute at once; the instance pool is sized for them.
    pub max_concurrent_runs: u32,
    /// Whether pool slots may be reset in place (`--reset-slots-in-place`).
    pub reset_in_place: bool,
}

/// Final status of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// The task returned `ok`, or the command exited with 0.
    Succeeded,
    /// The task returned `err`, trapped, hit a limit, or exited non-zero.
    Failed,
    /// The deadline passed first.
    TimedOut,
    /// Cancelled through the API before it finished.
    Cancelled,
}

/// Input of one run.
#[derive(Debug, Clone, Default)]
pub struct RunRequest {
    /// Name of the plugin, used as `argv[0]` of a command.
    pub plugin: String,
    /// The request's `input` as JSON text; `None` when the request had none.
    pub input: Option<String>,
    /// Arguments for a command plugin.
    pub args: Vec<String>,
}

/// The result of one run.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    /// Final status.
    pub status: RunStatus,
    /// Text the task returned in `ok` (task plugins only).
    pub output: Option<String>,
    /// Exit code (command plugins only).
    pub exit_code: Option<i32>,
    /// Captured standard output.
    pub stdout: Captured,
    /// Captured standard error.
    pub stderr: Captured,
    /// Wall time from the start of instantiation.
    pub duration: Duration,
    /// Reason the run failed or timed out.
    pub error: Option<String>,
    /// Capability decisions the host made during the run, in order.
    pub decisions: Vec<Decision>,
}

impl RunOutcome {
    /// Returns the outcome of a run cancelled while it waited for a slot.
    pub fn cancelled_before_start() -> RunOutcome {
        RunOutcome {
            status: RunStatus::Cancelled,
            output: None,
            exit_code: None,
            stdout: Captured::default(),
            stderr: Captured::default(),
            duration: Duration::ZERO,
            error: Some("cancelled through the API while queued".into()),
            decisions: Vec::new(),
        }
    }
}

/// Host state of one run.
pub struct RunState {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    hooks: HttpHooks,
    shell: ShellCalls,
    config: wasmtime_wasi_config::WasiConfigVariables,
    decisions: Decisions,
    table: ResourceTable,
    limiter: RunLimiter,
    writes: Arc<writes::WriteBudget>,
    /// Paths the task opened, by descriptor, to name files in decisions.
    opened: writes::OpenedPaths,
}

impl WasiHttpView for RunState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

impl WasiView for RunState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// The shared engine and linker, and the thread that advances epochs.
pub struct Engine {
    engine: wasmtime::Engine,
    linker: Linker<RunState>,
    ticker_stop: Arc<AtomicBool>,
}

impl Engine {
    /// Creates the engine, links the WASI imports and starts the epoch ticker.
    ///
    /// # Errors
    ///
    /// Fails when wasmtime rejects the configuration or the host cannot start
    /// the ticker thread.
    pub fn new(settings: EngineSettings) -> anyhow::Result<Engine> {
        let mut config = compile_config();
        let reset = pool::SlotReset::detect(settings.reset_in_place);
        match reset {
            pool::SlotReset::Madvise | pool::SlotReset::InPlace => {}
            pool::SlotReset::NoPagemapScan => tracing::warn!(
                "--reset-slots-in-place is ignored: this kernel lacks PAGEMAP_SCAN (Linux 6.7); slots are reset with madvise"
            ),
            pool::SlotReset::SwapActive => tracing::warn!(
                "--reset-slots-in-place is ignored: a swap area is active, and the in-place reset would miss swapped-out pages; slots are reset with madvise"
            ),
        }
        config.allocation_strategy(pool::strategy(
            settings.max_concurrent_runs,
            settings.memory_bytes,
            reset,
        ));

        let engine = match wasmtime::Engine::new(&config) {
            Ok(engine) => {
                if reset == pool::SlotReset::InPlace {
                    tracing::warn!(
                        "pool slots are reset in place (--reset-slots-in-place): faster, but a page the kernel is moving during a reset keeps the last run's data for the next run"
                    );
                }
                engine
            }
            Err(e) if reset == pool::SlotReset::InPlace => {
                tracing::warn!(
                    error = %e,
                    "--reset-slots-in-place is ignored: PAGEMAP_SCAN is not usable here, perhaps blocked by a seccomp filter; slots are reset with madvise"
                );
                config.allocation_strategy(pool::strategy(
                    settings.max_concurrent_runs,
                    settings.memory_bytes,
                    pool::SlotReset::Madvise,
                ));
                wasmtime::Engine::new(&config)?
            }
            Err(e) => return Err(e.into()),
        };
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        files::wrap_open_at(&mut linker)?;
        writes::wrap_writes(&mut linker)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
        crate::shell::add_to_linker(&mut linker, |state: &mut RunState| &mut state.shell)?;
        wasmtime_wasi_config::add_to_linker(&mut linker, |state: &mut RunState| {
            wasmtime_wasi_config::WasiConfig::from(&state.config)
        })?;

        let ticker_stop = Arc::new(AtomicBool::new(false));
        let stop = ticker_stop.clone();
        let ticking = engine.weak();
        std::thread::Builder::new()
            .name("apex-epoch".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    match ticking.upgrade() {
                        Some(engine) => engine.increment_epoch(),
                        None => break,
                    }
                }
            })?;

        Ok(Engine {
            engine,
            linker,
            ticker_stop,
        })
    }

    /// Compiles a component, or a preview-1 command module, in a separate
    /// process (`apex compile-worker`) with `memory_bytes` of address space,
    /// then loads and links the code it returns. A component built to
    /// exhaust the compiler's memory or time then ends that process, not the
    /// server.
    ///
    /// # Errors
    ///
    /// As [`Engine::compile`], and [`CompileError::Worker`] when the worker
    /// fails, runs out of memory or time, or cannot start.
    pub async fn compile_in_worker(
        &self,
        bytes: &[u8],
        memory_bytes: u64,
    ) -> Result<CompiledPlugin, CompileError> {
        // Checked here too, for the clearer message.
        check_header(bytes)?;
        let artifact = worker::compile(bytes, memory_bytes).await?;
        // SAFETY: `Component::deserialize` runs the native code it is given.
        // These bytes come from `wasmtime::Engine::precompile_component` in
        // a child running this same executable with the same compilation
        // settings. So they are the code `Component::new` would have produced
        // here, and wasmtime checks that the settings match.
        #[allow(unsafe_code)]
        let component =
            unsafe { Component::deserialize(&self.engine, &artifact) }.map_err(|e| compile_error(&e))?;
        self.link(component)
    }

    /// Validates, compiles and links a component, or a WASI preview-1
    /// command module after wrapping it with the preview-1 adapter.
    ///
    /// This is CPU-bound and can take seconds for a large component: call it
    /// from a blocking thread, never from an async worker.
    ///
    /// # Errors
    ///
    /// Returns a [`CompileError`] that explains why the bytes cannot be a plugin.
    pub fn compile(&self, bytes: &[u8]) -> Result<CompiledPlugin, CompileError> {
        let component = match check_header(bytes)? {
            SourceFormat::Component => Component::new(&self.engine, bytes),
            SourceFormat::Wasip1Module => {
                let adapted = adapt::command_component(bytes).map_err(CompileError::CoreModule)?;
                Component::new(&self.engine, &adapted)
            }
        };
        let component = component.map_err(|e| compile_error(&e))?;
        self.link(component)
    }

    /// Returns a key that changes whenever compiled code from this engine
    /// would no longer load: another wasmtime version, target or settings.
    pub fn compatibility_key(&self) -> String {
        use std::hash::{Hash, Hasher};

        // `DefaultHasher::new` uses fixed keys, so the key is stable for one
        // build of the server, which is all a cached artifact needs.
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        self.engine.precompile_compatibility_hash().hash(&mut hasher);
        env!("CARGO_PKG_VERSION").hash(&mut hasher);
        format!("{:016x}", hasher.finish())
    }

    /// Loads compiled code that [`CompiledPlugin::artifact`] produced.
    ///
    /// # Errors
    ///
    /// Fails when wasmtime rejects the code (another engine, corrupt data)
    /// or linking fails; the caller then compiles the component again.
    #[allow(unsafe_code)]
    pub fn load_artifact(&self, artifact: &[u8]) -> Result<CompiledPlugin, CompileError> {
        // SAFETY: `Component::deserialize` runs the native code it is given,
        // so the bytes must come from `Component::serialize` of a compatible
        // engine and be unaltered. The store only returns an artifact whose
        // SHA-256 matches the digest recorded when it was written. That record
        // is in the data directory, which tasks cannot reach. wasmtime itself
        // checks engine compatibility.
        let component = unsafe { Component::deserialize(&self.engine, artifact) }
            .map_err(|e| CompileError::Invalid(format!("{e:#}")))?;
        self.link(component)
    }

    fn link(&self, component: Component) -> Result<CompiledPlugin, CompileError> {
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| CompileError::UnsupportedImport(format!("{e:#}")))?;

        let ty = component.component_type();
        if let Some(export) = ty.get_export(&self.engine, TASK_EXPORT) {
            let ComponentItem::ComponentFunc(func) = export.ty else {
                return Err(CompileError::NoEntryPoint);
            };
            func.typecheck::<(String,), (Result<String, String>,)>(&ty.instance_type())
                .map_err(|_| CompileError::NoEntryPoint)?;
            let run = component
                .get_export_index(None, TASK_EXPORT)
                .ok_or(CompileError::NoEntryPoint)?;
            return Ok(CompiledPlugin {
                kind: PluginKind::Task,
                component,
                prepared: Prepared::Task { pre, run },
            });
        }

        let command_export = ty
            .exports(&self.engine)
            .find(|(name, _)| name.starts_with(COMMAND_EXPORT_PREFIX));
        if let Some((name, item)) = command_export {
            // Checked here, so a wrong signature fails the upload, not every run.
            let wrong_type = || {
                CompileError::Invalid(format!(
                    "`{name}` must export `run: func() -> result`, as the wasi:cli world defines it"
                ))
            };
            let ComponentItem::ComponentInstance(instance) = item.ty else {
                return Err(wrong_type());
            };
            let Some(ComponentItem::ComponentFunc(run)) =
                instance.get_export(&self.engine, "run").map(|export| export.ty)
            else {
                return Err(wrong_type());
            };
            run.typecheck::<(), (Result<(), ()>,)>(&ty.instance_type())
                .map_err(|_| wrong_type())?;
            let command = CommandPre::new(pre).map_err(|e| CompileError::Invalid(format!("{e:#}")))?;
            return Ok(CompiledPlugin {
                kind: PluginKind::Command,
                component,
                prepared: Prepared::Command(command),
            });
        }

        Err(CompileError::NoEntryPoint)
    }

    /// Runs a plugin once in a fresh instance under the policy in `grants`.
    ///
    /// The deadline covers instantiation and the whole call, including time
    /// the task spends waiting inside host calls. When `cancel` completes
    /// first, the run stops and ends as [`RunStatus::Cancelled`].
    pub async fn run(
        &self,
        plugin: &CompiledPlugin,
        request: RunRequest,
        grants: &Grants,
        cancel: impl Future<Output = ()>,
    ) -> RunOutcome {
        let started = Instant::now();
        let decisions = Decisions::default();
        let policy = &grants.policy;
        let stdout = CappedOutput::new(policy.limits.output_bytes);
        let stderr = CappedOutput::new(policy.limits.output_bytes);

        let finish = |status, output, exit_code, error| RunOutcome {
            status,
            output,
            exit_code,
            stdout: stdout.captured(),
            stderr: stderr.captured(),
            duration: started.elapsed(),
            error,
            decisions: decisions.snapshot(),
        };

        let wasi = match build_wasi(plugin.kind, &request, policy, &stdout, &stderr) {
            Ok(wasi) => wasi,
            Err(e) => {
                return finish(
                    RunStatus::Failed,
                    None,
                    None,
                    Some(format!("cannot prepare the run: {e:#}")),
                );
            }
        };

        let state = RunState {
            wasi,
            http: WasiHttpCtx::new(),
            hooks: grants.egress.hooks(&request.plugin, decisions.clone()),
            shell: grants
                .shell
                .for_run(&request.plugin, decisions.clone(), grants.egress.clone()),
            config: grants.config.iter().cloned().collect(),
            decisions: decisions.clone(),
            table: ResourceTable::new(),
            limiter: RunLimiter::new(policy.limits.memory_bytes),
            writes: writes::WriteBudget::new(policy.limits.write_bytes as u64),
            opened: writes::OpenedPaths::default(),
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| &mut state.limiter);
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(|_| Ok(UpdateDeadline::Yield(1)));

        let deadline = policy.timeouts.task;
        let input = request.input.clone().unwrap_or_else(|| "null".to_string());
        let call = call_plugin(&mut store, plugin, input);
        // Dropping the call stops the task: wasm at its next epoch tick, a
        // host call at once, and a shell call with its process group.
        let result = tokio::select! {
            result = tokio::time::timeout(deadline, call) => Some(result),
            () = cancel => None,
        };
        let Some(result) = result else {
            return finish(
                RunStatus::Cancelled,
                None,
                None,
                Some("cancelled through the API".into()),
            );
        };

        let limiter = &store.data().limiter;
        match result {
            Err(_) => finish(
                RunStatus::TimedOut,
                None,
                None,
                Some(format!(
                    "deadline of {} s exceeded ({})",
                    deadline.as_secs(),
                    policy.timeouts.task_key
                )),
            ),
            Ok(Err(e)) => {
                let message = match limiter.exceeded() {
                    Some(requested) => format!(
                        "memory limit exceeded: the run's linear memories would need {} MiB, the limit is {} MiB for all of them (limits.memory_mib)",
                        requested.div_ceil(1 << 20),
                        limiter.memory_bytes() >> 20
                    ),
                    None => describe_trap(&e),
                };
                finish(RunStatus::Failed, None, None, Some(message))
            }
            Ok(Ok(Ended::Returned(Ok(output)))) if output.len() > policy.limits.output_bytes => finish(
                RunStatus::Failed,
                None,
                None,
                Some(format!(
                    "the task returned {} bytes of output, more than the {} KiB allowed (limits.output_kib)",
                    output.len(),
                    policy.limits.output_bytes >> 10
                )),
            ),
            Ok(Ok(Ended::Returned(Ok(output)))) => finish(RunStatus::Succeeded, Some(output), None, None),
            Ok(Ok(Ended::Returned(Err(message)))) => {
                let message = crate::truncate_text(&message, policy.limits.output_bytes);
                finish(RunStatus::Failed, None, None, Some(message))
            }
            Ok(Ok(Ended::Exited(0))) => finish(RunStatus::Succeeded, None, Some(0), None),
            Ok(Ok(Ended::Exited(code))) => finish(
                RunStatus::Failed,
                None,
                Some(code),
                Some(format!("the command exited with code {code}")),
            ),
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

/// Result of a call that did not trap.
enum Ended {
    Returned(Result<String, String>),
    Exited(i32),
}

async fn call_plugin(
    store: &mut Store<RunState>,
    plugin: &CompiledPlugin,
    input: String,
) -> wasmtime::Result<Ended> {
    match &plugin.prepared {
        Prepared::Task { pre, run } => {
            let instance = pre.instantiate_async(&mut *store).await?;
            let func = instance.get_typed_func::<(String,), (Result<String, String>,)>(&mut *store, run)?;
            let (result,) = func.call_async(&mut *store, (input,)).await?;
            Ok(Ended::Returned(result))
        }
        Prepared::Command(pre) => {
            let command = pre.instantiate_async(&mut *store).await?;
            match command.wasi_cli_run().call_run(&mut *store).await {
                Ok(Ok(())) => Ok(Ended::Exited(0)),
                Ok(Err(())) => Ok(Ended::Exited(1)),
                Err(e) => match e.downcast_ref::<I32Exit>() {
                    Some(exit) => Ok(Ended::Exited(exit.0)),
                    None => Err(e),
                },
            }
        }
    }
}

/// Builds the WASI context of one run: captured stdio, no environment, the
/// policy's directories preopened under their host paths, no sockets.
fn build_wasi(
    kind: PluginKind,
    request: &RunRequest,
    policy: &Policy,
    stdout: &CappedOutput,
    stderr: &CappedOutput,
) -> anyhow::Result<WasiCtx> {
    let mut builder = WasiCtx::builder();
    builder.stdout(stdout.clone()).stderr(stderr.clone());

    if kind == PluginKind::Command {
        builder.arg(&request.plugin);
        builder.args(&request.args);
        if let Some(input) = &request.input {
            builder.stdin(MemoryInputPipe::new(input.clone().into_bytes()));
        }
    }

    for allowed in &policy.paths_allow {
        let guest = allowed
            .path
            .to_str()
            .expect("policy paths are validated as UTF-8");
        let perms = match allowed.mode {
            PathMode::Rw => FsPerms::ReadWrite,
            PathMode::Ro => FsPerms::ReadOnly,
        };
        builder.preopened_dir(&allowed.path, guest, perms)?;
    }

    builder
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false)
        .socket_addr_check(|_, _| Box::pin(async { false }));
    Ok(builder.build())
}

/// Returns the settings that decide compiled code, shared by the server's
/// engine and the compile worker, so the worker's code loads in the server.
fn compile_config() -> Config {
    let mut config = Config::new();
    config.wasm_component_model(true);
    config.epoch_interruption(true);
    config
}

/// Compiles `bytes` (a component, or a preview-1 command module, which is
/// adapted first) for an engine of [`compile_config`], and returns the
/// serialized code. This is the work of `apex compile-worker`.
///
/// # Errors
///
/// Fails when the bytes are not WebAssembly or do not compile.
pub fn precompile(bytes: &[u8]) -> Result<Vec<u8>, CompileError> {
    let engine =
        wasmtime::Engine::new(&compile_config()).map_err(|e| CompileError::Invalid(format!("{e:#}")))?;
    let compiled = match check_header(bytes)? {
        SourceFormat::Component => engine.precompile_component(bytes),
        SourceFormat::Wasip1Module => {
            let adapted = adapt::command_component(bytes).map_err(CompileError::CoreModule)?;
            engine.precompile_component(&adapted)
        }
    };
    compiled.map_err(|e| compile_error(&e))
}

/// Turns a wasmtime error about a component into a [`CompileError`], with a
/// hint when the instance pool cannot hold it.
fn compile_error(error: &wasmtime::Error) -> CompileError {
    let mut message = format!("{error:#}");
    if message.contains("pooling allocator") {
        message.push_str(
            "; the limit is set by limits.memory_mib (all memories of one run together) and limits.max_concurrent_runs in the policy",
        );
    }
    CompileError::Invalid(message)
}

/// Tells a component from a core module by the header, and rejects bytes that
/// are neither before wasmtime parses them, so the mistake gets a clear message.
fn check_header(bytes: &[u8]) -> Result<SourceFormat, CompileError> {
    if bytes.is_empty() {
        return Err(CompileError::Empty);
    }
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(CompileError::NotWasm);
    }
    // Bytes 4..8 are a version and a layer: layer 0 is a core module, layer 1 a component.
    match bytes[6..8] {
        [0, 0] => Ok(SourceFormat::Wasip1Module),
        [1, 0] => Ok(SourceFormat::Component),
        _ => Err(CompileError::Invalid(
            "unknown WebAssembly layer in the header".into(),
        )),
    }
}

/// Maximum length, in bytes, of a trap's error text in a run result. Names in a module's
/// name section end up in it, and a module chooses them.
const MAX_TRAP_TEXT: usize = 16 * 1024;

/// Formats a trap or host error for the run result: the message and its
/// causes, without the guest backtrace, cut at [`MAX_TRAP_TEXT`] bytes.
fn describe_trap(error: &wasmtime::Error) -> String {
    let mut message = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !cause.is_empty()
            && !message.contains(&cause)
            && !cause.starts_with("error while executing at wasm backtrace")
        {
            message.push_str(": ");
            message.push_str(&cause);
        }
    }
    // Only modules wrapped at upload contain the adapter, whose functions
    // appear in the backtrace under its module name.
    if message.contains("wasi_snapshot_preview1[") {
        message.push_str(
            " (the trap is inside the WASI preview-1 adapter, whose state the module overwrote; modules built with Go 1.24 or newer do, see docs/plugins/go.md)",
        );
    }
    crate::truncate_text(&message, MAX_TRAP_TEXT)
}
