//! The Access Tokens web page: where a person signs in with their password
//! and manages their own personal access tokens and account, served on its
//! own listener (`IDENTITY_WEB_ADDR`, see `app::web`). It is another client
//! of the domain's use cases, calling the same [`Identity`] methods as the
//! gRPC handlers with the signed-in person's session as the credential, so
//! the same authorization, throttles and audit events apply: never a back
//! door.
//!
//! Security, on every response or request (tests/integration/web.rs):
//! - The session token lives in a cookie, `HttpOnly`, `SameSite=Strict`,
//!   `Path=/`, expiring with the session; over TLS also `Secure` and named
//!   with the `__Host-` prefix.
//! - It answers only to the names it is served under (against DNS
//!   rebinding), and can be served as an `https://` origin behind a
//!   TLS-terminating proxy: see `origin`.
//! - Every POST must come from this page's own origin (`Origin`, or
//!   `Sec-Fetch-Site` when a client sends no `Origin` or `null`) and carry a CSRF
//!   token: for a signed-in person a hash of the session secret (it cannot
//!   be computed without the cookie, and works on every replica); for the
//!   sign-in form a random value also set as a cookie (double submit).
//! - Headers: `Content-Security-Policy` (`default-src 'self'`, no inline
//!   script or style, `frame-ancestors 'none'`), `Referrer-Policy:
//!   no-referrer`, `X-Content-Type-Options: nosniff`, `Cache-Control:
//!   no-store` (every page: secrets are shown on some).
//! - A secret (a new token's, a session's) is written only into the body of
//!   the response to the POST that made it, never into a URL, a redirect
//!   (redirects go to fixed paths) or a log line. Every user string is
//!   escaped ([`html::escape`]). Bodies are limited to [`MAX_BODY_BYTES`].
//! - Bad input returns the form with each field's message (400 or 422);
//!   errors never show more than the domain's message.

mod account;
pub mod form;
pub mod html;
mod origin;
mod pages;
mod response;
mod session;
mod sign_in;
mod tokens;

use std::{net::SocketAddr, sync::Arc};

use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Bytes;

use crate::{
    api::layers::forwarded::TrustedProxies,
    domain::{Identity, audit::Origin},
};
use form::Form;
use pages::Errors;
use response::{asset, csrf_refused, message, problem, redirect, sentence};
use session::same;

pub use origin::PublicOrigin;

/// The host a request was addressed to: `Host`, or the URI's authority
/// (HTTP/2).
fn host(parts: &http::request::Parts) -> Option<&str> {
    parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| parts.uri.authority().map(|a| a.as_str()))
}

/// The largest request body read; larger ones are refused with 413.
pub const MAX_BODY_BYTES: usize = 16 * 1024;

/// A response of the page.
pub type Page = Response<Full<Bytes>>;

/// The page's state: the domain, who may forward client addresses,
/// whether it is served over TLS, and the origin browsers reach it at.
#[derive(Clone)]
pub struct Site {
    identity: Identity,
    trusted: Arc<TrustedProxies>,
    /// Served over TLS here.
    tls: bool,
    /// Reached over TLS by browsers (here, or at a proxy in front): names
    /// and marks the cookies, and sends HSTS.
    secure: bool,
    /// The origin browsers reach the page at, if configured (`origin`).
    origin: Option<Arc<PublicOrigin>>,
}

/// One request, read.
struct Call {
    method: Method,
    path: String,
    query: Form,
    headers: HeaderMap,
    origin: Origin,
    form: Form,
}

impl Site {
    /// The page over `identity`, resolving client addresses as the gRPC
    /// layer does (`trusted`), served over TLS when `tls`, and reached by
    /// browsers at `origin` when one is given (see `origin`).
    pub fn new(
        identity: Identity,
        trusted: TrustedProxies,
        tls: bool,
        origin: Option<PublicOrigin>,
    ) -> Self {
        Self {
            identity,
            trusted: Arc::new(trusted),
            tls,
            secure: tls || origin.as_ref().is_some_and(PublicOrigin::is_https),
            origin: origin.map(Arc::new),
        }
    }

    /// Answers one request from `peer`, with the security headers on
    /// whatever the answer is.
    pub async fn handle<B>(&self, request: Request<B>, peer: SocketAddr) -> Page
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let mut page = match self.read(request, peer).await {
            Ok(call) => self.route(call).await,
            Err(page) => page,
        };
        self.secure_headers(page.headers_mut());
        page
    }

    /// The request's parts and, for a POST from this origin, its form.
    async fn read<B>(&self, request: Request<B>, peer: SocketAddr) -> Result<Call, Page>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (parts, body) = request.into_parts();
        if !origin::serves(self.origin.as_deref(), self.tls, host(&parts)) {
            return Err(message(
                StatusCode::MISDIRECTED_REQUEST,
                "This page is not served under that name.",
            ));
        }
        let forwarded = parts
            .headers
            .get_all("x-forwarded-for")
            .iter()
            .map(HeaderValue::as_bytes);
        let origin = Origin::new(self.trusted.resolve(peer, forwarded).to_string());
        let query = Form::parse(parts.uri.query().unwrap_or_default().as_bytes())
            .map_err(|_| message(StatusCode::BAD_REQUEST, "The address is malformed."))?;
        let mut form = Form::default();
        if parts.method == Method::POST {
            if !self.same_origin(&parts) {
                return Err(message(
                    StatusCode::FORBIDDEN,
                    "Refused: this request did not come from this page.",
                ));
            }
            let form_type = parts
                .headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split(';').next())
                .is_some_and(|v| v.trim() == "application/x-www-form-urlencoded");
            if !form_type {
                return Err(message(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "Send the page's forms as application/x-www-form-urlencoded.",
                ));
            }
            let bytes = match Limited::new(body, MAX_BODY_BYTES).collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(err) if err.is::<http_body_util::LengthLimitError>() => {
                    return Err(message(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "The form is too large.",
                    ));
                }
                Err(_) => return Err(message(StatusCode::BAD_REQUEST, "The form was cut off.")),
            };
            form = Form::parse(&bytes)
                .map_err(|_| message(StatusCode::BAD_REQUEST, "The form is malformed."))?;
        }
        Ok(Call {
            method: parts.method,
            path: parts.uri.path().to_owned(),
            query,
            headers: parts.headers,
            origin,
            form,
        })
    }

    async fn route(&self, call: Call) -> Page {
        let get = call.method == Method::GET || call.method == Method::HEAD;
        let post = call.method == Method::POST;
        match call.path.as_str() {
            "/static/app.css" if get => asset("text/css; charset=utf-8", pages::CSS),
            "/static/copy.js" if get => asset("text/javascript; charset=utf-8", pages::JS),
            "/" if get => redirect("/tokens"),
            "/sign-in" if get => self.sign_in_form(&call).await,
            "/sign-in" if post => self.sign_in(&call).await,
            path @ ("/sign-out"
            | "/tokens"
            | "/tokens/new"
            | "/tokens/revoke"
            | "/tokens/rotate"
            | "/account"
            | "/account/password"
            | "/account/sign-out-everywhere")
                if get || post =>
            {
                let session = match self.session(&call).await {
                    Ok(Some(session)) => session,
                    Ok(None) => return redirect("/sign-in"),
                    Err(page) => return page,
                };
                if post && !same(call.form.get("csrf"), &session.csrf) {
                    return csrf_refused();
                }
                match (path, post) {
                    ("/sign-out", true) => self.sign_out(&call, &session).await,
                    ("/tokens", false) => self.list(&call, &session, None).await,
                    ("/tokens", true) => self.create(&call, &session).await,
                    ("/tokens/new", false) => {
                        self.new_token(&session, &Form::default(), &Errors::default())
                    }
                    ("/tokens/revoke" | "/tokens/rotate", false) => {
                        self.confirm(&call, &session, path).await
                    }
                    ("/tokens/revoke", true) => self.revoke(&call, &session).await,
                    ("/tokens/rotate", true) => self.rotate(&call, &session).await,
                    ("/account", false) => {
                        self.account(&session, StatusCode::OK, &Errors::default(), None)
                            .await
                    }
                    ("/account/password", true) => self.change_password(&call, &session).await,
                    ("/account/sign-out-everywhere", true) => {
                        self.sign_out_everywhere(&call, &session).await
                    }
                    _ => message(
                        StatusCode::METHOD_NOT_ALLOWED,
                        "That method is not allowed here.",
                    ),
                }
            }
            "/" | "/sign-in" | "/static/app.css" | "/static/copy.js" => message(
                StatusCode::METHOD_NOT_ALLOWED,
                "That method is not allowed here.",
            ),
            _ => message(StatusCode::NOT_FOUND, "There is no such page."),
        }
    }
}
