//! `identity.v1.AccountsService`: decodes requests, authenticates the caller,
//! calls the domain, encodes responses.

use tonic::{Request, Response, Status};

use crate::api::{
    auth::{self, Presented},
    convert,
    pb::{self, accounts_service_server::AccountsService, get_account_request::Lookup},
    status::to_status,
};
use crate::domain::{
    DomainError, Identity,
    account::{AccountId, AccountKind, Email, Username},
    credential::CredentialKind,
    error::Violations,
    page::{ACCOUNTS_LISTING, PageRequest},
    password::Password,
    policy::{self, Action},
    service::{AccountLookup, NewAccount},
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
        policy::authorize(&caller, Action::CreateAccount).map_err(to_status)?;
        let new = parse_new_account(request.into_inner(), &self.identity).map_err(to_status)?;
        let account = self
            .identity
            .create_account(&caller, &origin, new)
            .await
            .map_err(to_status)?;
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
        let lookup = match request.into_inner().lookup {
            Some(Lookup::AccountId(id)) => {
                AccountId::parse("account_id", &id).map(AccountLookup::Id)
            }
            Some(Lookup::Username(name)) => {
                Username::parse("username", &name).map(AccountLookup::Username)
            }
            None => Err(DomainError::invalid("lookup", "set account_id or username")),
        }
        .map_err(to_status)?;
        let account = self
            .identity
            .get_account(&caller, lookup)
            .await
            .map_err(to_status)?;
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
        policy::authorize(&caller, Action::ListAccounts).map_err(to_status)?;
        let req = request.into_inner();
        let page = PageRequest::parse(ACCOUNTS_LISTING, req.page_size, &req.page_token)
            .map_err(to_status)?;
        let (accounts, next_page_token) = self
            .identity
            .list_accounts(&caller, page)
            .await
            .map_err(to_status)?;
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
            return Err(to_status(DomainError::SessionRequired));
        }
        let origin = auth::origin(&request);
        let req = request.into_inner();
        let policy = &self.identity.settings().password_policy;
        let mut violations = Violations::new();
        // A name that breaks the username rules belongs to no account; saying
        // so reveals nothing about which accounts exist.
        let username = violations.check(Username::parse("username", &req.username));
        let password = violations.check(Password::offered("password", req.password, policy));
        let (username, password) = violations
            .complete(username.zip(password))
            .map_err(to_status)?;
        let signed_in = self
            .identity
            .sign_in(&origin, &username, password)
            .await
            .map_err(to_status)?;
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
        self.identity
            .sign_out(&caller, &origin)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::SignOutResponse {}))
    }

    #[tracing::instrument(name = "ChangePassword", skip_all, fields(caller))]
    async fn change_password(
        &self,
        request: Request<pb::ChangePasswordRequest>,
    ) -> Result<Response<pb::ChangePasswordResponse>, Status> {
        let (caller, origin) = auth::caller(&self.identity, &request).await?;
        policy::authorize(&caller, Action::ChangePassword).map_err(to_status)?;
        let req = request.into_inner();
        let policy = &self.identity.settings().password_policy;
        let mut violations = Violations::new();
        let current = violations.check(Password::offered(
            "current_password",
            req.current_password,
            policy,
        ));
        let new = violations.check(Password::new_checked(
            "new_password",
            req.new_password,
            policy,
            caller.account.username.as_str(),
        ));
        let (current, new) = violations.complete(current.zip(new)).map_err(to_status)?;
        let ended_sessions = self
            .identity
            .change_password(&caller, &origin, current, new)
            .await
            .map_err(to_status)?;
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
        let id =
            AccountId::parse("account_id", &request.get_ref().account_id).map_err(to_status)?;
        let ended_sessions = self
            .identity
            .sign_out_everywhere(&caller, &origin, &id)
            .await
            .map_err(to_status)?;
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
        let id =
            AccountId::parse("account_id", &request.get_ref().account_id).map_err(to_status)?;
        let account = self
            .identity
            .set_account_disabled(&caller, &origin, &id, true)
            .await
            .map_err(to_status)?;
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
        let id =
            AccountId::parse("account_id", &request.get_ref().account_id).map_err(to_status)?;
        let account = self
            .identity
            .set_account_disabled(&caller, &origin, &id, false)
            .await
            .map_err(to_status)?;
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
        let id =
            AccountId::parse("account_id", &request.get_ref().account_id).map_err(to_status)?;
        self.identity
            .delete_account(&caller, &origin, &id)
            .await
            .map_err(to_status)?;
        tracing::info!(account_id = id.as_str(), "account deleted");
        Ok(Response::new(pb::DeleteAccountResponse {}))
    }
}

/// Parses every field of a `CreateAccountRequest`, reporting all bad fields
/// at once.
fn parse_new_account(
    req: pb::CreateAccountRequest,
    identity: &Identity,
) -> Result<NewAccount, DomainError> {
    let mut violations = Violations::new();
    let username = violations.check(Username::parse("username", &req.username));
    let email = violations.check(Email::parse("email", &req.email));
    let kind = violations.check(convert::parse_account_kind("kind", req.kind));
    let role = violations.check(convert::parse_role("role", req.role));
    let password = match kind {
        Some(AccountKind::Robot) if !req.password.is_empty() => {
            violations.push(
                "password",
                "must be empty for robot accounts, which never sign in",
            );
            None
        }
        Some(AccountKind::Robot) | None => None,
        Some(AccountKind::Person) => violations.check(Password::new_checked(
            "password",
            req.password,
            &identity.settings().password_policy,
            &req.username,
        )),
    };
    violations.complete((|| {
        Some(NewAccount {
            username: username?,
            password,
            email: email?,
            kind: kind?,
            role: role?,
        })
    })())
}
