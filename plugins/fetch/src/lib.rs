//! Makes one outgoing HTTP request and describes the response.
//!
//! Input: `{"url": URL, "method": "GET", "headers": {NAME: VALUE}, "body": TEXT,
//! "timeout_ms": N}`, all but `url` optional. Output: `{"status": N,
//! "content_type": TEXT or null, "bytes": N, "sha256": HEX, "location": TEXT or
//! null}`. When the host denies or fails the request, the run fails with the
//! `wasi:http` error code, such as `HttpRequestDenied`.
//!
//! HTTP goes through `wstd`, which wraps `wasi:http/outgoing-handler`.

use std::collections::BTreeMap;
use std::time::Duration;

use sha2::{Digest, Sha256};
use wstd::http::{Body, Client, Method, Request};

wit_bindgen::generate!({
    path: "../../wit",
    world: "apex:task/task",
    generate_all,
});

#[derive(serde::Deserialize)]
struct Input {
    url: String,
    method: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    body: Option<String>,
    timeout_ms: Option<u64>,
}

async fn fetch(input: Input) -> Result<serde_json::Value, String> {
    let method = input.method.as_deref().unwrap_or("GET");
    let method =
        Method::from_bytes(method.as_bytes()).map_err(|e| format!("invalid method {method:?}: {e}"))?;

    let mut request = Request::builder().uri(&input.url).method(method);
    for (name, value) in &input.headers {
        request = request.header(name, value);
    }
    let body = match input.body {
        Some(text) => Body::from(text),
        None => Body::empty(),
    };
    let request = request.body(body).map_err(|e| format!("invalid request: {e}"))?;

    let mut client = Client::new();
    if let Some(ms) = input.timeout_ms {
        client.set_connect_timeout(Duration::from_millis(ms));
        client.set_first_byte_timeout(Duration::from_millis(ms));
        client.set_between_bytes_timeout(Duration::from_millis(ms));
    }

    let response = client
        .send(request)
        .await
        .map_err(|e| format!("request failed: {e:?}"))?;
    let status = response.status().as_u16();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let content_type = header("content-type");
    let location = header("location");

    let mut body = response.into_body();
    let bytes = body
        .contents()
        .await
        .map_err(|e| format!("reading the response body failed: {e:?}"))?;

    Ok(serde_json::json!({
        "status": status,
        "content_type": content_type,
        "location": location,
        "bytes": bytes.len(),
        "sha256": hex(&Sha256::digest(bytes)),
    }))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

struct Fetch;

impl Guest for Fetch {
    fn run(input: String) -> Result<String, String> {
        let input: Input = serde_json::from_str(&input)
            .map_err(|e| format!("invalid input: {e}; expected {{\"url\": URL, ...}}"))?;
        let output = wstd::runtime::block_on(fetch(input))?;
        Ok(output.to_string())
    }
}

export!(Fetch);
