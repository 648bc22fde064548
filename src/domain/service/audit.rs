//! Reading the audit log.

use super::Identity;
use crate::domain::{
    DomainError,
    account::AccountId,
    audit::{AuditEvent, AuditFilter, EventType},
    page::PageRequest,
    policy::{self, Action, Principal},
};

impl Identity {
    /// `ListAuditEvents`, newest first. Non-operators must name their own
    /// account.
    pub async fn list_audit_events(
        &self,
        caller: &Principal,
        account: Option<AccountId>,
        types: Vec<EventType>,
        page: PageRequest,
    ) -> Result<(Vec<AuditEvent>, String), DomainError> {
        policy::authorize(caller, Action::ReadAudit(account.as_ref()))?;
        let listing = audit_listing(account.as_ref());
        let filter = AuditFilter { account, types };
        let found = self
            .store
            .list_events(&filter, page.after.as_deref(), page.fetch_limit())
            .await?;
        Ok(page.finish(&listing, found, |e| e.id.as_str()))
    }
}

/// The listing name that scopes audit page tokens.
pub fn audit_listing(account: Option<&AccountId>) -> String {
    format!("audit/{}", account.map_or("*", AccountId::as_str))
}
