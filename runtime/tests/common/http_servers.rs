//! Local HTTP and HTTPS servers on 127.0.0.1 for outgoing-request tests.
//!
//! Routes: `/` returns `hello from the test server`, `/redirect?to=URL`
//! returns 302 to URL, `/big?bytes=N` returns N bytes, and `/hang` accepts
//! and never responds. Each server counts the requests it received.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

/// Body of `/`.
pub const HELLO: &str = "hello from the test server";

/// A server running on its own threads until dropped.
pub struct LocalServer {
    pub port: u16,
    requests: Arc<AtomicUsize>,
    headers: Arc<std::sync::Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

impl LocalServer {
    /// Starts a plain HTTP server.
    pub fn http() -> LocalServer {
        LocalServer::start(None)
    }

    /// Starts an HTTPS server with a certificate for `names`, signed by a
    /// fresh test CA. Returns the server and the CA certificate in PEM.
    pub fn https(names: &[&str]) -> (LocalServer, String) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Apex test CA");
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();

        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let leaf = rcgen::CertificateParams::new(names)
            .unwrap()
            .signed_by(&leaf_key, &ca)
            .unwrap();

        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
            )
            .unwrap();
        (LocalServer::start(Some(Arc::new(config))), ca.pem())
    }

    fn start(tls: Option<Arc<rustls::ServerConfig>>) -> LocalServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(AtomicUsize::new(0));
        let headers = Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));

        let (count, stopping, seen) = (requests.clone(), stop.clone(), headers.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                let (count, tls, seen) = (count.clone(), tls.clone(), seen.clone());
                std::thread::spawn(move || {
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
                    match tls {
                        Some(config) => {
                            let Ok(connection) = rustls::ServerConnection::new(config) else {
                                return;
                            };
                            let mut tls_stream = rustls::StreamOwned::new(connection, stream);
                            serve_one(&mut tls_stream, &count, &seen);
                        }
                        None => {
                            let mut stream = stream;
                            serve_one(&mut stream, &count, &seen);
                        }
                    }
                });
            }
        });
        LocalServer {
            port,
            requests,
            headers,
            stop,
        }
    }

    /// Returns every header line the server received, lower-cased names.
    pub fn header_lines(&self) -> Vec<String> {
        self.headers.lock().unwrap().clone()
    }

    /// Returns how many requests reached the server.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn serve_one<S: std::io::Read + Write>(
    stream: &mut S,
    count: &AtomicUsize,
    seen: &std::sync::Mutex<Vec<String>>,
) {
    let mut reader = BufReader::new(&mut *stream);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() || request_line.is_empty() {
        return;
    }
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) if line == "\r\n" => break,
            Ok(_) => {
                let line = line.trim_end();
                let recorded = match line.split_once(':') {
                    Some((name, value)) => format!("{}:{value}", name.to_ascii_lowercase()),
                    None => line.to_string(),
                };
                seen.lock().unwrap().push(recorded);
            }
        }
    }
    count.fetch_add(1, Ordering::SeqCst);

    let target = request_line.split(' ').nth(1).unwrap_or("/").to_string();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let param = |name: &str| {
        query.split('&').find_map(|pair| {
            pair.strip_prefix(name)
                .and_then(|v| v.strip_prefix('='))
                .map(str::to_owned)
        })
    };

    let (status, extra, body): (&str, String, Vec<u8>) = match path {
        "/" => ("200 OK", String::new(), HELLO.as_bytes().to_vec()),
        "/redirect" => (
            "302 Found",
            format!("Location: {}\r\n", param("to").unwrap_or_default()),
            Vec::new(),
        ),
        "/big" => {
            let size: usize = param("bytes").and_then(|b| b.parse().ok()).unwrap_or(0);
            ("200 OK", String::new(), vec![b'b'; size])
        }
        "/hang" => {
            std::thread::sleep(Duration::from_secs(30));
            return;
        }
        _ => ("404 Not Found", String::new(), b"no such route".to_vec()),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(&body);
    let _ = stream.flush();
}
