//! The authentication layer in front of every `/v1` route.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tracing::Instrument;

use super::AppState;
use super::error::ApiError;
use crate::auth::{AuthError, HEADER_NONCE, HEADER_SIG, HEADER_TS, SignedRequest};

/// Verifies the signature of a request before it reaches a handler.
///
/// The body is read here, up to the largest body any route accepts, because
/// its digest is signed; the handler then gets the same bytes.
pub async fn authenticate(
    State(state): State<Arc<AppState>>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    request: Request,
    next: Next,
) -> Response {
    let (parts, body) = request.into_parts();
    let method = parts.method.as_str().to_owned();
    // The request target as it appeared in the request line; hyper keeps the
    // original bytes of an origin-form target.
    let target = parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str().to_owned())
        .unwrap_or_else(|| parts.uri.path().to_owned());
    let span = tracing::info_span!("request", %method, %target, %remote);

    async move {
        let body = match axum::body::to_bytes(body, state.max_body_bytes()).await {
            Ok(body) => body,
            Err(_) => {
                return ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    format!(
                        "request body is larger than {} bytes (limits.upload_mib and limits.input_kib)",
                        state.max_body_bytes()
                    ),
                )
                .into_response();
            }
        };

        let checked = headers(&parts.headers).and_then(|(ts, signature, nonce)| {
            let signed = SignedRequest { ts, signature, nonce, method: &method, target: &target, body: &body };
            state.verifier.verify(&signed, crate::unix_now())
        });
        if let Err(error) = checked {
            tracing::warn!(code = error.code(), %remote, "authentication failed: {error}");
            state.audit.record(
                "auth_failure",
                serde_json::json!({
                    "remote": remote.to_string(),
                    "check": error.code(),
                    "method": method,
                    "target": target,
                }),
            );
            return ApiError::new(StatusCode::UNAUTHORIZED, error.code(), error.to_string()).into_response();
        }

        let request = Request::from_parts(parts, Body::from(body));
        next.run(request).await
    }
    .instrument(span)
    .await
}

/// Extracts `X-TS`, `X-SIG` and the optional `X-Nonce`, each at most once.
fn headers(headers: &HeaderMap) -> Result<(&str, &str, &str), AuthError> {
    let ts = single(headers, HEADER_TS, "X-TS")?.ok_or(AuthError::MissingHeader("X-TS"))?;
    let signature =
        single(headers, HEADER_SIG, "X-SIG")?.ok_or(AuthError::MissingHeader("X-SIG"))?;

    // A value that is not visible ASCII cannot be one the client signed.
    let ts = ts.to_str().map_err(|_| AuthError::InvalidTimestamp)?;
    let signature = signature.to_str().map_err(|_| AuthError::BadSignature)?;
    let nonce = match single(headers, HEADER_NONCE, "X-Nonce")? {
        Some(value) => value.to_str().map_err(|_| AuthError::InvalidNonce)?,
        None => "",
    };
    Ok((ts, signature, nonce))
}

fn single<'a>(
    headers: &'a HeaderMap,
    name: &str,
    display: &'static str,
) -> Result<Option<&'a axum::http::HeaderValue>, AuthError> {
    let mut values = headers.get_all(name).iter();
    let first = values.next();
    if values.next().is_some() {
        return Err(AuthError::RepeatedHeader(display));
    }
    Ok(first)
}
