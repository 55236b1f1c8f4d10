//! API errors: an HTTP status, a stable code and a message, sent as JSON.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// An error response: `{"error": {"code": CODE, "message": MESSAGE}}`.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code.
    pub code: &'static str,
    /// Human-readable message, including what to do next.
    pub message: String,
}

impl ApiError {
    /// Creates an error response.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    /// 400 with `code`.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 404 for a plugin that does not exist.
    pub fn plugin_not_found(name: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "plugin_not_found",
            format!("plugin {name:?} not found; upload it with PUT /v1/plugins/{name}"),
        )
    }

    /// 404 for deleting a plugin that is not there.
    pub fn no_plugin_to_delete(name: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "plugin_not_found",
            format!(
                "plugin {name:?} not found, so there is nothing to delete; GET /v1/plugins lists the plugins"
            ),
        )
    }

    /// 500 for a host failure; the detail goes to the log, not to the client.
    pub fn internal(context: &str, error: impl std::fmt::Display) -> ApiError {
        tracing::error!(error = %error, "{context}");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            format!("{context}; the server log has the details"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": { "code": self.code, "message": self.message } });
        (self.status, Json(body)).into_response()
    }
}
