//! `identity.v1.TokensService`: decodes requests, authenticates the caller,
//! calls the domain, encodes responses.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::api::{
    auth, convert, parse,
    pb::{self, tokens_service_server::TokensService},
    ratelimit::RateLimiter,
};
use crate::domain::{DomainError, Identity, service::Verification, verifier::VerifierRule};

/// The tokens service over the domain's use cases.
#[derive(Clone)]
pub struct TokensApi {
    identity: Identity,
    leak_reports: Arc<RateLimiter>,
    verifiers: Arc<VerifierRule>,
}

impl TokensApi {
    /// Serves `identity`'s token use cases, allowing each client address
    /// `leak_reports_per_minute` leak reports a minute.
    pub fn new(identity: Identity, leak_reports_per_minute: u32) -> Self {
        Self {
            identity,
            leak_reports: Arc::new(RateLimiter::new(leak_reports_per_minute)),
            verifiers: Arc::default(),
        }
    }

    /// Admits verifiers under `rule` instead of the default
    /// (a credential with the `tokens:verify` scope).
    #[must_use]
    pub fn with_verifiers(mut self, rule: VerifierRule) -> Self {
        self.verifiers = Arc::new(rule);
        self
    }
}

#[tonic::async_trait]
impl TokensService for TokensApi {
    #[tracing::instrument(name = "CreateToken", skip_all, fields(caller))]
    async fn create_token(
        &self,
        request: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let (caller, origin) = auth::caller(&self.identity, &request).await?;
        let request = parse::create_token(request.into_inner(), self.identity.now())?;
        let issued = self
            .identity
            .create_token(&caller, &origin, request)
            .await?;
        tracing::info!(token_id = issued.token.id.as_str(), "token created");
        Ok(Response::new(pb::CreateTokenResponse {
            secret: issued.secret.expose().to_owned(),
            token: Some(convert::token(issued.token, self.identity.now())),
        }))
    }

    #[tracing::instrument(name = "GetToken", skip_all, fields(caller))]
    async fn get_token(
        &self,
        request: Request<pb::GetTokenRequest>,
    ) -> Result<Response<pb::GetTokenResponse>, Status> {
        let (caller, _) = auth::caller(&self.identity, &request).await?;
        let id = parse::get_token(request.get_ref())?;
        let token = self.identity.get_token(&caller, &id).await?;
        Ok(Response::new(pb::GetTokenResponse {
            token: Some(convert::token(token, self.identity.now())),
        }))
    }

    #[tracing::instrument(name = "ListTokens", skip_all, fields(caller))]
    async fn list_tokens(
        &self,
        request: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        let (caller, _) = auth::caller(&self.identity, &request).await?;
        let now = self.identity.now();
        let (account, filter, page) = parse::list_tokens(request.get_ref(), now)?;
        let (tokens, next_page_token) = self
            .identity
            .list_tokens(&caller, account.as_ref(), filter, page)
            .await?;
        Ok(Response::new(pb::ListTokensResponse {
            tokens: tokens.into_iter().map(|t| convert::token(t, now)).collect(),
            next_page_token,
        }))
    }

    #[tracing::instrument(name = "RevokeToken", skip_all, fields(caller))]
    async fn revoke_token(
        &self,
        request: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        let (caller, origin) = auth::caller(&self.identity, &request).await?;
        let id = parse::revoke_token(request.get_ref())?;
        let token = self.identity.revoke_token(&caller, &origin, &id).await?;
        tracing::info!(token_id = token.id.as_str(), "token revoked");
        Ok(Response::new(pb::RevokeTokenResponse {
            token: Some(convert::token(token, self.identity.now())),
        }))
    }

    // The hot path logs nothing at INFO, so its span is DEBUG: at the default
    // level it then costs nothing.
    #[tracing::instrument(
        name = "VerifyToken",
        level = "debug",
        skip_all,
        fields(caller, client)
    )]
    async fn verify_token(
        &self,
        request: Request<pb::VerifyTokenRequest>,
    ) -> Result<Response<pb::VerifyTokenResponse>, Status> {
        // Refuse before parsing: a caller that may not verify learns nothing
        // of its request.
        let verifier = auth::verifier(&self.identity, &self.verifiers, &request).await?;
        self.identity.note_verifier(&verifier);
        let query = parse::verify_token(request.get_ref())?;
        let verification = self
            .identity
            .verify(
                &verifier,
                query.credential,
                &query.scopes,
                &query.resources,
                &query.client,
            )
            .await?;
        Ok(Response::new(match verification {
            Verification::Active(principal) => pb::VerifyTokenResponse {
                active: true,
                reason: pb::InactiveReason::Unspecified as i32,
                principal: Some(convert::principal(&principal)),
                missing_scopes: Vec::new(),
                missing_resources: Vec::new(),
            },
            Verification::Inactive(reason) => pb::VerifyTokenResponse {
                active: false,
                reason: convert::inactive_reason(reason) as i32,
                principal: None,
                missing_scopes: Vec::new(),
                missing_resources: Vec::new(),
            },
            Verification::MissingScopes(missing_scopes) => pb::VerifyTokenResponse {
                active: false,
                reason: pb::InactiveReason::InsufficientScope as i32,
                principal: None,
                missing_scopes,
                missing_resources: Vec::new(),
            },
            Verification::MissingResources(missing_resources) => pb::VerifyTokenResponse {
                active: false,
                reason: pb::InactiveReason::ResourceNotAllowed as i32,
                principal: None,
                missing_scopes: Vec::new(),
                missing_resources,
            },
        }))
    }

    #[tracing::instrument(name = "RotateToken", skip_all, fields(caller))]
    async fn rotate_token(
        &self,
        request: Request<pb::RotateTokenRequest>,
    ) -> Result<Response<pb::RotateTokenResponse>, Status> {
        let origin = auth::origin(&request);
        // The domain authenticates the call itself: presenting an
        // already-rotated token here must trigger reuse detection, not a
        // plain authentication failure.
        let presented = auth::presented(request.metadata()).credential();
        let id = parse::rotate_token(request.get_ref())?;
        let rotated = self.identity.rotate_token(presented, &origin, &id).await?;
        tracing::info!(
            token_id = rotated.issued.token.id.as_str(),
            previous = rotated.previous.id.as_str(),
            "token rotated"
        );
        let now = self.identity.now();
        Ok(Response::new(pb::RotateTokenResponse {
            secret: rotated.issued.secret.expose().to_owned(),
            token: Some(convert::token(rotated.issued.token, now)),
            previous: Some(convert::token(rotated.previous, now)),
        }))
    }

    #[tracing::instrument(name = "RenewToken", skip_all, fields(caller))]
    async fn renew_token(
        &self,
        request: Request<pb::RenewTokenRequest>,
    ) -> Result<Response<pb::RenewTokenResponse>, Status> {
        let (caller, origin) = auth::caller(&self.identity, &request).await?;
        let (id, expire_time, never_expires) = parse::renew_token(request.get_ref())?;
        let token = self
            .identity
            .renew_token(&caller, &origin, &id, expire_time, never_expires)
            .await?;
        tracing::info!(token_id = token.id.as_str(), "token renewed");
        Ok(Response::new(pb::RenewTokenResponse {
            token: Some(convert::token(token, self.identity.now())),
        }))
    }

    #[tracing::instrument(name = "RevokeLeakedToken", skip_all)]
    async fn revoke_leaked_token(
        &self,
        request: Request<pb::RevokeLeakedTokenRequest>,
    ) -> Result<Response<pb::RevokeLeakedTokenResponse>, Status> {
        let origin = auth::origin(&request);
        self.leak_reports
            .check(auth::client_address(&request).map(|a| a.ip))
            .map_err(DomainError::RateLimited)?;
        let leaked = parse::revoke_leaked_token(request.get_ref())?;
        self.identity.revoke_leaked(&origin, leaked).await?;
        Ok(Response::new(pb::RevokeLeakedTokenResponse {}))
    }

    #[tracing::instrument(name = "GetCaller", skip_all, fields(caller))]
    async fn get_caller(
        &self,
        request: Request<pb::GetCallerRequest>,
    ) -> Result<Response<pb::GetCallerResponse>, Status> {
        let (caller, _) = auth::caller(&self.identity, &request).await?;
        let principal = self.identity.get_caller(&caller)?;
        Ok(Response::new(pb::GetCallerResponse {
            principal: Some(convert::principal(&principal)),
        }))
    }
}
