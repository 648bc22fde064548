//! Sessions, cookies, CSRF tokens and the `Origin` check: who the
//! signed-in person of a request is, and whether a POST comes from this
//! page.

use std::sync::Arc;

use http::{HeaderMap, HeaderValue, header, request::Parts};
use sha2::{Digest as _, Sha256};

use super::{Call, Page, Site, html, response::failure};
use crate::domain::{DomainError, credential::CredentialKind, policy::Principal};

/// The signed-in person of a request.
pub(super) struct Session {
    pub(super) principal: Arc<Principal>,
    pub(super) secret: String,
    pub(super) csrf: String,
}

impl Session {
    pub(super) fn viewer(&self) -> html::Viewer<'_> {
        html::Viewer {
            username: self.principal.account.username.as_str(),
            csrf: &self.csrf,
        }
    }
}

impl Site {
    /// Whether a POST comes from this page: its `Origin` is the configured
    /// origin, or without one this server's (scheme and the `Host` the
    /// client addressed); or, when the client
    /// sends none or `null` (Chromium does under `Referrer-Policy:
    /// no-referrer`), `Sec-Fetch-Site`, which scripts cannot set, says
    /// same-origin. `null` without it is refused; no `Origin` and no
    /// `Sec-Fetch-Site` (a client that is not a browser) passes, the CSRF
    /// token still required.
    pub(super) fn same_origin(&self, parts: &Parts) -> bool {
        let host = super::host(parts);
        let fetch_site = parts
            .headers
            .get("sec-fetch-site")
            .map(HeaderValue::as_bytes);
        let from_here = matches!(fetch_site, Some(b"same-origin" | b"none"));
        match parts.headers.get(header::ORIGIN).map(HeaderValue::as_bytes) {
            Some(b"null") => from_here,
            Some(origin) => match &self.origin {
                Some(public) => origin == public.serialized().as_bytes(),
                None => host.is_some_and(|host| {
                    let scheme = if self.secure { "https" } else { "http" };
                    origin == format!("{scheme}://{host}").as_bytes()
                }),
            },
            None => fetch_site.is_none() || from_here,
        }
    }

    pub(super) fn session_cookie(&self) -> &'static str {
        if self.secure {
            "__Host-identity-session"
        } else {
            "identity-session"
        }
    }

    pub(super) fn sign_in_cookie(&self) -> &'static str {
        if self.secure {
            "__Host-identity-sign-in"
        } else {
            "identity-sign-in"
        }
    }

    /// A `Set-Cookie` value: `HttpOnly`, `SameSite=Strict`, `Path=/`, and
    /// `Secure` over TLS; `max_age` 0 removes the cookie.
    pub(super) fn set_cookie(&self, name: &str, value: &str, max_age: u64) -> HeaderValue {
        let secure = if self.secure { "; Secure" } else { "" };
        HeaderValue::from_str(&format!(
            "{name}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}"
        ))
        .unwrap_or_else(|_| HeaderValue::from_static("invalid=; Max-Age=0"))
    }

    /// The signed-in person, if the session cookie holds an active session
    /// (a personal access token there is not a session, and is ignored).
    pub(super) async fn session(&self, call: &Call) -> Result<Option<Session>, Page> {
        let Some(secret) = cookie(&call.headers, self.session_cookie()) else {
            return Ok(None);
        };
        if !secret.starts_with(CredentialKind::Session.prefix()) {
            return Ok(None);
        }
        match self
            .identity
            .authenticate(Some(&secret), &call.origin)
            .await
        {
            Ok(principal) if principal.credential == CredentialKind::Session => {
                let csrf = session_csrf(&secret);
                Ok(Some(Session {
                    principal,
                    secret,
                    csrf,
                }))
            }
            Ok(_) | Err(DomainError::CredentialInvalid(_) | DomainError::CredentialMissing) => {
                Ok(None)
            }
            Err(err) => Err(failure(&err)),
        }
    }
}

/// The CSRF token of a session: a hash of its secret, domain-separated
/// so that it is not the digest the store keeps.
fn session_csrf(secret: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"identity web page csrf v1\0");
    hasher.update(secret.as_bytes());
    hex(&hasher.finalize())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `token` has the form of a token [`random_hex`] makes: 64
/// lowercase hexadecimal digits. (Only the form: a double-submit pair a
/// client made up itself in that form still matches; what keeps another
/// site from posting one is the Origin check, and over TLS the `__Host-`
/// prefix, which no other origin can set.)
pub(super) fn issued_form(token: &str) -> bool {
    token.len() == 64
        && token
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

pub(super) fn random_hex() -> String {
    let mut bytes = [0_u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes);
    hex(&bytes)
}

/// Whether two strings are equal, in time that depends on their length
/// only.
pub(super) fn same(given: &str, expected: &str) -> bool {
    given.len() == expected.len()
        && given
            .bytes()
            .zip(expected.bytes())
            .fold(0_u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// The value of cookie `name`, if the request carries it.
pub(super) fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_found_by_exact_name() {
        let mut headers = HeaderMap::new();
        headers.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; identity-session=s2"),
        );
        headers.append(
            header::COOKIE,
            HeaderValue::from_static("x-identity-session=no"),
        );
        assert_eq!(cookie(&headers, "identity-session").as_deref(), Some("s2"));
        assert_eq!(cookie(&headers, "a").as_deref(), Some("1"));
        assert_eq!(cookie(&headers, "b"), None);
    }

    #[test]
    fn the_csrf_token_is_not_the_secret_nor_its_digest() {
        let secret = "ids_example";
        let csrf = session_csrf(secret);
        assert_eq!(csrf.len(), 64);
        assert!(!csrf.contains(secret));
        assert_ne!(csrf, hex(&Sha256::digest(secret.as_bytes())));
        assert_eq!(csrf, session_csrf(secret));
        assert!(same(&csrf, &session_csrf(secret)));
        assert!(!same(&csrf, &session_csrf("ids_other")));
        assert!(!same("", &csrf));
    }
}
