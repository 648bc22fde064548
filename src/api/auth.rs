//! Who is calling: the caller's credential from request metadata, the peer
//! (its address, and over mutual TLS the names of its verified client
//! certificate), the client address ([`client_address`]: the peer, or behind
//! a trusted proxy the client it forwards for, see [`super::layers::forwarded`]),
//! and the inputs of who may call `VerifyToken` (the verifier rule itself is
//! the domain's, [`crate::domain::verifier`]).
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
pub use crate::domain::verifier::ClientNames;
use crate::domain::{
    Identity,
    audit::Origin,
    policy::Principal,
    verifier::{Verifier, VerifierRule},
};

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

/// Admits the caller of `VerifyToken` under `rule` (the rule `guard::RULES`
/// names `Access::Verifier`). The decision is the domain's,
/// [`VerifierRule::admit`]; this only gathers its inputs: the names of the
/// client certificate the connection verified and, when the rule needs a
/// credential, the authenticated caller. The credential is authenticated
/// only when the certificate passes, so a caller outside the allowed set is
/// refused with PERMISSION_DENIED whatever credential it holds, and spends
/// nothing.
pub async fn verifier<T>(
    identity: &Identity,
    rule: &VerifierRule,
    request: &tonic::Request<T>,
) -> Result<Verifier, tonic::Status> {
    let certificate = client_names(request);
    let passes = rule.certificate_passes(certificate);
    if passes
        && rule.mode.needs_client()
        && let Some(names) = certificate
    {
        tracing::Span::current().record("client", tracing::field::display(names));
    }
    let credential = if passes && rule.needs_credential() {
        Some(caller(identity, request).await?.0)
    } else {
        None
    };
    Ok(rule.admit(certificate, credential)?)
}
