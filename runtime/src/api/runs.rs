//! Runs: starting them (waiting or in the background), reading their
//! history, cancelling them, and reading the audit log.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

use axum::Json;
use axum::extract::{Extension, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::auth::Caller;
use super::slots::{RETRY_AFTER_SECONDS, Ticket};
use super::{ApiError, AppState, check_name};
use crate::engine::{PluginKind, RunOutcome, RunRequest, RunStatus};
use crate::history::{AuditQuery, RunQuery, RunRecord, now_ms};
use crate::registry::LoadedPlugin;

/// Every status a run can have.
const RUN_STATUSES: [&str; 7] = [
    "queued",
    "running",
    "succeeded",
    "failed",
    "timed_out",
    "cancelled",
    "interrupted",
];

/// Time after which a waiting run that started at once is recorded as
/// running. Most runs end sooner and are written once, when they end.
const RECORD_RUNNING_AFTER: std::time::Duration = std::time::Duration::from_millis(2);

/// Maximum length of a run's input kept in the history, in bytes.
const MAX_RECORDED_INPUT: usize = 64 * 1024;

/// Default and maximum page size of the list routes.
const DEFAULT_PAGE: usize = 50;
const MAX_PAGE: usize = 1000;

/// Cancellation senders of the runs queued or running now, by run id.
#[derive(Default)]
pub struct InFlight(std::sync::Mutex<HashMap<String, oneshot::Sender<()>>>);

impl InFlight {
    fn insert(&self, id: &str) -> oneshot::Receiver<()> {
        let (sender, receiver) = oneshot::channel();
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_owned(), sender);
        receiver
    }

    fn take(&self, id: &str) -> Option<oneshot::Sender<()>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(id)
    }
}

/// Body of `POST /v1/plugins/{name}/run`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunBody {
    /// Any JSON; passed to the task as JSON text.
    #[serde(default)]
    input: Option<Value>,
    /// Arguments of a command plugin.
    #[serde(default)]
    args: Vec<String>,
    /// Whether to respond only when the run has finished (the default).
    #[serde(default = "default_wait")]
    wait: bool,
}

fn default_wait() -> bool {
    true
}

pub(super) async fn run_plugin(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    check_name(&name)?;
    let request: RunBody = if body.iter().all(u8::is_ascii_whitespace) {
        RunBody {
            wait: true,
            ..RunBody::default()
        }
    } else if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        // serde would also fill the fields of a struct from an array, by position.
        return Err(ApiError::bad_request(
            "invalid_json",
            "invalid run request: the body must be a JSON object such as {\"input\": <any JSON>}, or empty",
        ));
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request(
                "invalid_json",
                format!(
                    "invalid run request: {e}; expected {{\"input\": <any JSON>, \"args\": [strings], \"wait\": true|false}}"
                ),
            )
        })?
    };

    let plugin = state
        .registry
        .get(&name)
        .ok_or_else(|| ApiError::plugin_not_found(&name))?;
    if plugin.record.kind == PluginKind::Task && !request.args.is_empty() {
        return Err(ApiError::bad_request(
            "args_not_supported",
            format!(
                "plugin {name:?} is a task, and `args` apply to command plugins only; pass data in `input`"
            ),
        ));
    }

    // A full queue is reported now, also for a background run.
    let Some(ticket) = state.run_slots.enter() else {
        tracing::warn!(plugin = %name, "run queue full; rejecting the run");
        let mut response = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "queue_full",
            "every run slot is busy and the queue is full (limits.max_concurrent_runs, limits.max_queued_runs); retry later",
        )
        .into_response();
        response
            .headers_mut()
            .insert(axum::http::header::RETRY_AFTER, RETRY_AFTER_SECONDS.into());
        return Ok(response);
    };

    let input = request.input.as_ref().map(Value::to_string);
    let recorded_input = input
        .as_deref()
        .map(|text| crate::truncate_text(text, MAX_RECORDED_INPUT));
    let mut record = RunRecord::queued(&name, &plugin.record.sha256, &caller.key.id, recorded_input);
    // A run with a free slot is recorded as running, saving a write.
    if ticket.has_slot() {
        record.status = "running".into();
        record.started_at_ms = Some(record.queued_at_ms);
    }
    let cancel = state.in_flight.insert(&record.id);
    let run = RunRequest {
        plugin: name,
        input,
        args: request.args,
    };
    let id = record.id.clone();
    let span = tracing::info_span!("run", run_id = %id, plugin = %record.plugin);

    // The run is its own task, so a client that disconnects does not stop it.
    if !request.wait {
        // The record is committed before the 202 that gives out the run id,
        // and in the run's task, so a client that hangs up cannot leave a
        // record of a run that never starts.
        let (committed_sender, committed) = oneshot::channel();
        let state_for_run = state.clone();
        state.detached_runs.spawn(
            async move {
                let stored = state_for_run.history.queue_committed(record.clone()).await;
                let failed = stored.is_err();
                let _ = committed_sender.send(stored);
                if failed {
                    state_for_run.in_flight.take(&record.id);
                    return;
                }
                let _ =
                    execute_or_record_panic(state_for_run, plugin, record, run, ticket, cancel, false).await;
            }
            .instrument(span),
        );
        return match committed.await {
            Ok(Ok(())) => Ok((
                StatusCode::ACCEPTED,
                Json(json!({ "run_id": id, "status": "queued" })),
            )
                .into_response()),
            Ok(Err(e)) => {
                tracing::error!(run_id = %id, error = %e, "cannot record a background run, so it is rejected");
                Err(history_unavailable())
            }
            Err(_) => Err(history_unavailable()),
        };
    }

    // A queued waiting run is recorded at once, so it can be read while it
    // waits. A waiting run with a free slot is recorded when it ends, or
    // after RECORD_RUNNING_AFTER if it still runs.
    let record_later = ticket.has_slot();
    if !record_later {
        state.history.queue(record.clone());
    }
    // The run goes on if the client disconnects and this handler is dropped.
    let run = RunToEnd::new(
        execute_or_record_panic(state.clone(), plugin, record, run, ticket, cancel, record_later)
            .instrument(span),
        &state.detached_runs,
    );
    let (record, warning) = match run.await {
        Ok(finished) => finished,
        Err(panic) => {
            return Err(ApiError::internal(
                "the run task failed",
                format!("run {id} panicked: {panic}"),
            ));
        }
    };
    let mut body = run_json(&record);
    if let Some(warning) = warning {
        body["warning"] = json!(warning);
    }
    Ok(Json(body).into_response())
}

/// A future that is polled by the task that awaits it, and that goes on in a
/// task of `tracker` when dropped before it ends, as when the client of a
/// waiting run disconnects. Unlike a spawned task, it costs no hand-over
/// between tasks while the client stays.
struct RunToEnd<F: Future + Send + 'static> {
    future: Option<Pin<Box<F>>>,
    tracker: TaskTracker,
}

impl<F: Future + Send + 'static> RunToEnd<F> {
    fn new(future: F, tracker: &TaskTracker) -> RunToEnd<F> {
        RunToEnd {
            future: Some(Box::pin(future)),
            tracker: tracker.clone(),
        }
    }
}

impl<F: Future + Send + 'static> Future for RunToEnd<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<F::Output> {
        let future = self.future.as_mut().expect("RunToEnd polled after it ended");
        let output = std::task::ready!(future.as_mut().poll(cx));
        self.future = None;
        Poll::Ready(output)
    }
}

impl<F: Future + Send + 'static> Drop for RunToEnd<F> {
    fn drop(&mut self) {
        let Some(future) = self.future.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                self.tracker.spawn_on(
                    async move {
                        future.await;
                    },
                    &runtime,
                );
            }
            // No runtime is left to run it, so the run stops here, and the
            // next start marks it interrupted.
            Err(_) => tracing::warn!("a run stopped without a runtime to finish it"),
        }
    }
}

/// A future that ends with the panic's message instead of unwinding.
struct CatchPanic<F: Future> {
    future: Option<Pin<Box<F>>>,
}

impl<F: Future> Future for CatchPanic<F> {
    type Output = Result<F::Output, String>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        let future = self.future.as_mut().expect("CatchPanic polled after it ended");
        let output = match std::panic::catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(cx))) {
            Ok(Poll::Pending) => return Poll::Pending,
            Ok(Poll::Ready(output)) => Ok(output),
            Err(panic) => Err(panic
                .downcast_ref::<&str>()
                .map(|text| text.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into())),
        };
        // Dropping a panicked run releases its slot.
        self.future = None;
        Poll::Ready(output)
    }
}

/// Awaits `future`; when it panics, awaits `on_panic` with the message and
/// returns the message as the error.
async fn recover<F: Future, R: Future<Output = ()>>(
    future: F,
    on_panic: impl FnOnce(String) -> R,
) -> Result<F::Output, String> {
    let caught = CatchPanic {
        future: Some(Box::pin(future)),
    }
    .await;
    if let Err(panic) = &caught {
        on_panic(panic.clone()).await;
    }
    caught
}

/// Runs [`execute`], and records the run as failed when it panics, whether
/// or not a client still waits for it. Without that record the run would
/// stay `running` until the next start.
async fn execute_or_record_panic(
    state: Arc<AppState>,
    plugin: Arc<LoadedPlugin>,
    record: RunRecord,
    run: RunRequest,
    ticket: Ticket,
    cancel: oneshot::Receiver<()>,
    record_later: bool,
) -> Result<(RunRecord, Option<String>), String> {
    let mut failed = record.clone();
    let running = execute(state.clone(), plugin, record, run, ticket, cancel, record_later);
    recover(running, |panic| async move {
        tracing::error!(run_id = %failed.id, panic = %panic, "a run panicked; recording it as failed");
        state.in_flight.take(&failed.id);
        failed.status = "failed".into();
        failed.finished_at_ms = Some(now_ms());
        failed.error = Some("the server failed while running the task; see its log".into());
        if let Err(e) = state.history.finish(failed.clone()).await {
            tracing::error!(run_id = %failed.id, error = %e, "cannot record a failed run");
        }
    })
    .await
}

/// Waits for a slot, runs the plugin, and records the result. Returns the
/// finished record and, when output was cut, a warning for the caller. With
/// `record_later`, the run is first recorded after [`RECORD_RUNNING_AFTER`],
/// if it is still running then.
async fn execute(
    state: Arc<AppState>,
    plugin: Arc<LoadedPlugin>,
    mut record: RunRecord,
    run: RunRequest,
    ticket: Ticket,
    mut cancel: oneshot::Receiver<()>,
    record_later: bool,
) -> (RunRecord, Option<String>) {
    let started_at_once = ticket.has_slot();
    let slot = tokio::select! {
        slot = ticket.slot() => Some(slot),
        _ = &mut cancel => None,
    };
    let outcome = match slot {
        None => RunOutcome::cancelled_before_start(),
        Some(slot) => {
            if !started_at_once {
                record.started_at_ms = Some(now_ms());
                record.status = "running".into();
                state.history.start(&record.id);
            }
            let cancelled = async move {
                // A dropped sender (the run finished) is not a cancellation.
                if cancel.await.is_err() {
                    std::future::pending::<()>().await;
                }
            };
            let grants = state.grants_for(&record.plugin);
            let running = state.engine.run(&plugin.compiled, run, &grants, cancelled);
            let outcome = if record_later {
                let mut running = std::pin::pin!(running);
                tokio::select! {
                    biased;
                    outcome = &mut running => outcome,
                    () = tokio::time::sleep(RECORD_RUNNING_AFTER) => {
                        state.history.queue(record.clone());
                        running.await
                    }
                }
            } else {
                running.await
            };
            drop(slot);
            outcome
        }
    };
    state.in_flight.take(&record.id);

    for denial in outcome.decisions.iter().filter(|d| !d.allowed) {
        state.audit.record(
            "policy_denial",
            json!({
                "run_id": record.id,
                "plugin": record.plugin,
                "capability": denial.capability,
                "target": denial.target,
                "reason": denial.reason,
            }),
        );
    }

    let warning = (outcome.stdout.truncated || outcome.stderr.truncated).then(|| {
        format!(
            "output truncated: stdout {} bytes, stderr {} bytes written, {} KiB kept per stream (limits.output_kib)",
            outcome.stdout.total,
            outcome.stderr.total,
            state.grants.policy.limits.output_bytes >> 10
        )
    });
    fill_record(&mut record, &outcome);
    tracing::info!(
        run_id = %record.id,
        plugin = %record.plugin,
        status = %record.status,
        duration_ms = record.duration_ms.unwrap_or(0),
        "run finished"
    );
    let warning = match state.history.finish(record.clone()).await {
        Ok(()) => warning,
        Err(e) => {
            tracing::error!(run_id = %record.id, error = %e, "cannot record a finished run");
            let lost = format!(
                "the run finished, but the history could not record it yet ({e}); the server keeps trying"
            );
            Some(match warning {
                Some(warning) => format!("{warning}; {lost}"),
                None => lost,
            })
        }
    };
    (record, warning)
}

/// Returns the error for a run that could not be recorded before it started.
fn history_unavailable() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "history_unavailable",
        "the run history cannot record the run, so it was not started; see the server log and retry",
    )
}

fn fill_record(record: &mut RunRecord, outcome: &RunOutcome) {
    record.status = status_name(outcome.status).into();
    record.finished_at_ms = Some(now_ms());
    record.duration_ms = Some(outcome.duration.as_millis() as i64);
    record.exit_code = outcome.exit_code;
    record.output = outcome.output.clone();
    record.stdout = String::from_utf8_lossy(&outcome.stdout.bytes).into_owned();
    record.stderr = String::from_utf8_lossy(&outcome.stderr.bytes).into_owned();
    record.stdout_truncated = outcome.stdout.truncated;
    record.stderr_truncated = outcome.stderr.truncated;
    record.error = outcome.error.clone();
    record.decisions = serde_json::to_value(&outcome.decisions).unwrap_or(Value::Array(Vec::new()));
}

fn status_name(status: RunStatus) -> &'static str {
    match status {
        RunStatus::Succeeded => "succeeded",
        RunStatus::Failed => "failed",
        RunStatus::TimedOut => "timed_out",
        RunStatus::Cancelled => "cancelled",
    }
}

/// Builds the JSON form of a run record.
fn run_json(record: &RunRecord) -> Value {
    // Output that parses as JSON is returned as JSON, anything else as a string.
    let output = record
        .output
        .as_deref()
        .map(|text| serde_json::from_str::<Value>(text).unwrap_or_else(|_| Value::String(text.to_owned())));
    let input = record
        .input
        .as_deref()
        .map(|text| serde_json::from_str::<Value>(text).unwrap_or(Value::String(text.into())));

    let mut body = json!({
        "run_id": record.id,
        "plugin": record.plugin,
        "sha256": record.sha256,
        "key_id": record.key_id,
        "status": record.status,
        "queued_at_ms": record.queued_at_ms,
        "started_at_ms": record.started_at_ms,
        "finished_at_ms": record.finished_at_ms,
        "duration_ms": record.duration_ms,
        "input": input,
        "output": output,
        "stdout": record.stdout,
        "stderr": record.stderr,
        "stdout_truncated": record.stdout_truncated,
        "stderr_truncated": record.stderr_truncated,
        "decisions": record.decisions,
    });
    if let Some(code) = record.exit_code {
        body["exit_code"] = json!(code);
    }
    if let Some(error) = &record.error {
        body["error"] = json!(error);
    }
    body
}

fn history_error(error: rusqlite::Error) -> ApiError {
    ApiError::internal("cannot read the run history", error)
}

fn page_size(params: &HashMap<String, String>) -> Result<usize, ApiError> {
    match params.get("limit") {
        None => Ok(DEFAULT_PAGE),
        Some(text) => match text.parse::<usize>() {
            Ok(limit) if (1..=MAX_PAGE).contains(&limit) => Ok(limit),
            _ => Err(ApiError::bad_request(
                "invalid_query",
                format!("limit {text:?} must be 1 to {MAX_PAGE}"),
            )),
        },
    }
}

fn check_query_keys(params: &HashMap<String, String>, allowed: &[&str]) -> Result<(), ApiError> {
    match params.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(unknown) => Err(ApiError::bad_request(
            "invalid_query",
            format!("unknown query parameter {unknown:?}; use {}", allowed.join(", ")),
        )),
        None => Ok(()),
    }
}

pub(super) async fn get_run(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    state.history.flush().await;
    let record = state
        .history
        .run(&id)
        .await
        .map_err(history_error)?
        .ok_or_else(|| run_not_found(&id))?;
    Ok(Json(run_json(&record)))
}

fn run_not_found(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "run_not_found",
        format!("run {id:?} not found; list runs with GET /v1/runs"),
    )
}

pub(super) async fn list_runs(
    State(state): State<Arc<AppState>>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    check_query_keys(&params, &["plugin", "status", "limit", "before"])?;
    let limit = page_size(&params)?;
    if let Some(status) = params.get("status")
        && !RUN_STATUSES.contains(&status.as_str())
    {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("status {status:?} is not one of {}", RUN_STATUSES.join(", ")),
        ));
    }
    if let Some(plugin) = params.get("plugin") {
        check_name(plugin)?;
    }
    let query = RunQuery {
        plugin: params.get("plugin").cloned(),
        status: params.get("status").cloned(),
        before: params.get("before").cloned(),
        limit,
    };

    state.history.flush().await;
    let runs = state.history.runs(query).await.map_err(history_error)?;
    // The last id of a full page is the cursor of the next one.
    let next = (runs.len() == limit)
        .then(|| runs.last().map(|r| r.id.clone()))
        .flatten();
    let runs: Vec<Value> = runs
        .iter()
        .map(|r| {
            json!({
                "run_id": r.id,
                "plugin": r.plugin,
                "status": r.status,
                "queued_at_ms": r.queued_at_ms,
                "duration_ms": r.duration_ms,
                "exit_code": r.exit_code,
                "error": r.error.as_deref().map(|e| crate::truncate_text(e, 200)),
            })
        })
        .collect();
    Ok(Json(json!({ "runs": runs, "next_before": next })))
}

pub(super) async fn cancel_run(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    if let Some(cancel) = state.in_flight.take(&id) {
        let _ = cancel.send(());
        tracing::info!(run_id = %id, "run cancelled through the API");
        state
            .audit
            .record("run_cancel", json!({ "run_id": id, "key_id": caller.key.id }));
        return Ok((
            StatusCode::ACCEPTED,
            Json(json!({ "run_id": id, "status": "cancelling" })),
        )
            .into_response());
    }

    state.history.flush().await;
    match state.history.run(&id).await.map_err(history_error)? {
        Some(record) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "run_finished",
            format!("run {id:?} already ended with status {}", record.status),
        )),
        None => Err(run_not_found(&id)),
    }
}

pub(super) async fn list_audit(
    State(state): State<Arc<AppState>>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    check_query_keys(&params, &["since", "kind", "limit"])?;
    let limit = page_size(&params)?;
    if let Some(kind) = params.get("kind")
        && !crate::audit::AUDIT_KINDS.contains(&kind.as_str())
    {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!(
                "kind {kind:?} is not one of {}",
                crate::audit::AUDIT_KINDS.join(", ")
            ),
        ));
    }
    let since = match params.get("since") {
        None => None,
        Some(text) => Some(text.parse::<i64>().map_err(|_| {
            ApiError::bad_request(
                "invalid_query",
                format!("since {text:?} must be Unix time in seconds"),
            )
        })?),
    };

    state.history.flush().await;
    let events = state
        .history
        .audit_events(AuditQuery {
            since,
            kind: params.get("kind").cloned(),
            limit,
        })
        .await
        .map_err(history_error)?;
    Ok(Json(json!({ "events": events })))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use tokio_util::task::TaskTracker;

    use super::{RunToEnd, recover};

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn dropped_run_goes_on_in_tracked_task() {
        let finished = std::sync::Arc::new(AtomicBool::new(false));
        let flag = finished.clone();
        let tracker = TaskTracker::new();
        runtime().block_on(async move {
            let run = RunToEnd::new(
                async move {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    flag.store(true, Ordering::SeqCst);
                },
                &tracker,
            );
            // The caller gives up after the run has started.
            let _ = tokio::time::timeout(Duration::from_millis(10), run).await;
            assert_eq!(tracker.len(), 1, "the run moved to the tracker");
            tracker.close();
            tracker.wait().await;
        });
        assert!(finished.load(Ordering::SeqCst));
    }

    #[test]
    fn panic_in_run_becomes_error() {
        let outcome = runtime().block_on(recover(
            async {
                tokio::task::yield_now().await;
                panic!("broken run");
            },
            |_| async {},
        ));
        let error: Result<(), String> = outcome;
        assert_eq!(error.unwrap_err(), "broken run");
    }

    #[test]
    fn panic_after_client_left_still_handled() {
        let handled = std::sync::Arc::new(std::sync::Mutex::new(None));
        let seen = handled.clone();
        let tracker = TaskTracker::new();
        runtime().block_on(async move {
            let guarded = recover(
                async {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    panic!("broken detached run");
                },
                move |panic| async move {
                    *seen.lock().unwrap() = Some(panic);
                },
            );
            let run = RunToEnd::new(guarded, &tracker);
            let _ = tokio::time::timeout(Duration::from_millis(10), run).await;
            tracker.close();
            tracker.wait().await;
        });
        assert_eq!(handled.lock().unwrap().as_deref(), Some("broken detached run"));
    }
}
