//! Which names the page answers to, and under which origin browsers reach
//! it.
//!
//! Two problems, one setting (`IDENTITY_WEB_ORIGIN`):
//! - **DNS rebinding.** A site whose name an attacker points at this
//!   server's address (say 127.0.0.1) is, to the browser, the attacker's
//!   own origin: its scripts may read the page and post its forms, and the
//!   `Origin` check passes, since `Origin` and `Host` both say the
//!   attacker's name. The page therefore answers only to the `Host` it is
//!   served under: the configured origin's, or, over plaintext without one,
//!   an IP address or `localhost` (names an attacker cannot point
//!   elsewhere). Over TLS without one, the certificate binds the name.
//! - **A TLS-terminating proxy.** Behind one, the page is reached over
//!   `https://` but served in plaintext: it would name and mark its cookies
//!   for plaintext and refuse every form (`Origin: https://…` is not
//!   `http://…`). With an `https://` origin configured, it serves as that
//!   origin: `__Host-` cookies marked `Secure`, HSTS, and forms accepted
//!   from that origin only.

use std::net::{IpAddr, Ipv6Addr};

/// The origin browsers reach the page at, as `scheme://host[:port]`, the
/// port left out when it is the scheme's default (as browsers send
/// `Origin` and `Host`). Holds no secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicOrigin {
    https: bool,
    /// `host[:port]`, lower-case: what `Host` must say.
    authority: String,
}

impl PublicOrigin {
    /// Parses `http://host[:port]` or `https://host[:port]`, with at most
    /// a trailing `/`: no path, query, fragment or user.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let (https, rest) = if let Some(rest) = raw.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = raw.strip_prefix("http://") {
            (false, rest)
        } else {
            return Err("must start with https:// or http://".into());
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '?', '#', '@']) {
            return Err("must be an origin only: no path, query, fragment or user".into());
        }
        let (host, port) = split_host(rest).ok_or("must name a host")?;
        if !valid_host(host) {
            return Err(format!("{host:?} is not a host name or an IP address"));
        }
        let default = if https { 443 } else { 80 };
        let authority = match port {
            None => host.to_ascii_lowercase(),
            Some(port) => {
                let port: u16 = port
                    .parse()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or("its port must be a number from 1 to 65535")?;
                if port == default {
                    host.to_ascii_lowercase()
                } else {
                    format!("{}:{port}", host.to_ascii_lowercase())
                }
            }
        };
        Ok(Self { https, authority })
    }

    /// Whether browsers reach the page over TLS.
    pub fn is_https(&self) -> bool {
        self.https
    }

    /// The origin as browsers send it in `Origin`.
    pub fn serialized(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}", self.authority)
    }

    /// Whether a request's `Host` names this origin.
    pub(super) fn is_host(&self, host: &str) -> bool {
        host.eq_ignore_ascii_case(&self.authority)
    }
}

impl std::fmt::Display for PublicOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.serialized())
    }
}

/// Whether the page answers a request addressed to `host` (its `Host`):
/// the configured origin's host alone; else, over plaintext, an IP address
/// or `localhost` (with any port); else (TLS) any name the certificate
/// was accepted for.
pub(super) fn serves(origin: Option<&PublicOrigin>, tls: bool, host: Option<&str>) -> bool {
    match (origin, host) {
        (Some(origin), Some(host)) => origin.is_host(host),
        (Some(_), None) => false,
        (None, _) if tls => true,
        (None, Some(host)) => split_host(host).is_some_and(|(name, port)| {
            port.is_none_or(|p| p.parse::<u16>().is_ok())
                && (name.eq_ignore_ascii_case("localhost") || is_address(name))
        }),
        (None, None) => false,
    }
}

/// `host[:port]` split, `[v6]` brackets kept on the host; `None` if empty.
fn split_host(authority: &str) -> Option<(&str, Option<&str>)> {
    let (host, port) = if authority.starts_with('[') {
        let end = authority.find(']')?;
        let (host, rest) = authority.split_at(end + 1);
        match rest {
            "" => (host, None),
            _ => (host, Some(rest.strip_prefix(':')?)),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    (!host.is_empty()).then_some((host, port))
}

/// An IPv4 address, or an IPv6 one in brackets.
fn is_address(host: &str) -> bool {
    match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<Ipv6Addr>().is_ok(),
        None => host.parse::<IpAddr>().is_ok_and(|ip| ip.is_ipv4()),
    }
}

/// A DNS name (letters, digits, `-` and `.`, labels of 1 to 63) or an
/// address.
fn valid_host(host: &str) -> bool {
    is_address(host)
        || (host.len() <= 253
            && host.split('.').all(|label| {
                (1..=63).contains(&label.len())
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_parse_as_browsers_send_them() {
        for (raw, serialized) in [
            ("https://id.example.com", "https://id.example.com"),
            ("https://ID.Example.com/", "https://id.example.com"),
            ("https://id.example.com:443", "https://id.example.com"),
            ("https://id.example.com:8443", "https://id.example.com:8443"),
            ("http://localhost:8080", "http://localhost:8080"),
            ("http://127.0.0.1:80", "http://127.0.0.1"),
            ("https://[::1]:8443", "https://[::1]:8443"),
        ] {
            let origin = PublicOrigin::parse(raw).expect(raw);
            assert_eq!(origin.serialized(), serialized, "{raw}");
        }
        for bad in [
            "",
            "id.example.com",
            "ftp://id.example.com",
            "https://",
            "https://id.example.com/tokens",
            "https://id.example.com?x",
            "https://user@id.example.com",
            "https://id.example.com:0",
            "https://id.example.com:99999",
            "https://id.example.com:x",
            "https://id_example.com",
            "https://[::1",
            "https://[nope]:1",
            "https://a..b",
        ] {
            assert!(PublicOrigin::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn the_page_answers_only_to_the_names_it_is_served_under() {
        let origin = PublicOrigin::parse("https://id.example.com").expect("origin");
        for (configured, tls, host, served) in [
            (Some(&origin), false, Some("id.example.com"), true),
            (Some(&origin), false, Some("ID.EXAMPLE.COM"), true),
            (Some(&origin), false, Some("id.example.com:443"), false),
            (Some(&origin), false, Some("127.0.0.1:8080"), false),
            (Some(&origin), true, Some("evil.example"), false),
            (Some(&origin), false, None, false),
            (None, false, Some("127.0.0.1:8080"), true),
            (None, false, Some("127.0.0.1"), true),
            (None, false, Some("[::1]:8080"), true),
            (None, false, Some("localhost:8080"), true),
            (None, false, Some("LocalHost"), true),
            (None, false, Some("evil.example:8080"), false),
            (None, false, Some("127.0.0.1.evil.example"), false),
            (None, false, Some("localhost.evil.example:8080"), false),
            (None, false, Some("127.0.0.1:x"), false),
            (None, false, Some("[::1]x"), false),
            (None, false, None, false),
            (None, true, Some("evil.example"), true),
        ] {
            assert_eq!(
                serves(configured, tls, host),
                served,
                "{configured:?} tls={tls} {host:?}"
            );
        }
    }
}
