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

pub mod form;
pub mod html;
mod pages;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header, request::Parts};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Bytes;
use sha2::{Digest as _, Sha256};

use crate::{
    api::layers::forwarded::TrustedProxies,
    domain::{
        DomainError, Identity,
        account::Username,
        audit::{AuditFilter, Origin},
        credential::CredentialKind,
        page::{PageRequest, tokens_listing},
        password::Password,
        policy::Principal,
        resource::Resources,
        scope::Scopes,
        service::{TokenRequest, audit_listing},
        store::TokenFilter,
        token::{TokenId, TokenName, TokenState},
    },
};
use form::Form;
use pages::Errors;

/// The largest request body read; larger ones are refused with 413.
pub const MAX_BODY_BYTES: usize = 16 * 1024;

/// The tokens one page of the list shows.
const TOKENS_PER_PAGE: i32 = 100;

/// The audit events the account page shows, newest first.
const EVENTS_SHOWN: i32 = 50;

/// A response of the page.
pub type Page = Response<Full<Bytes>>;

/// The page's state: the domain, who may forward client addresses, and
/// whether it is served over TLS (which names and marks its cookies).
#[derive(Clone)]
pub struct Site {
    identity: Identity,
    trusted: Arc<TrustedProxies>,
    secure: bool,
}

/// The signed-in person of a request.
struct Session {
    principal: Arc<Principal>,
    secret: String,
    csrf: String,
}

impl Session {
    fn viewer(&self) -> html::Viewer<'_> {
        html::Viewer {
            username: self.principal.account.username.as_str(),
            csrf: &self.csrf,
        }
    }
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
    /// layer does (`trusted`), served over TLS when `secure`.
    pub fn new(identity: Identity, trusted: TrustedProxies, secure: bool) -> Self {
        Self {
            identity,
            trusted: Arc::new(trusted),
            secure,
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

    /// The answer to a request that was not complete within the request
    /// timeout (a body sent too slowly, say): `408`, with the security
    /// headers.
    pub fn timed_out(&self) -> Page {
        let mut page = message(StatusCode::REQUEST_TIMEOUT, "The request took too long.");
        self.secure_headers(page.headers_mut());
        page
    }

    fn secure_headers(&self, headers: &mut HeaderMap) {
        let fixed = [
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
            ),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-store"),
            (header::X_FRAME_OPTIONS, "DENY"),
        ];
        for (name, value) in fixed {
            headers.insert(name, HeaderValue::from_static(value));
        }
        if self.secure {
            headers.insert(
                header::STRICT_TRANSPORT_SECURITY,
                HeaderValue::from_static("max-age=31536000"),
            );
        }
    }

    /// The request's parts and, for a POST from this origin, its form.
    async fn read<B>(&self, request: Request<B>, peer: SocketAddr) -> Result<Call, Page>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (parts, body) = request.into_parts();
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

    /// Whether a POST comes from this page: its `Origin` is this server's
    /// (scheme and the `Host` the client addressed); or, when the client
    /// sends none or `null` (Chromium does under `Referrer-Policy:
    /// no-referrer`), `Sec-Fetch-Site`, which scripts cannot set, says
    /// same-origin. `null` without it is refused; no `Origin` and no
    /// `Sec-Fetch-Site` (a client that is not a browser) passes, the CSRF
    /// token still required.
    fn same_origin(&self, parts: &Parts) -> bool {
        let host = parts
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| parts.uri.authority().map(|a| a.as_str()));
        let fetch_site = parts
            .headers
            .get("sec-fetch-site")
            .map(HeaderValue::as_bytes);
        let from_here = matches!(fetch_site, Some(b"same-origin" | b"none"));
        match parts.headers.get(header::ORIGIN).map(HeaderValue::as_bytes) {
            Some(b"null") => from_here,
            Some(origin) => host.is_some_and(|host| {
                let scheme = if self.secure { "https" } else { "http" };
                origin == format!("{scheme}://{host}").as_bytes()
            }),
            None => fetch_site.is_none() || from_here,
        }
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

    fn session_cookie(&self) -> &'static str {
        if self.secure {
            "__Host-identity-session"
        } else {
            "identity-session"
        }
    }

    fn sign_in_cookie(&self) -> &'static str {
        if self.secure {
            "__Host-identity-sign-in"
        } else {
            "identity-sign-in"
        }
    }

    /// A `Set-Cookie` value: `HttpOnly`, `SameSite=Strict`, `Path=/`, and
    /// `Secure` over TLS; `max_age` 0 removes the cookie.
    fn set_cookie(&self, name: &str, value: &str, max_age: u64) -> HeaderValue {
        let secure = if self.secure { "; Secure" } else { "" };
        HeaderValue::from_str(&format!(
            "{name}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}"
        ))
        .unwrap_or_else(|_| HeaderValue::from_static("invalid=; Max-Age=0"))
    }

    /// The signed-in person, if the session cookie holds an active session
    /// (a personal access token there is not a session, and is ignored).
    async fn session(&self, call: &Call) -> Result<Option<Session>, Page> {
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

    async fn sign_in_form(&self, call: &Call) -> Page {
        if let Ok(Some(_)) = self.session(call).await {
            return redirect("/tokens");
        }
        self.sign_in_page(call, StatusCode::OK, "", &Errors::default(), None)
    }

    /// The sign-in form, with a fresh double-submit token unless the
    /// browser holds one already.
    fn sign_in_page(
        &self,
        call: &Call,
        status: StatusCode,
        username: &str,
        errors: &Errors,
        retry_after: Option<Duration>,
    ) -> Page {
        let token = cookie(&call.headers, self.sign_in_cookie())
            .filter(|t| issued_form(t))
            .unwrap_or_else(random_hex);
        let mut page = html_page(status, pages::sign_in(&token, username, errors));
        page.headers_mut().append(
            header::SET_COOKIE,
            self.set_cookie(self.sign_in_cookie(), &token, 3600),
        );
        if let Some(wait) = retry_after
            && let Ok(value) = HeaderValue::from_str(&wait.as_secs().max(1).to_string())
        {
            page.headers_mut().insert(header::RETRY_AFTER, value);
        }
        page
    }

    async fn sign_in(&self, call: &Call) -> Page {
        // Only a token of the form this page issues (never an empty or a
        // short one a client picked), and the same in the form as in the
        // cookie.
        let expected = cookie(&call.headers, self.sign_in_cookie()).filter(|t| issued_form(t));
        if !expected.is_some_and(|t| same(call.form.get("csrf"), &t)) {
            return csrf_refused();
        }
        let raw_username = call.form.get("username");
        let policy = &self.identity.settings().password_policy;
        let username = Username::parse("username", raw_username);
        let password = Password::offered("password", call.form.get("password").to_owned(), policy);
        let (username, password) = match (username, password) {
            (Ok(u), Ok(p)) => (u, p),
            (u, p) => {
                let mut errors = Errors::default();
                for err in [u.err(), p.err()].into_iter().flatten() {
                    errors.add(&err);
                }
                return self.sign_in_page(
                    call,
                    StatusCode::UNPROCESSABLE_ENTITY,
                    raw_username,
                    &errors,
                    None,
                );
            }
        };
        match self
            .identity
            .sign_in(&call.origin, &username, password)
            .await
        {
            Ok(signed_in) => {
                let now = self.identity.now();
                let seconds = (signed_in.session.expire_time.as_micros() - now.as_micros()).max(0)
                    / 1_000_000;
                let mut page = redirect("/tokens");
                let headers = page.headers_mut();
                headers.append(
                    header::SET_COOKIE,
                    self.set_cookie(
                        self.session_cookie(),
                        signed_in.secret.expose(),
                        u64::try_from(seconds).unwrap_or(0),
                    ),
                );
                headers.append(
                    header::SET_COOKIE,
                    self.set_cookie(self.sign_in_cookie(), "", 0),
                );
                page
            }
            Err(err) => {
                let (status, text) = problem(&err);
                let retry = match err {
                    DomainError::SignInThrottled(wait)
                    | DomainError::RateLimited(wait)
                    | DomainError::HashingBusy(wait) => Some(wait),
                    _ => None,
                };
                let mut errors = Errors::default();
                errors.general(text);
                self.sign_in_page(call, status, raw_username, &errors, retry)
            }
        }
    }

    async fn sign_out(&self, call: &Call, session: &Session) -> Page {
        if let Err(err) = self
            .identity
            .sign_out(&session.principal, &call.origin)
            .await
        {
            return failure(&err);
        }
        self.signed_out()
    }

    fn signed_out(&self) -> Page {
        let mut page = redirect("/sign-in");
        page.headers_mut().append(
            header::SET_COOKIE,
            self.set_cookie(self.session_cookie(), "", 0),
        );
        page
    }

    async fn list(&self, call: &Call, session: &Session, notice: Option<&str>) -> Page {
        let now = self.identity.now();
        let account = &session.principal.account.id;
        let state = call.query.get("state");
        let states = match state {
            "" | "all" => vec![],
            "active" => vec![TokenState::Active],
            "expired" => vec![TokenState::Expired],
            "revoked" => vec![TokenState::Revoked],
            "exhausted" => vec![TokenState::Exhausted],
            _ => {
                return message(
                    StatusCode::BAD_REQUEST,
                    "There is no such state to filter by.",
                );
            }
        };
        let filter = TokenFilter {
            now,
            states,
            expire_before: None,
            last_used_before: None,
        };
        let page = match PageRequest::parse(
            &tokens_listing(Some(account)),
            TOKENS_PER_PAGE,
            call.query.get("page"),
        ) {
            Ok(page) => page,
            Err(err) => return failure(&err),
        };
        match self
            .identity
            .list_tokens(&session.principal, Some(account), filter, page)
            .await
        {
            Ok((tokens, next)) => html_page(
                StatusCode::OK,
                pages::tokens(&session.viewer(), &tokens, now, state, &next, notice),
            ),
            Err(err) => failure(&err),
        }
    }

    fn new_token(&self, session: &Session, values: &Form, errors: &Errors) -> Page {
        let status = if errors.is_empty() {
            StatusCode::OK
        } else {
            StatusCode::UNPROCESSABLE_ENTITY
        };
        html_page(status, pages::new_token(&session.viewer(), values, errors))
    }

    async fn create(&self, call: &Call, session: &Session) -> Page {
        let form = &call.form;
        let now = self.identity.now();
        let mut errors = Errors::default();
        let name = TokenName::parse("name", form.get("name"));
        let mut scopes: Vec<&str> = form.all("scope").collect();
        scopes.extend(
            form.get("other_scopes")
                .split(|c: char| c == ',' || c.is_whitespace())
                .filter(|s| !s.is_empty()),
        );
        let scopes = Scopes::parse("scopes", &scopes);
        let resources: Vec<&str> = form
            .get("resources")
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|r| !r.is_empty())
            .collect();
        let resources = Resources::parse("resources", &resources);
        let expire_time = match form.get("expires") {
            days @ ("7" | "30" | "60" | "90") => {
                let days: u64 = days.parse().unwrap_or(30);
                Some(now.saturating_add(Duration::from_secs(days * 86_400)))
            }
            "date" => {
                let at = html::end_of_date(form.get("expire_date"));
                if at.is_none() {
                    errors.field("expire_date", "Enter a date, such as 2030-12-31.");
                }
                at
            }
            _ => {
                errors.field("expires", "Choose when the token expires.");
                None
            }
        };
        let max_uses = match form.get("max_uses").trim() {
            "" => None,
            raw => match raw.parse::<i64>() {
                Ok(n) => Some(n),
                Err(_) => {
                    errors.field(
                        "max_uses",
                        "Enter a whole number, or leave it empty for no limit.",
                    );
                    None
                }
            },
        };
        for err in [
            name.as_ref().err(),
            scopes.as_ref().err(),
            resources.as_ref().err(),
        ]
        .into_iter()
        .flatten()
        {
            errors.add(err);
        }
        let (Ok(name), Ok(scopes), Ok(resources), Some(expire_time), true) =
            (name, scopes, resources, expire_time, errors.is_empty())
        else {
            return self.new_token(session, form, &errors);
        };
        let request = TokenRequest {
            account_id: session.principal.account.id.clone(),
            name,
            scopes,
            resources,
            expire_time: Some(expire_time),
            expire_field: "expire_date",
            never_expires: false,
            max_uses,
        };
        match self
            .identity
            .create_token(&session.principal, &call.origin, request)
            .await
        {
            Ok(issued) => html_page(
                StatusCode::OK,
                pages::secret(
                    &session.viewer(),
                    &issued.token,
                    issued.secret.expose(),
                    false,
                ),
            ),
            Err(err) => {
                let mut errors = Errors::default();
                let (status, _) = problem(&err);
                errors.add(&err);
                let mut page = self.new_token(session, form, &errors);
                *page.status_mut() = status;
                page
            }
        }
    }

    fn token_id(form: &Form) -> Option<TokenId> {
        TokenId::parse("id", form.get("id")).ok()
    }

    async fn confirm(&self, call: &Call, session: &Session, path: &str) -> Page {
        let id = match Self::token_id(&call.query) {
            Some(id) => id,
            None => return message(StatusCode::NOT_FOUND, "There is no such token."),
        };
        match self.identity.get_token(&session.principal, &id).await {
            Ok(token) => html_page(
                StatusCode::OK,
                pages::confirm(&session.viewer(), &token, path == "/tokens/rotate"),
            ),
            Err(err) => failure(&err),
        }
    }

    async fn revoke(&self, call: &Call, session: &Session) -> Page {
        let id = match Self::token_id(&call.form) {
            Some(id) => id,
            None => return message(StatusCode::NOT_FOUND, "There is no such token."),
        };
        match self
            .identity
            .revoke_token(&session.principal, &call.origin, &id)
            .await
        {
            Ok(_) => redirect("/tokens"),
            Err(err) => failure(&err),
        }
    }

    async fn rotate(&self, call: &Call, session: &Session) -> Page {
        let id = match Self::token_id(&call.form) {
            Some(id) => id,
            None => return message(StatusCode::NOT_FOUND, "There is no such token."),
        };
        match self
            .identity
            .rotate_token(Some(&session.secret), &call.origin, &id)
            .await
        {
            Ok(rotated) => html_page(
                StatusCode::OK,
                pages::secret(
                    &session.viewer(),
                    &rotated.issued.token,
                    rotated.issued.secret.expose(),
                    true,
                ),
            ),
            Err(err) => failure(&err),
        }
    }

    async fn account(
        &self,
        session: &Session,
        status: StatusCode,
        errors: &Errors,
        notice: Option<&str>,
    ) -> Page {
        let account = session.principal.account.id.clone();
        let page = match PageRequest::parse_timed(&audit_listing(Some(&account)), EVENTS_SHOWN, "")
        {
            Ok(page) => page,
            Err(err) => return failure(&err),
        };
        let filter = AuditFilter {
            account: Some(account),
            ..AuditFilter::default()
        };
        match self
            .identity
            .list_audit_events(&session.principal, filter, page)
            .await
        {
            Ok((events, _)) => html_page(
                status,
                pages::account(&session.viewer(), &events, errors, notice),
            ),
            Err(err) => failure(&err),
        }
    }

    async fn change_password(&self, call: &Call, session: &Session) -> Page {
        let form = &call.form;
        let policy = &self.identity.settings().password_policy;
        let mut errors = Errors::default();
        let current = Password::offered(
            "current_password",
            form.get("current_password").to_owned(),
            policy,
        );
        let new = Password::new_checked(
            "new_password",
            form.get("new_password").to_owned(),
            policy,
            session.principal.account.username.as_str(),
        );
        if form.get("new_password") != form.get("new_password_again") {
            errors.field("new_password_again", "The two new passwords differ.");
        }
        for err in [current.as_ref().err(), new.as_ref().err()]
            .into_iter()
            .flatten()
        {
            errors.add(err);
        }
        let (Ok(current), Ok(new), true) = (current, new, errors.is_empty()) else {
            return self
                .account(session, StatusCode::UNPROCESSABLE_ENTITY, &errors, None)
                .await;
        };
        match self
            .identity
            .change_password(&session.principal, &call.origin, current, new)
            .await
        {
            Ok(ended) => {
                let notice = format!(
                    "Password changed. {ended} other session{} ended.",
                    if ended == 1 { "" } else { "s" }
                );
                self.account(session, StatusCode::OK, &Errors::default(), Some(&notice))
                    .await
            }
            Err(DomainError::SignInFailed) => {
                errors.field("current_password", "The current password is wrong.");
                self.account(session, StatusCode::UNPROCESSABLE_ENTITY, &errors, None)
                    .await
            }
            Err(err) => {
                let (status, _) = problem(&err);
                errors.add(&err);
                self.account(session, status, &errors, None).await
            }
        }
    }

    async fn sign_out_everywhere(&self, call: &Call, session: &Session) -> Page {
        let account = session.principal.account.id.clone();
        match self
            .identity
            .sign_out_everywhere(&session.principal, &call.origin, &account)
            .await
        {
            Ok(_) => self.signed_out(),
            Err(err) => failure(&err),
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
/// hexadecimal digits.
fn issued_form(token: &str) -> bool {
    token.len() == 64 && token.bytes().all(|b| b.is_ascii_hexdigit())
}

fn random_hex() -> String {
    let mut bytes = [0_u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes);
    hex(&bytes)
}

/// Whether two strings are equal, in time that depends on their length
/// only.
fn same(given: &str, expected: &str) -> bool {
    given.len() == expected.len()
        && given
            .bytes()
            .zip(expected.bytes())
            .fold(0_u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// The value of cookie `name`, if the request carries it.
fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.to_owned())
}

/// The status and the message a person sees for a domain error: the
/// domain's own words (which never carry a secret), or for an unexpected
/// error none at all.
fn problem(err: &DomainError) -> (StatusCode, String) {
    let status = match err {
        DomainError::InvalidArgument(_) | DomainError::TokenLifetime(_) => {
            StatusCode::UNPROCESSABLE_ENTITY
        }
        DomainError::SignInFailed
        | DomainError::CredentialInvalid(_)
        | DomainError::CredentialMissing => StatusCode::UNAUTHORIZED,
        DomainError::SignInThrottled(_)
        | DomainError::RateLimited(_)
        | DomainError::TokenCreationRateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
        DomainError::NotAllowed(_)
        | DomainError::ScopeMissing(_)
        | DomainError::SessionRequired
        | DomainError::Escalation(_)
        | DomainError::SignInLocked => StatusCode::FORBIDDEN,
        DomainError::AccountNotFound | DomainError::TokenNotFound => StatusCode::NOT_FOUND,
        DomainError::TokenNameTaken
        | DomainError::TokenLimitReached(_)
        | DomainError::CredentialReused
        | DomainError::TokenAlreadyRotated
        | DomainError::TokenInactive(_)
        | DomainError::UsernameTaken => StatusCode::CONFLICT,
        DomainError::HashingBusy(_) | DomainError::Unavailable(_) => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        DomainError::Internal(_) => {
            tracing::error!(error = %err, "the web page failed");
            StatusCode::INTERNAL_SERVER_ERROR
        }
        _ => StatusCode::BAD_REQUEST,
    };
    let text = match err {
        DomainError::SignInFailed => "Unknown username or wrong password.".to_owned(),
        DomainError::Unavailable(_) => {
            "The service cannot reach its database right now; try again shortly.".to_owned()
        }
        DomainError::Internal(_) => "Something went wrong; try again.".to_owned(),
        other => sentence(&other.to_string()),
    };
    (status, text)
}

/// `text` with a capital first letter and a full stop.
fn sentence(text: &str) -> String {
    let mut chars = text.chars();
    let mut out: String = chars
        .next()
        .map(|c| c.to_uppercase().collect::<String>())
        .unwrap_or_default();
    out.push_str(chars.as_str());
    if !out.ends_with('.') {
        out.push('.');
    }
    out
}

/// A page saying what went wrong.
fn failure(err: &DomainError) -> Page {
    let (status, text) = problem(err);
    message(status, &text)
}

fn csrf_refused() -> Page {
    message(
        StatusCode::FORBIDDEN,
        "Refused: the form's security token is missing or wrong. Reload the page and try again.",
    )
}

fn message(status: StatusCode, text: &str) -> Page {
    html_page(status, pages::message(status, text))
}

fn html_page(status: StatusCode, body: String) -> Page {
    let mut page = Response::new(Full::new(Bytes::from(body)));
    *page.status_mut() = status;
    page.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    page
}

fn asset(content_type: &'static str, body: &'static str) -> Page {
    let mut page = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    page.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    page
}

/// A 303 to one of the page's fixed paths (never with a secret in it).
fn redirect(location: &'static str) -> Page {
    let mut page = Response::new(Full::new(Bytes::new()));
    *page.status_mut() = StatusCode::SEE_OTHER;
    page.headers_mut()
        .insert(header::LOCATION, HeaderValue::from_static(location));
    page
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
