//! Who is calling: the caller's credential from request metadata, the peer
//! (its address, and over mutual TLS the names of its verified client
//! certificate), the client address ([`client_address`]: the peer, or behind
//! a trusted proxy the client it forwards for, see [`super::layers::forwarded`]),
//! and who may call `VerifyToken`.
//!
//! Callers send `authorization: Bearer <token>`. The scheme is matched
//! case-insensitively (RFC 7235); anything else in the header is treated as
//! a malformed credential rather than ignored, so a client bug shows up as
//! UNAUTHENTICATED instead of silently acting anonymously.
//!
//! Client certificate names come only from [`TlsPeer`], which the server's
//! TLS acceptor builds from the certificate chain the handshake verified;
//! nothing a client merely sends (metadata, request fields) can set them.

use std::{net::SocketAddr, sync::Arc};

use tonic::metadata::MetadataMap;

use super::layers::forwarded::ClientAddress;
pub use crate::domain::verifier::{ClientNames, VerifierPolicy, VerifyAuth, VerifyClients};
use crate::domain::{DomainError, Identity, audit::Origin, policy::Principal, verifier::Verifier};

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

/// What the server knows of the peer of a TLS connection: the connect info
/// tonic attaches to every request of a connection the server accepted over
/// TLS (plaintext connections carry tonic's own `TcpConnectInfo`).
#[derive(Debug, Clone)]
pub struct TlsPeer {
    /// The peer's address.
    pub remote_addr: SocketAddr,
    /// The names of the client certificate the handshake verified; empty
    /// when the server does not ask for one.
    pub client: Arc<ClientNames>,
}

/// The peer's address, over TLS or plaintext; `None` when unknown.
pub fn remote_addr<T>(request: &tonic::Request<T>) -> Option<SocketAddr> {
    match request.extensions().get::<TlsPeer>() {
        Some(peer) => Some(peer.remote_addr),
        None => request.remote_addr(),
    }
}

/// The names of the client certificate verified on the request's
/// connection; `None` over plaintext or TLS without client certificates.
pub fn client_names<T>(request: &tonic::Request<T>) -> Option<&ClientNames> {
    request
        .extensions()
        .get::<TlsPeer>()
        .map(|peer| &*peer.client)
        .filter(|names| !names.is_empty())
}

/// The client's address: as [`super::layers::forwarded::ClientAddressLayer`]
/// resolved it (the peer, or behind a trusted proxy the address it forwards
/// for), or, on a request that did not pass that layer, the peer itself.
/// `None` when unknown.
pub fn client_address<T>(request: &tonic::Request<T>) -> Option<ClientAddress> {
    match request.extensions().get::<ClientAddress>() {
        Some(client) => Some(*client),
        None => remote_addr(request).map(|peer| ClientAddress {
            ip: peer.ip(),
            port: Some(peer.port()),
            forwarded: false,
        }),
    }
}

/// Where a request came from: its client address (see [`client_address`]),
/// for the audit log, the sign-in throttle and a token's last use.
pub fn origin<T>(request: &tonic::Request<T>) -> Origin {
    Origin::new(
        client_address(request)
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
        .await?;
    tracing::Span::current().record("caller", principal.account.id.as_str());
    if let Some(call) = request
        .extensions()
        .get::<super::layers::observe::CallSpan>()
    {
        call.record_caller(
            principal.account.id.as_str(),
            principal.credential_id.as_str(),
        );
    }
    Ok((principal, origin))
}

/// A `VerifyToken` caller that [`verifier`] admitted.
#[derive(Debug)]
pub enum VerifyCaller {
    /// Authenticated by its credential, whose scope the domain checks.
    Credential(std::sync::Arc<Principal>),
    /// An allowed client certificate, without a credential.
    Service,
}

impl VerifyCaller {
    /// The verifier to hand to the domain.
    pub fn as_verifier(&self) -> Verifier<'_> {
        match self {
            VerifyCaller::Credential(principal) => Verifier::Caller(principal),
            VerifyCaller::Service => Verifier::TrustedService,
        }
    }
}

/// Admits the caller of `VerifyToken` under `policy` (the rule
/// `guard::RULES` names `Access::Verifier`). The client certificate is
/// checked first, without I/O: a caller outside the allowed set is refused
/// with PERMISSION_DENIED whatever credential it holds. Then, when the
/// policy asks for the scope, the bearer credential is authenticated (the
/// domain checks its scope).
pub async fn verifier<T>(
    identity: &Identity,
    policy: &VerifierPolicy,
    request: &tonic::Request<T>,
) -> Result<VerifyCaller, tonic::Status> {
    if policy.auth.needs_client() {
        match client_names(request) {
            Some(names) if policy.clients.admits(names) => {
                tracing::Span::current().record("client", tracing::field::display(names));
            }
            _ => {
                return Err(tonic::Status::from(DomainError::NotAllowed(
                    "VerifyToken needs a client certificate the server allows",
                )));
            }
        }
    }
    if policy.auth.needs_scope() {
        let (principal, _) = caller(identity, request).await?;
        Ok(VerifyCaller::Credential(principal))
    } else {
        Ok(VerifyCaller::Service)
    }
}
