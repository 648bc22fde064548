//! Default deny for RPCs. Every method of the `identity.v1` services must be
//! listed in [`RULES`]; a call to one that is not (a method added to the
//! proto before its authorization rule was written) is refused with
//! PERMISSION_DENIED before it reaches a handler. The authorization matrix
//! test checks that every method in the descriptor set has a rule here and
//! rows in its table.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use tower::{Layer, Service};

use Access::{Anonymous, Authenticated, Verifier};

/// Who may reach a method at all; the handler then applies the domain's
/// policy to the authenticated caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Callable without a credential.
    Anonymous,
    /// Needs an authenticated caller.
    Authenticated,
    /// A verifier: admitted by the one verifier rule,
    /// `domain::verifier::VerifierRule::admit` (`IDENTITY_VERIFY_AUTH`: a
    /// token granted `tokens:verify` by name, the default, an allowed TLS
    /// client certificate, or both), whose inputs `auth::verifier` gathers.
    Verifier,
}

/// The methods this service exposes, and who may reach each.
pub const RULES: &[(&str, Access)] = &[
    ("/identity.v1.AccountsService/CreateAccount", Authenticated),
    ("/identity.v1.AccountsService/GetAccount", Authenticated),
    ("/identity.v1.AccountsService/ListAccounts", Authenticated),
    ("/identity.v1.AccountsService/SignIn", Anonymous),
    ("/identity.v1.AccountsService/SignOut", Authenticated),
    ("/identity.v1.AccountsService/ChangePassword", Authenticated),
    (
        "/identity.v1.AccountsService/SignOutEverywhere",
        Authenticated,
    ),
    ("/identity.v1.AccountsService/DisableAccount", Authenticated),
    ("/identity.v1.AccountsService/EnableAccount", Authenticated),
    ("/identity.v1.AccountsService/DeleteAccount", Authenticated),
    ("/identity.v1.AuditService/ListAuditEvents", Authenticated),
    ("/identity.v1.TokensService/CreateToken", Authenticated),
    ("/identity.v1.TokensService/GetToken", Authenticated),
    ("/identity.v1.TokensService/ListTokens", Authenticated),
    ("/identity.v1.TokensService/RevokeToken", Authenticated),
    ("/identity.v1.TokensService/VerifyToken", Verifier),
    ("/identity.v1.TokensService/RotateToken", Authenticated),
    ("/identity.v1.TokensService/RenewToken", Authenticated),
    ("/identity.v1.TokensService/RevokeLeakedToken", Anonymous),
    ("/identity.v1.TokensService/GetCaller", Authenticated),
];

/// The rule for a request path, if it is one of ours.
pub fn rule(path: &str) -> Option<Access> {
    RULES
        .iter()
        .find(|(p, _)| *p == path)
        .map(|&(_, access)| access)
}

/// Whether a path belongs to this service's own API (as opposed to health or
/// reflection, which are public).
fn is_ours(path: &str) -> bool {
    path.starts_with("/identity.")
}

/// A tower layer that applies [`RULES`].
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultDenyLayer;

impl<S> Layer<S> for DefaultDenyLayer {
    type Service = DefaultDeny<S>;

    fn layer(&self, inner: S) -> Self::Service {
        DefaultDeny { inner }
    }
}

/// The service [`DefaultDenyLayer`] produces.
#[derive(Debug, Clone)]
pub struct DefaultDeny<S> {
    inner: S,
}

impl<S, B> Service<http::Request<B>> for DefaultDeny<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = GuardFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path();
        if is_ours(path) && rule(path).is_none() {
            tracing::warn!(path, "refused a method that has no authorization rule");
            let status = crate::api::status::to_status(crate::domain::DomainError::NotAllowed(
                "this method has no authorization rule",
            ));
            return GuardFuture::Refused {
                response: Some(status.into_http()),
            };
        }
        GuardFuture::Forwarded {
            inner: self.inner.call(request),
        }
    }
}

pin_project_lite::pin_project! {
    /// The response of [`DefaultDeny`]: a refusal at once, or the inner
    /// service's response.
    #[project = GuardProjection]
    pub enum GuardFuture<F> {
        /// Refused before reaching a handler.
        Refused { response: Option<http::Response<tonic::body::Body>> },
        /// Passed on to the inner service.
        Forwarded { #[pin] inner: F },
    }
}

impl<F, E> Future for GuardFuture<F>
where
    F: Future<Output = Result<http::Response<tonic::body::Body>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            GuardProjection::Refused { response } => match response.take() {
                Some(response) => Poll::Ready(Ok(response)),
                None => panic!("GuardFuture polled after completion"),
            },
            GuardProjection::Forwarded { inner } => inner.poll(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use tower::{ServiceExt as _, service_fn};

    use super::*;

    /// Marks a response that came from the inner service.
    const REACHED: &str = "x-reached-inner";

    /// Sends a request for `path` through the guard, in front of a service
    /// that answers every call with an empty response marked [`REACHED`].
    async fn send(path: &str) -> http::Response<tonic::body::Body> {
        let inner = service_fn(|_: http::Request<()>| async {
            let mut response = http::Response::new(tonic::body::Body::default());
            response
                .headers_mut()
                .insert(REACHED, http::HeaderValue::from_static("yes"));
            Ok::<_, Infallible>(response)
        });
        let request = http::Request::post(path).body(()).expect("a valid request");
        DefaultDenyLayer
            .layer(inner)
            .oneshot(request)
            .await
            .expect("infallible")
    }

    #[tokio::test]
    async fn unlisted_identity_methods_are_refused_before_the_handler() {
        for path in [
            "/identity.v1.X/Y",
            "/identity.v1.AccountsService/DeleteEverything",
            "/identity.v2.AccountsService/GetAccount",
        ] {
            let response = send(path).await;
            assert_eq!(
                response.headers().get("grpc-status").map(|v| v.as_bytes()),
                Some(&b"7"[..]),
                "{path} must be PERMISSION_DENIED"
            );
            assert!(
                response.headers().get(REACHED).is_none(),
                "{path} reached the handler"
            );
        }
    }

    #[tokio::test]
    async fn listed_methods_and_other_services_pass_through() {
        let listed = RULES.iter().map(|&(path, _)| path);
        for path in listed.chain([
            "/grpc.health.v1.Health/Check",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        ]) {
            let response = send(path).await;
            assert!(
                response.headers().get(REACHED).is_some(),
                "{path} did not reach the inner service"
            );
            assert!(
                response.headers().get("grpc-status").is_none(),
                "{path} was answered by the guard"
            );
        }
    }
}
