//! Host rules for outgoing HTTP requests, checked before any connection is
//! made.
//!
//! An entry of `network.http_allow_domains` is a host name
//! (`api.github.com`), a wildcard for subdomains only
//! (`*.git.example.com`) that does not cover a whole public suffix, or an IP literal (`127.0.0.1`, `[::1]`), each
//! optionally with a port (`localhost:8443`). Without a port an entry allows
//! the default port of the request's scheme. Names are compared in lower case,
//! without one trailing dot, and in their ASCII (punycode) form.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The host part of an allow-list entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// One exact host name, normalised.
    Name(String),
    /// Any name with at least one more label in front of this suffix.
    Subdomains(String),
    /// One IP address, written as a literal by the operator.
    Ip(IpAddr),
}

/// One entry of `network.http_allow_domains`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRule {
    /// The host part.
    pub host: HostPattern,
    /// The port, or `None` for the scheme's default port.
    pub port: Option<u16>,
}

impl fmt::Display for HostRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            HostPattern::Name(name) => f.write_str(name)?,
            HostPattern::Subdomains(suffix) => write!(f, "*.{suffix}")?,
            HostPattern::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]")?,
            HostPattern::Ip(ip) => write!(f, "{ip}")?,
        }
        match self.port {
            Some(port) => write!(f, ":{port}"),
            None => f.write_str(" (default port)"),
        }
    }
}

/// A request's host, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestHost {
    /// A host name in normalised ASCII form.
    Name(String),
    /// An IP literal in canonical form.
    Ip(IpAddr),
}

impl fmt::Display for RequestHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestHost::Name(name) => f.write_str(name),
            RequestHost::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            RequestHost::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// Normalises a host name: lower case, one trailing dot removed, ASCII
/// (punycode) form. Returns `None` for a name that is not a valid DNS name.
pub fn normalize_name(name: &str) -> Option<String> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.ends_with('.') {
        return None;
    }
    let ascii = idna::domain_to_ascii(name).ok()?;
    let valid = !ascii.is_empty()
        && ascii.len() <= 253
        && ascii.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    valid.then_some(ascii)
}

/// Classifies the host of a request URI (as `http::Uri` gives it, with
/// brackets around IPv6).
///
/// # Errors
///
/// Returns why the host can never be allowed: an IPv4 address in an unusual
/// spelling (`2130706433`, `0x7f.1`, `127.1`, `0177.0.0.1`), which resolvers
/// and URL parsers disagree about, or a name that is not a valid DNS name.
pub fn classify_host(host: &str) -> Result<RequestHost, String> {
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return inner
            .parse::<Ipv6Addr>()
            .map(|ip| RequestHost::Ip(IpAddr::V6(ip)))
            .map_err(|_| format!("invalid IPv6 literal {host}"));
    }
    let trimmed = host.strip_suffix('.').unwrap_or(host);
    if let Ok(ip) = trimmed.parse::<Ipv4Addr>() {
        return Ok(RequestHost::Ip(IpAddr::V4(ip)));
    }
    // The WHATWG URL standard treats a host whose last label is numeric (or
    // hex) as an IPv4 address, so `0x7f.1` means 127.0.0.1 to some clients and
    // resolvers. Such spellings are never accepted.
    let last = trimmed.rsplit('.').next().unwrap_or(trimmed);
    let numeric = !last.is_empty()
        && (last.bytes().all(|b| b.is_ascii_digit())
            || (last.len() > 2
                && last[..2].eq_ignore_ascii_case("0x")
                && last[2..].bytes().all(|b| b.is_ascii_hexdigit())));
    if numeric {
        return Err(format!(
            "{host} is an IPv4 address in a non-standard spelling; only the dotted-decimal form can be allowed"
        ));
    }
    normalize_name(host)
        .map(RequestHost::Name)
        .ok_or_else(|| format!("{host:?} is not a valid host name"))
}

impl HostRule {
    /// Parses one entry of `network.http_allow_domains`.
    ///
    /// # Errors
    ///
    /// Returns what is wrong with the entry.
    pub fn parse(entry: &str) -> Result<HostRule, String> {
        let entry = entry.trim();
        if entry.contains("://") || entry.contains('/') {
            return Err("write a host name without scheme or path, such as api.github.com".into());
        }
        let (host, port) = split_port(entry)?;

        if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            let ip: Ipv6Addr = inner
                .parse()
                .map_err(|_| format!("invalid IPv6 address {inner:?}"))?;
            return Ok(HostRule {
                host: HostPattern::Ip(IpAddr::V6(ip)),
                port,
            });
        }
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(HostRule {
                host: HostPattern::Ip(ip),
                port,
            });
        }

        if let Some(suffix) = host.strip_prefix("*.") {
            let suffix =
                normalize_name(suffix).ok_or_else(|| format!("invalid domain {suffix:?} after `*.`"))?;
            if !suffix.contains('.') {
                return Err(format!(
                    "`*.{suffix}` would allow a whole top-level domain; name a registered domain"
                ));
            }
            // Names under a public suffix such as `co.uk` or `github.io`
            // belong to different owners, so a wildcard over one allows hosts
            // the operator did not choose.
            if psl::suffix(suffix.as_bytes())
                .is_some_and(|public| public.is_known() && public == suffix.as_str())
            {
                return Err(format!(
                    "`*.{suffix}` would allow every host under `{suffix}`, a public suffix whose names \
                     belong to different owners; list the hosts you need, such as `name.{suffix}`"
                ));
            }
            return Ok(HostRule {
                host: HostPattern::Subdomains(suffix),
                port,
            });
        }
        if host.contains('*') {
            return Err("a wildcard is allowed only as the first label, as in `*.example.com`".into());
        }
        match classify_host(host)? {
            RequestHost::Name(name) => Ok(HostRule {
                host: HostPattern::Name(name),
                port,
            }),
            RequestHost::Ip(ip) => Ok(HostRule {
                host: HostPattern::Ip(ip),
                port,
            }),
        }
    }

    /// Returns whether this rule allows `host` on `port`, where
    /// `default_port` is the port of the request's scheme.
    pub fn allows(&self, host: &RequestHost, port: u16, default_port: u16) -> bool {
        if port != self.port.unwrap_or(default_port) {
            return false;
        }
        match (&self.host, host) {
            (HostPattern::Name(rule), RequestHost::Name(name)) => rule == name,
            (HostPattern::Subdomains(suffix), RequestHost::Name(name)) => {
                is_subdomain(name, suffix) && public_suffix_below(name, suffix).is_none()
            }
            (HostPattern::Ip(rule), RequestHost::Ip(ip)) => rule == ip,
            _ => false,
        }
    }

    /// Returns the public suffix that keeps this wildcard from matching
    /// `host`, when the host is under the wildcard's domain but also under a
    /// longer public suffix, as `bucket.s3.amazonaws.com` is under
    /// `*.amazonaws.com` and `s3.amazonaws.com`.
    pub fn foreign_suffix(&self, host: &RequestHost) -> Option<String> {
        match (&self.host, host) {
            (HostPattern::Subdomains(suffix), RequestHost::Name(name)) if is_subdomain(name, suffix) => {
                public_suffix_below(name, suffix)
            }
            _ => None,
        }
    }
}

/// Returns whether `name` has at least one label in front of `suffix`.
fn is_subdomain(name: &str, suffix: &str) -> bool {
    name.strip_suffix(suffix)
        .and_then(|prefix| prefix.strip_suffix('.'))
        .is_some_and(|label| !label.is_empty())
}

/// Returns the public suffix of `name` when it is longer than `suffix`, the
/// domain of a wildcard. Names under it belong to other owners than the
/// wildcard's domain, though the wildcard would match them.
fn public_suffix_below(name: &str, suffix: &str) -> Option<String> {
    let public = psl::suffix(name.as_bytes())?;
    (public.as_bytes().len() > suffix.len()).then(|| String::from_utf8_lossy(public.as_bytes()).into_owned())
}

/// Splits `host[:port]`, keeping IPv6 brackets on the host.
fn split_port(entry: &str) -> Result<(&str, Option<u16>), String> {
    let parse_port = |text: &str| -> Result<u16, String> {
        match text.parse::<u16>() {
            Ok(0) | Err(_) => Err(format!("invalid port {text:?}; use 1 to 65535")),
            Ok(port) => Ok(port),
        }
    };

    if entry.starts_with('[') {
        let close = entry
            .find(']')
            .ok_or_else(|| format!("missing `]` in {entry:?}"))?;
        let (host, rest) = entry.split_at(close + 1);
        return match rest {
            "" => Ok((host, None)),
            _ => match rest.strip_prefix(':') {
                Some(port) => Ok((host, Some(parse_port(port)?))),
                None => Err(format!("unexpected {rest:?} after the IPv6 address")),
            },
        };
    }
    // A bare IPv6 address has several colons and no port.
    if entry.matches(':').count() > 1 {
        return Ok((entry, None));
    }
    match entry.rsplit_once(':') {
        Some((host, port)) => Ok((host, Some(parse_port(port)?))),
        None => Ok((entry, None)),
    }
}

/// Returns why `ip` is not a public address, or `None` when it is.
///
/// Loopback, private, shared (CGNAT), link-local (including the cloud
/// metadata address 169.254.169.254), unique-local, multicast, broadcast,
/// documentation and unspecified addresses are all refused, and so are IPv6
/// forms that embed such an IPv4 address.
pub fn non_public_reason(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => non_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return non_public_v4(v4);
            }
            let segments = v6.segments();
            if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_unspecified() {
                Some("unspecified")
            } else if segments[0] & 0xfe00 == 0xfc00 {
                Some("unique-local")
            } else if segments[0] & 0xffc0 == 0xfe80 {
                Some("link-local")
            } else if v6.is_multicast() {
                Some("multicast")
            } else if segments[..6] == [0, 0, 0, 0, 0, 0] {
                // IPv4-compatible form (::a.b.c.d), deprecated and never public.
                Some("IPv4-compatible")
            } else if segments[0] == 0x64 && segments[1] == 0xff9b {
                // NAT64 (64:ff9b::/96) reaches the embedded IPv4 address.
                let embedded = Ipv4Addr::new(
                    (segments[6] >> 8) as u8,
                    segments[6] as u8,
                    (segments[7] >> 8) as u8,
                    segments[7] as u8,
                );
                non_public_v4(embedded)
            } else if segments[0] == 0x2001 && segments[1] == 0x0db8 {
                Some("documentation")
            } else {
                None
            }
        }
    }
}

fn non_public_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let octets = ip.octets();
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_private() {
        Some("private")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if ip.is_unspecified() || octets[0] == 0 {
        Some("unspecified")
    } else if octets[0] == 100 && (octets[1] & 0xc0) == 64 {
        Some("shared address space")
    } else if ip.is_broadcast() {
        Some("broadcast")
    } else if ip.is_multicast() || octets[0] >= 240 {
        Some("multicast or reserved")
    } else if ip.is_documentation() {
        Some("documentation")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(host: &str) -> RequestHost {
        classify_host(host).unwrap()
    }

    #[test]
    fn exact_name_matches_case_and_trailing_dot() {
        let rule = HostRule::parse("api.github.com").unwrap();
        assert!(rule.allows(&name("api.github.com"), 443, 443));
        assert!(rule.allows(&name("API.GitHub.com"), 443, 443));
        assert!(rule.allows(&name("api.github.com."), 443, 443));
        assert!(!rule.allows(&name("api.github.com"), 8443, 443), "other port");
        assert!(!rule.allows(&name("xapi.github.com"), 443, 443));
        assert!(!rule.allows(&name("api.github.com.evil.com"), 443, 443));
        assert!(
            classify_host("api.github.com..").is_err(),
            "only one trailing dot is ignored"
        );
    }

    #[test]
    fn wildcard_matches_subdomains_only() {
        let rule = HostRule::parse("*.git.example.com").unwrap();
        assert!(rule.allows(&name("eu.git.example.com"), 443, 443));
        assert!(rule.allows(&name("a.b.git.example.com"), 443, 443));
        assert!(!rule.allows(&name("git.example.com"), 443, 443));
        assert!(!rule.allows(&name("evilgit.example.com"), 443, 443));
        assert!(!rule.allows(&name("git.example.com.evil.com"), 443, 443));
    }

    #[test]
    fn wildcard_under_public_suffix_rejected() {
        // Whole public suffixes, in any spelling, and listed ones that a
        // two-label check would let through.
        for entry in [
            "*.co.uk",
            "*.CO.UK.",
            "*.github.io",
            "*.githubusercontent.com",
            "*.s3.amazonaws.com",
            "*.xn--55qx5d.cn",
            "*.公司.cn",
        ] {
            let error = HostRule::parse(entry).unwrap_err();
            assert!(error.contains("public suffix"), "{entry:?}: {error}");
        }
        // One owner's domain under a public suffix, and exact names.
        for entry in [
            "*.example.co.uk",
            "*.docs.github.io",
            "*.internal.test",
            "github.io",
            "raw.githubusercontent.com",
        ] {
            assert!(HostRule::parse(entry).is_ok(), "{entry:?}");
        }
    }

    #[test]
    fn wildcard_skips_public_suffixes_below_it() {
        let rule = HostRule::parse("*.amazonaws.com").unwrap();
        // `s3.amazonaws.com` and `us-east-1.compute.amazonaws.com` are
        // public suffixes: buckets and machines of other customers.
        for host in [
            "bucket.s3.amazonaws.com",
            "ec2-1-2-3-4.us-east-1.compute.amazonaws.com",
        ] {
            assert!(!rule.allows(&name(host), 443, 443), "{host}");
            assert!(rule.foreign_suffix(&name(host)).is_some(), "{host}");
        }
        assert!(rule.allows(&name("sts.amazonaws.com"), 443, 443));
        assert_eq!(rule.foreign_suffix(&name("sts.amazonaws.com")), None);

        let rule = HostRule::parse("*.example.co.uk").unwrap();
        assert!(rule.allows(&name("api.example.co.uk"), 443, 443));
    }

    #[test]
    fn port_in_entry_replaces_default() {
        let rule = HostRule::parse("localhost:8443").unwrap();
        assert!(rule.allows(&name("localhost"), 8443, 443));
        assert!(!rule.allows(&name("localhost"), 443, 443));
        assert!(!rule.allows(&name("localhost"), 80, 80));
    }

    #[test]
    fn internationalised_names_compared_as_punycode() {
        let rule = HostRule::parse("bücher.example").unwrap();
        assert_eq!(rule.host, HostPattern::Name("xn--bcher-kva.example".into()));
        assert!(rule.allows(&name("xn--bcher-kva.example"), 443, 443));
        assert!(rule.allows(&name("BÜCHER.example"), 443, 443));
    }

    #[test]
    fn odd_ipv4_spellings_rejected() {
        for host in [
            "2130706433",
            "0x7f.1",
            "0x7f000001",
            "127.1",
            "0177.0.0.1",
            "127.0.0.1.",
            "1.2.3.0x4",
        ] {
            if host == "127.0.0.1." {
                // A trailing dot on a dotted-decimal address is still that address.
                assert_eq!(
                    classify_host(host),
                    Ok(RequestHost::Ip("127.0.0.1".parse().unwrap()))
                );
                continue;
            }
            assert!(classify_host(host).is_err(), "{host}");
        }
    }

    #[test]
    fn ip_literal_matches_only_listed_address() {
        let rule = HostRule::parse("127.0.0.1:8080").unwrap();
        assert!(rule.allows(&name("127.0.0.1"), 8080, 80));
        assert!(!rule.allows(&name("127.0.0.2"), 8080, 80));
        assert!(
            !rule.allows(&name("localhost"), 8080, 80),
            "a name is not the literal"
        );

        let v6 = HostRule::parse("[::1]:8080").unwrap();
        assert!(v6.allows(&name("[::1]"), 8080, 80));
        assert!(!v6.allows(&name("[::2]"), 8080, 80));
        assert_eq!(
            HostRule::parse("::1").unwrap().host,
            HostPattern::Ip("::1".parse().unwrap())
        );
    }

    #[test]
    fn invalid_entries_rejected() {
        for entry in [
            "",
            "*",
            "*.com",
            "a.*.com",
            "*example.com",
            "host:0",
            "host:99999",
            "host:x",
            "[::1",
            "[::1]x",
            "under_score.com",
            "-a.com",
        ] {
            assert!(HostRule::parse(entry).is_err(), "{entry:?}");
        }
    }

    #[test]
    fn non_public_addresses_detected() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fc00::1",
            "fd12::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "::127.0.0.1",
        ] {
            assert!(non_public_reason(ip.parse().unwrap()).is_some(), "{ip}");
        }
        for ip in [
            "93.184.216.34",
            "140.82.112.3",
            "2606:4700::1111",
            "64:ff9b::808:808",
        ] {
            assert_eq!(non_public_reason(ip.parse().unwrap()), None, "{ip}");
        }
    }
}
