//! Per-plugin grants (`plugins:`) and secrets injected into outgoing
//! requests (`network.inject`).
//!
//! A plugin's section may only narrow the global policy: every path, host,
//! command and deadline it names must already be allowed globally. A key
//! left out inherits the global value.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;

use super::{AllowedPath, Checker, PathMode, Policy, PolicyError, RawTimeouts};
use crate::net::rules::{HostPattern, HostRule};
use crate::shell::rules::ShellEntry;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPluginGrant {
    http_allow_domains: Option<Vec<serde_yaml_ng::Value>>,
    paths_allow: Option<Vec<serde_yaml_ng::Value>>,
    shell_allow: Option<Vec<serde_yaml_ng::Value>>,
    timeouts: Option<RawTimeouts>,
    #[serde(default)]
    config: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawInjection {
    host: String,
    header: String,
    value: String,
    plugins: Vec<String>,
    #[serde(default)]
    plain_http: bool,
}

/// A plugin's section of the policy, validated as a narrowing.
#[derive(Debug, Clone, Default)]
pub struct PluginGrant {
    /// Replaces `network.http_allow_domains` (as written, then parsed).
    pub http_allow: Option<(Vec<String>, Vec<HostRule>)>,
    /// Replaces `paths_allow`.
    pub paths_allow: Option<Vec<AllowedPath>>,
    /// Replaces `shell_allow` (as written, then parsed).
    pub shell_allow: Option<(Vec<String>, Vec<ShellEntry>)>,
    /// Replaces the deadlines it sets.
    pub timeouts: Option<super::Timeouts>,
    /// Values for `wasi:config/store`, with `${NAME}` expanded.
    pub config: BTreeMap<String, String>,
}

/// A header the host adds to a plugin's requests to one host. The value is
/// a secret: its `Debug` form leaves it out.
#[derive(Clone, PartialEq, Eq)]
pub struct Injection {
    /// Host name, normalised.
    pub host: String,
    /// Port, or `None` for the scheme's default port.
    pub port: Option<u16>,
    /// Header name, lower case.
    pub header: String,
    /// Header value, with `${NAME}` expanded.
    pub value: String,
    /// Plugins whose requests get the header.
    pub plugins: Vec<String>,
    /// Whether plain `http` requests get the header too, in clear text.
    pub plain_http: bool,
}

impl fmt::Debug for Injection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Injection")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("header", &self.header)
            .field("plugins", &self.plugins)
            .finish_non_exhaustive()
    }
}

/// Replaces each `${NAME}` in `text` with the environment variable NAME.
fn expand(checker: &Checker<'_>, key: &str, text: &str) -> Result<String, PolicyError> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| checker.error(key, "`${` without a closing `}`"))?;
        let name = &after[..end];
        let value = std::env::var(name).map_err(|_| {
            checker.error(
                key,
                format!("the environment variable {name} is not set; set it before starting the server"),
            )
        })?;
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Returns whether every request `narrow` allows is also allowed by `wide`.
fn host_rule_within(narrow: &HostRule, wide: &HostRule) -> bool {
    if narrow.port != wide.port {
        return false;
    }
    match (&narrow.host, &wide.host) {
        (HostPattern::Name(a), HostPattern::Name(b)) => a == b,
        (HostPattern::Name(name), HostPattern::Subdomains(suffix)) => name
            .strip_suffix(suffix.as_str())
            .and_then(|p| p.strip_suffix('.'))
            .is_some_and(|l| !l.is_empty()),
        (HostPattern::Subdomains(a), HostPattern::Subdomains(b)) => {
            a == b || a.strip_suffix(b.as_str()).is_some_and(|p| p.ends_with('.'))
        }
        (HostPattern::Ip(a), HostPattern::Ip(b)) => a == b,
        _ => false,
    }
}

/// Returns whether every command `narrow` allows is also allowed by `wide`.
fn shell_entry_within(narrow: &ShellEntry, wide: &ShellEntry) -> bool {
    (wide.network || !narrow.network)
        && narrow.tokens.starts_with(&wide.tokens)
        && (!wide.needs_argument || narrow.tokens.len() > wide.tokens.len() || narrow.needs_argument)
}

impl Checker<'_> {
    pub(super) fn plugin_grants(
        &self,
        base: &std::path::Path,
        raw: &BTreeMap<String, RawPluginGrant>,
        global: &Policy,
    ) -> Result<BTreeMap<String, PluginGrant>, PolicyError> {
        let mut grants = BTreeMap::new();
        for (name, section) in raw {
            let prefix = format!("plugins.{name}");
            if !crate::store::is_valid_name(name) {
                return Err(self.error(prefix, "not a valid plugin name ([a-z0-9][a-z0-9_-]{0,62})"));
            }
            let mut grant = PluginGrant::default();

            if let Some(entries) = &section.http_allow_domains {
                let key = format!("{prefix}.http_allow_domains");
                let written = self.strings(&key, entries)?;
                let mut rules = Vec::new();
                for (index, entry) in written.iter().enumerate() {
                    let rule = HostRule::parse(entry)
                        .map_err(|e| self.error(format!("{key}[{index}]"), format!("{entry:?}: {e}")))?;
                    if !global
                        .network
                        .http_allow
                        .iter()
                        .any(|wide| host_rule_within(&rule, wide))
                    {
                        return Err(self.error(
                            format!("{key}[{index}]"),
                            format!("{entry:?} is wider than the global network.http_allow_domains; a plugin may only narrow it"),
                        ));
                    }
                    rules.push(rule);
                }
                grant.http_allow = Some((written, rules));
            }

            if let Some(entries) = &section.paths_allow {
                let key = format!("{prefix}.paths_allow");
                let paths = self
                    .resolve_paths(base, entries)
                    .map_err(|e| rename_key(e, "paths_allow", &key))?;
                for (index, path) in paths.iter().enumerate() {
                    let within = global.paths_allow.iter().any(|wide| {
                        path.path.starts_with(&wide.path)
                            && (wide.mode == PathMode::Rw || path.mode == PathMode::Ro)
                    });
                    if !within {
                        return Err(self.error(
                            format!("{key}[{index}]"),
                            format!(
                                "{} ({}) is not inside a global paths_allow entry with at least that access; a plugin may only narrow it",
                                path.path.display(),
                                path.mode
                            ),
                        ));
                    }
                }
                grant.paths_allow = Some(paths);
            }

            if let Some(entries) = &section.shell_allow {
                let key = format!("{prefix}.shell_allow");
                let (written, entries) = self.shell_allow(&key, entries)?;
                let mut parsed = Vec::new();
                for (index, (entry, shell)) in written.iter().zip(entries).enumerate() {
                    if !global
                        .shell
                        .entries
                        .iter()
                        .any(|wide| shell_entry_within(&shell, wide))
                    {
                        return Err(self.error(
                            format!("{key}[{index}]"),
                            format!("{entry:?} is wider than every global shell_allow entry; a plugin may only narrow them, and may set `network: true` only under a global entry that has it"),
                        ));
                    }
                    parsed.push(shell);
                }
                grant.shell_allow = Some((written, parsed));
            }

            if let Some(raw_timeouts) = &section.timeouts {
                let mut timeouts = global.timeouts;
                let pairs = [
                    (
                        "task_seconds",
                        raw_timeouts.task_seconds.or(raw_timeouts.python_seconds),
                        &mut timeouts.task,
                        global.timeouts.task,
                    ),
                    (
                        "shell_seconds",
                        raw_timeouts.shell_seconds,
                        &mut timeouts.shell,
                        global.timeouts.shell,
                    ),
                    (
                        "http_seconds",
                        raw_timeouts.http_seconds,
                        &mut timeouts.http,
                        global.timeouts.http,
                    ),
                ];
                for (field, value, slot, limit) in pairs {
                    let Some(seconds) = value else { continue };
                    let key = format!("{prefix}.timeouts.{field}");
                    if seconds == 0 || seconds > limit.as_secs() {
                        return Err(self.error(
                            key,
                            format!("{seconds} must be 1 to {} (the global deadline); a plugin may only narrow it", limit.as_secs()),
                        ));
                    }
                    *slot = std::time::Duration::from_secs(seconds);
                }
                grant.timeouts = Some(timeouts);
            }

            for (config_key, value) in &section.config {
                let key = format!("{prefix}.config.{config_key}");
                grant
                    .config
                    .insert(config_key.clone(), expand(self, &key, value)?);
            }
            grants.insert(name.clone(), grant);
        }
        Ok(grants)
    }

    pub(super) fn injections(
        &self,
        raw: &[RawInjection],
        http_allow: &[HostRule],
    ) -> Result<Vec<Injection>, PolicyError> {
        let mut injections = Vec::new();
        for (index, entry) in raw.iter().enumerate() {
            let key = format!("network.inject[{index}]");
            let rule = HostRule::parse(&entry.host)
                .map_err(|e| self.error(format!("{key}.host"), format!("{:?}: {e}", entry.host)))?;
            let HostPattern::Name(host) = rule.host else {
                return Err(self.error(
                    format!("{key}.host"),
                    "name one host, without a wildcard or an IP address",
                ));
            };
            let header = entry.header.to_ascii_lowercase();
            if axum::http::HeaderName::from_bytes(header.as_bytes()).is_err() {
                return Err(self.error(
                    format!("{key}.header"),
                    format!("{:?} is not a header name", entry.header),
                ));
            }
            let value = expand(self, &format!("{key}.value"), &entry.value)?;
            if axum::http::HeaderValue::from_str(&value).is_err() {
                return Err(self.error(
                    format!("{key}.value"),
                    "the value is not a valid header value once expanded",
                ));
            }
            if entry.plugins.is_empty() {
                return Err(self.error(
                    format!("{key}.plugins"),
                    "list the plugins whose requests get the header",
                ));
            }
            if let Some(name) = entry
                .plugins
                .iter()
                .find(|name| !crate::store::is_valid_name(name))
            {
                return Err(self.error(
                    format!("{key}.plugins"),
                    format!("{name:?} is not a valid plugin name ([a-z0-9][a-z0-9_-]{{0,62}})"),
                ));
            }
            // An entry no request can reach is a mistake, such as a typo in
            // the host, that would otherwise go unnoticed.
            let target = crate::net::rules::RequestHost::Name(host.clone());
            let reachable = http_allow.iter().any(|allowed| {
                allowed.allows(&target, rule.port.unwrap_or(443), 443)
                    || (entry.plain_http && allowed.allows(&target, rule.port.unwrap_or(80), 80))
            });
            if !reachable {
                return Err(self.error(
                    format!("{key}.host"),
                    format!(
                        "{:?} is not allowed by network.http_allow_domains, so the header would never be sent; \
                         allow the host there or remove the entry",
                        entry.host
                    ),
                ));
            }
            injections.push(Injection {
                host,
                port: rule.port,
                header,
                value,
                plugins: entry.plugins.clone(),
                plain_http: entry.plain_http,
            });
        }
        Ok(injections)
    }
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "none".into()
    } else {
        items.join(", ")
    }
}

/// Renames the key of a path error so it names the plugin section.
fn rename_key(error: PolicyError, from: &str, to: &str) -> PolicyError {
    match error {
        PolicyError::Value { path, key, message } => PolicyError::Value {
            path,
            key: key.replacen(from, to, 1),
            message,
        },
        other => other,
    }
}

impl Policy {
    /// Describes each plugin's effective grants and the injections, for
    /// `apex policy check`. Injected values and configuration values are
    /// left out.
    pub fn describe_plugins(&self) -> String {
        let mut out = String::new();
        for (name, grant) in &self.plugins {
            let effective = self.for_plugin(name);
            out.push_str(&format!("plugin {name}:\n"));
            let paths: Vec<String> = effective
                .paths_allow
                .iter()
                .map(|p| format!("{} ({})", p.path.display(), p.mode))
                .collect();
            out.push_str(&format!("  directories: {}\n", list_or_none(&paths)));
            let hosts: Vec<String> = effective
                .network
                .http_allow
                .iter()
                .map(|r| r.to_string())
                .collect();
            out.push_str(&format!("  outgoing HTTP hosts: {}\n", list_or_none(&hosts)));
            let commands: Vec<String> = effective
                .shell
                .entries
                .iter()
                .map(|e| {
                    let network = if e.network { " (network)" } else { "" };
                    format!("{:?}{network}", e.raw)
                })
                .collect();
            out.push_str(&format!(
                "  shell command prefixes: {}\n",
                list_or_none(&commands)
            ));
            out.push_str(&format!(
                "  timeouts: task {} s, shell {} s, http {} s\n",
                effective.timeouts.task.as_secs(),
                effective.timeouts.shell.as_secs(),
                effective.timeouts.http.as_secs()
            ));
            let keys: Vec<String> = grant.config.keys().cloned().collect();
            out.push_str(&format!("  config keys: {}\n", list_or_none(&keys)));
        }
        for injection in &self.network.inject {
            let port = injection.port.map(|p| format!(":{p}")).unwrap_or_default();
            out.push_str(&format!(
                "inject header {} into requests to {}{port} of plugins {} (value not shown)\n",
                injection.header,
                injection.host,
                injection.plugins.join(", ")
            ));
        }
        out
    }

    /// Returns the policy `plugin` runs under: the global policy with the
    /// plugin's section applied, and only the injections listed for it.
    pub fn for_plugin(&self, plugin: &str) -> Policy {
        let mut policy = self.clone();
        policy
            .network
            .inject
            .retain(|i| i.plugins.iter().any(|p| p == plugin));
        let Some(grant) = self.plugins.get(plugin) else {
            return policy;
        };
        if let Some((written, rules)) = &grant.http_allow {
            policy.http_allow_domains = written.clone();
            policy.network.http_allow = rules.clone();
        }
        if let Some(paths) = &grant.paths_allow {
            policy.paths_allow = paths.clone();
        }
        if let Some((written, entries)) = &grant.shell_allow {
            policy.shell_allow = written.clone();
            policy.shell.entries = entries.clone();
        }
        if let Some(timeouts) = grant.timeouts {
            policy.timeouts = timeouts;
        }
        policy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_narrowing() {
        let wide = HostRule::parse("*.example.com").unwrap();
        assert!(host_rule_within(
            &HostRule::parse("api.example.com").unwrap(),
            &wide
        ));
        assert!(host_rule_within(
            &HostRule::parse("*.eu.example.com").unwrap(),
            &wide
        ));
        assert!(!host_rule_within(&HostRule::parse("example.com").unwrap(), &wide));
        assert!(
            !host_rule_within(&HostRule::parse("api.example.com:8443").unwrap(), &wide),
            "another port is wider"
        );
        assert!(!host_rule_within(
            &HostRule::parse("*.com").unwrap_or(wide.clone()),
            &HostRule::parse("a.example.com").unwrap()
        ));
    }

    #[test]
    fn shell_narrowing() {
        let wide = ShellEntry::parse("git ").unwrap();
        assert!(shell_entry_within(&ShellEntry::parse("git pull").unwrap(), &wide));
        assert!(shell_entry_within(
            &ShellEntry::parse("git clone ").unwrap(),
            &wide
        ));
        assert!(
            !shell_entry_within(&ShellEntry::parse("git").unwrap(), &wide),
            "bare git needs an argument globally"
        );
        assert!(!shell_entry_within(&ShellEntry::parse("gitk").unwrap(), &wide));
    }
}
