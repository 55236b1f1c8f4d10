//! The policy file: what tasks may touch, loaded and validated once at startup.
//!
//! The file keeps the keys of the operators' existing security guide
//! (`shell_allow`, `paths_allow`, `network.http_allow_domains`, `timeouts`) and
//! adds `limits`. Loading resolves relative paths against the directory of the
//! file, so the same file means the same thing from any working directory.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

mod plugins;

pub use self::plugins::{Injection, PluginGrant};
use crate::net::rules::{HostRule, normalize_name};
use crate::shell::confine::{ChildLimits, Confinement};
use crate::shell::rules::ShellEntry;

/// Errors found while loading a policy file.
///
/// Each message names the key and the value at fault and explains how to fix it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// The file could not be read.
    #[error("cannot read policy file {path}")]
    Read {
        /// The policy file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid YAML, has an unknown key or a value of the wrong type.
    #[error("invalid policy file {path}: {message}")]
    Syntax {
        /// The policy file.
        path: PathBuf,
        /// The parser's message, with the line and column.
        message: String,
    },
    /// A value is syntactically fine but not acceptable.
    #[error("invalid policy file {path}: `{key}`: {message}")]
    Value {
        /// The policy file.
        path: PathBuf,
        /// The key, in dotted form (`timeouts.task_seconds`, `paths_allow[1]`).
        key: String,
        /// The problem and the fix.
        message: String,
    },
}

/// Access a task gets to an allowed directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PathMode {
    /// Read and write (the default).
    Rw,
    /// Read only.
    Ro,
}

impl fmt::Display for PathMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PathMode::Rw => "read-write",
            PathMode::Ro => "read-only",
        })
    }
}

/// A directory a task may access, preopened under the same absolute path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedPath {
    /// The canonical absolute path on the host, which is also the guest path.
    pub path: PathBuf,
    /// Read-write or read-only.
    pub mode: PathMode,
}

/// Deadlines from the `timeouts` section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Deadline of one plugin run (`task_seconds`, or `python_seconds` in the
    /// operators' original format).
    pub task: Duration,
    /// The key the run deadline came from, for messages.
    pub task_key: &'static str,
    /// Deadline of one host shell call (`shell_seconds`).
    pub shell: Duration,
    /// Deadline of one outgoing HTTP request (`http_seconds`).
    pub http: Duration,
}

/// Resource limits from the `limits` section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Maximum size of all linear memories of one run together, in bytes (`memory_mib`).
    pub memory_bytes: usize,
    /// Maximum size of an uploaded component, in bytes (`upload_mib`).
    pub upload_bytes: usize,
    /// Maximum size of a run request body, in bytes (`input_kib`).
    pub input_bytes: usize,
    /// Maximum captured stdout, and separately stderr, of one run, in bytes (`output_kib`).
    pub output_bytes: usize,
    /// Maximum body of one outgoing HTTP response, in bytes (`response_mib`).
    pub response_bytes: usize,
    /// Bytes one run may write to files, in bytes (`write_mib`).
    pub write_bytes: usize,
    /// Address space of the process that compiles an upload, in bytes (`compile_mib`).
    pub compile_bytes: usize,
    /// Most shell children running at once, over all runs (`max_shell_processes`).
    pub max_shell_processes: usize,
    /// Maximum stdout, and separately stderr, kept per shell call, in bytes (`shell_output_kib`).
    pub shell_output_bytes: usize,
    /// Runs that execute at once (`max_concurrent_runs`).
    pub max_concurrent_runs: usize,
    /// Runs that may wait for a free slot; more get 503 (`max_queued_runs`).
    pub max_queued_runs: usize,
    /// Client connections open at once; more are closed at accept (`max_connections`).
    pub max_connections: usize,
}

/// Rules for the host shell call.
#[derive(Debug, Clone, Default)]
pub struct ShellPolicy {
    /// Parsed `shell_allow`, in order.
    pub entries: Vec<ShellEntry>,
    /// Directories searched for programs (`shell_path`).
    pub search_path: Vec<PathBuf>,
    /// Environment variables added for every child (`shell_env`).
    pub env: BTreeMap<String, String>,
    /// Kernel confinement of children (`shell_confinement`,
    /// `shell_system_paths`, `shell_limits`).
    pub confinement: Confinement,
}

/// Programs are looked up here when the policy sets no `shell_path`.
pub const DEFAULT_SHELL_PATH: [&str; 3] = ["/usr/local/bin", "/usr/bin", "/bin"];

/// Environment variables the host sets itself for shell children.
const RESERVED_SHELL_ENV: [&str; 6] = [
    "PATH",
    "HOME",
    "LANG",
    "XDG_CONFIG_HOME",
    "CURL_HOME",
    "PYTHONNOUSERSITE",
];

/// The `network` section: where outgoing HTTP requests may go.
#[derive(Debug, Clone, Default)]
pub struct NetworkPolicy {
    /// Parsed `http_allow_domains`, in order.
    pub http_allow: Vec<HostRule>,
    /// Whether an allowed name may resolve to a loopback, private or other
    /// non-public address (`allow_private_addresses`).
    pub allow_private_addresses: bool,
    /// Fixed addresses for host names, consulted before DNS (`resolve`).
    pub resolve: HashMap<String, IpAddr>,
    /// Extra trusted CA certificates, PEM (`ca_file`).
    pub ca_file: Option<PathBuf>,
    /// Headers added to plugins' requests (`inject`).
    pub inject: Vec<Injection>,
}

/// Default deadline of a plugin run, shell call and HTTP request, in seconds.
pub const DEFAULT_TASK_SECONDS: u64 = 60;
const DEFAULT_SHELL_SECONDS: u64 = 60;
const DEFAULT_HTTP_SECONDS: u64 = 30;

/// Default memory limit. A componentize-py component starts with about 12 MiB
/// of linear memory and grows from there, so this leaves ample room.
const DEFAULT_MEMORY_MIB: u64 = 256;
/// Default upload limit. A componentize-py component is about 20 MB.
const DEFAULT_UPLOAD_MIB: u64 = 64;
const DEFAULT_INPUT_KIB: u64 = 1024;
const DEFAULT_OUTPUT_KIB: u64 = 1024;
const DEFAULT_RESPONSE_MIB: u64 = 16;
const DEFAULT_WRITE_MIB: u64 = 1024;
const DEFAULT_COMPILE_MIB: u64 = 4096;
const DEFAULT_SHELL_PROCESSES: u64 = 4;
const DEFAULT_CONCURRENT_RUNS: u64 = 64;
const DEFAULT_QUEUED_RUNS: u64 = 256;
const DEFAULT_CONNECTIONS: u64 = 1024;

const MAX_SECONDS: u64 = 24 * 60 * 60;

/// Directories that expose the host's processes, kernel or devices; no
/// allowed path may be inside them.
const SYSTEM_DIRS: [&str; 3] = ["/proc", "/sys", "/dev"];
const MAX_MEMORY_MIB: u64 = 4096;
const MAX_UPLOAD_MIB: u64 = 1024;
const MAX_INPUT_KIB: u64 = 64 * 1024;
const MAX_OUTPUT_KIB: u64 = 64 * 1024;
const MAX_RESPONSE_MIB: u64 = 1024;
const MAX_WRITE_MIB: u64 = 1 << 20;
const MAX_COMPILE_MIB: u64 = 1 << 16;
const MIN_COMPILE_MIB: u64 = 64;
const MAX_SHELL_PROCESSES: u64 = 256;
const MAX_CONCURRENT_RUNS: u64 = 4096;
const MAX_QUEUED_RUNS: u64 = 100_000;
const MAX_CONNECTIONS: u64 = 65_536;

/// A validated policy.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The policy file, canonical.
    pub source: PathBuf,
    /// SHA-256 of the file as loaded, lowercase hex.
    pub sha256: String,
    /// Command prefixes for the host shell call, as written.
    pub shell_allow: Vec<String>,
    /// The shell section, parsed.
    pub shell: ShellPolicy,
    /// Directories tasks may access.
    pub paths_allow: Vec<AllowedPath>,
    /// Host names outgoing HTTP requests may reach, as written.
    pub http_allow_domains: Vec<String>,
    /// The `network` section, parsed.
    pub network: NetworkPolicy,
    /// Deadlines.
    pub timeouts: Timeouts,
    /// Resource limits.
    pub limits: Limits,
    /// How long history is kept.
    pub retention: Retention,
    /// API access rules: allowed clients and throttling of authentication failures.
    pub api: ApiPolicy,
    /// Per-plugin sections, by plugin name.
    pub plugins: BTreeMap<String, PluginGrant>,
    /// Files the server trusts that shell children can read, because a
    /// `shell_system_paths` entry contains them; one warning each.
    pub exposed_to_shell: Vec<String>,
}

/// The `api` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiPolicy {
    /// Networks clients may connect from (`ip_allow`); `None` allows all.
    pub ip_allow: Option<Vec<IpNet>>,
    /// Failed authentications from one address, within the window, that start a block.
    pub failures_max: u32,
    /// Window in which failures are counted.
    pub failures_window: Duration,
    /// How long an address is blocked; its requests get 429.
    pub block: Duration,
    /// A reverse proxy whose client-address header is believed.
    pub trusted_proxy: Option<TrustedProxy>,
}

/// A reverse proxy in front of the API (`api.trusted_proxy`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedProxy {
    /// Header carrying the client address, such as `X-Forwarded-For`; the
    /// last address in it (the one the proxy added) is used.
    pub header: String,
    /// Networks the proxy connects from; the header is ignored from anywhere else.
    pub from: Vec<IpNet>,
}

/// An IP network in CIDR form, such as `127.0.0.1/32` or `fd00::/8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    /// Network address.
    pub address: IpAddr,
    /// Prefix length in bits.
    pub prefix: u8,
}

impl IpNet {
    /// Parses `ADDRESS/PREFIX`, or a bare address as a single host.
    pub fn parse(text: &str) -> Option<IpNet> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address.parse::<IpAddr>().ok()?, prefix.parse::<u8>().ok()?),
            None => {
                let address = text.parse::<IpAddr>().ok()?;
                (address, if address.is_ipv4() { 32 } else { 128 })
            }
        };
        let bits = if address.is_ipv4() { 32 } else { 128 };
        (prefix <= bits).then_some(IpNet { address, prefix })
    }

    /// Returns whether `ip` is inside the network. An IPv4-mapped IPv6
    /// address counts as its IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.address, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// How long run history and audit events are kept (`retention`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Days a finished run is kept (`runs_days`).
    pub runs_days: u64,
    /// Days an audit event is kept (`audit_days`).
    pub audit_days: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    shell_allow: Vec<serde_yaml_ng::Value>,
    shell_path: Option<Vec<serde_yaml_ng::Value>>,
    #[serde(default)]
    shell_env: BTreeMap<String, String>,
    shell_confinement: Option<String>,
    shell_system_paths: Option<Vec<String>>,
    #[serde(default)]
    shell_limits: RawShellLimits,
    #[serde(default)]
    paths_allow: Vec<serde_yaml_ng::Value>,
    #[serde(default)]
    network: RawNetwork,
    #[serde(default)]
    timeouts: RawTimeouts,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    retention: RawRetention,
    #[serde(default)]
    api: RawApi,
    #[serde(default)]
    plugins: BTreeMap<String, plugins::RawPluginGrant>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShellLimits {
    cpu_seconds: Option<u64>,
    memory_mib: Option<u64>,
    file_mib: Option<u64>,
    processes: Option<u64>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApi {
    ip_allow: Option<Vec<String>>,
    #[serde(default)]
    auth_failures: RawAuthFailures,
    trusted_proxy: Option<RawTrustedProxy>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTrustedProxy {
    header: String,
    from: Vec<String>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuthFailures {
    max: Option<u64>,
    window_seconds: Option<u64>,
    block_seconds: Option<u64>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetention {
    runs_days: Option<u64>,
    audit_days: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPathEntry {
    path: String,
    #[serde(default = "default_mode")]
    mode: PathMode,
}

fn default_mode() -> PathMode {
    PathMode::Rw
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    #[serde(default)]
    http_allow_domains: Vec<serde_yaml_ng::Value>,
    #[serde(default)]
    allow_private_addresses: bool,
    #[serde(default)]
    resolve: BTreeMap<String, String>,
    ca_file: Option<String>,
    #[serde(default)]
    inject: Vec<plugins::RawInjection>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    shell_seconds: Option<u64>,
    python_seconds: Option<u64>,
    task_seconds: Option<u64>,
    http_seconds: Option<u64>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    memory_mib: Option<u64>,
    upload_mib: Option<u64>,
    input_kib: Option<u64>,
    output_kib: Option<u64>,
    response_mib: Option<u64>,
    write_mib: Option<u64>,
    compile_mib: Option<u64>,
    max_shell_processes: Option<u64>,
    shell_output_kib: Option<u64>,
    max_concurrent_runs: Option<u64>,
    max_queued_runs: Option<u64>,
    max_connections: Option<u64>,
}

/// Files the server trusts, which no allowed path may contain or lie inside.
#[derive(Debug, Default, Clone)]
pub struct ProtectedPaths {
    /// The server's data directory (plugins, compiled code).
    pub data_dir: Option<PathBuf>,
    /// Other files the server reads at startup: key files, `.env`.
    pub files: Vec<PathBuf>,
}

impl Policy {
    /// Loads and validates the policy file at `path`.
    ///
    /// Relative paths in the file are resolved against its directory and must
    /// exist. No allowed path may overlap the policy file itself or any of the
    /// `protected` paths, so that a task can never write what the server
    /// later trusts.
    ///
    /// # Errors
    ///
    /// Returns a [`PolicyError`] naming the key and value at fault.
    pub fn load(path: &Path, protected: &ProtectedPaths) -> Result<Policy, PolicyError> {
        let read_error = |source| PolicyError::Read {
            path: path.to_path_buf(),
            source,
        };
        let text = std::fs::read(path).map_err(read_error)?;
        let source = path.canonicalize().map_err(read_error)?;

        // Another hard link to the file, inside an allowed directory, would
        // let a task rewrite the policy the server loads next.
        #[cfg(unix)]
        let links = std::os::unix::fs::MetadataExt::nlink(&std::fs::metadata(&source).map_err(read_error)?);
        #[cfg(not(unix))]
        let links = 1;
        if links > 1 {
            return Err(PolicyError::Value {
                path: source,
                key: "(file)".into(),
                message: format!(
                    "the policy file has {links} hard links; keep a single link so no other path can change it"
                ),
            });
        }

        let mut protected = protected.clone();
        protected.files.push(path.to_path_buf());
        Policy::parse(&text, &source, &protected)
    }

    /// Validates policy text as if it were read from the file `source`,
    /// which must be canonical.
    ///
    /// # Errors
    ///
    /// Returns a [`PolicyError`] naming the key and value at fault.
    pub fn parse(text: &[u8], source: &Path, protected: &ProtectedPaths) -> Result<Policy, PolicyError> {
        let sha256 = crate::auth::sha256_hex(text);
        let raw: Option<RawPolicy> = serde_yaml_ng::from_slice(text).map_err(|e| PolicyError::Syntax {
            path: source.to_path_buf(),
            message: with_duplicate_lines(plain_serde_message(&e.to_string()), text),
        })?;
        // An empty file is a policy that grants nothing.
        let raw = raw.unwrap_or_else(|| RawPolicy {
            shell_allow: Vec::new(),
            shell_path: None,
            shell_env: BTreeMap::new(),
            shell_confinement: None,
            shell_system_paths: None,
            shell_limits: RawShellLimits::default(),
            paths_allow: Vec::new(),
            network: RawNetwork::default(),
            timeouts: RawTimeouts::default(),
            limits: RawLimits::default(),
            retention: RawRetention::default(),
            api: RawApi::default(),
            plugins: BTreeMap::new(),
        });

        let checker = Checker { source };
        let base = source.parent().unwrap_or(Path::new("/"));

        let (shell_allow, shell_entries) = checker.shell_allow("shell_allow", &raw.shell_allow)?;
        let domains = checker.strings("network.http_allow_domains", &raw.network.http_allow_domains)?;
        let shell_path = raw
            .shell_path
            .as_deref()
            .map(|p| checker.strings("shell_path", p))
            .transpose()?;
        let paths_allow = checker.resolve_paths(base, &raw.paths_allow)?;
        checker.check_protected(&paths_allow, protected)?;
        let network = checker.network(base, &raw.network, &domains)?;
        let shell = checker.shell(shell_entries, shell_path, &raw.shell_env, &paths_allow)?;

        let mut policy = Policy {
            source: source.to_path_buf(),
            sha256,
            shell_allow,
            shell,
            paths_allow,
            http_allow_domains: domains,
            network,
            timeouts: checker.timeouts(&raw.timeouts)?,
            limits: checker.limits(&raw.limits)?,
            api: checker.api(&raw.api)?,
            retention: Retention {
                runs_days: checker.days("retention.runs_days", raw.retention.runs_days, 30)?,
                audit_days: checker.days("retention.audit_days", raw.retention.audit_days, 365)?,
            },
            plugins: BTreeMap::new(),
            exposed_to_shell: Vec::new(),
        };
        policy.shell.confinement = checker.confinement(&raw, policy.timeouts.shell)?;
        if !policy.shell.entries.is_empty() {
            policy.exposed_to_shell =
                checker.exposed_to_shell(&policy.shell.confinement.system_paths, protected);
        }
        policy.network.inject = checker.injections(&raw.network.inject, &policy.network.http_allow)?;
        policy.plugins = checker.plugin_grants(base, &raw.plugins, &policy)?;
        Ok(policy)
    }

    /// Describes the capabilities this policy grants, one per line, for
    /// `apex policy check` and the startup log.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!(
            "policy {} (sha256 {})\n",
            self.source.display(),
            self.sha256
        ));

        out.push_str("directories (preopened under the same path):\n");
        if self.paths_allow.is_empty() {
            out.push_str("  none\n");
        }
        for allowed in &self.paths_allow {
            out.push_str(&format!("  {} ({})\n", allowed.path.display(), allowed.mode));
        }

        out.push_str("outgoing HTTP hosts (http and https):\n");
        if self.network.http_allow.is_empty() {
            out.push_str("  none\n");
        }
        for rule in &self.network.http_allow {
            out.push_str(&format!("  {rule}\n"));
        }
        let mut pinned: Vec<_> = self.network.resolve.iter().collect();
        pinned.sort();
        for (name, ip) in pinned {
            out.push_str(&format!("  resolve {name} -> {ip}\n"));
        }
        out.push_str(&format!(
            "  private addresses: {}\n",
            if self.network.allow_private_addresses {
                "allowed"
            } else {
                "denied"
            }
        ));
        if let Some(ca_file) = &self.network.ca_file {
            out.push_str(&format!("  extra CA certificates: {}\n", ca_file.display()));
        }
        out.push_str("shell command prefixes (a trailing space requires more arguments):\n");
        if self.shell.entries.is_empty() {
            out.push_str("  none\n");
        }
        for entry in &self.shell.entries {
            let network = if entry.network {
                "network through the proxy, to the outgoing HTTP hosts"
            } else {
                "no network"
            };
            out.push_str(&format!("  {:?} ({network})\n", entry.raw));
        }
        let search: Vec<String> = self
            .shell
            .search_path
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        out.push_str(&format!("  programs from: {}\n", search.join(":")));
        let names: Vec<&str> = self.shell.env.keys().map(String::as_str).collect();
        out.push_str(&format!(
            "  child environment: PATH, LANG, PYTHONNOUSERSITE, and HOME, XDG_CONFIG_HOME and CURL_HOME (an empty read-only directory){}{}\n",
            if names.is_empty() { "" } else { ", " },
            names.join(", ")
        ));

        out.push_str("raw sockets and name lookup: denied\nenvironment: empty\n");
        out.push_str(&format!(
            "history kept: runs {} days, audit events {} days\n",
            self.retention.runs_days, self.retention.audit_days
        ));
        let t = &self.timeouts;
        out.push_str(&format!(
            "timeouts: task {} s, shell {} s, http {} s\n",
            t.task.as_secs(),
            t.shell.as_secs(),
            t.http.as_secs()
        ));
        let l = &self.limits;
        out.push_str(&format!(
            "limits: memory {} MiB per run, upload {} MiB, input {} KiB, output {} KiB per stream, HTTP response {} MiB, file writes {} MiB per run, compiling an upload {} MiB, shell output {} KiB per stream, {} shell processes at once, {} runs at once and {} queued, {} client connections\n",
            l.memory_bytes >> 20,
            l.upload_bytes >> 20,
            l.input_bytes >> 10,
            l.output_bytes >> 10,
            l.response_bytes >> 20,
            l.write_bytes >> 20,
            l.compile_bytes >> 20,
            l.shell_output_bytes >> 10,
            l.max_shell_processes,
            l.max_concurrent_runs,
            l.max_queued_runs,
            l.max_connections
        ));
        out
    }
}

/// Validation helpers that know which file they report on.
struct Checker<'a> {
    source: &'a Path,
}

impl Checker<'_> {
    fn error(&self, key: impl Into<String>, message: impl Into<String>) -> PolicyError {
        PolicyError::Value {
            path: self.source.to_path_buf(),
            key: key.into(),
            message: message.into(),
        }
    }

    /// Checks a list of strings: each a non-empty quoted string, none twice.
    fn strings(&self, key: &str, values: &[serde_yaml_ng::Value]) -> Result<Vec<String>, PolicyError> {
        let mut seen = HashSet::new();
        let mut strings = Vec::new();
        for (index, value) in values.iter().enumerate() {
            let serde_yaml_ng::Value::String(value) = value else {
                return Err(self.error(
                    format!("{key}[{index}]"),
                    format!("{} is not a string; quote the entry", describe_yaml(value)),
                ));
            };
            if value.trim().is_empty() {
                return Err(self.error(
                    format!("{key}[{index}]"),
                    "empty entry; remove it (an empty list grants nothing)",
                ));
            }
            if !seen.insert(value.as_str()) {
                return Err(self.error(
                    format!("{key}[{index}]"),
                    format!("duplicate entry {value:?}; list each value once"),
                ));
            }
            strings.push(value.clone());
        }
        Ok(strings)
    }

    fn resolve_paths(
        &self,
        base: &Path,
        raw: &[serde_yaml_ng::Value],
    ) -> Result<Vec<AllowedPath>, PolicyError> {
        let mut resolved: Vec<AllowedPath> = Vec::new();

        for (index, entry) in raw.iter().enumerate() {
            let key = format!("paths_allow[{index}]");
            // An entry is a path, or `{path: P, mode: rw|ro}`.
            let (written, mode) = match entry {
                serde_yaml_ng::Value::String(path) => (path.clone(), PathMode::Rw),
                serde_yaml_ng::Value::Mapping(_) => {
                    let entry: RawPathEntry = serde_yaml_ng::from_value(entry.clone()).map_err(|e| {
                        self.error(
                            &key,
                            format!("{e}; expected a path or {{path: DIR, mode: rw|ro}}"),
                        )
                    })?;
                    (entry.path, entry.mode)
                }
                _ => return Err(self.error(key, "expected a path or {path: DIR, mode: rw|ro}")),
            };
            let written = written.as_str();
            if written.trim().is_empty() {
                return Err(self.error(key, "empty path; remove the entry (an empty list grants nothing)"));
            }

            let joined = base.join(written);
            let path = joined.canonicalize().map_err(|e| {
                self.error(
                    &key,
                    format!(
                        "{written:?} resolves to {}, which cannot be used: {e}; create the directory or fix the path",
                        joined.display()
                    ),
                )
            })?;
            if !path.is_dir() {
                return Err(self.error(
                    key,
                    format!("{written:?} ({}) is not a directory", path.display()),
                ));
            }
            if path.to_str().is_none() {
                return Err(self.error(
                    key,
                    format!("{} is not valid UTF-8, which WASI paths require", path.display()),
                ));
            }
            if path == Path::new("/") {
                return Err(self.error(
                    key,
                    "the root directory would expose the whole host; allow a narrower directory",
                ));
            }
            if let Some(system) = SYSTEM_DIRS.iter().find(|d| path.starts_with(d)) {
                return Err(self.error(
                    key,
                    format!(
                        "{written:?} ({}) is inside {system}, which exposes the host's processes or devices; \
                         allow only directories of files the tasks need",
                        path.display()
                    ),
                ));
            }
            for (earlier, other) in resolved.iter().enumerate() {
                if other.path == path {
                    return Err(self.error(
                        key,
                        format!(
                            "{written:?} is the same directory as paths_allow[{earlier}] ({})",
                            path.display()
                        ),
                    ));
                }
                // A task could replace the inner directory with a symlink
                // through the outer one, and the next run would follow it.
                if other.path.starts_with(&path) || path.starts_with(&other.path) {
                    return Err(self.error(
                        key,
                        format!(
                            "{} and paths_allow[{earlier}] ({}) are nested; list only the outer directory, or move them apart",
                            path.display(),
                            other.path.display()
                        ),
                    ));
                }
            }

            resolved.push(AllowedPath { path, mode });
        }
        Ok(resolved)
    }

    fn check_protected(
        &self,
        allowed: &[AllowedPath],
        protected: &ProtectedPaths,
    ) -> Result<(), PolicyError> {
        let trusted = self.trusted_paths(protected);
        for (index, entry) in allowed.iter().enumerate() {
            for (what, given) in &trusted {
                // Check the path as given and every place a symlink along it
                // leads to: a symlink inside an allowed directory is as
                // writable to a task as a file there.
                for path in path_forms(given) {
                    if path.starts_with(&entry.path) || entry.path.starts_with(&path) {
                        return Err(self.error(
                            format!("paths_allow[{index}]"),
                            format!(
                                "{} overlaps {what} ({}); tasks must never reach files the server trusts, so move one of them",
                                entry.path.display(),
                                path.display()
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Returns the files and directories the server trusts, each with how
    /// messages name it: the policy file, the data directory, and `protected`.
    fn trusted_paths<'p>(&'p self, protected: &'p ProtectedPaths) -> Vec<(&'static str, &'p Path)> {
        let mut trusted: Vec<(&'static str, &Path)> = vec![("the policy file", self.source)];
        if let Some(data_dir) = &protected.data_dir {
            trusted.push(("the data directory", data_dir));
        }
        for file in &protected.files {
            trusted.push(("a file the server trusts", file));
        }
        trusted
    }

    /// Lists the trusted files that a directory of `system_paths` contains,
    /// where Landlock lets every shell child read them.
    fn exposed_to_shell(&self, system_paths: &[PathBuf], protected: &ProtectedPaths) -> Vec<String> {
        let mut exposed = Vec::new();
        for (what, given) in self.trusted_paths(protected) {
            let forms = path_forms(given);
            if let Some(system) = system_paths
                .iter()
                .find(|s| forms.iter().any(|p| p.starts_with(s)))
            {
                exposed.push(format!(
                    "shell_system_paths entry {} contains {what} ({}), so shell children can read it; move it or list narrower shell_system_paths",
                    system.display(),
                    given.display()
                ));
            }
        }
        exposed
    }

    fn seconds(&self, key: &str, value: Option<u64>, default: u64) -> Result<Duration, PolicyError> {
        let seconds = value.unwrap_or(default);
        if seconds == 0 || seconds > MAX_SECONDS {
            return Err(self.error(
                key,
                format!("{seconds} is out of range; use 1 to {MAX_SECONDS} seconds"),
            ));
        }
        Ok(Duration::from_secs(seconds))
    }

    fn timeouts(&self, raw: &RawTimeouts) -> Result<Timeouts, PolicyError> {
        let task = match (raw.task_seconds, raw.python_seconds) {
            (Some(task), Some(python)) if task != python => {
                return Err(self.error(
                    "timeouts.task_seconds",
                    format!(
                        "{task} differs from timeouts.python_seconds ({python}); both name the deadline of a plugin run, so set only one"
                    ),
                ));
            }
            (task, python) => task.or(python),
        };
        let task_key = if raw.task_seconds.is_some() {
            "timeouts.task_seconds"
        } else {
            "timeouts.python_seconds"
        };

        Ok(Timeouts {
            task: self.seconds(task_key, task, DEFAULT_TASK_SECONDS)?,
            task_key,
            shell: self.seconds("timeouts.shell_seconds", raw.shell_seconds, DEFAULT_SHELL_SECONDS)?,
            http: self.seconds("timeouts.http_seconds", raw.http_seconds, DEFAULT_HTTP_SECONDS)?,
        })
    }

    fn sized(
        &self,
        key: &str,
        value: Option<u64>,
        default: u64,
        max: u64,
        unit_shift: u32,
        unit: &str,
    ) -> Result<usize, PolicyError> {
        let amount = value.unwrap_or(default);
        if amount == 0 || amount > max {
            return Err(self.error(key, format!("{amount} is out of range; use 1 to {max} {unit}")));
        }
        Ok((amount << unit_shift) as usize)
    }

    fn networks(&self, key: &str, entries: &[String]) -> Result<Vec<IpNet>, PolicyError> {
        let mut nets = Vec::new();
        for (index, entry) in entries.iter().enumerate() {
            let net = IpNet::parse(entry.trim()).ok_or_else(|| {
                self.error(
                    format!("{key}[{index}]"),
                    format!("{entry:?} is not a network such as 127.0.0.1/32 or fd00::/8"),
                )
            })?;
            nets.push(net);
        }
        Ok(nets)
    }

    fn api(&self, raw: &RawApi) -> Result<ApiPolicy, PolicyError> {
        let trusted_proxy = match &raw.trusted_proxy {
            None => None,
            Some(proxy) => {
                if axum::http::HeaderName::from_bytes(proxy.header.as_bytes()).is_err() {
                    return Err(self.error(
                        "api.trusted_proxy.header",
                        format!("{:?} is not a header name", proxy.header),
                    ));
                }
                if proxy.from.is_empty() {
                    return Err(self.error(
                        "api.trusted_proxy.from",
                        "list the networks the proxy connects from",
                    ));
                }
                Some(TrustedProxy {
                    header: proxy.header.to_ascii_lowercase(),
                    from: self.networks("api.trusted_proxy.from", &proxy.from)?,
                })
            }
        };
        let ip_allow = match &raw.ip_allow {
            None => None,
            Some(entries) => {
                let mut nets = Vec::new();
                for (index, entry) in entries.iter().enumerate() {
                    let net = IpNet::parse(entry.trim()).ok_or_else(|| {
                        self.error(
                            format!("api.ip_allow[{index}]"),
                            format!("{entry:?} is not a network such as 127.0.0.1/32 or fd00::/8"),
                        )
                    })?;
                    nets.push(net);
                }
                Some(nets)
            }
        };
        let max = raw.auth_failures.max.unwrap_or(20);
        if max == 0 || max > 1_000_000 {
            return Err(self.error(
                "api.auth_failures.max",
                format!("{max} is out of range; use 1 to 1000000"),
            ));
        }
        Ok(ApiPolicy {
            ip_allow,
            failures_max: max as u32,
            failures_window: self.seconds(
                "api.auth_failures.window_seconds",
                raw.auth_failures.window_seconds,
                60,
            )?,
            block: self.seconds(
                "api.auth_failures.block_seconds",
                raw.auth_failures.block_seconds,
                60,
            )?,
            trusted_proxy,
        })
    }

    fn confinement(&self, raw: &RawPolicy, shell_timeout: Duration) -> Result<Confinement, PolicyError> {
        let required = match raw.shell_confinement.as_deref() {
            None | Some("best_effort") => false,
            Some("required") => true,
            Some(other) => {
                return Err(self.error(
                    "shell_confinement",
                    format!("{other:?} is not `required` or `best_effort`"),
                ));
            }
        };
        let written: Vec<String> = raw.shell_system_paths.clone().unwrap_or_else(|| {
            crate::shell::confine::DEFAULT_SYSTEM_PATHS
                .iter()
                .map(|p| p.to_string())
                .collect()
        });
        let mut system_paths = Vec::new();
        for (index, path) in written.iter().enumerate() {
            if !path.starts_with('/') {
                return Err(self.error(
                    format!("shell_system_paths[{index}]"),
                    format!("{path:?} must be absolute"),
                ));
            }
            system_paths.push(PathBuf::from(path));
        }

        let limits = &raw.shell_limits;
        let count = |key, value, default, max| self.sized(key, value, default, max, 0, "");
        let mib = |key, value, default, max| self.sized(key, value, default, max, 20, "MiB");
        let cpu_default = shell_timeout.as_secs() + 5;
        Ok(Confinement {
            system_paths,
            required,
            limits: ChildLimits {
                cpu_seconds: count(
                    "shell_limits.cpu_seconds",
                    limits.cpu_seconds,
                    cpu_default,
                    MAX_SECONDS,
                )? as u64,
                memory_bytes: mib("shell_limits.memory_mib", limits.memory_mib, 4096, 1 << 20)? as u64,
                file_bytes: mib("shell_limits.file_mib", limits.file_mib, 1024, 1 << 20)? as u64,
                processes: count("shell_limits.processes", limits.processes, 1024, 1 << 20)? as u64,
            },
        })
    }

    fn days(&self, key: &str, value: Option<u64>, default: u64) -> Result<u64, PolicyError> {
        let days = value.unwrap_or(default);
        if days == 0 || days > 36_500 {
            return Err(self.error(key, format!("{days} is out of range; use 1 to 36500 days")));
        }
        Ok(days)
    }

    fn limits(&self, raw: &RawLimits) -> Result<Limits, PolicyError> {
        let mib = |key, value, default, max| self.sized(key, value, default, max, 20, "MiB");
        let kib = |key, value, default, max| self.sized(key, value, default, max, 10, "KiB");
        let count = |key, value, default, max| self.sized(key, value, default, max, 0, "processes");
        Ok(Limits {
            memory_bytes: mib(
                "limits.memory_mib",
                raw.memory_mib,
                DEFAULT_MEMORY_MIB,
                MAX_MEMORY_MIB,
            )?,
            upload_bytes: mib(
                "limits.upload_mib",
                raw.upload_mib,
                DEFAULT_UPLOAD_MIB,
                MAX_UPLOAD_MIB,
            )?,
            input_bytes: kib(
                "limits.input_kib",
                raw.input_kib,
                DEFAULT_INPUT_KIB,
                MAX_INPUT_KIB,
            )?,
            output_bytes: kib(
                "limits.output_kib",
                raw.output_kib,
                DEFAULT_OUTPUT_KIB,
                MAX_OUTPUT_KIB,
            )?,
            response_bytes: mib(
                "limits.response_mib",
                raw.response_mib,
                DEFAULT_RESPONSE_MIB,
                MAX_RESPONSE_MIB,
            )?,
            write_bytes: mib(
                "limits.write_mib",
                raw.write_mib,
                DEFAULT_WRITE_MIB,
                MAX_WRITE_MIB,
            )?,
            compile_bytes: match raw.compile_mib {
                // The worker's own executable and threads take tens of MiB.
                Some(small) if small < MIN_COMPILE_MIB => {
                    return Err(self.error(
                        "limits.compile_mib",
                        format!("{small} is out of range; use {MIN_COMPILE_MIB} to {MAX_COMPILE_MIB} MiB"),
                    ));
                }
                value => mib("limits.compile_mib", value, DEFAULT_COMPILE_MIB, MAX_COMPILE_MIB)?,
            },
            shell_output_bytes: kib(
                "limits.shell_output_kib",
                raw.shell_output_kib,
                DEFAULT_OUTPUT_KIB,
                MAX_OUTPUT_KIB,
            )?,
            max_concurrent_runs: count(
                "limits.max_concurrent_runs",
                raw.max_concurrent_runs,
                DEFAULT_CONCURRENT_RUNS,
                MAX_CONCURRENT_RUNS,
            )?,
            max_queued_runs: count(
                "limits.max_queued_runs",
                raw.max_queued_runs,
                DEFAULT_QUEUED_RUNS,
                MAX_QUEUED_RUNS,
            )?,
            max_shell_processes: count(
                "limits.max_shell_processes",
                raw.max_shell_processes,
                DEFAULT_SHELL_PROCESSES,
                MAX_SHELL_PROCESSES,
            )?,
            max_connections: self.sized(
                "limits.max_connections",
                raw.max_connections,
                DEFAULT_CONNECTIONS,
                MAX_CONNECTIONS,
                0,
                "connections",
            )?,
        })
    }
}

impl Checker<'_> {
    /// Reads a `shell_allow` list: each entry is a command prefix, or a
    /// mapping `{prefix: PREFIX, network: BOOL}`. Returns the prefixes as
    /// written and the parsed entries.
    pub(super) fn shell_allow(
        &self,
        key: &str,
        values: &[serde_yaml_ng::Value],
    ) -> Result<(Vec<String>, Vec<ShellEntry>), PolicyError> {
        use serde_yaml_ng::Value;

        let mut written = Vec::new();
        let mut entries = Vec::new();
        for (index, value) in values.iter().enumerate() {
            let at = format!("{key}[{index}]");
            let (prefix, network) = match value {
                Value::String(prefix) => (prefix.clone(), false),
                Value::Mapping(map) => {
                    for name in map.keys() {
                        if !matches!(name.as_str(), Some("prefix" | "network")) {
                            let name = name
                                .as_str()
                                .map_or_else(|| describe_yaml(name), |n| format!("{n:?}"));
                            return Err(self.error(
                                at,
                                format!("unknown key {name}; an entry has `prefix` and optionally `network`"),
                            ));
                        }
                    }
                    let prefix = match map.get("prefix") {
                        Some(Value::String(prefix)) => prefix.clone(),
                        Some(other) => {
                            return Err(self.error(
                                format!("{at}.prefix"),
                                format!("{} is not a string", describe_yaml(other)),
                            ));
                        }
                        None => {
                            return Err(
                                self.error(at, "missing `prefix`: the command prefix this entry allows")
                            );
                        }
                    };
                    let network = match map.get("network") {
                        None => false,
                        Some(Value::Bool(network)) => *network,
                        Some(other) => {
                            return Err(self.error(
                                format!("{at}.network"),
                                format!("{} is not true or false", describe_yaml(other)),
                            ));
                        }
                    };
                    (prefix, network)
                }
                other => {
                    return Err(self.error(
                        at,
                        format!(
                            "{} is neither a command prefix nor a mapping {{prefix: PREFIX, network: true}}; quote the prefix",
                            describe_yaml(other)
                        ),
                    ));
                }
            };
            if prefix.trim().is_empty() {
                return Err(self.error(at, "empty entry; remove it (an empty list grants nothing)"));
            }
            if written.contains(&prefix) {
                return Err(self.error(at, format!("duplicate entry {prefix:?}; list each value once")));
            }
            let mut entry =
                ShellEntry::parse(&prefix).map_err(|e| self.error(at.clone(), format!("{prefix:?}: {e}")))?;
            entry.network = network;
            written.push(prefix);
            entries.push(entry);
        }
        Ok((written, entries))
    }

    fn shell(
        &self,
        entries: Vec<ShellEntry>,
        shell_path: Option<Vec<String>>,
        shell_env: &BTreeMap<String, String>,
        paths_allow: &[AllowedPath],
    ) -> Result<ShellPolicy, PolicyError> {
        let written_path: Vec<String> =
            shell_path.unwrap_or_else(|| DEFAULT_SHELL_PATH.iter().map(|p| p.to_string()).collect());
        let mut search_path = Vec::new();
        for (index, dir) in written_path.iter().enumerate() {
            let path = PathBuf::from(dir);
            if !path.is_absolute() {
                return Err(self.error(
                    format!("shell_path[{index}]"),
                    format!("{dir:?} must be an absolute directory"),
                ));
            }
            // A task could plant a program there that shadows an allowed one.
            let resolved = path.canonicalize().unwrap_or_else(|_| path.clone());
            if let Some(allowed) = paths_allow
                .iter()
                .find(|a| resolved.starts_with(&a.path) || a.path.starts_with(&resolved))
            {
                return Err(self.error(
                    format!("shell_path[{index}]"),
                    format!(
                        "{dir:?} overlaps paths_allow entry {}, where tasks can write programs",
                        allowed.path.display()
                    ),
                ));
            }
            search_path.push(path);
        }

        for name in shell_env.keys() {
            let valid = !name.is_empty()
                && !name.starts_with(|c: char| c.is_ascii_digit())
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !valid {
                return Err(self.error(
                    format!("shell_env.{name}"),
                    "an environment variable name is letters, digits and `_`",
                ));
            }
            if RESERVED_SHELL_ENV.contains(&name.as_str()) || name.starts_with("GIT_") {
                return Err(self.error(
                    format!("shell_env.{name}"),
                    "the host sets this variable itself (PATH from shell_path, HOME and its kin to an empty directory, LANG, and GIT_* for git)",
                ));
            }
        }

        Ok(ShellPolicy {
            entries,
            search_path,
            env: shell_env.clone(),
            confinement: Confinement::default(),
        })
    }

    fn network(
        &self,
        base: &Path,
        raw: &RawNetwork,
        domains: &[String],
    ) -> Result<NetworkPolicy, PolicyError> {
        let mut http_allow = Vec::new();
        for (index, entry) in domains.iter().enumerate() {
            let key = format!("network.http_allow_domains[{index}]");
            let rule = HostRule::parse(entry).map_err(|e| self.error(&key, format!("{entry:?}: {e}")))?;
            if let Some(earlier) = http_allow.iter().position(|r| *r == rule) {
                return Err(self.error(
                    key,
                    format!("{entry:?} allows the same as network.http_allow_domains[{earlier}]; list each host once"),
                ));
            }
            http_allow.push(rule);
        }

        let mut resolve = HashMap::new();
        for (name, address) in &raw.resolve {
            let key = format!("network.resolve.{name}");
            let normalized = normalize_name(name)
                .ok_or_else(|| self.error(&key, format!("{name:?} is not a valid host name")))?;
            let ip: IpAddr = address
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse()
                .map_err(|_| self.error(&key, format!("{address:?} is not an IP address")))?;
            if resolve.insert(normalized, ip).is_some() {
                return Err(self.error(
                    key,
                    "the same host name is listed twice (names compare in lower case)",
                ));
            }
        }

        let ca_file = match &raw.ca_file {
            None => None,
            Some(written) => {
                let joined = base.join(written);
                let path = joined.canonicalize().map_err(|e| {
                    self.error(
                        "network.ca_file",
                        format!("{written:?} ({}) cannot be used: {e}", joined.display()),
                    )
                })?;
                if !path.is_file() {
                    return Err(self.error("network.ca_file", format!("{} is not a file", path.display())));
                }
                Some(path)
            }
        };

        Ok(NetworkPolicy {
            http_allow,
            allow_private_addresses: raw.allow_private_addresses,
            resolve,
            ca_file,
            inject: Vec::new(),
        })
    }
}

/// Replaces the Rust type names in a serde message with what the policy
/// file should contain.
fn plain_serde_message(message: &str) -> String {
    message
        .replace(
            "expected struct RawPolicy",
            "expected a mapping of policy keys such as shell_allow and paths_allow",
        )
        .replace("expected struct ", "expected a mapping for ")
        .replace("expected u64", "expected a whole number")
        .replace("expected u32", "expected a whole number")
        .replace("expected a sequence", "expected a list, such as [\"a\", \"b\"]")
}

/// Adds the lines of a duplicated key to serde's message, which gives no
/// location for a key repeated at the top level.
fn with_duplicate_lines(message: String, text: &[u8]) -> String {
    let Some(key) = message
        .split("duplicate field `")
        .nth(1)
        .and_then(|rest| rest.split('`').next())
    else {
        return message;
    };
    let text = String::from_utf8_lossy(text);
    let lines: Vec<String> = text
        .lines()
        .enumerate()
        .filter(|(_, line)| line.trim_start().starts_with(&format!("{key}:")))
        .map(|(index, _)| (index + 1).to_string())
        .collect();
    // A repeated nested key already comes with a location.
    if lines.len() < 2 || message.contains(" at line ") {
        return message;
    }
    format!("{message} (on lines {}); keep one", lines.join(", "))
}

/// Returns `path` made absolute, and for each of its ancestors that exists,
/// the ancestor's resolved location joined with the rest of the path. Every
/// location a symlink along `path` leads to is in the list.
fn path_forms(path: &Path) -> Vec<PathBuf> {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut forms = vec![absolute.clone()];
    for ancestor in absolute.ancestors() {
        let Ok(resolved) = ancestor.canonicalize() else {
            continue;
        };
        let rest = absolute.strip_prefix(ancestor).unwrap_or(Path::new(""));
        let form = if rest.as_os_str().is_empty() {
            resolved
        } else {
            resolved.join(rest)
        };
        if !forms.contains(&form) {
            forms.push(form);
        }
    }
    forms
}

fn describe_yaml(value: &serde_yaml_ng::Value) -> String {
    match value {
        serde_yaml_ng::Value::Null => "null".into(),
        serde_yaml_ng::Value::Bool(b) => format!("the boolean {b}"),
        serde_yaml_ng::Value::Number(n) => format!("the number {n}"),
        serde_yaml_ng::Value::String(s) => format!("the string {s:?}"),
        serde_yaml_ng::Value::Sequence(_) => "a list".into(),
        serde_yaml_ng::Value::Mapping(_) => "a mapping".into(),
        serde_yaml_ng::Value::Tagged(_) => "a tagged value".into(),
    }
}
