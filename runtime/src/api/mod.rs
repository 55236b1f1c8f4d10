//! The HTTP API: routes, shared state and JSON bodies.
//!
//! `GET /healthz` is open; every other route requires a signed request (see
//! [`crate::auth`]).

mod auth;
mod error;
mod slots;

pub use self::auth::BodyBudget;
pub use self::slots::RunSlots;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};

pub use self::error::ApiError;
use crate::audit::AuditLog;
use crate::auth::Verifier;
use crate::engine::{Captured, Engine, PluginKind, RunOutcome, RunRequest};
use crate::grants::Grants;
use crate::registry::{Registry, UploadError};
use crate::store::is_valid_name;

/// Everything a request handler needs.
pub struct AppState {
    /// The engine that runs plugins.
    pub engine: Arc<Engine>,
    /// The policy every run is confined by, and the capabilities built from it.
    pub grants: Grants,
    /// The plugins.
    pub registry: Registry,
    /// Request signature checks.
    pub verifier: Verifier,
    /// The audit log.
    pub audit: AuditLog,
    /// Memory for request bodies, shared by all requests.
    pub body_budget: BodyBudget,
    /// Run slots and the queue in front of them.
    pub run_slots: RunSlots,
}

/// Builds the router.
pub fn router(state: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route("/v1/plugins", get(list_plugins))
        .route(
            "/v1/plugins/{name}",
            put(upload_plugin).get(show_plugin).delete(delete_plugin),
        )
        .route("/v1/plugins/{name}/run", post(run_plugin))
        .fallback(route_not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ))
        // The authentication layer enforces each route's body limit.
        .layer(axum::extract::DefaultBodyLimit::disable());

    Router::new()
        .route("/healthz", get(healthz))
        .merge(v1)
        .with_state(state)
}

async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not accept that method; see the README for the API",
    )
}

async fn route_not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "route_not_found",
        "no such route; see the README for the API",
    )
}

fn check_name(name: &str) -> Result<(), ApiError> {
    if is_valid_name(name) {
        return Ok(());
    }
    Err(ApiError::bad_request(
        "invalid_name",
        format!(
            "invalid plugin name {name:?}: use 1 to 63 characters from a-z, 0-9, `_` and `-`, starting with a letter or digit"
        ),
    ))
}

async fn list_plugins(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({ "plugins": state.registry.records() }))
}

async fn show_plugin(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    check_name(&name)?;
    let plugin = state
        .registry
        .get(&name)
        .ok_or_else(|| ApiError::plugin_not_found(&name))?;
    Ok(Json(json!(plugin.record)))
}

async fn upload_plugin(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    check_name(&name)?;
    let limit = state.grants.policy.limits.upload_bytes;
    if body.len() > limit {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "upload_too_large",
            format!(
                "component is {} bytes, more than the {} MiB allowed (limits.upload_mib)",
                body.len(),
                limit >> 20
            ),
        ));
    }

    let record = match state.registry.upload(&name, body).await {
        Ok(record) => record,
        Err(UploadError::Compile(e)) => {
            tracing::warn!(plugin = %name, error = %e, "rejected upload");
            return Err(ApiError::bad_request("invalid_component", e.to_string()));
        }
        Err(UploadError::Host(e)) => return Err(ApiError::internal("cannot store the plugin", e)),
    };

    tracing::info!(plugin = %name, sha256 = %record.sha256, size = record.size, "uploaded plugin");
    state.audit.record(
        "plugin_upload",
        json!({ "plugin": name, "sha256": record.sha256, "size": record.size }),
    );
    Ok((StatusCode::CREATED, Json(json!(record))).into_response())
}

async fn delete_plugin(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    check_name(&name)?;
    let removed = state
        .registry
        .delete(&name)
        .await
        .map_err(|e| ApiError::internal("cannot delete the plugin", e))?
        .ok_or_else(|| ApiError::plugin_not_found(&name))?;

    tracing::info!(plugin = %name, "deleted plugin");
    state.audit.record(
        "plugin_delete",
        json!({ "plugin": name, "sha256": removed.sha256 }),
    );
    Ok(Json(json!({ "deleted": name, "sha256": removed.sha256 })))
}

/// Longest run error written to the audit log, in bytes.
const MAX_AUDITED_ERROR: usize = 1024;

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
}

async fn run_plugin(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    check_name(&name)?;
    let limit = state.grants.policy.limits.input_bytes;
    if body.len() > limit {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "input_too_large",
            format!(
                "run request is {} bytes, more than the {} KiB allowed (limits.input_kib)",
                body.len(),
                limit >> 10
            ),
        ));
    }
    let request: RunBody = if body.iter().all(u8::is_ascii_whitespace) {
        RunBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request(
                "invalid_json",
                format!("invalid run request: {e}; expected {{\"input\": <any JSON>, \"args\": [strings]}}"),
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

    let run = RunRequest {
        plugin: name.clone(),
        input: request.input.as_ref().map(Value::to_string),
        args: request.args,
    };
    let Some(_slot) = state.run_slots.acquire().await else {
        tracing::warn!(plugin = %name, "run queue full; rejecting the run");
        let mut response = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "queue_full",
            "every run slot is busy and the queue is full (limits.max_concurrent_runs, limits.max_queued_runs); retry later",
        )
        .into_response();
        response
            .headers_mut()
            .insert(axum::http::header::RETRY_AFTER, slots::RETRY_AFTER_SECONDS.into());
        return Ok(response);
    };
    let outcome = state.engine.run(&plugin.compiled, run, &state.grants).await;
    for denial in outcome.decisions.iter().filter(|d| !d.allowed) {
        state.audit.record(
            "policy_denial",
            json!({ "plugin": name, "capability": denial.capability, "target": denial.target, "reason": denial.reason }),
        );
    }

    tracing::info!(
        plugin = %name,
        status = ?outcome.status,
        duration_ms = outcome.duration.as_millis() as u64,
        "run finished"
    );
    state.audit.record(
        "run",
        json!({
            "plugin": name,
            "sha256": plugin.record.sha256,
            "status": outcome.status,
            "error": outcome.error.as_deref().map(|e| crate::truncate_text(e, MAX_AUDITED_ERROR)),
        }),
    );
    Ok(Json(run_response(
        &name,
        &outcome,
        state.grants.policy.limits.output_bytes,
    ))
    .into_response())
}

/// Builds the JSON result of a run.
fn run_response(plugin: &str, outcome: &RunOutcome, output_limit: usize) -> Value {
    // Output that parses as JSON is returned as JSON, anything else as a string.
    let output = outcome
        .output
        .as_deref()
        .map(|text| serde_json::from_str::<Value>(text).unwrap_or_else(|_| Value::String(text.to_owned())));

    let mut body = json!({
        "plugin": plugin,
        "status": outcome.status,
        "output": output,
        "stdout": lossy(&outcome.stdout),
        "stderr": lossy(&outcome.stderr),
        "stdout_truncated": outcome.stdout.truncated,
        "stderr_truncated": outcome.stderr.truncated,
        "duration_ms": outcome.duration.as_millis() as u64,
        "decisions": outcome.decisions,
    });
    if let Some(code) = outcome.exit_code {
        body["exit_code"] = json!(code);
    }
    if let Some(error) = &outcome.error {
        body["error"] = json!(error);
    }
    if outcome.stdout.truncated || outcome.stderr.truncated {
        body["warning"] = json!(format!(
            "output truncated: stdout {} bytes, stderr {} bytes written, {} KiB kept per stream (limits.output_kib)",
            outcome.stdout.total,
            outcome.stderr.total,
            output_limit >> 10
        ));
    }
    body
}

fn lossy(captured: &Captured) -> String {
    String::from_utf8_lossy(&captured.bytes).into_owned()
}
