//! Test harness: builds the example plugins, starts the real `apex serve` on
//! 127.0.0.1 with a policy of the test's choosing, and talks raw HTTP/1.1 to
//! it so tests control every byte of the request line and headers.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod http_servers;

/// The shared key every test server uses.
pub const KEY: &str = "test-key-0123456789abcdef0123456789abcdef";

/// Returns the repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Returns the path of an example plugin, building all of them on first use.
/// The tours (`NAME-tour`) need other toolchains, so they are built on the
/// first use of one of them.
pub fn plugin(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let script = repo_root().join("scripts/build-plugins.sh");
        let status = Command::new("bash").arg(&script).status().expect("bash runs");
        assert!(
            status.success(),
            "building the plugins with {} failed",
            script.display()
        );
    });
    if name.ends_with("-tour") {
        static TOURS: OnceLock<()> = OnceLock::new();
        TOURS.get_or_init(|| {
            let script = repo_root().join("scripts/build-tours.sh");
            let status = Command::new("bash").arg(&script).status().expect("bash runs");
            assert!(
                status.success(),
                "building the tours with {} failed",
                script.display()
            );
        });
    }
    let path = repo_root().join("target/plugins").join(format!("{name}.wasm"));
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// A response: status, headers (lower-case names) and body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// Parses the body as JSON, panicking with the body text if it is not.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// Returns the `error.code` of an error body.
    pub fn error_code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Returns the `error.message` of an error body.
    pub fn error_message(&self) -> String {
        self.json()["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

/// A request to send, with full control over the signed parts.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub target: String,
    pub body: Vec<u8>,
    pub headers: Vec<(String, String)>,
}

impl Request {
    pub fn new(method: &str, target: &str, body: impl Into<Vec<u8>>) -> Request {
        Request {
            method: method.into(),
            target: target.into(),
            body: body.into(),
            headers: Vec::new(),
        }
    }

    /// Adds `X-TS`, `X-Nonce` and `X-SIG` for the current time.
    pub fn signed(self) -> Request {
        self.signed_at(apex::unix_now())
    }

    /// Adds `X-Key-Id`, `X-TS`, `X-Nonce` and `X-SIG`, signed with `secret`.
    pub fn signed_with(self, key_id: &str, secret: &str) -> Request {
        let ts = apex::unix_now().to_string();
        let nonce = apex::auth::generate_nonce();
        let text = apex::auth::string_to_sign(&ts, &self.method, &self.target, &nonce, &self.body);
        let signature = apex::auth::sign(secret.as_bytes(), &text);
        self.header("X-Key-Id", key_id)
            .header("X-TS", &ts)
            .header("X-Nonce", &nonce)
            .header("X-SIG", &signature)
    }

    /// Adds `X-TS`, `X-Nonce` and `X-SIG` for Unix time `ts`.
    pub fn signed_at(mut self, ts: u64) -> Request {
        let ts = ts.to_string();
        let nonce = apex::auth::generate_nonce();
        let text = apex::auth::string_to_sign(&ts, &self.method, &self.target, &nonce, &self.body);
        let signature = apex::auth::sign(KEY.as_bytes(), &text);
        self.headers.push(("X-TS".into(), ts));
        self.headers.push(("X-Nonce".into(), nonce));
        self.headers.push(("X-SIG".into(), signature));
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Request {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn without_header(mut self, name: &str) -> Request {
        self.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
        self
    }

    pub fn find_header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    }

    pub fn get_header(&self, name: &str) -> String {
        self.find_header(name)
            .unwrap_or_else(|| panic!("request has no {name} header"))
    }

    pub fn set_header(self, name: &str, value: &str) -> Request {
        self.without_header(name).header(name, value)
    }
}

/// Policy settings a test varies; the rest comes from [`TestServer::start`].
#[derive(Debug, Clone)]
pub struct Setup {
    /// Policy text; `{WORK}` is replaced with the work directory, `{RO}`
    /// with a read-only directory.
    pub policy: String,
}

impl Default for Setup {
    fn default() -> Setup {
        Setup {
            policy: "paths_allow:\n  - {WORK}\n  - {path: {RO}, mode: ro}\ntimeouts: {task_seconds: 10}\n"
                .into(),
        }
    }
}

/// A running `apex serve` in a temporary directory.
pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub addr: String,
    child: Option<Child>,
    /// Command line up to the `apex` binary, if it is not run directly.
    wrapper: Vec<String>,
    /// Extra arguments of `apex serve`.
    pub extra_args: Vec<String>,
    /// Extra environment variables of the server.
    pub extra_env: Vec<(String, String)>,
}

impl TestServer {
    /// Starts a server with the default test policy.
    pub fn start() -> TestServer {
        TestServer::start_with(Setup::default())
    }

    /// Starts a server with `setup`.
    pub fn start_with(setup: Setup) -> TestServer {
        TestServer::start_wrapped(setup, Vec::new(), |_| {})
    }

    /// Starts a server with `setup` and the extra `apex serve` arguments `args`.
    pub fn start_with_args(setup: Setup, args: &[&str]) -> TestServer {
        let mut server = TestServer::start_with(setup);
        server.extra_args = args.iter().map(|arg| arg.to_string()).collect();
        server.kill();
        server.spawn();
        server
    }

    /// Starts a server with `setup` by the command line `wrapper`, which
    /// ends with the path of an `apex` binary (such as `setpriv ... apex`),
    /// after `prepare` has run on the server's directory.
    pub fn start_wrapped(setup: Setup, wrapper: Vec<String>, prepare: impl FnOnce(&Path)) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path().join("work");
        let ro = dir.path().join("ro");
        std::fs::create_dir_all(&work).unwrap();
        std::fs::create_dir_all(&ro).unwrap();
        let policy = setup
            .policy
            .replace("{WORK}", work.to_str().unwrap())
            .replace("{RO}", ro.to_str().unwrap());
        std::fs::write(dir.path().join("policy.yaml"), policy).unwrap();
        prepare(dir.path());

        let mut server = TestServer {
            dir,
            addr: String::new(),
            child: None,
            wrapper,
            extra_args: Vec::new(),
            extra_env: Vec::new(),
        };
        server.spawn();
        server
    }

    /// Starts a server with `setup`, a keys file with `keys` (mode 0600) and
    /// the environment variables `env`.
    pub fn start_with_keys(setup: Setup, keys: &str, env: &[(&str, &str)]) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("work")).unwrap();
        std::fs::create_dir_all(dir.path().join("ro")).unwrap();
        let policy = setup
            .policy
            .replace("{WORK}", dir.path().join("work").to_str().unwrap())
            .replace("{RO}", dir.path().join("ro").to_str().unwrap());
        std::fs::write(dir.path().join("policy.yaml"), policy).unwrap();
        let keys_file = dir.path().join("keys.yaml");
        std::fs::write(&keys_file, keys).unwrap();
        std::fs::set_permissions(&keys_file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();

        let mut server = TestServer {
            dir,
            addr: String::new(),
            child: None,
            wrapper: Vec::new(),
            extra_args: vec!["--keys".into(), keys_file.to_str().unwrap().into()],
            extra_env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        server.spawn();
        server
    }

    /// Returns the server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the server is running").id()
    }

    pub fn work(&self) -> PathBuf {
        self.dir.path().join("work").canonicalize().unwrap()
    }

    pub fn ro(&self) -> PathBuf {
        self.dir.path().join("ro").canonicalize().unwrap()
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Starts (or restarts) the server process on a free port.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .unwrap();
        let mut command = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args);
                command
            }
            None => Command::new(env!("CARGO_BIN_EXE_apex")),
        };
        let mut child = command
            .arg("serve")
            .arg("--config")
            .arg(self.dir.path().join("policy.yaml"))
            .arg("--data")
            .arg(self.data())
            .arg("--listen")
            .arg("127.0.0.1:0")
            .args(&self.extra_args)
            .envs(self.extra_env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .current_dir(self.dir.path())
            .env("APEX_SHARED_KEY", KEY)
            .env("APEX_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("apex starts");

        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let listening = line
            .trim()
            .strip_prefix("apex listening on ")
            .and_then(|url| url.split_once("://"));
        let Some((_, addr)) = listening else {
            let _ = child.kill();
            panic!("server did not start: {line:?}\nlog:\n{}", self.log());
        };
        self.addr = addr.to_string();
        self.child = Some(child);
    }

    /// Stops the server with SIGTERM and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if child.try_wait().unwrap().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the server with SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Returns the server's log (stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Returns the audit events, oldest first, each with its `fields`
    /// merged into the top level, read through `GET /v1/audit`.
    pub fn audit(&self) -> Vec<Value> {
        let response = self.send(&Request::new("GET", "/v1/audit?limit=1000", "").signed());
        assert_eq!(
            response.status,
            200,
            "{}",
            String::from_utf8_lossy(&response.body)
        );
        let mut events: Vec<Value> = response.json()["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|event| {
                let mut flat = event["fields"].clone();
                flat["kind"] = event["kind"].clone();
                flat["time"] = event["time"].clone();
                flat
            })
            .collect();
        events.reverse();
        events
    }

    /// Sends `request` as raw HTTP/1.1 and reads the whole response.
    pub fn send(&self, request: &Request) -> Response {
        send_raw(&self.addr, request)
    }

    pub fn upload(&self, name: &str, wasm: &[u8]) -> Response {
        self.send(&Request::new("PUT", &format!("/v1/plugins/{name}"), wasm).signed())
    }

    /// Uploads an example plugin under its own name and asserts success.
    pub fn upload_plugin(&self, name: &str) {
        let wasm = std::fs::read(plugin(name)).unwrap();
        let response = self.upload(name, &wasm);
        assert_eq!(
            response.status,
            201,
            "upload {name}: {}",
            String::from_utf8_lossy(&response.body)
        );
    }

    /// Runs a plugin with `body` and returns the JSON result (status 200 asserted).
    pub fn run(&self, name: &str, body: Value) -> Value {
        let response =
            self.send(&Request::new("POST", &format!("/v1/plugins/{name}/run"), body.to_string()).signed());
        assert_eq!(
            response.status,
            200,
            "run {name}: {}",
            String::from_utf8_lossy(&response.body)
        );
        response.json()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Returns an `apex serve` command that runs in `dir`, reads `policy.yaml`,
/// keeps its data in `data` and listens on a free port of 127.0.0.1.
pub fn serve_command(dir: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_apex"));
    command
        .args(["serve", "--config", "policy.yaml", "--data", "data"])
        .args(["--listen", "127.0.0.1:0"])
        .current_dir(dir);
    command
}

/// Sends one request on a new connection and reads until the server closes it.
pub fn send_raw(addr: &str, request: &Request) -> Response {
    let stream = TcpStream::connect(addr).unwrap();
    // Uploads of the tours (about 20 MB each) compile for tens of seconds
    // with the debug build on a loaded machine.
    stream.set_read_timeout(Some(Duration::from_secs(180))).unwrap();
    exchange(stream, addr, request)
}

/// Like [`send_raw`], from the local address `from` (any of 127.0.0.0/8).
pub fn send_raw_from(from: &str, addr: &str, request: &Request) -> Response {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let stream = runtime.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
        socket.connect(addr.parse().unwrap()).await.unwrap()
    });
    let stream = stream.into_std().unwrap();
    stream.set_nonblocking(false).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    exchange(stream, addr, request)
}

/// Writes `request` to `stream` and reads the response until the server closes it.
pub fn exchange<S: Read + Write>(mut stream: S, addr: &str, request: &Request) -> Response {
    stream.write_all(request_head(addr, request).as_bytes()).unwrap();
    // The server may respond (413, 401) and close before the whole body is sent.
    let _ = stream.write_all(&request.body);

    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    parse_response(&raw)
}

/// Returns the HTTP/1.1 head of `request` to `addr`, with `Connection: close`.
pub fn request_head(addr: &str, request: &Request) -> String {
    let mut head = format!(
        "{} {} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n",
        request.method, request.target
    );
    for (name, value) in &request.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", request.body.len()));
    head
}

fn parse_response(raw: &[u8]) -> Response {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("response has a header block");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status: u16 = status_line.split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();

    let mut body = raw[split + 4..].to_vec();
    if headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"))
    {
        body = dechunk(&body);
    }
    Response {
        status,
        headers,
        body,
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n").unwrap();
        let size = usize::from_str_radix(std::str::from_utf8(&data[..line_end]).unwrap().trim(), 16).unwrap();
        data = &data[line_end + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}
