//! Who may call `VerifyToken`. Such a caller is a *verifier*, and who is one
//! is decided here, in one place: [`VerifierRule::admit`].
//!
//! The rule ([`VerifierRule`]) is what the configuration sets: a
//! [`VerifierMode`] (`IDENTITY_VERIFY_AUTH`: a credential with the
//! `tokens:verify` scope, an allowed client certificate, or both) and the
//! [`VerifierClients`] (`IDENTITY_VERIFY_CLIENTS`: the client certificate
//! names allowed). Its inputs are the [`ClientNames`] of the client
//! certificate the transport verified and, when the rule
//! [needs a credential](VerifierRule::needs_credential), the authenticated
//! [`Principal`]; the wire layer gathers them and nothing else. What it
//! admits is a [`Verifier`], which only [`VerifierRule::admit`] makes, so
//! `Identity::verify` needs no second look.
//!
//! The scope part is the policy's: `policy::authorize` with
//! [`Action::VerifyToken`] (`tokens:verify` granted by name; full access
//! does not include it).

use std::{collections::BTreeSet, fmt, str::FromStr, sync::Arc};

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

/// How verifiers are admitted (`IDENTITY_VERIFY_AUTH`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum VerifierMode {
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

impl VerifierMode {
    /// Whether the caller's client certificate must be an allowed one.
    pub fn needs_client(self) -> bool {
        matches!(self, VerifierMode::Client | VerifierMode::ClientAndScope)
    }

    /// Whether the caller must present a credential with the scope.
    pub fn needs_scope(self) -> bool {
        matches!(self, VerifierMode::Scope | VerifierMode::ClientAndScope)
    }
}

impl FromStr for VerifierMode {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        match raw {
            "scope" => Ok(VerifierMode::Scope),
            "client" => Ok(VerifierMode::Client),
            "client-and-scope" => Ok(VerifierMode::ClientAndScope),
            _ => Err(format!(
                "expected scope, client or client-and-scope, got {raw:?}"
            )),
        }
    }
}

impl fmt::Display for VerifierMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VerifierMode::Scope => "scope",
            VerifierMode::Client => "client",
            VerifierMode::ClientAndScope => "client-and-scope",
        })
    }
}

/// The client certificate names of the verifiers
/// (`IDENTITY_VERIFY_CLIENTS`): DNS names, matched exactly but without
/// regard to case, and URIs (an entry with a `:`), matched exactly. A
/// certificate is allowed when any of its names is listed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifierClients {
    dns: BTreeSet<String>,
    uris: BTreeSet<String>,
}

impl VerifierClients {
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

/// Who may call `VerifyToken`: `IDENTITY_VERIFY_AUTH` (the mode) and
/// `IDENTITY_VERIFY_CLIENTS` (the client certificate names it allows).
#[derive(Debug, Clone, Default)]
pub struct VerifierRule {
    /// How verifiers are admitted.
    pub mode: VerifierMode,
    /// The client certificates allowed when `mode` asks for one.
    pub clients: VerifierClients,
}

impl VerifierRule {
    /// Whether [`Self::admit`] needs the caller's credential: the wire layer
    /// authenticates the caller only then (under `client` the
    /// `authorization` header is not read).
    pub fn needs_credential(&self) -> bool {
        self.mode.needs_scope()
    }

    /// Whether the client certificate part of the rule lets `certificate`
    /// through: no certificate is needed, or it is an allowed one. The wire
    /// layer asks this before authenticating, so that a caller whose
    /// certificate [`Self::admit`] will refuse spends nothing and learns
    /// nothing of its credential.
    pub fn certificate_passes(&self, certificate: Option<&ClientNames>) -> bool {
        !self.mode.needs_client() || certificate.is_some_and(|names| self.clients.admits(names))
    }

    /// Admits the caller of `VerifyToken`, with the names of the client
    /// certificate the transport verified (`None` over plaintext or without
    /// one) and, when [`Self::needs_credential`], the principal its
    /// credential authenticated (ignored otherwise). The certificate comes
    /// first: outside the allowed set it is refused (`NotAllowed`) whatever
    /// credential is held. Then the credential must be there
    /// (`CredentialMissing`) and hold the `tokens:verify` scope by name
    /// (`ScopeMissing`, the policy's [`Action::VerifyToken`]).
    pub fn admit(
        &self,
        certificate: Option<&ClientNames>,
        credential: Option<Arc<Principal>>,
    ) -> Result<Verifier, DomainError> {
        if !self.certificate_passes(certificate) {
            return Err(DomainError::NotAllowed(
                "VerifyToken needs a client certificate the server allows",
            ));
        }
        if !self.needs_credential() {
            return Ok(Verifier(None));
        }
        let principal = credential.ok_or(DomainError::CredentialMissing)?;
        policy::authorize(&principal, Action::VerifyToken)?;
        Ok(Verifier(Some(principal)))
    }
}

/// An admitted verifier: made only by [`VerifierRule::admit`].
#[derive(Debug, Clone)]
pub struct Verifier(Option<Arc<Principal>>);

impl Verifier {
    /// The principal of the verifier's credential; `None` for a service the
    /// transport authenticated (an allowed client certificate) without one.
    pub fn principal(&self) -> Option<&Arc<Principal>> {
        self.0.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{
        account::{Account, AccountId, AccountKind, Email, Role, Username},
        credential::CredentialKind,
        resource::Resources,
        scope::{self, Scopes},
        time::Timestamp,
        token::TokenId,
    };

    #[test]
    fn verifier_modes_parse_and_print() {
        for mode in [
            VerifierMode::Scope,
            VerifierMode::Client,
            VerifierMode::ClientAndScope,
        ] {
            assert_eq!(mode.to_string().parse::<VerifierMode>(), Ok(mode));
        }
        assert!("Client".parse::<VerifierMode>().is_err());
        assert!("".parse::<VerifierMode>().is_err());
    }

    #[test]
    fn verifier_clients_match_dns_names_without_case_and_uris_exactly() {
        let clients = VerifierClients::parse(" Gateway.Internal, spiffe://example.org/sa/gw ,,")
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
        assert!(VerifierClients::parse("").expect("empty").is_empty());
        assert!(VerifierClients::parse("two words").is_err());
    }

    fn principal(credential: CredentialKind, scopes: Scopes) -> Arc<Principal> {
        Arc::new(Principal {
            account: Arc::new(Account {
                id: AccountId::generate(),
                username: Username::parse("u", "gateway").expect("valid"),
                email: Email::default(),
                kind: AccountKind::Robot,
                role: Role::User,
                password_hash: None,
                create_time: Timestamp::from_micros(0),
                disable_time: None,
                credentials_generation: 0,
            }),
            credential,
            credential_id: TokenId::generate(),
            scopes,
            resources: Resources::all(),
            expire_time: None,
            uses_remaining: None,
            last_used_time: None,
        })
    }

    /// Every mode, with an allowed client certificate, a refused one (a
    /// name not listed, and one without names) or none, and a credential
    /// with `tokens:verify`, one with full access (a session, which does not
    /// include it), one with other scopes, or none; checked against the
    /// rule restated case by case.
    #[test]
    fn admit_decides_every_mode_certificate_and_credential() {
        let allowed = ClientNames::new(["Gateway.Internal"], []);
        let unlisted = ClientNames::new(["other.internal"], ["spiffe://example.org/sa/gw"]);
        let nameless = ClientNames::default();
        let certificates: [(Option<&ClientNames>, bool); 4] = [
            (Some(&allowed), true),
            (Some(&unlisted), false),
            (Some(&nameless), false),
            (None, false),
        ];
        let verify = || Scopes::parse("s", &[scope::TOKENS_VERIFY]).expect("valid");
        let other = || Scopes::parse("s", &[scope::TOKENS_READ]).expect("valid");
        let credentials: [(Option<Arc<Principal>>, bool); 5] = [
            (
                Some(principal(CredentialKind::PersonalAccessToken, verify())),
                true,
            ),
            (
                Some(principal(CredentialKind::Session, Scopes::full())),
                false,
            ),
            (
                Some(principal(
                    CredentialKind::PersonalAccessToken,
                    Scopes::full(),
                )),
                false,
            ),
            (
                Some(principal(CredentialKind::PersonalAccessToken, other())),
                false,
            ),
            (None, false),
        ];
        let mut checked = 0;
        for mode in [
            VerifierMode::Scope,
            VerifierMode::Client,
            VerifierMode::ClientAndScope,
        ] {
            let rule = VerifierRule {
                mode,
                clients: VerifierClients::parse("gateway.internal, spiffe://example.org/sa/x")
                    .expect("names"),
            };
            let needs_client = mode != VerifierMode::Scope;
            let needs_scope = mode != VerifierMode::Client;
            assert_eq!(rule.needs_credential(), needs_scope, "{mode}");
            for (certificate, certificate_allowed) in certificates {
                let passes = !needs_client || certificate_allowed;
                assert_eq!(rule.certificate_passes(certificate), passes, "{mode}");
                for (credential, has_scope) in &credentials {
                    let result = rule.admit(certificate, credential.clone());
                    let case = format!("{mode}, {certificate:?}, {credential:?}: {result:?}");
                    match (passes, needs_scope, credential, has_scope) {
                        (false, _, _, _) => {
                            assert!(matches!(result, Err(DomainError::NotAllowed(_))), "{case}")
                        }
                        (true, false, _, _) => assert!(
                            result.as_ref().is_ok_and(|v| v.principal().is_none()),
                            "{case}"
                        ),
                        (true, true, None, _) => assert!(
                            matches!(result, Err(DomainError::CredentialMissing)),
                            "{case}"
                        ),
                        (true, true, Some(_), false) => assert!(
                            matches!(result, Err(DomainError::ScopeMissing(scope::TOKENS_VERIFY))),
                            "{case}"
                        ),
                        (true, true, Some(expected), true) => assert!(
                            result.as_ref().is_ok_and(|v| v
                                .principal()
                                .is_some_and(|p| p.credential_id == expected.credential_id)),
                            "{case}"
                        ),
                    }
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, 3 * 4 * 5);
    }
}
