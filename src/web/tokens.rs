//! The tokens pages: the list, creating, revoking and rotating a token.

use std::time::Duration;

use http::StatusCode;

use super::{
    Call, Page, Site,
    form::Form,
    html, pages,
    pages::Errors,
    response::{failure, html_page, message, problem, redirect},
    session::Session,
};
use crate::domain::{
    page::{PageRequest, tokens_listing},
    resource::Resources,
    scope::Scopes,
    service::TokenRequest,
    store::TokenFilter,
    token::{TokenId, TokenName, TokenState},
};

/// The tokens one page of the list shows.
const TOKENS_PER_PAGE: i32 = 100;

impl Site {
    pub(super) async fn list(&self, call: &Call, session: &Session, notice: Option<&str>) -> Page {
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

    pub(super) fn new_token(&self, session: &Session, values: &Form, errors: &Errors) -> Page {
        let status = if errors.is_empty() {
            StatusCode::OK
        } else {
            StatusCode::UNPROCESSABLE_ENTITY
        };
        html_page(status, pages::new_token(&session.viewer(), values, errors))
    }

    pub(super) async fn create(&self, call: &Call, session: &Session) -> Page {
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

    pub(super) async fn confirm(&self, call: &Call, session: &Session, path: &str) -> Page {
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

    pub(super) async fn revoke(&self, call: &Call, session: &Session) -> Page {
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

    pub(super) async fn rotate(&self, call: &Call, session: &Session) -> Page {
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
}
