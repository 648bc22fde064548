//! `identity.v1.AuditService`: reading the audit log.

use tonic::{Request, Response, Status};

use super::{
    auth, convert,
    pb::{self, audit_service_server::AuditService},
    status::to_status,
};
use crate::domain::{
    Identity, account::AccountId, error::Violations, page::PageRequest, service::audit_listing,
};

/// The audit service over the domain's use cases.
#[derive(Clone)]
pub struct AuditApi {
    identity: Identity,
}

impl AuditApi {
    /// Serves `identity`'s audit log.
    pub fn new(identity: Identity) -> Self {
        Self { identity }
    }
}

#[tonic::async_trait]
impl AuditService for AuditApi {
    #[tracing::instrument(name = "ListAuditEvents", skip_all, fields(caller))]
    async fn list_audit_events(
        &self,
        request: Request<pb::ListAuditEventsRequest>,
    ) -> Result<Response<pb::ListAuditEventsResponse>, Status> {
        let (caller, _) = auth::caller(&self.identity, &request).await?;
        let req = request.into_inner();
        let mut violations = Violations::new();
        let account = if req.account_id.is_empty() {
            Some(None)
        } else {
            violations.check(AccountId::parse("account_id", &req.account_id).map(Some))
        };
        let types = violations.check(convert::parse_event_types("types", &req.types));
        let (account, types) = violations.complete(account.zip(types)).map_err(to_status)?;
        let page = PageRequest::parse(
            &audit_listing(account.as_ref()),
            req.page_size,
            &req.page_token,
        )
        .map_err(to_status)?;
        let (events, next_page_token) = self
            .identity
            .list_audit_events(&caller, account, types, page)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::ListAuditEventsResponse {
            events: events.into_iter().map(convert::audit_event).collect(),
            next_page_token,
        }))
    }
}
