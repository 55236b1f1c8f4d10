//! The HTTP proxy of shell children whose `shell_allow` entry has
//! `network: true`.
//!
//! Such a child runs in a network namespace of its own, where the only
//! address is loopback. Before `exec` it opens a listening socket on
//! `127.0.0.1:PORT` inside that namespace and hands it to the server, which
//! serves this proxy on it. The child finds the proxy in `HTTP_PROXY` and
//! `HTTPS_PROXY`. Landlock lets the child connect to that port only. So the
//! child stays in its namespace, and every connection it makes to the
//! outside is one the proxy opened after the checks a task's request gets.
//!
//! The proxy takes `CONNECT host:port` (HTTPS and other TLS, tunnelled
//! without looking inside) and plain HTTP requests in absolute form
//! (`GET http://host/path`). Each request opens one connection to the
//! destination it names, and the client connection ends with it.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use super::egress::{Egress, Refusal};
use crate::decision::Decisions;

/// Port of the proxy inside each child's network namespace. Every child has
/// its own namespace, so the port never collides with another.
pub const PROXY_PORT: u16 = 3128;

/// Largest request head the proxy reads.
const MAX_HEAD_BYTES: usize = 16 * 1024;

/// Client connections one child may have open through its proxy at once;
/// further ones wait in the listen backlog. Each takes two descriptors of
/// the server.
const MAX_CONNECTIONS: usize = 64;

/// Serves the proxy on `listener` until the returned future is dropped,
/// which also ends the connections it serves.
pub(crate) async fn serve(listener: TcpListener, egress: Arc<Egress>, decisions: Decisions, plugin: String) {
    let mut connections = JoinSet::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => {
                    let (egress, decisions, plugin) = (egress.clone(), decisions.clone(), plugin.clone());
                    connections.spawn(async move {
                        handle(client, &egress, &decisions, &plugin).await;
                        drop(slot);
                    });
                }
                Err(e) => {
                    tracing::warn!(%plugin, error = %e, "the shell proxy cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// A parsed request head.
struct Head {
    method: String,
    target: String,
    version: String,
    /// Header lines, without the request line and the final empty line.
    headers: Vec<String>,
    /// Bytes read after the head: the start of a body or of a TLS stream.
    rest: Vec<u8>,
}

async fn handle(mut client: TcpStream, egress: &Egress, decisions: &Decisions, plugin: &str) {
    let head = match tokio::time::timeout(egress.timeout(), read_head(&mut client)).await {
        Ok(Ok(head)) => head,
        Ok(Err(reason)) => return reply(&mut client, "400 Bad Request", &reason).await,
        Err(_) => return reply(&mut client, "408 Request Timeout", "no request head in time").await,
    };

    let (uri, connect) = match destination(&head) {
        Ok(destination) => destination,
        Err(reason) => return reply(&mut client, "400 Bad Request", &reason).await,
    };
    let mut upstream = match egress.connect_for_proxy(&uri, decisions, plugin).await {
        Ok(upstream) => upstream,
        Err(Refusal::Denied(reason)) => {
            return reply(
                &mut client,
                "403 Forbidden",
                &format!("Apex denied the request: {reason}"),
            )
            .await;
        }
        Err(Refusal::Failed(_, reason)) => return reply(&mut client, "502 Bad Gateway", &reason).await,
    };

    let forwarded = if connect {
        client
            .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .await
            .is_ok()
    } else {
        upstream.write_all(&origin_form(&head, &uri)).await.is_ok()
    };
    if !forwarded || upstream.write_all(&head.rest).await.is_err() {
        return;
    }
    // Either side closing or failing ends the exchange; there is nothing to report.
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}

/// Reads the request head, up to the empty line.
async fn read_head(client: &mut TcpStream) -> Result<Head, String> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    let too_long = || format!("the request head is longer than {MAX_HEAD_BYTES} bytes");
    let end = loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            // The last read may have brought the end and more than the limit.
            if end > MAX_HEAD_BYTES {
                return Err(too_long());
            }
            break end;
        }
        if buffer.len() > MAX_HEAD_BYTES {
            return Err(too_long());
        }
        let read = client.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if read == 0 {
            return Err("the connection closed before the request head ended".into());
        }
        buffer.extend_from_slice(&chunk[..read]);
    };

    let text =
        std::str::from_utf8(&buffer[..end]).map_err(|_| "the request head is not UTF-8".to_string())?;
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(format!("invalid request line {request_line:?}"));
    };
    Ok(Head {
        method: method.to_owned(),
        target: target.to_owned(),
        version: version.to_owned(),
        headers: lines.map(str::to_owned).collect(),
        rest: buffer[end + 4..].to_vec(),
    })
}

/// Returns the URI the policy checks (scheme, host and port) and whether
/// the request is a `CONNECT`.
fn destination(head: &Head) -> Result<(http::Uri, bool), String> {
    if head.method == "CONNECT" {
        // A tunnel is checked as HTTPS: port 443 is its default.
        let uri: http::Uri = format!("https://{}", head.target)
            .parse()
            .map_err(|_| format!("invalid CONNECT target {:?}; expected host:port", head.target))?;
        if uri.port_u16().is_none() || uri.path() != "/" || uri.query().is_some() {
            return Err(format!(
                "invalid CONNECT target {:?}; expected host:port",
                head.target
            ));
        }
        return Ok((uri, true));
    }
    let uri: http::Uri = head
        .target
        .parse()
        .map_err(|_| format!("invalid request target {:?}", head.target))?;
    if uri.scheme() != Some(&http::uri::Scheme::HTTP) {
        return Err(format!(
            "the proxy takes CONNECT host:port or an absolute http:// URL, not {:?}",
            head.target
        ));
    }
    Ok((uri, false))
}

/// Rewrites a proxied request for the destination: the request line in
/// origin form (`GET /path HTTP/1.1`), without the proxy's own headers, and
/// with `Connection: close`, so the connection serves this request only.
fn origin_form(head: &Head, uri: &http::Uri) -> Vec<u8> {
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut out = format!("{} {path} {}\r\n", head.method, head.version);
    for line in &head.headers {
        let name = line
            .split(':')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        if matches!(
            name.as_str(),
            "proxy-connection" | "proxy-authorization" | "connection"
        ) {
            continue;
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    out.into_bytes()
}

async fn reply(client: &mut TcpStream, status: &str, message: &str) {
    let body = format!("{message}\n");
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    // The client may be gone already; nothing is left to do then.
    let _ = client.write_all(response.as_bytes()).await;
}
