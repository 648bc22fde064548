use crate::domain::{
    DomainError,
    account::{AccountKind, Email, Role, Username},
    audit::Origin,
    resource::Resources,
    scope::Scopes,
    token::{TokenId, TokenName},
};

use super::{Identity, IssuedToken, NewAccount, TokenRequest};

impl Identity {
    /// `identity bootstrap-operator`: makes sure an operator robot named
    /// `username` exists and issues it a new full-access token that never
    /// expires (the break-glass credential of whoever runs the server; revoke
    /// it once personal operator tokens exist). Refuses to turn an existing
    /// non-operator into one.
    pub async fn bootstrap_operator(&self, username: Username) -> Result<IssuedToken, DomainError> {
        let origin = Origin::new("bootstrap-operator");
        let account = match self.store.account_by_username(&username.key()).await? {
            // The break-glass case: its tokens would be refused, so say so
            // rather than print one.
            Some(existing) if existing.role == Role::Operator && existing.is_disabled() => {
                return Err(DomainError::NotAllowed(
                    "the operator account with this username is disabled, and would refuse \
                     any token issued for it: have another operator enable it \
                     (EnableAccount), or bootstrap a different username",
                ));
            }
            Some(existing) if existing.role == Role::Operator => existing,
            Some(_) => {
                return Err(DomainError::NotAllowed(
                    "an account with this username exists and is not an operator",
                ));
            }
            None => {
                let new = NewAccount {
                    username: username.clone(),
                    password: None,
                    email: Email::default(),
                    kind: AccountKind::Robot,
                    role: Role::Operator,
                };
                match self.insert_account(new, &origin, None).await {
                    Ok(account) => account,
                    // Another bootstrap won the race; use its account.
                    Err(DomainError::UsernameTaken) => self
                        .store
                        .account_by_username(&username.key())
                        .await?
                        .filter(|a| a.role == Role::Operator)
                        .ok_or(DomainError::UsernameTaken)?,
                    Err(other) => return Err(other),
                }
            }
        };
        let request = TokenRequest {
            name: TokenName::parse(
                "name",
                &format!("bootstrap-{}", TokenId::generate().as_str()),
            )?,
            account_id: account.id.clone(),
            scopes: Scopes::full(),
            resources: Resources::all(),
            expire_time: None,
            expire_field: "expire_time",
            never_expires: true,
            max_uses: None,
        };
        self.issue_token(&account, request, None, self.now(), &origin, None)
            .await
    }
}
