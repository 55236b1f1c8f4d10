//! The HTTP API: routes, shared state and JSON bodies.
//!
//! `GET /healthz` is open; every other route requires a signed request (see
//! [`crate::auth`]).

mod auth;
mod error;
mod runs;
mod slots;
mod throttle;

pub use self::auth::{BodyBudget, Caller};
pub use self::runs::InFlight;
pub use self::slots::RunSlots;
pub use self::throttle::Throttle;
use std::sync::Arc;

use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use bytes::Bytes;
use serde_json::{Value, json};

pub use self::error::ApiError;
use crate::audit::AuditLog;
use crate::auth::Verifier;
use crate::engine::Engine;
use crate::grants::Grants;
use crate::history::History;
use crate::keys::{KeyError, KeySource};
use crate::registry::{Registry, UploadError};
use crate::store::is_valid_name;

/// Everything a request handler needs.
pub struct AppState {
    /// The engine that runs plugins.
    pub engine: Arc<Engine>,
    /// The global policy and the capabilities built from it; plugins without
    /// a section of their own run under these.
    pub grants: Arc<Grants>,
    /// Grants of plugins with a section in the policy or an injection.
    pub plugin_grants: std::collections::HashMap<String, Arc<Grants>>,
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
    /// Run history and audit storage.
    pub history: Arc<History>,
    /// Runs queued or running now, for cancellation.
    pub in_flight: InFlight,
    /// Source of the key ring, for reloads.
    pub key_source: KeySource,
    /// Failed authentications per address.
    pub throttle: Throttle,
    /// Runs that go on without a client: background runs, and waiting runs
    /// whose client disconnected. A server stop waits for them.
    pub detached_runs: tokio_util::task::TaskTracker,
}

impl AppState {
    /// Returns the grants `plugin` runs under.
    pub fn grants_for(&self, plugin: &str) -> Arc<Grants> {
        self.plugin_grants
            .get(plugin)
            .cloned()
            .unwrap_or_else(|| self.grants.clone())
    }

    /// Reloads the key ring from its source. A ring that fails to load
    /// leaves the current one in place.
    ///
    /// # Errors
    ///
    /// Returns why the keys could not be loaded.
    pub fn reload_keys(&self) -> Result<Vec<String>, KeyError> {
        match self.key_source.load() {
            Ok(ring) => {
                let ids: Vec<String> = ring.ids().iter().map(|id| id.to_string()).collect();
                tracing::info!(keys = ?ids, "reloaded the keys");
                self.audit
                    .record("keys_load", json!({ "keys": ids, "sha256": ring.file_sha256 }));
                self.verifier.replace_ring(ring);
                Ok(ids)
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot reload the keys; the previous keys stay in force");
                self.audit
                    .record("keys_load_failed", json!({ "error": e.to_string() }));
                Err(e)
            }
        }
    }
}

async fn reload_keys(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Value>, ApiError> {
    tracing::info!(key_id = %caller.key.id, "key reload requested");
    let ids = state.reload_keys().map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_keys",
            format!("{e}; the previous keys stay in force"),
        )
    })?;
    Ok(Json(json!({ "keys": ids })))
}

/// Builds the router.
pub fn router(state: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route("/v1/plugins", get(list_plugins))
        .route(
            "/v1/plugins/{name}",
            put(upload_plugin).get(show_plugin).delete(delete_plugin),
        )
        .route("/v1/plugins/{name}/run", post(runs::run_plugin))
        .route("/v1/runs", get(runs::list_runs))
        .route("/v1/runs/{id}", get(runs::get_run))
        .route("/v1/runs/{id}/cancel", post(runs::cancel_run))
        .route("/v1/audit", get(runs::list_audit))
        .route("/v1/keys/reload", post(reload_keys))
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

pub(crate) fn check_name(name: &str) -> Result<(), ApiError> {
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
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    check_name(&name)?;

    let record = match state.registry.upload(&name, body.clone()).await {
        Ok(record) => record,
        Err(UploadError::Compile(e)) => {
            tracing::warn!(plugin = %name, error = %e, "rejected upload");
            // Over a limit the component may be fine, and the limit too low.
            let code = match e {
                crate::engine::CompileError::Limit(_) => "compile_limit",
                _ => "invalid_component",
            };
            let reason = e.to_string();
            state.audit.record(
                "plugin_upload_rejected",
                json!({
                    "plugin": name,
                    "sha256": crate::auth::sha256_hex(&body),
                    "size": body.len(),
                    "code": code,
                    "reason": crate::truncate_text(&reason, 300),
                    "key_id": caller.key.id,
                }),
            );
            return Err(ApiError::bad_request(code, reason));
        }
        Err(UploadError::Host(e)) => return Err(ApiError::internal("cannot compile or store the plugin", e)),
    };

    tracing::info!(plugin = %name, sha256 = %record.sha256, size = record.size, "uploaded plugin");
    state.audit.record(
        "plugin_upload",
        json!({ "plugin": name, "sha256": record.sha256, "size": record.size, "key_id": caller.key.id }),
    );
    Ok((StatusCode::CREATED, Json(json!(record))).into_response())
}

async fn delete_plugin(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    check_name(&name)?;
    let removed = state
        .registry
        .delete(&name)
        .await
        .map_err(|e| ApiError::internal("cannot delete the plugin", e))?
        .ok_or_else(|| ApiError::no_plugin_to_delete(&name))?;

    tracing::info!(plugin = %name, "deleted plugin");
    state.audit.record(
        "plugin_delete",
        json!({ "plugin": name, "sha256": removed.sha256, "key_id": caller.key.id }),
    );
    Ok(Json(json!({ "deleted": name, "sha256": removed.sha256 })))
}
