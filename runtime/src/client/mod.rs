//! A client that signs its requests, used by the `apex` subcommands.

pub mod tables;

use anyhow::Context;
use reqwest::Method;
use serde_json::Value;

use crate::auth::{self, HEADER_NONCE, HEADER_SIG, HEADER_TS};

/// Default server address when `APEX_URL` is not set.
pub const DEFAULT_URL: &str = "http://127.0.0.1:8080";

/// The headers that authenticate one request.
#[derive(Debug, Clone)]
pub struct SignedHeaders {
    /// `X-TS` value.
    pub ts: String,
    /// `X-Nonce` value.
    pub nonce: String,
    /// `X-SIG` value.
    pub signature: String,
}

/// Signs a request at the current time with a fresh nonce.
pub fn sign_request(key: &[u8], method: &str, target: &str, body: &[u8]) -> SignedHeaders {
    let ts = crate::unix_now().to_string();
    let nonce = auth::generate_nonce();
    let text = auth::string_to_sign(&ts, method, target, &nonce, body);
    SignedHeaders {
        signature: auth::sign(key, &text),
        ts,
        nonce,
    }
}

/// A signing client for one server.
pub struct Client {
    base: reqwest::Url,
    key: Vec<u8>,
    key_id: Option<String>,
    http: reqwest::Client,
}

/// A response: status and JSON body.
#[derive(Debug)]
pub struct Reply {
    /// HTTP status.
    pub status: reqwest::StatusCode,
    /// Parsed body, or the text as a JSON string when it is not JSON.
    pub body: Value,
}

impl Client {
    /// Creates a client for `url` signing with `key`.
    ///
    /// # Errors
    ///
    /// Fails when `url` is not an http URL.
    pub fn new(url: &str, key: &str) -> anyhow::Result<Client> {
        let base = reqwest::Url::parse(url)
            .with_context(|| format!("invalid server URL {url:?}; write it as http://HOST:PORT"))?;
        if base.scheme() != "http" {
            anyhow::bail!("invalid server URL {url:?}: only http:// is supported");
        }
        if base.query().is_some() || base.fragment().is_some() {
            anyhow::bail!("invalid server URL {url:?}: remove the query or fragment");
        }
        crate::server::check_key(key)?;
        Ok(Client {
            base,
            key: key.as_bytes().to_vec(),
            key_id: None,
            http: reqwest::Client::new(),
        })
    }

    /// Names the key in `X-Key-Id`; without it the server uses `default`.
    ///
    /// # Errors
    ///
    /// Fails when `id` is not a valid key id.
    pub fn with_key_id(mut self, id: &str) -> anyhow::Result<Client> {
        if !crate::keys::is_valid_key_id(id) {
            anyhow::bail!("invalid key id {id:?}: use 1 to 64 characters from A-Z, a-z, 0-9, `_` and `-`");
        }
        self.key_id = Some(id.to_owned());
        Ok(self)
    }

    /// Sends a signed request to `target` (path and query).
    ///
    /// # Errors
    ///
    /// Fails when the server cannot be reached.
    pub async fn send(&self, method: Method, target: &str, body: Vec<u8>) -> anyhow::Result<Reply> {
        // A path in the server URL (a reverse proxy's prefix) is kept.
        let prefix = self.base.path().trim_end_matches('/');
        let (path, query) = match target.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (target, None),
        };
        let mut url = self.base.clone();
        url.set_path(&format!("{prefix}{path}"));
        url.set_query(query);
        // Sign the target exactly as it will go on the wire, after URL parsing.
        let mut wire_target = url.path().to_owned();
        if let Some(query) = url.query() {
            wire_target.push('?');
            wire_target.push_str(query);
        }
        let headers = sign_request(&self.key, method.as_str(), &wire_target, &body);

        let mut request = self
            .http
            .request(method, url.clone())
            .header(HEADER_TS, headers.ts)
            .header(HEADER_NONCE, headers.nonce)
            .header(HEADER_SIG, headers.signature);
        if let Some(id) = &self.key_id {
            request = request.header(crate::auth::HEADER_KEY_ID, id);
        }
        let response = request.body(body).send().await.map_err(|e| {
            let context = if e.is_connect() {
                format!(
                    "cannot reach the Apex server at {}; is it running there? Set APEX_URL to its address",
                    self.base
                )
            } else {
                format!(
                    "the Apex server at {} did not answer, perhaps because it is stopping; \
                     a run may have started anyway: check `apex runs`",
                    self.base
                )
            };
            anyhow::Error::new(e).context(context)
        })?;

        let status = response.status();
        let text = response.text().await.context("cannot read the response")?;
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok(Reply { status, body })
    }
}
