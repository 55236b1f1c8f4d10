//! Apex benchmarks: `cargo bench -p apex-runtime --bench apex`.
//!
//! Measures, in one run on one machine, so the ratios compare like with like:
//! - instantiate + run of `hello` in process, through Apex and through a bare
//!   wasmtime embedding of the same component;
//! - recording runs in the history database, one at a time and from 32 tasks;
//! - signed runs over loopback HTTP at 1 and 32 connections, each request
//!   signed afresh by the load generator;
//! - the 1-connection load again with an idle-priority spinner on each core,
//!   to show how much of the latency is spent waking halted virtual CPUs,
//!   and `GET /healthz` both ways, as the floor of any request;
//! - spawning `python3 -c 'print(1)'` per task, the design Apex replaces;
//! - time to ready with 100 stored plugins, from cached compiled code and cold;
//! - 1,000 concurrent runs waiting on a slow local HTTP server, with the
//!   server's peak memory.
//!
//! Prints a table and writes it to `docs/benchmarks.md`, keeping the notes
//! section of that file. Needs the example plugins: run
//! `scripts/build-plugins.sh` first. `APEX_BENCH_ONLY=http` runs only the
//! loopback load, `APEX_BENCH_ONLY=engine` only the in-process runs and
//! `APEX_BENCH_ONLY=waiting` only the waiting runs, each printing one line.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use apex::engine::{Engine, EngineSettings, RunRequest, RunStatus};
use apex::grants::Grants;
use apex::history::{History, RunRecord};
use apex::policy::{Policy, ProtectedPaths};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const KEY: &str = "bench-key-0123456789abcdef0123456789abcdef";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn plugin(name: &str) -> Vec<u8> {
    let path = repo_root().join("target/plugins").join(format!("{name}.wasm"));
    std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{}: {e}; run scripts/build-plugins.sh first", path.display()))
}

/// Latency figures of a sample, in microseconds.
struct Stats {
    median: f64,
    p99: f64,
}

fn stats(mut samples: Vec<Duration>) -> Stats {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize].as_secs_f64() * 1e6;
    Stats {
        median: at(0.5),
        p99: at(0.99),
    }
}

/// Returns `None` when `value` is at most `limit`, else how far over it is.
fn over(value: f64, limit: f64, label: &str) -> Option<String> {
    (value > limit).then(|| format!("{label} {:.0} % over", (value / limit - 1.0) * 100.0))
}

/// Returns `None` when `value` is at least `limit`, else how far under it is.
fn under(value: f64, limit: f64, label: &str) -> Option<String> {
    (value < limit).then(|| format!("{label} {:.0} % under", (1.0 - value / limit) * 100.0))
}

/// Returns `target` followed by whether it was met, and by how much it was
/// missed where it was not.
fn judged(target: &str, misses: &[Option<String>]) -> String {
    let misses: Vec<&str> = misses.iter().flatten().map(String::as_str).collect();
    if misses.is_empty() {
        format!("{target}: met")
    } else {
        format!("{target}: **missed**, {}", misses.join(", "))
    }
}

/// One line of the results table.
struct Row {
    what: String,
    figure: String,
    target: String,
}

fn row(what: impl Into<String>, figure: impl Into<String>, target: impl Into<String>) -> Row {
    Row {
        what: what.into(),
        figure: figure.into(),
        target: target.into(),
    }
}

fn main() {
    // `APEX_BENCH_ONLY=http` runs just the loopback load, for quick comparisons.
    if std::env::var("APEX_BENCH_ONLY").as_deref() == Ok("http") {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let server = BenchServer::start("limits: {max_concurrent_runs: 64, max_queued_runs: 4096}\n");
        server.upload("hello", &plugin("hello"));
        let one = runtime.block_on(http_load(&server.addr, 1, Duration::from_secs(4)));
        let many = runtime.block_on(http_load(&server.addr, 32, Duration::from_secs(4)));
        let awake = {
            let _cores = CoresAwake::start();
            runtime.block_on(http_load(&server.addr, 1, Duration::from_secs(4)))
        };
        println!(
            "1 connection: {:.0} runs/s, p50 {:.0} µs (no core left to halt: p50 {:.0} µs); 32 connections: {:.0} runs/s, p50 {:.0} µs, p99 {:.0} µs",
            one.rate,
            one.latency.median,
            awake.latency.median,
            many.rate,
            many.latency.median,
            many.latency.p99
        );
        return;
    }
    // `APEX_BENCH_ONLY=engine` runs just the in-process runs.
    if std::env::var("APEX_BENCH_ONLY").as_deref() == Ok("engine") {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let (apex_run, in_place, bare_run) = runtime.block_on(in_process());
        println!(
            "Apex: median {:.1} µs, p99 {:.1} µs; reset in place: median {:.1} µs, p99 {:.1} µs; \
             bare wasmtime: median {:.1} µs, p99 {:.1} µs",
            apex_run.median, apex_run.p99, in_place.median, in_place.p99, bare_run.median, bare_run.p99
        );
        return;
    }
    // `APEX_BENCH_ONLY=waiting` runs just the 1,000 waiting runs.
    if std::env::var("APEX_BENCH_ONLY").as_deref() == Ok("waiting") {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let waiting = runtime.block_on(waiting_runs(1000));
        println!("1,000 waiting runs: {waiting}");
        return;
    }
    // `cargo bench` passes `--bench`; a filter argument is not supported.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut rows = Vec::new();

    let (apex_run, in_place, bare_run) = runtime.block_on(in_process());
    rows.push(row(
        "in process: instantiate + run `hello`, Apex",
        format!("median {:.1} µs, p99 {:.1} µs", apex_run.median, apex_run.p99),
        judged("median ≤ 25 µs", &[over(apex_run.median, 25.0, "median")]),
    ));
    rows.push(row(
        "in process: the same, slots reset in place (`--reset-slots-in-place`)",
        format!("median {:.1} µs, p99 {:.1} µs", in_place.median, in_place.p99),
        judged("median ≤ 25 µs", &[over(in_place.median, 25.0, "median")]),
    ));
    rows.push(row(
        "in process: same component, bare wasmtime",
        format!(
            "median {:.1} µs, p99 {:.1} µs (Apex/bare: {:.2}×)",
            bare_run.median,
            bare_run.p99,
            apex_run.median / bare_run.median
        ),
        "baseline",
    ));

    let writes = runtime.block_on(history_writes());
    rows.push(row(
        "run history: record one finished run, until committed",
        format!(
            "median {:.0} µs, p99 {:.0} µs, {:.0} µs of CPU",
            writes.latency.median, writes.latency.p99, writes.cpu_per_run
        ),
        "included in the 1-connection p50",
    ));

    let python = python_baseline();
    rows.push(row(
        "spawn `python3 -c 'print(1)'` per task",
        format!("median {:.0} µs", python.median),
        "baseline",
    ));

    let server = BenchServer::start("limits: {max_concurrent_runs: 64, max_queued_runs: 4096}\n");
    server.upload("hello", &plugin("hello"));
    let one = runtime.block_on(http_load(&server.addr, 1, Duration::from_secs(5)));
    rows.push(row(
        "signed HTTP runs, 1 connection",
        format!(
            "{:.0} runs/s, p50 {:.0} µs, p99 {:.0} µs",
            one.rate, one.latency.median, one.latency.p99
        ),
        judged("p50 ≤ 200 µs", &[over(one.latency.median, 200.0, "p50")]),
    ));
    let (awake, health, health_awake) = {
        let health = runtime.block_on(load(&server.addr, 1, Duration::from_secs(3), Ask::Health));
        let _cores = CoresAwake::start();
        let awake = runtime.block_on(http_load(&server.addr, 1, Duration::from_secs(5)));
        let health_awake = runtime.block_on(load(&server.addr, 1, Duration::from_secs(3), Ask::Health));
        (awake, health, health_awake)
    };
    rows.push(row(
        "signed HTTP runs, 1 connection, no core left to halt (an idle-priority spinner per core)",
        format!(
            "p50 {:.0} µs, p99 {:.0} µs",
            awake.latency.median, awake.latency.p99
        ),
        "diagnostic: the part of the 1-connection p50 spent waking halted virtual CPUs",
    ));
    rows.push(row(
        "`GET /healthz`, 1 connection: no run, no signature",
        format!(
            "p50 {:.0} µs; with no core left to halt: p50 {:.0} µs",
            health.latency.median, health_awake.latency.median
        ),
        "baseline",
    ));
    let pid = server.child.id();
    let (cpu_before, load_started) = (process_cpu_ticks(pid), Instant::now());
    let many = runtime.block_on(http_load(&server.addr, 32, Duration::from_secs(5)));
    let server_cpu = (process_cpu_ticks(pid) - cpu_before) as f64 / clock_ticks_per_second();
    // CPU seconds per second: of the whole server, and of recording at this
    // rate, at the cost of one run recorded alone (no shared commits).
    let server_load = server_cpu / load_started.elapsed().as_secs_f64();
    let recording_load = many.rate * writes.cpu_per_run / 1e6;
    let recording_share = recording_load / server_load;
    rows.push(row(
        "signed HTTP runs, 32 connections",
        format!(
            "{:.0} runs/s, p50 {:.0} µs, p99 {:.0} µs ({:.0}× faster per task than python3)",
            many.rate,
            many.latency.median,
            many.latency.p99,
            python.median / (1e6 / many.rate)
        ),
        judged(
            "≥ 10,000 runs/s, p99 ≤ 10 ms",
            &[
                under(many.rate, 10_000.0, "rate"),
                over(many.latency.p99, 10_000.0, "p99"),
            ],
        ),
    ));
    // Without recording the server could run at most 1 / (1 - share) times
    // as fast, so a share under half cannot halve it.
    rows.push(row(
        "run history: recording's share of server CPU at 32 connections",
        format!(
            "{:.0} %, estimated: {:.0} µs of CPU per run recorded alone, at {:.0} runs/s, against the server's {:.2} CPU \
             seconds per second (32 tasks in process record {:.0} runs/s, {:.1}× the 32-connection rate)",
            recording_share * 100.0,
            writes.cpu_per_run,
            many.rate,
            server_load,
            writes.rate,
            writes.rate / many.rate
        ),
        judged(
            "recording must not halve throughput: share < 50 %",
            &[over(recording_share * 100.0, 50.0, "share")],
        ),
    ));
    drop(server);

    let server = BenchServer::start_with_args(
        "limits: {max_concurrent_runs: 64, max_queued_runs: 4096}\n",
        &["--reset-slots-in-place"],
    );
    server.upload("hello", &plugin("hello"));
    let single = runtime.block_on(http_load(&server.addr, 1, Duration::from_secs(5)));
    let parallel = runtime.block_on(http_load(&server.addr, 32, Duration::from_secs(5)));
    rows.push(row(
        "signed HTTP runs, slots reset in place (`--reset-slots-in-place`)",
        format!(
            "1 connection: p50 {:.0} µs, p99 {:.0} µs; 32 connections: {:.0} runs/s, p99 {:.0} µs",
            single.latency.median, single.latency.p99, parallel.rate, parallel.latency.p99
        ),
        judged(
            "the same targets",
            &[
                over(single.latency.median, 200.0, "p50"),
                under(parallel.rate, 10_000.0, "rate"),
                over(parallel.latency.p99, 10_000.0, "p99"),
            ],
        ),
    ));
    drop(server);

    let (cached, cold) = startup();
    rows.push(row(
        "ready with 100 stored plugins, cached compiled code",
        format!("{:.0} ms", cached * 1e3),
        judged("≤ 1 s", &[over(cached * 1e3, 1000.0, "time")]),
    ));
    rows.push(row(
        "ready with 100 stored plugins, compiling all (cold)",
        format!("{:.0} ms", cold * 1e3),
        "baseline",
    ));

    let waiting = runtime.block_on(waiting_runs(1000));
    rows.push(row(
        "1,000 concurrent runs waiting on a slow HTTP server",
        waiting.to_string(),
        judged(
            "all finish, peak RSS ≤ 512 MiB",
            &[
                (waiting.failed > 0).then(|| format!("{} runs failed", waiting.failed)),
                over(waiting.peak_mib, 512.0, "peak RSS"),
            ],
        ),
    ));

    report(&rows);
}

/// Runs `hello` in process through Apex, with slots reset by `madvise` and in
/// place, and through a bare embedding.
async fn in_process() -> (Stats, Stats, Stats) {
    let wasm = plugin("hello");
    let input = r#"{"name":"Ada"}"#.to_string();
    let madvise = apex_runs(&wasm, &input, false).await;
    let in_place = apex_runs(&wasm, &input, true).await;
    let bare = bare_runs(&wasm, &input).await;
    (madvise, in_place, bare)
}

const IN_PROCESS_RUNS: usize = 3000;

/// Runs `hello` in process through Apex.
async fn apex_runs(wasm: &[u8], input: &str, reset_in_place: bool) -> Stats {
    const RUNS: usize = IN_PROCESS_RUNS;
    let dir = tempfile::tempdir().unwrap();
    let policy_file = dir.path().join("policy.yaml");
    std::fs::write(&policy_file, "").unwrap();
    let policy = Policy::load(&policy_file, &ProtectedPaths::default()).unwrap();
    let settings = EngineSettings {
        memory_bytes: policy.limits.memory_bytes,
        max_concurrent_runs: 64,
        reset_in_place,
    };
    let grants = Grants::new(policy, dir.path().to_path_buf()).unwrap();
    let engine = Engine::new(settings).unwrap();
    let compiled = engine.compile(wasm).unwrap();

    let mut samples = Vec::with_capacity(RUNS);
    for index in 0..RUNS + 100 {
        let request = RunRequest {
            plugin: "hello".into(),
            input: Some(input.to_string()),
            args: Vec::new(),
        };
        let started = Instant::now();
        let outcome = engine
            .run(&compiled, request, &grants, std::future::pending())
            .await;
        let elapsed = started.elapsed();
        assert_eq!(outcome.status, RunStatus::Succeeded, "{:?}", outcome.error);
        if index >= 100 {
            samples.push(elapsed);
        }
    }
    stats(samples)
}

/// Runs `hello` in process through the bare embedding.
async fn bare_runs(wasm: &[u8], input: &str) -> Stats {
    const RUNS: usize = IN_PROCESS_RUNS;
    let bare = bare::Bare::new(wasm);
    let mut bare_samples = Vec::with_capacity(RUNS);
    for index in 0..RUNS + 100 {
        let started = Instant::now();
        let output = bare.run(input).await;
        let elapsed = started.elapsed();
        assert!(output.contains("Ada"));
        if index >= 100 {
            bare_samples.push(elapsed);
        }
    }
    stats(bare_samples)
}

/// Figures of recording runs in the history, in process.
struct HistoryWrites {
    /// Latency of recording one finished run, until committed.
    latency: Stats,
    /// CPU time of the whole process per run recorded one at a time, in µs.
    cpu_per_run: f64,
    /// Runs recorded per second by 32 tasks at once.
    rate: f64,
}

/// Records finished runs as the server does for a waiting run that got a
/// slot at once, with one write when it ends: first one run at a time, then
/// from 32 tasks at once.
async fn history_writes() -> HistoryWrites {
    const RUNS: usize = 3000;
    let dir = tempfile::tempdir().unwrap();
    let history = Arc::new(History::open(dir.path()).unwrap());

    let mut samples = Vec::with_capacity(RUNS);
    let mut cpu_before = 0.0;
    for index in 0..RUNS + 100 {
        if index == 100 {
            cpu_before = own_cpu_seconds();
        }
        let (_, finished) = run_records();
        let started = Instant::now();
        history.finish(finished).await.unwrap();
        if index >= 100 {
            samples.push(started.elapsed());
        }
    }
    let cpu_per_run = (own_cpu_seconds() - cpu_before) * 1e6 / RUNS as f64;

    let deadline = Instant::now() + Duration::from_secs(3);
    let started = Instant::now();
    let writers: Vec<_> = (0..32)
        .map(|_| {
            let history = history.clone();
            tokio::spawn(async move {
                let mut recorded = 0usize;
                while Instant::now() < deadline {
                    let (_, finished) = run_records();
                    history.finish(finished).await.unwrap();
                    recorded += 1;
                }
                recorded
            })
        })
        .collect();
    let mut recorded = 0;
    for writer in writers {
        recorded += writer.await.unwrap();
    }
    HistoryWrites {
        latency: stats(samples),
        cpu_per_run,
        rate: recorded as f64 / started.elapsed().as_secs_f64(),
    }
}

/// Returns the user and system CPU time of this process, in seconds.
fn own_cpu_seconds() -> f64 {
    use nix::sys::resource::{UsageWho, getrusage};
    let usage = getrusage(UsageWho::RUSAGE_SELF).unwrap();
    let seconds = |time: nix::sys::time::TimeVal| time.tv_sec() as f64 + time.tv_usec() as f64 / 1e6;
    seconds(usage.user_time()) + seconds(usage.system_time())
}

/// Returns the queued and the finished record of a run of `hello`.
fn run_records() -> (RunRecord, RunRecord) {
    let mut queued = RunRecord::queued(
        "hello",
        "4db5d485842aa80ec350286f815acbad51b43588116ae943a0cdd924ed7ccb5c",
        "default",
        Some(r#"{"name":"Ada"}"#.into()),
    );
    let now = queued.queued_at_ms;
    queued.started_at_ms = Some(now);
    queued.status = "running".into();
    let mut finished = queued.clone();
    finished.status = "succeeded".into();
    finished.finished_at_ms = Some(now);
    finished.duration_ms = Some(0);
    finished.output = Some(r#"{"greeting":"Hello, Ada!"}"#.into());
    (queued, finished)
}

/// The smallest embedding that runs the component: default configuration,
/// WASI linked, instantiate and call.
mod bare {
    use wasmtime::component::{Component, InstancePre, Linker, ResourceTable};
    use wasmtime::{Config, Engine, Store};
    use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

    pub struct State {
        ctx: WasiCtx,
        table: ResourceTable,
    }

    impl WasiView for State {
        fn ctx(&mut self) -> WasiCtxView<'_> {
            WasiCtxView {
                ctx: &mut self.ctx,
                table: &mut self.table,
            }
        }
    }

    pub struct Bare {
        engine: Engine,
        pre: InstancePre<State>,
    }

    impl Bare {
        pub fn new(wasm: &[u8]) -> Bare {
            let engine = Engine::new(&Config::new()).unwrap();
            let mut linker = Linker::new(&engine);
            wasmtime_wasi::p2::add_to_linker_async(&mut linker).unwrap();
            let component = Component::new(&engine, wasm).unwrap();
            let pre = linker.instantiate_pre(&component).unwrap();
            Bare { engine, pre }
        }

        pub async fn run(&self, input: &str) -> String {
            let state = State {
                ctx: WasiCtx::builder().build(),
                table: ResourceTable::new(),
            };
            let mut store = Store::new(&self.engine, state);
            let instance = self.pre.instantiate_async(&mut store).await.unwrap();
            let func = instance
                .get_typed_func::<(String,), (Result<String, String>,)>(&mut store, "run")
                .unwrap();
            let (result,) = func.call_async(&mut store, (input.to_string(),)).await.unwrap();
            result.unwrap()
        }
    }
}

fn python_baseline() -> Stats {
    let mut samples = Vec::new();
    for _ in 0..60 {
        let started = Instant::now();
        let status = Command::new("python3")
            .args(["-c", "print(1)"])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        samples.push(started.elapsed());
        assert!(status.success());
    }
    stats(samples)
}

/// `apex serve` as a child process on a free port.
struct BenchServer {
    dir: tempfile::TempDir,
    addr: String,
    child: Child,
}

impl BenchServer {
    fn start(policy: &str) -> BenchServer {
        BenchServer::start_with_args(policy, &[])
    }

    /// Starts a server with the extra `apex serve` arguments `args`.
    fn start_with_args(policy: &str, args: &[&str]) -> BenchServer {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("policy.yaml"), policy).unwrap();
        let (child, addr) = spawn_server(dir.path(), args);
        BenchServer { dir, addr, child }
    }

    fn upload(&self, name: &str, wasm: &[u8]) {
        let status = blocking_request(&self.addr, "PUT", &format!("/v1/plugins/{name}"), wasm);
        assert_eq!(status, 201, "upload {name}");
    }
}

impl Drop for BenchServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `apex serve` in `dir`, returning the child and its address once it listens.
fn spawn_server(dir: &Path, args: &[&str]) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_apex"))
        .args([
            "serve",
            "--config",
            "policy.yaml",
            "--data",
            "data",
            "--listen",
            "127.0.0.1:0",
        ])
        .args(args)
        .current_dir(dir)
        .env("APEX_SHARED_KEY", KEY)
        .env("APEX_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("apex listening on http://")
        .expect("server started")
        .to_string();
    (child, addr)
}

fn signed_request(addr: &str, method: &str, target: &str, body: &[u8]) -> Vec<u8> {
    let headers = apex::client::sign_request(KEY.as_bytes(), method, target, body);
    let mut request = format!(
        "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nX-TS: {}\r\nX-Nonce: {}\r\nX-SIG: {}\r\nContent-Length: {}\r\n\r\n",
        headers.ts,
        headers.nonce,
        headers.signature,
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    request
}

fn blocking_request(addr: &str, method: &str, target: &str, body: &[u8]) -> u16 {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .write_all(&signed_request(addr, method, target, body))
        .unwrap();
    let mut reader = BufReader::new(stream);
    let mut status = String::new();
    reader.read_line(&mut status).unwrap();
    status.split(' ').nth(1).unwrap().parse().unwrap()
}

struct Load {
    rate: f64,
    latency: Stats,
}

/// The request a load sends.
#[derive(Clone, Copy)]
enum Ask {
    /// A signed, waiting run of `hello`.
    Run,
    /// The open `GET /healthz`, which does nothing else.
    Health,
}

/// Sends signed runs of `hello` on `connections` keep-alive connections for
/// `duration`, each request signed with a fresh nonce.
async fn http_load(addr: &str, connections: usize, duration: Duration) -> Load {
    load(addr, connections, duration, Ask::Run).await
}

/// Sends `ask` requests on `connections` keep-alive connections for `duration`.
async fn load(addr: &str, connections: usize, duration: Duration, ask: Ask) -> Load {
    let body = br#"{"input":{"name":"Ada"}}"#;
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let addr = addr.to_string();
        tasks.push(tokio::spawn(async move {
            let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
            stream.set_nodelay(true).unwrap();
            let mut samples = Vec::new();
            let mut buffer = Vec::with_capacity(4096);
            while Instant::now() < deadline {
                let request = match ask {
                    Ask::Run => signed_request(&addr, "POST", "/v1/plugins/hello/run", body),
                    Ask::Health => format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n").into_bytes(),
                };
                let started = Instant::now();
                stream.write_all(&request).await.unwrap();
                let status = read_response(&mut stream, &mut buffer).await;
                samples.push(started.elapsed());
                assert_eq!(status, 200);
            }
            samples
        }));
    }
    let started = Instant::now();
    let mut samples = Vec::new();
    for task in tasks {
        samples.extend(task.await.unwrap());
    }
    let elapsed = started.elapsed().as_secs_f64();
    Load {
        rate: samples.len() as f64 / elapsed,
        latency: stats(samples),
    }
}

/// Threads at idle priority (`SCHED_IDLE`), one on each core, which run only
/// when no other thread wants the core. They take almost no time from the
/// server or the load generator, but keep the cores from halting between
/// requests, so no request waits for the hypervisor to wake a halted
/// virtual CPU.
struct CoresAwake {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl CoresAwake {
    fn start() -> CoresAwake {
        let stop = Arc::new(AtomicBool::new(false));
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = (0..cores)
            .map(|core| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut cpus = nix::sched::CpuSet::new();
                    cpus.set(core).unwrap();
                    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpus).unwrap();
                    let idle = nix::libc::sched_param { sched_priority: 0 };
                    // SAFETY: the call reads `idle` only, and applies to this thread.
                    #[allow(unsafe_code)]
                    let result = unsafe { nix::libc::sched_setscheduler(0, nix::libc::SCHED_IDLE, &idle) };
                    assert_eq!(result, 0, "SCHED_IDLE: {}", std::io::Error::last_os_error());
                    while !stop.load(Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        CoresAwake { stop, threads }
    }
}

impl Drop for CoresAwake {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Reads one HTTP/1.1 response with a Content-Length body; returns its status.
async fn read_response(stream: &mut tokio::net::TcpStream, buffer: &mut Vec<u8>) -> u16 {
    buffer.clear();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = std::str::from_utf8(&buffer[..end]).unwrap().to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().unwrap())
                .unwrap_or(0);
            while buffer.len() < end + 4 + length {
                let read = stream.read(&mut chunk).await.unwrap();
                assert!(read > 0, "connection closed mid-response");
                buffer.extend_from_slice(&chunk[..read]);
            }
            return head[9..12].parse().unwrap();
        }
        let read = stream.read(&mut chunk).await.unwrap();
        assert!(read > 0, "connection closed before a response");
        buffer.extend_from_slice(&chunk[..read]);
    }
}

/// Returns the seconds from spawning the server to its listening line, with
/// 100 stored plugins: first with their cached compiled code, then cold.
fn startup() -> (f64, f64) {
    let server = BenchServer::start("");
    let hello = plugin("hello");
    for index in 0..100 {
        server.upload(&format!("p{index:03}"), &hello);
    }
    let mut server = server;
    let _ = server.child.kill();
    let _ = server.child.wait();

    let time_start = |dir: &Path| {
        let started = Instant::now();
        let (mut child, _) = spawn_server(dir, &[]);
        let elapsed = started.elapsed().as_secs_f64();
        let _ = child.kill();
        let _ = child.wait();
        elapsed
    };
    let cached = time_start(server.dir.path());

    for entry in std::fs::read_dir(server.dir.path().join("data/plugins/blobs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "cwasm") {
            std::fs::remove_file(path).unwrap();
        }
    }
    let cold = time_start(server.dir.path());
    (cached, cold)
}

/// Returns the CPU time process `pid` has used, in clock ticks.
fn process_cpu_ticks(pid: u32) -> u64 {
    cpu_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap())
}

/// Returns the clock ticks per second of the CPU times in `/proc`.
fn clock_ticks_per_second() -> f64 {
    use nix::unistd::{SysconfVar, sysconf};
    sysconf(SysconfVar::CLK_TCK).unwrap().unwrap() as f64
}

/// Returns user plus system time from the text of a `/proc` `stat` file.
fn cpu_ticks(stat: &str) -> u64 {
    // The fields after the command name, which is in parentheses. utime and
    // stime are fields 14 and 15 of the whole line, 12 and 13 of these.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// Figures of the waiting runs.
struct Waiting {
    /// Runs started.
    count: usize,
    /// Runs that did not succeed.
    failed: usize,
    /// Seconds from the first request to the last response.
    seconds: f64,
    /// Peak resident memory of the server.
    peak_mib: f64,
    /// Most requests the slow server held at once.
    peak_waiting: usize,
}

impl std::fmt::Display for Waiting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.failed == 0 {
            write!(f, "all finished in {:.1} s", self.seconds)?;
        } else {
            write!(
                f,
                "{} of {} failed, the rest finished in {:.1} s",
                self.failed, self.count, self.seconds
            )?;
        }
        write!(
            f,
            ", {} waiting at once, peak server RSS {:.0} MiB",
            self.peak_waiting, self.peak_mib
        )
    }
}

/// Runs `count` fetches at once against a local server that responds after
/// one second, and measures how they went.
async fn waiting_runs(count: usize) -> Waiting {
    // All the runs connect at once, more than the default backlog of 128.
    let slow = tokio::net::TcpSocket::new_v4().unwrap();
    slow.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let slow = slow.listen(4096).unwrap();
    let slow_port = slow.local_addr().unwrap().port();
    let waiting = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let peak_seen = peak.clone();
    tokio::spawn(async move {
        loop {
            let mut stream = match slow.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    eprintln!("the slow server failed to accept a connection: {e}");
                    continue;
                }
            };
            let waiting = waiting.clone();
            let peak = peak.clone();
            tokio::spawn(async move {
                let mut buffer = [0u8; 2048];
                let _ = stream.read(&mut buffer).await;
                let now = waiting.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(1)).await;
                waiting.fetch_sub(1, Ordering::SeqCst);
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
                    .await;
            });
        }
    });

    let policy = format!(
        "network:\n  http_allow_domains: [\"slow.test:{slow_port}\"]\n  resolve: {{slow.test: 127.0.0.1}}\n  \
         allow_private_addresses: true\nlimits: {{max_concurrent_runs: {count}, max_queued_runs: {count}}}\n\
         timeouts: {{task_seconds: 120}}\n"
    );
    let server = BenchServer::start(&policy);
    server.upload("fetch", &plugin("fetch"));
    let pid = server.child.id();

    let body = format!(r#"{{"input":{{"url":"http://slow.test:{slow_port}/"}}}}"#);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..count {
        let addr = server.addr.clone();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
            let request = signed_request(&addr, "POST", "/v1/plugins/fetch/run", body.as_bytes());
            stream.write_all(&request).await.unwrap();
            let mut buffer = Vec::new();
            let status = read_response(&mut stream, &mut buffer).await;
            let text = String::from_utf8_lossy(&buffer).into_owned();
            (status == 200 && text.contains(r#""status":"succeeded""#), text)
        }));
    }
    let mut failures = Vec::new();
    for task in tasks {
        let (succeeded, text) = task.await.unwrap();
        if !succeeded {
            failures.push(text);
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    if let Some(first) = failures.first() {
        eprintln!(
            "{} of {count} waiting runs failed; the first response:\n{first}",
            failures.len()
        );
    }

    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let peak_kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    Waiting {
        count,
        failed: failures.len(),
        seconds,
        peak_mib: peak_kib / 1024.0,
        peak_waiting: peak_seen.load(Ordering::SeqCst),
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    format!("{cores} cores, {cpu}, Linux {kernel}")
}

fn report(rows: &[Row]) {
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let mut table = String::from("| measurement | result | target |\n|---|---|---|\n");
    for row in rows {
        table.push_str(&format!("| {} | {} | {} |\n", row.what, row.figure, row.target));
    }
    println!("\n{table}");

    let doc = format!(
        "# Benchmarks\n\nProduced by `cargo bench -p apex-runtime --bench apex` (after `scripts/build-plugins.sh`) on {date}.\n\
         Machine: {}.\n\nEvery figure comes from the same run, so the ratios compare like with like. The load generator runs \
         on the same machine as the server and signs every request with a fresh nonce. The server logs at `warn` \
         (`APEX_LOG=warn`). At the default `info` level it writes two lines per run.\n\n{table}",
        machine()
    );
    let path = repo_root().join("docs/benchmarks.md");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let notes_marker = "\n## Notes\n";
    let notes = std::fs::read_to_string(&path)
        .ok()
        .and_then(|old| old.find(notes_marker).map(|at| old[at..].to_string()))
        .unwrap_or_default();
    std::fs::write(&path, format!("{doc}{notes}")).unwrap();
    println!("written to {}", path.display());
}
