//! `identity.v1.AccountsService`: decodes requests, authenticates the caller,
//! calls the domain, encodes responses.

use tonic::{Request, Response, Status};

use crate::api::{
    auth::{self, Presented},
    convert, parse,
    pb::{self, accounts_service_server::AccountsService},
};
use crate::domain::{
    DomainError, Identity,
    credential::CredentialKind,
    policy::{self, Action},
};

/// The accounts service over the domain's use cases.
#[derive(Clone)]
pub struct AccountsApi {
    identity: Identity,
}

impl AccountsApi {
    /// Serves `identity`'s account use cases.
    pub fn new(identity: Identity) -> Self {
        Self { identity }
    }
}

#[tonic::async_trait]
impl AccountsService for AccountsApi {
    #[tracing::instrument(name = "CreateAccount", skip_all, fields(caller))]
    async fn create_account(
        &self,
        request: Request<pb::CreateAccountRequest>,
    ) -> Result<Response<pb::CreateAccountResponse>, Status> {
        let (caller, origin) = auth::caller(&self.identity, &request).await?;
        // The rule does not depend on the request: refuse before parsing.
        policy::authorize(&caller, Action::CreateAccount)?;
        let policy = &self.identity.settings().password_policy;
        let new = parse::create_account(request.into_inner(), policy)?;
        let account = self.identity.create_account(&caller, &origin, new).await?;
        tracing::info!(account_id = account.id.as_str(), "account created");
        Ok(Response::new(pb::CreateAccountResponse {
            account: Some(convert::account(account)),
        }))
    }

    #[tracing::instrument(name = "GetAccount", skip_all, fields(caller))]
    async fn get_account(
        &self,
        request: Request<pb::GetAccountRequest>,
    ) -> Result<Response<pb::GetAccountResponse>, Status> {
        let (caller, _) = auth::caller(&self.identity, &request).await?;
        let lookup = parse::get_account(request.into_inner())?;
        let account = self.identity.get_account(&caller, lookup).await?;
        Ok(Response::new(pb::GetAccountResponse {
            account: Some(convert::account(account)),
        }))
    }

    #[tracing::instrument(name = "ListAccounts", skip_all, fields(caller))]
    async fn list_accounts(
        &self,
        request: Request<pb::ListAccountsRequest>,
    ) -> Result<Response<pb::ListAccountsResponse>, Status> {
        let (caller, _) = auth::caller(&self.identity, &request).await?;
        policy::authorize(&caller, Action::ListAccounts)?;
        let page = parse::list_accounts(request.get_ref())?;
        let (accounts, next_page_token) = self.identity.list_accounts(&caller, page).await?;
        Ok(Response::new(pb::ListAccountsResponse {
            accounts: accounts.into_iter().map(convert::account).collect(),
            next_page_token,
        }))
    }

    #[tracing::instrument(name = "SignIn", skip_all, fields(caller))]
    async fn sign_in(
        &self,
        request: Request<pb::SignInRequest>,
    ) -> Result<Response<pb::SignInResponse>, Status> {
        // Signing in needs no credential, but a personal access token must
        // not be used to open a session.
        if let Presented::Bearer(raw) = auth::presented(request.metadata())
            && raw.starts_with(CredentialKind::PersonalAccessToken.prefix())
        {
            return Err(DomainError::SessionRequired.into());
        }
        let origin = auth::origin(&request);
        let policy = &self.identity.settings().password_policy;
        let (username, password) = parse::sign_in(request.into_inner(), policy)?;
        let signed_in = self.identity.sign_in(&origin, &username, password).await?;
        tracing::info!(
            account_id = signed_in.account.id.as_str(),
            session_id = signed_in.session.id.as_str(),
            "signed in"
        );
        Ok(Response::new(pb::SignInResponse {
            session_token: signed_in.secret.expose().to_owned(),
            expire_time: Some(convert::timestamp(signed_in.session.expire_time)),
            session_id: signed_in.session.id.as_str().to_owned(),
            account: Some(convert::account(signed_in.account)),
        }))
    }

    #[tracing::instrument(name = "SignOut", skip_all, fields(caller))]
    async fn sign_out(
        &self,
        request: Request<pb::SignOutRequest>,
    ) -> Result<Response<pb::SignOutResponse>, Status> {
        let (caller, origin) = auth::caller(&self.identity, &request).await?;
        self.identity.sign_out(&caller, &origin).await?;
        Ok(Response::new(pb::SignOutResponse {}))
    }

    #[tracing::instrument(name = "ChangePassword", skip_all, fields(caller))]
    async fn change_password(
        &self,
        request: Request<pb::ChangePasswordRequest>,
    ) -> Result<Response<pb::ChangePasswordResponse>, Status> {
        let (caller, origin) = auth::caller(&self.identity, &request).await?;
        policy::authorize(&caller, Action::ChangePassword)?;
        let policy = &self.identity.settings().password_policy;
        let (current, new) = parse::change_password(
            request.into_inner(),
            policy,
            caller.account.username.as_str(),
        )?;
        let ended_sessions = self
            .identity
            .change_password(&caller, &origin, current, new)
            .await?;
        tracing::info!(ended_sessions, "password changed");
        Ok(Response::new(pb::ChangePasswordResponse {
            ended_sessions: i64::try_from(ended_sessions).unwrap_or(i64::MAX),
        }))
    }

    #[tracing::instrument(name = "SignOutEverywhere", skip_all, fields(caller))]
    async fn sign_out_everywhere(
        &self,
        request: Request<pb::SignOutEverywhereRequest>,
    ) -> Result<Response<pb::SignOutEverywhereResponse>, Status> {
        let (caller, origin) = auth::caller(&self.identity, &request).await?;
        let id = parse::sign_out_everywhere(request.get_ref())?;
        let ended_sessions = self
            .identity
            .sign_out_everywhere(&caller, &origin, &id)
            .await?;
        Ok(Response::new(pb::SignOutEverywhereResponse {
            ended_sessions: i64::try_from(ended_sessions).unwrap_or(i64::MAX),
        }))
    }

    #[tracing::instrument(name = "DisableAccount", skip_all, fields(caller))]
    async fn disable_account(
        &self,
        request: Request<pb::DisableAccountRequest>,
    ) -> Result<Response<pb::DisableAccountResponse>, Status> {
        let (caller, origin) = auth::caller(&self.identity, &request).await?;
        let id = parse::disable_account(request.get_ref())?;
        let account = self
            .identity
            .set_account_disabled(&caller, &origin, &id, true)
            .await?;
        tracing::info!(account_id = account.id.as_str(), "account disabled");
        Ok(Response::new(pb::DisableAccountResponse {
            account: Some(convert::account(account)),
        }))
    }

    #[tracing::instrument(name = "EnableAccount", skip_all, fields(caller))]
    async fn enable_account(
        &self,
        request: Request<pb::EnableAccountRequest>,
    ) -> Result<Response<pb::EnableAccountResponse>, Status> {
        let (caller, origin) = auth::caller(&self.identity, &request).await?;
        let id = parse::enable_account(request.get_ref())?;
        let account = self
            .identity
            .set_account_disabled(&caller, &origin, &id, false)
            .await?;
        tracing::info!(account_id = account.id.as_str(), "account enabled");
        Ok(Response::new(pb::EnableAccountResponse {
            account: Some(convert::account(account)),
        }))
    }

    #[tracing::instrument(name = "DeleteAccount", skip_all, fields(caller))]
    async fn delete_account(
        &self,
        request: Request<pb::DeleteAccountRequest>,
    ) -> Result<Response<pb::DeleteAccountResponse>, Status> {
        let (caller, origin) = auth::caller(&self.identity, &request).await?;
        let id = parse::delete_account(request.get_ref())?;
        self.identity.delete_account(&caller, &origin, &id).await?;
        tracing::info!(account_id = id.as_str(), "account deleted");
        Ok(Response::new(pb::DeleteAccountResponse {}))
    }
}
