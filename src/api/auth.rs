//! Reading the caller's credential from request metadata.
//!
//! Callers send `authorization: Bearer <token>`. The scheme is matched
//! case-insensitively (RFC 7235); anything else in the header is treated as
//! a malformed credential rather than ignored, so a client bug shows up as
//! UNAUTHENTICATED instead of silently acting anonymously.

use tonic::metadata::MetadataMap;

use crate::domain::{Identity, audit::Origin, policy::Principal};

/// What the `authorization` metadata holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Presented<'a> {
    /// No `authorization` entry.
    Nothing,
    /// A bearer credential (still to be parsed and looked up).
    Bearer(&'a str),
    /// An entry that is not `Bearer <token>`.
    Garbled,
}

/// Extracts the bearer credential from `metadata`.
pub fn presented(metadata: &MetadataMap) -> Presented<'_> {
    let mut values = metadata.get_all("authorization").iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return if metadata.get("authorization").is_none() {
            Presented::Nothing
        } else {
            // More than one authorization entry: ambiguous, refuse.
            Presented::Garbled
        };
    };
    let Ok(text) = value.to_str() else {
        return Presented::Garbled;
    };
    match text.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") && !token.is_empty() => {
            Presented::Bearer(token.trim())
        }
        _ => Presented::Garbled,
    }
}

impl<'a> Presented<'a> {
    /// The credential to authenticate: `None` when nothing was sent; a
    /// garbled header yields an empty credential, which fails as malformed.
    pub fn credential(&self) -> Option<&'a str> {
        match *self {
            Presented::Nothing => None,
            Presented::Bearer(token) => Some(token),
            Presented::Garbled => Some(""),
        }
    }
}

/// Where a request came from: its peer address, for the audit log.
pub fn origin<T>(request: &tonic::Request<T>) -> Origin {
    Origin::new(
        request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_default(),
    )
}

/// Authenticates the caller of a request from its metadata: the principal,
/// and where the request came from.
pub async fn caller<T>(
    identity: &Identity,
    request: &tonic::Request<T>,
) -> Result<(std::sync::Arc<Principal>, Origin), tonic::Status> {
    let origin = origin(request);
    let principal = identity
        .authenticate(presented(request.metadata()).credential(), &origin)
        .await
        .map_err(super::status::to_status)?;
    tracing::Span::current().record("caller", principal.account.id.as_str());
    if let Some(call) = request.extensions().get::<super::observe::CallSpan>() {
        call.record_caller(
            principal.account.id.as_str(),
            principal.credential_id.as_str(),
        );
    }
    Ok((principal, origin))
}
