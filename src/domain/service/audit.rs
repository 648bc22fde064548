//! Reading the audit log.

use super::Identity;
use crate::domain::{
    DomainError,
    account::AccountId,
    audit::{AuditEvent, AuditFilter},
    page::{PageRequest, split_time_key, time_key},
    policy::{self, Action, Principal},
};

impl Identity {
    /// `ListAuditEvents`, newest first. Non-operators must name their own
    /// account in `filter`. `page` must come from [`PageRequest::parse_timed`]
    /// with the listing [`audit_listing`] names.
    pub async fn list_audit_events(
        &self,
        caller: &Principal,
        filter: AuditFilter,
        page: PageRequest,
    ) -> Result<(Vec<AuditEvent>, String), DomainError> {
        policy::authorize(caller, Action::ReadAudit(filter.account.as_ref()))?;
        let listing = audit_listing(filter.account.as_ref());
        let before = match page.after.as_deref() {
            None => None,
            Some(key) => Some(split_time_key(key).ok_or_else(|| {
                DomainError::invalid("page_token", "is not a page token of this listing")
            })?),
        };
        let found = self
            .store
            .list_events(&filter, before, page.fetch_limit())
            .await?;
        Ok(page.finish_keyed(&listing, found, |e| time_key(e.time, &e.id)))
    }
}

/// The listing name that scopes audit page tokens.
pub fn audit_listing(account: Option<&AccountId>) -> String {
    format!("audit/{}", account.map_or("*", AccountId::as_str))
}
