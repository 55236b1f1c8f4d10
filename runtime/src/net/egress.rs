//! Sending a task's outgoing HTTP requests under the policy.
//!
//! wasmtime-wasi-http's default sender resolves and connects in one step, so
//! the host could not see which address it connects to. Apex sends requests
//! itself. It checks the scheme, authority, host and port against the rules,
//! then resolves the name (`network.resolve` first, then DNS) and checks
//! every address. It connects only to a checked address and speaks HTTP/1.1
//! with hyper, over TLS from rustls when the scheme is `https`.

use std::collections::HashMap;
use std::future::{Future, poll_fn};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::uri::Scheme;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use wasmtime_wasi_http::io::TokioIo;
use wasmtime_wasi_http::{Error as HttpError, RequestOptions, WasiBody, WasiHttpHooks};

use super::rules::{HostRule, RequestHost, classify_host, non_public_reason};
use crate::decision::{Decision, Decisions};
use crate::policy::Injection;

/// Errors in the `network` section of the policy, reported at startup.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    /// `network.ca_file` is unusable.
    #[error("network.ca_file {path}: {message}")]
    CaFile {
        /// The file.
        path: String,
        /// The problem.
        message: String,
    },
    /// rustls rejected the TLS configuration.
    #[error("cannot configure TLS: {0}")]
    Tls(String),
}

/// The outgoing-HTTP half of a policy, built once at startup.
pub struct Egress {
    rules: Vec<HostRule>,
    injections: Vec<Injection>,
    allow_private_addresses: bool,
    resolve: HashMap<String, IpAddr>,
    tls: tokio_rustls::TlsConnector,
    timeout: Duration,
    max_response_bytes: u64,
}

/// Settings an [`Egress`] is built from.
pub struct EgressConfig<'a> {
    /// Parsed `network.http_allow_domains`.
    pub rules: Vec<HostRule>,
    /// Headers to add to requests to given hosts.
    pub injections: Vec<Injection>,
    /// `network.allow_private_addresses`.
    pub allow_private_addresses: bool,
    /// `network.resolve`, with normalised names.
    pub resolve: HashMap<String, IpAddr>,
    /// `network.ca_file`: extra trusted roots, PEM.
    pub ca_file: Option<&'a Path>,
    /// `timeouts.http_seconds`.
    pub timeout: Duration,
    /// `limits.response_mib`, in bytes.
    pub max_response_bytes: u64,
}

impl Egress {
    /// Builds the sender: loads the system trust roots and the optional CA file.
    ///
    /// # Errors
    ///
    /// Fails when the CA file cannot be read or contains no certificate.
    pub fn new(config: EgressConfig<'_>) -> Result<Egress, EgressError> {
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for error in &native.errors {
            tracing::warn!(error = %error, "cannot load a system trust root");
        }
        roots.add_parsable_certificates(native.certs);

        if let Some(path) = config.ca_file {
            let ca_error = |message: String| EgressError::CaFile {
                path: path.display().to_string(),
                message,
            };
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .map_err(|e| ca_error(e.to_string()))?
                .collect::<Result<_, _>>()
                .map_err(|e| ca_error(e.to_string()))?;
            if certs.is_empty() {
                return Err(ca_error("no PEM certificate found".into()));
            }
            for cert in certs {
                roots.add(cert).map_err(|e| ca_error(e.to_string()))?;
            }
        }

        // `ring` builds without cmake or a C toolchain beyond the system compiler.
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| EgressError::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];

        Ok(Egress {
            rules: config.rules,
            injections: config.injections,
            allow_private_addresses: config.allow_private_addresses,
            resolve: config.resolve,
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
            timeout: config.timeout,
            max_response_bytes: config.max_response_bytes,
        })
    }

    /// Creates the `wasi:http` hooks of one run.
    pub fn hooks(self: &Arc<Self>, plugin: &str, decisions: Decisions) -> HttpHooks {
        HttpHooks {
            egress: self.clone(),
            plugin: plugin.to_owned(),
            decisions,
        }
    }

    /// Checks the request against the rules, without touching the network.
    fn check(&self, uri: &http::Uri) -> Result<Destination, Denial> {
        let scheme = uri.scheme().cloned();
        let tls = match &scheme {
            Some(s) if *s == Scheme::HTTPS => true,
            Some(s) if *s == Scheme::HTTP => false,
            Some(other) => {
                return Err(Denial::new(
                    uri,
                    format!("scheme {other:?} is not allowed; use http or https"),
                ));
            }
            None => return Err(Denial::new(uri, "the request has no scheme")),
        };
        let authority = uri
            .authority()
            .ok_or_else(|| Denial::new(uri, "the request has no host"))?;
        if authority.as_str().contains('@') {
            return Err(Denial::new(
                uri,
                "user information in the URL authority (user@host) is not allowed",
            ));
        }

        let host = classify_host(authority.host()).map_err(|reason| Denial::new(uri, reason))?;
        let default_port = if tls { 443 } else { 80 };
        let port = authority.port_u16().unwrap_or(default_port);
        if !self
            .rules
            .iter()
            .any(|rule| rule.allows(&host, port, default_port))
        {
            let below = self.rules.iter().find_map(|rule| {
                let suffix = rule.foreign_suffix(&host)?;
                Some(format!(
                    "{host} is under the public suffix {suffix}, so {rule} does not match it: names there belong to other owners"
                ))
            });
            return Err(Denial::new(
                uri,
                below.unwrap_or_else(|| format!("{host}:{port} is not in network.http_allow_domains")),
            ));
        }
        Ok(Destination { host, port, tls })
    }

    /// Resolves a checked destination to the addresses it may connect to.
    async fn addresses(
        &self,
        destination: &Destination,
        uri: &http::Uri,
    ) -> Result<Vec<SocketAddr>, SendError> {
        let port = destination.port;
        let name = match &destination.host {
            // A literal the operator listed is allowed even when private.
            RequestHost::Ip(ip) => return Ok(vec![SocketAddr::new(*ip, port)]),
            RequestHost::Name(name) => name,
        };

        let candidates: Vec<SocketAddr> = match self.resolve.get(name) {
            Some(ip) => vec![SocketAddr::new(*ip, port)],
            None => {
                let lookup = tokio::net::lookup_host((name.as_str(), port));
                match tokio::time::timeout(self.timeout, lookup).await {
                    Ok(Ok(addresses)) => addresses.collect(),
                    Ok(Err(e)) => {
                        return Err(SendError::Http(HttpError::DnsError {
                            rcode: Some(e.to_string()),
                            info_code: None,
                        }));
                    }
                    Err(_) => return Err(SendError::Http(HttpError::DnsTimeout)),
                }
            }
        };

        if self.allow_private_addresses {
            return Ok(candidates);
        }
        let mut checked = Vec::new();
        let mut rejected = Vec::new();
        for address in candidates {
            match non_public_reason(address.ip()) {
                None => checked.push(address),
                Some(reason) => rejected.push(format!("{} ({reason})", address.ip())),
            }
        }
        if checked.is_empty() {
            return Err(SendError::Denied(Denial::new(
                uri,
                format!(
                    "{name} resolves to {}, which is not a public address; set network.allow_private_addresses to allow it",
                    rejected.join(", ")
                ),
            )));
        }
        Ok(checked)
    }

    async fn send(
        &self,
        mut request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        decisions: &Decisions,
        plugin: &str,
    ) -> Result<
        (
            http::Response<WasiBody>,
            Box<dyn Future<Output = Result<(), HttpError>> + Send>,
        ),
        HttpError,
    > {
        let uri = request.uri().clone();

        // A task may shorten the deadlines, never extend them.
        let limit = |requested: Option<Duration>| requested.map_or(self.timeout, |d| d.min(self.timeout));
        let connect_timeout = limit(options.and_then(|o| o.connect_timeout));
        let first_byte_timeout = limit(options.and_then(|o| o.first_byte_timeout));
        let between_bytes_timeout =
            limit(options.and_then(|o| o.between_bytes_timeout)).max(Duration::from_millis(1));

        let opened = self
            .open_connection(&uri, connect_timeout, Requester::Task, decisions, plugin)
            .await;
        let (stream, destination) = match opened {
            Ok(opened) => opened,
            Err(Refusal::Denied(_)) => return Err(HttpError::HttpRequestDenied),
            Err(Refusal::Failed(error, _)) => return Err(error),
        };

        let stream: Box<dyn Stream> = if destination.tls {
            let server_name = match &destination.host {
                RequestHost::Name(name) => {
                    ServerName::try_from(name.clone()).map_err(|_| HttpError::HttpRequestUriInvalid)?
                }
                RequestHost::Ip(ip) => ServerName::from(*ip),
            };
            let handshake = self.tls.connect(server_name, stream);
            match tokio::time::timeout(connect_timeout, handshake).await {
                Ok(Ok(stream)) => Box::new(stream),
                Ok(Err(e)) => {
                    tracing::info!(plugin, target = %target_of(&uri), error = %e, "TLS handshake failed");
                    return Err(tls_error(e));
                }
                Err(_) => return Err(HttpError::ConnectionTimeout),
            }
        } else {
            Box::new(stream)
        };

        let handshake = hyper::client::conn::http1::Builder::new().handshake(TokioIo::new(stream));
        let (mut sender, connection) = tokio::time::timeout(connect_timeout, handshake)
            .await
            .map_err(|_| HttpError::ConnectionTimeout)??;

        // Secrets go in only now, after every check, to the host they are for;
        // they replace any header of that name the task set. Over plain HTTP
        // anyone on the path could read them, so only with `plain_http` set.
        if let RequestHost::Name(name) = &destination.host {
            let default_port = if destination.tls { 443 } else { 80 };
            for injection in &self.injections {
                if &injection.host != name || injection.port.unwrap_or(default_port) != destination.port {
                    continue;
                }
                if !destination.tls && !injection.plain_http {
                    let recorded = decisions.push(Decision {
                        capability: "inject",
                        target: format!("{} on http://{name}:{}", injection.header, destination.port),
                        allowed: false,
                        reason: "not sent over plain http; set plain_http: true on the inject entry \
                                 to send it in clear text"
                            .into(),
                        exit_code: None,
                        duration_ms: None,
                    });
                    if recorded {
                        tracing::warn!(
                            plugin,
                            host = %name,
                            header = %injection.header,
                            "an inject header was not added to a plain http request; \
                             set plain_http: true on the entry to send it in clear text"
                        );
                    }
                    continue;
                }
                let (Ok(header), Ok(value)) = (
                    http::HeaderName::from_bytes(injection.header.as_bytes()),
                    http::HeaderValue::from_str(&injection.value),
                ) else {
                    continue;
                };
                request.headers_mut().insert(header, value);
            }
        }

        // Only the path and query go on the request line; the authority is in `Host`.
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        *request.uri_mut() = http::Uri::builder()
            .path_and_query(path)
            .build()
            .map_err(|_| HttpError::HttpRequestUriInvalid)?;

        let sent_empty = sent_without_body(&request);
        let request = request.map(|body| RequestBody::new(body, sent_empty));
        let max_bytes = self.max_response_bytes;
        let response =
            async move {
                let response = tokio::time::timeout(first_byte_timeout, sender.send_request(request))
                    .await
                    .map_err(|_| HttpError::ConnectionReadTimeout)??;
                Ok::<_, HttpError>(response.map(|incoming| {
                    LimitedBody::new(incoming, between_bytes_timeout, max_bytes).boxed_unsync()
                }))
            };

        // Drive the connection while waiting for the response head.
        let mut response = pin!(response);
        let mut connection = Some(connection);
        let response = poll_fn(|cx| match response.as_mut().poll(cx) {
            Poll::Ready(result) => Poll::Ready(result),
            Poll::Pending => {
                let Some(driver) = connection.as_mut() else {
                    return Poll::Pending;
                };
                let finished = ready!(Pin::new(driver).poll(cx));
                connection = None;
                match finished {
                    Ok(()) => response.as_mut().poll(cx),
                    Err(e) => Poll::Ready(Err(HttpError::from(e))),
                }
            }
        })
        .await?;

        let io = async move {
            match connection {
                Some(driver) => driver.await.map_err(HttpError::from),
                None => Ok(()),
            }
        };
        Ok((response, Box::new(io)))
    }
}

/// The sender of a request, which the decisions of the run name.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Requester {
    /// The task, through `wasi:http`.
    Task,
    /// A shell child, through its proxy.
    ShellChild,
}

/// The reason no connection was opened, already recorded in the run.
pub(crate) enum Refusal {
    /// The policy denies the destination, for the reason given.
    Denied(String),
    /// The destination is allowed, but resolving or connecting failed.
    Failed(HttpError, String),
}

impl Egress {
    /// Checks `uri` (its scheme, host and port) against the allowed hosts,
    /// `network.resolve` and the private-address rule, then connects.
    /// Records the outcome in the run's decisions and logs a denial.
    async fn open_connection(
        &self,
        uri: &http::Uri,
        connect_timeout: Duration,
        requester: Requester,
        decisions: &Decisions,
        plugin: &str,
    ) -> Result<(TcpStream, Destination), Refusal> {
        let via_proxy = requester == Requester::ShellChild;
        let record = |target: String, allowed: bool, reason: String| {
            decisions.push(Decision {
                capability: "http",
                target,
                allowed,
                reason,
                exit_code: None,
                duration_ms: None,
            })
        };
        let denied = |denial: Denial| {
            let reason = if via_proxy {
                format!("{} (from a shell child, through the proxy)", denial.reason)
            } else {
                denial.reason.clone()
            };
            if record(denial.target.clone(), false, reason.clone()) {
                tracing::warn!(plugin, target = %denial.target, reason = %denial.reason, "outgoing request denied");
            }
            Refusal::Denied(reason)
        };
        let failed = |error: HttpError, what: &str| {
            let reason = format!("allowed, but {what} failed: {error:?}");
            record(target_of(uri), true, reason.clone());
            Refusal::Failed(error, reason)
        };

        let destination = self.check(uri).map_err(denied)?;
        let addresses = match self.addresses(&destination, uri).await {
            Ok(addresses) => addresses,
            Err(SendError::Denied(denial)) => return Err(denied(denial)),
            Err(SendError::Http(error)) => return Err(failed(error, "name resolution")),
        };
        let (stream, address) = match connect(&addresses, connect_timeout).await {
            Ok(connected) => connected,
            Err(error) => return Err(failed(error, "connecting")),
        };
        let reason = if via_proxy {
            format!("connected to {address} for a shell child, through the proxy")
        } else {
            format!("connected to {address}")
        };
        record(target_of(uri), true, reason);
        Ok((stream, destination))
    }

    /// Connects to the destination of a request that a shell child sent
    /// through its proxy, after the checks a task's request gets.
    pub(crate) async fn connect_for_proxy(
        &self,
        uri: &http::Uri,
        decisions: &Decisions,
        plugin: &str,
    ) -> Result<TcpStream, Refusal> {
        let opened = self
            .open_connection(uri, self.timeout, Requester::ShellChild, decisions, plugin)
            .await;
        opened.map(|(stream, _)| stream)
    }

    /// Returns `timeouts.http_seconds`.
    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }
}

/// The `wasi:http` hooks of one run.
pub struct HttpHooks {
    egress: Arc<Egress>,
    plugin: String,
    decisions: Decisions,
}

impl WasiHttpHooks for HttpHooks {
    fn is_supported_scheme(&mut self, _scheme: &Scheme) -> bool {
        // Every scheme passes the protocol layer, so that the policy check
        // decides, with the denied-request error code.
        true
    }

    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        _response_result: Box<dyn Future<Output = Result<(), HttpError>> + Send>,
    ) -> Box<
        dyn Future<
                Output = Result<
                    (
                        http::Response<WasiBody>,
                        Box<dyn Future<Output = Result<(), HttpError>> + Send>,
                    ),
                    HttpError,
                >,
            > + Send,
    > {
        let egress = self.egress.clone();
        let decisions = self.decisions.clone();
        let plugin = self.plugin.clone();
        Box::new(async move { egress.send(request, options, &decisions, &plugin).await })
    }
}

/// A request the rules allow, before resolution.
struct Destination {
    host: RequestHost,
    port: u16,
    tls: bool,
}

/// A denied request: what was asked for and why it was denied.
#[derive(Debug)]
struct Denial {
    target: String,
    reason: String,
}

impl Denial {
    fn new(uri: &http::Uri, reason: impl Into<String>) -> Denial {
        Denial {
            target: target_of(uri),
            reason: reason.into(),
        }
    }
}

enum SendError {
    Denied(Denial),
    Http(HttpError),
}

/// Formats the scheme, host and port of a request for decisions and logs,
/// leaving out any user information, path and query.
fn target_of(uri: &http::Uri) -> String {
    let scheme = uri.scheme_str().unwrap_or("?");
    let Some(authority) = uri.authority() else {
        return format!("{scheme}://");
    };
    match authority.port_u16() {
        Some(port) => format!("{scheme}://{}:{port}", authority.host()),
        None => format!("{scheme}://{}", authority.host()),
    }
}

trait Stream: AsyncRead + AsyncWrite + Send + Sync + Unpin + 'static {}
impl<T> Stream for T where T: AsyncRead + AsyncWrite + Send + Sync + Unpin + 'static {}

/// Connects to the first address that accepts within the deadline.
async fn connect(addresses: &[SocketAddr], timeout: Duration) -> Result<(TcpStream, SocketAddr), HttpError> {
    let mut last_error = HttpError::ConnectionRefused;
    for address in addresses {
        match tokio::time::timeout(timeout, TcpStream::connect(address)).await {
            Ok(Ok(stream)) => return Ok((stream, *address)),
            Ok(Err(e)) => last_error = HttpError::Connect(e),
            Err(_) => last_error = HttpError::ConnectionTimeout,
        }
    }
    Err(last_error)
}

fn tls_error(error: std::io::Error) -> HttpError {
    let certificate = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|e| matches!(e, rustls::Error::InvalidCertificate(_)));
    if certificate {
        HttpError::TlsCertificateError
    } else {
        HttpError::Tls(error)
    }
}

/// Returns whether hyper sends `request` with an empty body without reading
/// the body: with `content-length: 0`, or as GET, HEAD or CONNECT with neither
/// `content-length` nor `transfer-encoding`.
fn sent_without_body<B>(request: &http::Request<B>) -> bool {
    let headers = request.headers();
    match headers.get(http::header::CONTENT_LENGTH) {
        Some(length) => length.as_bytes() == b"0",
        None => {
            !headers.contains_key(http::header::TRANSFER_ENCODING)
                && matches!(
                    *request.method(),
                    http::Method::GET | http::Method::HEAD | http::Method::CONNECT
                )
        }
    }
}

/// A task's request body, as given to hyper.
///
/// hyper drops the body of a request it sends without one (see
/// [`sent_without_body`]) before reading it. A task that finishes such a body
/// after that would see the stream closed, as if the connection had been
/// reset. So the body is then kept open in the background until the task
/// finishes or drops it, at the latest when the run ends. The first data
/// written to it ends that, and later writes fail as before: hyper sends no
/// body for such a request either way.
struct RequestBody {
    body: Option<WasiBody>,
    ended: bool,
    sent_empty: bool,
}

impl RequestBody {
    fn new(body: WasiBody, sent_empty: bool) -> RequestBody {
        RequestBody {
            body: Some(body),
            ended: false,
            sent_empty,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = HttpError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, HttpError>>> {
        let Some(body) = self.body.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = ready!(Pin::new(body).poll_frame(cx));
        if frame.is_none() {
            self.ended = true;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.body
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        let Some(mut body) = self.body.take() else {
            return;
        };
        if !self.sent_empty || self.ended || body.is_end_stream() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            while let Some(Ok(frame)) = body.frame().await {
                if frame.data_ref().is_some_and(|data| !data.is_empty()) {
                    break;
                }
            }
        });
    }
}

/// A response body that enforces the gap between chunks and a size cap.
struct LimitedBody {
    incoming: hyper::body::Incoming,
    gap: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
    remaining: u64,
    max_bytes: u64,
}

impl LimitedBody {
    fn new(incoming: hyper::body::Incoming, gap: Duration, max_bytes: u64) -> LimitedBody {
        LimitedBody {
            incoming,
            gap,
            timer: Box::pin(tokio::time::sleep(gap)),
            remaining: max_bytes,
            max_bytes,
        }
    }
}

impl Body for LimitedBody {
    type Data = Bytes;
    type Error = HttpError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, HttpError>>> {
        match Pin::new(&mut self.incoming).poll_frame(cx) {
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(HttpError::from(e)))),
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let length = data.len() as u64;
                    if length > self.remaining {
                        self.remaining = 0;
                        return Poll::Ready(Some(Err(HttpError::HttpResponseBodySize(Some(self.max_bytes)))));
                    }
                    self.remaining -= length;
                }
                let deadline = tokio::time::Instant::now() + self.gap;
                self.timer.as_mut().reset(deadline);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Pending => {
                ready!(self.timer.as_mut().poll(cx));
                Poll::Ready(Some(Err(HttpError::ConnectionReadTimeout)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.incoming.size_hint()
    }
}
