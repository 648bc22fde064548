//! `identity.v1.AuditService`: reading the audit log.

use tonic::{Request, Response, Status};

use crate::api::{
    auth, convert, parse,
    pb::{self, audit_service_server::AuditService},
};
use crate::domain::Identity;

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
        let (filter, page) = parse::list_audit_events(request.get_ref())?;
        let (events, next_page_token) = self
            .identity
            .list_audit_events(&caller, filter, page)
            .await?;
        Ok(Response::new(pb::ListAuditEventsResponse {
            events: events.into_iter().map(convert::audit_event).collect(),
            next_page_token,
        }))
    }
}
