//! Who may call `VerifyToken` (a verifier): the rule the configuration sets
//! (`IDENTITY_VERIFY_AUTH` and `IDENTITY_VERIFY_CLIENTS`) and the names of
//! the client certificate the transport verified, which it matches.

use std::{collections::BTreeSet, fmt, str::FromStr};

use super::{
    DomainError,
    policy::{self, Action, Principal},
};

/// The names a verified client certificate carries in its subject
/// alternative names: DNS names (lowercased) and URIs (such as SPIFFE IDs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientNames {
    dns: Vec<String>,
    uris: Vec<String>,
}

impl ClientNames {
    /// The names of a certificate whose DNS and URI names are `dns` and
    /// `uris`.
    pub fn new<'a>(
        dns: impl IntoIterator<Item = &'a str>,
        uris: impl IntoIterator<Item = &'a str>,
    ) -> Self {
        Self {
            dns: dns.into_iter().map(str::to_ascii_lowercase).collect(),
            uris: uris.into_iter().map(str::to_owned).collect(),
        }
    }

    /// Whether the certificate had no DNS or URI name (or there was none).
    pub fn is_empty(&self) -> bool {
        self.dns.is_empty() && self.uris.is_empty()
    }
}

impl fmt::Display for ClientNames {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self
            .dns
            .iter()
            .chain(&self.uris)
            .map(String::as_str)
            .collect();
        f.write_str(&names.join(","))
    }
}

/// How `VerifyToken` callers are admitted (`IDENTITY_VERIFY_AUTH`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum VerifyAuth {
    /// A bearer token granted the `tokens:verify` scope by name (the
    /// default; full access does not include it).
    #[default]
    Scope,
    /// A client certificate named in `IDENTITY_VERIFY_CLIENTS`, instead of a
    /// credential: the `authorization` header is not read.
    Client,
    /// Both: an allowed client certificate and a bearer credential with the
    /// `tokens:verify` scope.
    ClientAndScope,
}

impl VerifyAuth {
    /// Whether the caller's client certificate must be an allowed one.
    pub fn needs_client(self) -> bool {
        matches!(self, VerifyAuth::Client | VerifyAuth::ClientAndScope)
    }

    /// Whether the caller must present a credential with the scope.
    pub fn needs_scope(self) -> bool {
        matches!(self, VerifyAuth::Scope | VerifyAuth::ClientAndScope)
    }
}

impl FromStr for VerifyAuth {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        match raw {
            "scope" => Ok(VerifyAuth::Scope),
            "client" => Ok(VerifyAuth::Client),
            "client-and-scope" => Ok(VerifyAuth::ClientAndScope),
            _ => Err(format!(
                "expected scope, client or client-and-scope, got {raw:?}"
            )),
        }
    }
}

impl fmt::Display for VerifyAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VerifyAuth::Scope => "scope",
            VerifyAuth::Client => "client",
            VerifyAuth::ClientAndScope => "client-and-scope",
        })
    }
}

/// The client certificate names allowed to call `VerifyToken`
/// (`IDENTITY_VERIFY_CLIENTS`): DNS names, matched exactly but without
/// regard to case, and URIs (an entry with a `:`), matched exactly. A
/// certificate is allowed when any of its names is listed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyClients {
    dns: BTreeSet<String>,
    uris: BTreeSet<String>,
}

impl VerifyClients {
    /// Parses a comma-separated list; blank entries are skipped.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let mut clients = Self::default();
        for entry in raw.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            if !entry.chars().all(|c| c.is_ascii_graphic()) {
                return Err(format!(
                    "client name {entry:?} must be printable ASCII without spaces"
                ));
            }
            if entry.contains(':') {
                clients.uris.insert(entry.to_owned());
            } else {
                clients.dns.insert(entry.to_ascii_lowercase());
            }
        }
        Ok(clients)
    }

    /// Whether no name is allowed.
    pub fn is_empty(&self) -> bool {
        self.dns.is_empty() && self.uris.is_empty()
    }

    /// Whether a certificate with `names` is allowed.
    pub fn admits(&self, names: &ClientNames) -> bool {
        names.dns.iter().any(|name| self.dns.contains(name))
            || names.uris.iter().any(|uri| self.uris.contains(uri))
    }
}

/// Who may call `VerifyToken`: `IDENTITY_VERIFY_AUTH` and
/// `IDENTITY_VERIFY_CLIENTS`.
#[derive(Debug, Clone, Default)]
pub struct VerifierPolicy {
    /// How callers are admitted.
    pub auth: VerifyAuth,
    /// The client certificates allowed when `auth` asks for one.
    pub clients: VerifyClients,
}

/// Who asks `VerifyToken`.
#[derive(Debug, Clone, Copy)]
pub enum Verifier<'a> {
    /// A caller authenticated by its credential, which must carry the
    /// `tokens:verify` scope.
    Caller(&'a Principal),
    /// A service the transport has authenticated (a TLS client certificate
    /// the configuration names as a verifier): it presented no credential,
    /// so no scope applies. Only the wire layer, which checked the
    /// certificate, may vouch for one.
    TrustedService,
}

/// Decides whether `verifier` may ask `VerifyToken`.
pub fn authorize_verifier(verifier: Verifier<'_>) -> Result<(), DomainError> {
    match verifier {
        Verifier::Caller(caller) => policy::authorize(caller, Action::VerifyToken),
        Verifier::TrustedService => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_auth_modes_parse_and_print() {
        for mode in [
            VerifyAuth::Scope,
            VerifyAuth::Client,
            VerifyAuth::ClientAndScope,
        ] {
            assert_eq!(mode.to_string().parse::<VerifyAuth>(), Ok(mode));
        }
        assert!("Client".parse::<VerifyAuth>().is_err());
        assert!("".parse::<VerifyAuth>().is_err());
    }

    #[test]
    fn verify_clients_match_dns_names_without_case_and_uris_exactly() {
        let clients = VerifyClients::parse(" Gateway.Internal, spiffe://example.org/sa/gw ,,")
            .expect("names");
        let admits = |dns: &[&str], uris: &[&str]| {
            clients.admits(&ClientNames::new(dns.iter().copied(), uris.iter().copied()))
        };
        assert!(admits(&["gateway.internal"], &[]));
        assert!(admits(&["other.internal", "GATEWAY.internal"], &[]));
        assert!(admits(&[], &["spiffe://example.org/sa/gw"]));
        assert!(!admits(&[], &["SPIFFE://example.org/sa/gw"]));
        assert!(!admits(
            &["gateway.internal.evil"],
            &["spiffe://example.org/sa/gw/x"]
        ));
        // A URI name never matches a DNS entry, nor the reverse.
        assert!(!admits(&[], &["gateway.internal"]));
        assert!(!admits(&[], &[]));
        assert!(VerifyClients::parse("").expect("empty").is_empty());
        assert!(VerifyClients::parse("two words").is_err());
    }
}
