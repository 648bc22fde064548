//! Signing in with a password and signing out.

use std::time::Duration;

use http::{HeaderValue, StatusCode, header};

use super::{
    Call, Page, Site, pages,
    pages::Errors,
    response::{csrf_refused, failure, html_page, problem, redirect},
    session::{Session, cookie, issued_form, random_hex, same},
};
use crate::domain::{DomainError, account::Username, password::Password};

impl Site {
    pub(super) async fn sign_in_form(&self, call: &Call) -> Page {
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

    pub(super) async fn sign_in(&self, call: &Call) -> Page {
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

    pub(super) async fn sign_out(&self, call: &Call, session: &Session) -> Page {
        if let Err(err) = self
            .identity
            .sign_out(&session.principal, &call.origin)
            .await
        {
            return failure(&err);
        }
        self.signed_out()
    }

    pub(super) fn signed_out(&self) -> Page {
        let mut page = redirect("/sign-in");
        page.headers_mut().append(
            header::SET_COOKIE,
            self.set_cookie(self.session_cookie(), "", 0),
        );
        page
    }
}
