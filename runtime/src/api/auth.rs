//! The authentication layer in front of every `/v1` route.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;

use super::AppState;
use super::error::ApiError;
use crate::auth::{AuthError, HEADER_KEY_ID, HEADER_NONCE, HEADER_SIG, HEADER_TS, SignedRequest};
use crate::keys::{DEFAULT_KEY_ID, Key, Scope, is_valid_key_id};
use crate::policy::ApiPolicy;

/// Maximum length of a request target written to logs and the audit log, in bytes.
const MAX_LOGGED_TARGET: usize = 200;

/// How long a client may take to send a whole request body.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a request waits for room in the body budget before a 503.
const BUDGET_WAIT: Duration = Duration::from_secs(5);

/// Memory for request bodies being read or handled, shared by all requests.
///
/// Bodies must be read before their signature can be checked, so an
/// unauthenticated client can make the server buffer one. The budget bounds
/// the bytes all of them buffer together.
pub struct BodyBudget {
    kib: Arc<Semaphore>,
}

impl BodyBudget {
    /// Creates a budget of `bytes`, rounded up to whole KiB.
    pub fn new(bytes: usize) -> BodyBudget {
        let kib = bytes.div_ceil(1024).min(Semaphore::MAX_PERMITS);
        BodyBudget {
            kib: Arc::new(Semaphore::new(kib)),
        }
    }

    async fn reserve(&self, bytes: usize) -> Option<OwnedSemaphorePermit> {
        let kib = u32::try_from(bytes.div_ceil(1024)).ok()?;
        tokio::time::timeout(BUDGET_WAIT, self.kib.clone().acquire_many_owned(kib))
            .await
            .ok()?
            .ok()
    }
}

/// Verifies the signature of a request before it reaches a handler.
///
/// Headers and the timestamp are checked first, so a request that can never
/// pass costs no body read. The body is then read, within the route's limit
/// and the shared [`BodyBudget`], because its digest is signed; the handler
/// gets the same bytes.
pub async fn authenticate(
    State(state): State<Arc<AppState>>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    request: Request,
    next: Next,
) -> Response {
    // Only the API is signed; any other path is simply not found.
    let path = request.uri().path();
    if path != "/v1" && !path.starts_with("/v1/") {
        return next.run(request).await;
    }

    let (parts, body) = request.into_parts();
    let method = parts.method.as_str().to_owned();
    // The request target as it appeared in the request line; hyper keeps the
    // original bytes of an origin-form target.
    let target = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path().to_owned(), |pq| pq.as_str().to_owned());
    let logged_target = crate::truncate_text(&target, MAX_LOGGED_TARGET);
    let started = std::time::Instant::now();
    let span = tracing::info_span!("request", %method, target = %logged_target, %remote);

    async move {
        // The client address: the TCP peer, or what a trusted proxy reports.
        let client = client_address(&state.grants.policy.api, remote, &parts.headers);

        // Checked before any signature work: the address, then its block.
        if let Some(networks) = &state.grants.policy.api.ip_allow
            && !networks.iter().any(|net| net.contains(client))
        {
            tracing::warn!(%remote, %client, "request from an address outside api.ip_allow");
            state.audit.record(
                "ip_denial",
                serde_json::json!({ "remote": remote.to_string(), "client": client.to_string(), "target": logged_target }),
            );
            return ApiError::new(
                StatusCode::FORBIDDEN,
                "address_not_allowed",
                "this address may not use the API (api.ip_allow)",
            )
            .into_response();
        }
        if let Some(remaining) = state.throttle.blocked(client, std::time::Instant::now()) {
            let seconds = remaining.as_secs().max(1);
            let mut response = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_failures",
                format!("too many failed authentications from this address; retry in {seconds} s"),
            )
            .into_response();
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, seconds.into());
            return response;
        }

        if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
            return ApiError::bad_request(
                "absolute_target",
                "the request target must be a path (origin form), such as /v1/plugins",
            )
            .into_response();
        }

        // The key id as sent, cut short, for logs; never a secret.
        let claimed_key = parts
            .headers
            .get(HEADER_KEY_ID)
            .and_then(|v| v.to_str().ok())
            .map_or(DEFAULT_KEY_ID.to_string(), |v| crate::truncate_text(v, 64));
        let reject = |error: AuthError| {
            tracing::warn!(code = error.code(), %remote, key_id = %claimed_key, "authentication failed: {error}");
            state.audit.record(
                "auth_failure",
                serde_json::json!({
                    "remote": remote.to_string(),
                    "key_id": claimed_key,
                    "check": error.code(),
                    "method": method,
                    "target": logged_target,
                }),
            );
            if state.throttle.fail(client, std::time::Instant::now()) {
                tracing::warn!(%remote, "blocking an address after repeated authentication failures");
                state.audit.record("auth_throttled", serde_json::json!({ "remote": remote.to_string() }));
            }
            ApiError::new(StatusCode::UNAUTHORIZED, error.code(), error.to_string()).into_response()
        };

        let (ts, signature, nonce, key_id) = match headers(&parts.headers) {
            Ok(values) => values,
            Err(error) => return reject(error),
        };
        let now = crate::unix_now();
        if let Err(error) = state.verifier.check_timestamp(ts, now) {
            return reject(error);
        }

        let limit = state.body_limit(&parts.method);
        let (body, _reservation) = match read_body(body, &parts.method, &parts.headers, limit, &state.body_budget).await {
            Ok(read) => read,
            Err(error) => return error.into_response(),
        };

        let signed = SignedRequest {
            ts,
            signature,
            nonce,
            method: &method,
            target: &target,
            body: &body,
            key_id,
        };
        let key = match state.verifier.verify(&signed, now) {
            Ok(key) => key,
            Err(error) => return reject(error),
        };

        if let Err(denial) = check_scope(&key, &parts.method, parts.uri.path()) {
            tracing::warn!(key_id = %key.id, %remote, "request outside the key's scopes: {denial}");
            state.audit.record(
                "scope_denial",
                serde_json::json!({
                    "remote": remote.to_string(),
                    "key_id": key.id,
                    "method": method,
                    "target": logged_target,
                    "reason": denial,
                }),
            );
            return ApiError::new(StatusCode::FORBIDDEN, "forbidden", denial).into_response();
        }

        let mut request = Request::from_parts(parts, Body::from(body));
        let key_id = key.id.clone();
        request.extensions_mut().insert(Caller { key });
        let response = next.run(request).await;
        tracing::info!(
            status = response.status().as_u16(),
            %key_id,
            duration_ms = started.elapsed().as_millis() as u64,
            "request finished"
        );
        response
    }
    .instrument(span)
    .await
}

/// Reads a body of at most `limit` bytes, reserving room for it in `budget`
/// as it arrives.
async fn read_body(
    mut body: Body,
    method: &Method,
    headers: &HeaderMap,
    limit: usize,
    budget: &BodyBudget,
) -> Result<(Bytes, Option<OwnedSemaphorePermit>), ApiError> {
    let too_large = || {
        let (what, key) = if method == Method::PUT {
            ("component", "limits.upload_mib")
        } else {
            ("request body", "limits.input_kib")
        };
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the {what} is larger than the {limit} bytes allowed ({key})"),
        )
    };
    let busy = || {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_busy",
            "too many request bodies in flight; retry shortly",
        )
    };

    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|length| length > limit) {
        return Err(too_large());
    }

    let read = async {
        let mut buffer = BytesMut::new();
        let mut reservation: Option<OwnedSemaphorePermit> = None;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                ApiError::bad_request("invalid_body", format!("cannot read the request body: {e}"))
            })?;
            let Ok(data) = frame.into_data() else { continue };
            if buffer.len() + data.len() > limit {
                return Err(too_large());
            }

            // Reserve whole KiB ahead of the bytes held, so small chunks do
            // not each take a permit.
            let held = reservation.as_ref().map_or(0, |p| p.num_permits() * 1024);
            let needed = buffer.len() + data.len();
            if needed > held {
                let more = budget.reserve(needed - held).await.ok_or_else(busy)?;
                match reservation.as_mut() {
                    Some(permit) => permit.merge(more),
                    None => reservation = Some(more),
                }
            }
            buffer.extend_from_slice(&data);
        }
        Ok((buffer.freeze(), reservation))
    };

    match tokio::time::timeout(BODY_READ_TIMEOUT, read).await {
        Ok(result) => result,
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!(
                "the request body did not arrive within {} s",
                BODY_READ_TIMEOUT.as_secs()
            ),
        )),
    }
}

/// Returns the client's address: the TCP peer's, unless the peer is the
/// trusted proxy, whose header then names the client (its last entry, which
/// the proxy itself added).
fn client_address(api: &ApiPolicy, remote: SocketAddr, headers: &HeaderMap) -> IpAddr {
    let Some(proxy) = &api.trusted_proxy else {
        return remote.ip();
    };
    if !proxy.from.iter().any(|net| net.contains(remote.ip())) {
        return remote.ip();
    }
    headers
        .get_all(proxy.header.as_str())
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .next_back()
        .and_then(|last| last.trim().parse::<IpAddr>().ok())
        .unwrap_or(remote.ip())
}

/// The key that signed a request, for handlers.
#[derive(Clone)]
pub struct Caller {
    /// The verified key.
    pub key: Arc<Key>,
}

/// Checks that `key` may make a request of `method` to `path`.
///
/// Uploading, deleting and reloading keys need `admin`. Running and
/// cancelling need `run`, and a run also needs a plugin the key may run.
/// Everything else needs `read`.
fn check_scope(key: &Key, method: &Method, path: &str) -> Result<(), String> {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (scope, plugin) = match (method, segments.as_slice()) {
        (_, ["v1", "keys", ..]) => (Scope::Admin, None),
        (&Method::PUT | &Method::DELETE, ["v1", "plugins", ..]) => (Scope::Admin, None),
        (&Method::POST, ["v1", "plugins", name, "run"]) => (Scope::Run, Some(*name)),
        (&Method::POST, ["v1", "runs", _, "cancel"]) => (Scope::Run, None),
        (&Method::GET | &Method::HEAD, _) => (Scope::Read, None),
        _ => (Scope::Admin, None),
    };

    if !key.allows(scope) {
        return Err(format!(
            "key {:?} lacks the {scope} scope this request needs",
            key.id
        ));
    }
    if let Some(plugin) = plugin
        && !key.may_run(plugin)
    {
        return Err(format!("key {:?} may not run plugin {plugin:?}", key.id));
    }
    Ok(())
}

/// Extracts `X-TS`, `X-SIG`, the optional `X-Nonce` and the optional
/// `X-Key-Id`, each at most once.
fn headers(headers: &HeaderMap) -> Result<(&str, &str, &str, &str), AuthError> {
    let ts = single(headers, HEADER_TS, "X-TS")?.ok_or(AuthError::MissingHeader("X-TS"))?;
    let signature = single(headers, HEADER_SIG, "X-SIG")?.ok_or(AuthError::MissingHeader("X-SIG"))?;

    // A value that is not visible ASCII cannot be one the client signed.
    let ts = ts.to_str().map_err(|_| AuthError::InvalidTimestamp)?;
    let signature = signature.to_str().map_err(|_| AuthError::InvalidSignature)?;
    let nonce = match single(headers, HEADER_NONCE, "X-Nonce")? {
        Some(value) => value.to_str().map_err(|_| AuthError::InvalidNonce)?,
        None => "",
    };
    let key_id = match single(headers, HEADER_KEY_ID, "X-Key-Id")? {
        Some(value) => value
            .to_str()
            .ok()
            .filter(|id| is_valid_key_id(id))
            .ok_or(AuthError::InvalidKeyId)?,
        None => DEFAULT_KEY_ID,
    };
    Ok((ts, signature, nonce, key_id))
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

impl AppState {
    /// Largest body the route of `method` accepts: uploads use `PUT`.
    fn body_limit(&self, method: &Method) -> usize {
        if method == Method::PUT {
            self.grants.policy.limits.upload_bytes
        } else {
            self.grants.policy.limits.input_bytes
        }
    }
}
