//! The account page: recent activity, changing the password, signing out
//! everywhere.

use http::StatusCode;

use super::{
    Call, Page, Site, pages,
    pages::Errors,
    response::{failure, html_page, problem},
    session::Session,
};
use crate::domain::{
    DomainError, audit::AuditFilter, page::PageRequest, password::Password, service::audit_listing,
};

/// The audit events the account page shows, newest first.
const EVENTS_SHOWN: i32 = 50;

impl Site {
    pub(super) async fn account(
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

    pub(super) async fn change_password(&self, call: &Call, session: &Session) -> Page {
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

    pub(super) async fn sign_out_everywhere(&self, call: &Call, session: &Session) -> Page {
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
