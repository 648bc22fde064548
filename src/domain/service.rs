//! The use cases: one method per thing a caller can ask of the service. Each
//! takes the authenticated caller (a [`Principal`]) and validated inputs,
//! checks the policy, and talks to the store.

use std::{sync::Arc, time::Duration};

use super::{
    DomainError,
    account::{Account, AccountId, AccountKind, Email, Role, Username},
    credential::{self, CredentialKind, ParsedCredential, Secret},
    page::{ACCOUNTS_LISTING, PageRequest, tokens_listing},
    password::{Password, PasswordHasher, PasswordPolicy},
    policy::{self, Action, Principal},
    scope::Scopes,
    time::Timestamp,
    token::{NewToken, Session, Token, TokenId, TokenName, TokenState},
};
use crate::storage::Store;

/// Tunable rules of the domain.
#[derive(Debug, Clone)]
pub struct IdentitySettings {
    /// How long a session lasts after sign-in.
    pub session_ttl: Duration,
    /// What a new password must satisfy.
    pub password_policy: PasswordPolicy,
}

impl Default for IdentitySettings {
    fn default() -> Self {
        Self {
            session_ttl: Duration::from_secs(12 * 60 * 60),
            password_policy: PasswordPolicy::default(),
        }
    }
}

/// The identity service's use cases over a store.
#[derive(Clone)]
pub struct Identity {
    store: Arc<dyn Store>,
    hasher: PasswordHasher,
    settings: Arc<IdentitySettings>,
}

/// How to find an account.
#[derive(Debug, Clone)]
pub enum AccountLookup {
    /// By id.
    Id(AccountId),
    /// By username, case-insensitively.
    Username(Username),
}

/// A validated request to create an account.
#[derive(Debug)]
pub struct NewAccount {
    /// The username.
    pub username: Username,
    /// The password: `Some` for persons, `None` for robots.
    pub password: Option<Password>,
    /// The contact address.
    pub email: Email,
    /// Person or robot.
    pub kind: AccountKind,
    /// User or operator.
    pub role: Role,
}

/// A validated request to issue a token.
#[derive(Debug)]
pub struct TokenRequest {
    /// The account the token acts for.
    pub account_id: AccountId,
    /// Which integration holds it.
    pub name: TokenName,
    /// Its scopes; empty for full access.
    pub scopes: Scopes,
    /// When it stops working, if ever.
    pub expire_time: Option<Timestamp>,
}

/// Why a credential is not active.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InactiveReason {
    /// Not a credential this service issues.
    Malformed,
    /// Well-formed but unknown.
    Unknown,
    /// Past its expiry.
    Expired,
    /// Revoked or signed out.
    Revoked,
    /// Its account is disabled.
    AccountDisabled,
    /// Lacks a required scope.
    InsufficientScope,
}

impl InactiveReason {
    /// A short phrase for error messages.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Malformed => "malformed credential",
            Self::Unknown => "unknown credential",
            Self::Expired => "expired credential",
            Self::Revoked => "revoked credential",
            Self::AccountDisabled => "the credential's account is disabled",
            Self::InsufficientScope => "the credential lacks a required scope",
        }
    }
}

/// The verdict on a credential.
#[derive(Debug, Clone)]
pub enum Verdict {
    /// Valid: who it speaks for.
    Active(Box<Principal>),
    /// Not valid, and why.
    Inactive(InactiveReason),
}

/// A started session: its token (shown once) and metadata.
#[derive(Debug)]
pub struct SignedIn {
    /// The session token.
    pub secret: Secret,
    /// The session.
    pub session: Session,
    /// The account.
    pub account: Account,
}

/// A new token: its secret (shown once) and metadata.
#[derive(Debug)]
pub struct IssuedToken {
    /// The secret.
    pub secret: Secret,
    /// The metadata.
    pub token: Token,
}

impl Identity {
    /// The use cases over `store`, hashing passwords with `hasher`.
    pub fn new(store: Arc<dyn Store>, hasher: PasswordHasher, settings: IdentitySettings) -> Self {
        Self {
            store,
            hasher,
            settings: Arc::new(settings),
        }
    }

    /// The domain's settings.
    pub fn settings(&self) -> &IdentitySettings {
        &self.settings
    }

    /// Checks that the store answers.
    pub async fn ready(&self) -> Result<(), DomainError> {
        Ok(self.store.ping().await?)
    }

    /// Authenticates a caller from the credential it sent, if any. Anything
    /// but an active credential is an error.
    pub async fn authenticate(&self, credential: Option<&str>) -> Result<Principal, DomainError> {
        let raw = credential.ok_or(DomainError::CredentialMissing)?;
        match self.inspect(raw).await? {
            Verdict::Active(principal) => Ok(*principal),
            Verdict::Inactive(reason) => Err(DomainError::CredentialInvalid(reason.describe())),
        }
    }

    /// `VerifyToken`: the verdict on `credential` for a caller allowed to ask,
    /// requiring the `required_scopes` (checked once the caller is allowed).
    pub async fn verify<S: AsRef<str>>(
        &self,
        caller: &Principal,
        credential: &str,
        required_scopes: &[S],
    ) -> Result<Verdict, DomainError> {
        policy::authorize(caller, Action::VerifyToken)?;
        let required = Scopes::parse("required_scopes", required_scopes)?;
        let verdict = self.inspect(credential).await?;
        Ok(match verdict {
            // An empty requirement asks for nothing; each named scope must be
            // allowed (full access allows every scope).
            Verdict::Active(principal) if !required.names().all(|s| principal.scopes.allows(s)) => {
                Verdict::Inactive(InactiveReason::InsufficientScope)
            }
            other => other,
        })
    }

    /// Looks a credential up and judges it: the core of both authentication
    /// and `VerifyToken`. A malformed credential costs no I/O.
    async fn inspect(&self, raw: &str) -> Result<Verdict, DomainError> {
        let Ok(ParsedCredential { kind, digest }) = credential::parse(raw) else {
            return Ok(Verdict::Inactive(InactiveReason::Malformed));
        };
        let now = Timestamp::now();
        let found = match kind {
            CredentialKind::PersonalAccessToken => {
                self.store
                    .token_by_digest(&digest)
                    .await?
                    .map(|(token, account)| {
                        let state = token.state(now);
                        let principal = Principal {
                            account,
                            credential: kind,
                            credential_id: token.id,
                            scopes: token.scopes,
                            expire_time: token.expire_time,
                        };
                        (state, principal)
                    })
            }
            CredentialKind::Session => {
                self.store
                    .session_by_digest(&digest)
                    .await?
                    .map(|(session, account)| {
                        let state = session.state(now);
                        let principal = Principal {
                            account,
                            credential: kind,
                            credential_id: session.id,
                            scopes: Scopes::full(),
                            expire_time: Some(session.expire_time),
                        };
                        (state, principal)
                    })
            }
        };
        let Some((state, mut principal)) = found else {
            return Ok(Verdict::Inactive(InactiveReason::Unknown));
        };
        Ok(match state {
            TokenState::Revoked => Verdict::Inactive(InactiveReason::Revoked),
            TokenState::Expired => Verdict::Inactive(InactiveReason::Expired),
            TokenState::Active if principal.account.is_disabled() => {
                Verdict::Inactive(InactiveReason::AccountDisabled)
            }
            TokenState::Active => {
                principal.account.password_hash = None;
                Verdict::Active(Box::new(principal))
            }
        })
    }

    /// `CreateAccount`.
    pub async fn create_account(
        &self,
        caller: &Principal,
        new: NewAccount,
    ) -> Result<Account, DomainError> {
        policy::authorize(caller, Action::CreateAccount)?;
        self.insert_account(new).await
    }

    async fn insert_account(&self, new: NewAccount) -> Result<Account, DomainError> {
        let password_hash = match new.password {
            Some(password) => Some(self.hasher.hash(password).await?),
            None => None,
        };
        let account = Account {
            id: AccountId::generate(),
            username: new.username,
            email: new.email,
            kind: new.kind,
            role: new.role,
            password_hash,
            create_time: Timestamp::now(),
            disable_time: None,
        };
        self.store.create_account(&account).await?;
        Ok(without_hash(account))
    }

    /// `GetAccount`.
    pub async fn get_account(
        &self,
        caller: &Principal,
        lookup: AccountLookup,
    ) -> Result<Account, DomainError> {
        let account = match &lookup {
            AccountLookup::Id(id) => {
                policy::authorize(caller, Action::ReadAccount(id))?;
                self.store.account_by_id(id).await?
            }
            AccountLookup::Username(name) => {
                let found = self.store.account_by_username(&name.key()).await?;
                // A name that matches no account belongs to nobody: a fresh
                // id stands in for it, so a non-operator is refused alike
                // whether or not another account has that name.
                let placeholder = AccountId::generate();
                let target = found.as_ref().map_or(&placeholder, |a| &a.id);
                policy::authorize(caller, Action::ReadAccount(target))?;
                found
            }
        };
        account
            .map(without_hash)
            .ok_or(DomainError::AccountNotFound)
    }

    /// `ListAccounts`.
    pub async fn list_accounts(
        &self,
        caller: &Principal,
        page: PageRequest,
    ) -> Result<(Vec<Account>, String), DomainError> {
        policy::authorize(caller, Action::ListAccounts)?;
        let found = self
            .store
            .list_accounts(page.after.as_deref(), page.fetch_limit())
            .await?;
        let found = found.into_iter().map(without_hash).collect();
        Ok(page.finish(ACCOUNTS_LISTING, found, |a| a.id.as_str()))
    }

    /// `SignIn`. Unknown usernames, robots and wrong passwords fail alike,
    /// and all pay for one argon2 verification.
    pub async fn sign_in(
        &self,
        username: &str,
        password: Password,
    ) -> Result<SignedIn, DomainError> {
        let account = self
            .store
            .account_by_username(&username.to_ascii_lowercase())
            .await?;
        let hash = account.as_ref().and_then(|a| a.password_hash.clone());
        let matches = self.hasher.verify(password, hash).await?;
        let account = match account {
            Some(account)
                if matches && account.kind == AccountKind::Person && !account.is_disabled() =>
            {
                account
            }
            _ => return Err(DomainError::SignInFailed),
        };
        let secret = Secret::generate(CredentialKind::Session);
        let now = Timestamp::now();
        let session = Session {
            id: TokenId::generate(),
            account_id: account.id.clone(),
            create_time: now,
            expire_time: now.saturating_add(self.settings.session_ttl),
            revoke_time: None,
        };
        self.store
            .create_session(&session, &secret.digest())
            .await?;
        Ok(SignedIn {
            secret,
            session,
            account: without_hash(account),
        })
    }

    /// `SignOut`: ends the caller's own session.
    pub async fn sign_out(&self, caller: &Principal) -> Result<(), DomainError> {
        policy::authorize(caller, Action::SignOut)?;
        self.store
            .revoke_session(&caller.credential_id, Timestamp::now())
            .await?;
        Ok(())
    }

    /// `CreateToken`.
    pub async fn create_token(
        &self,
        caller: &Principal,
        request: TokenRequest,
    ) -> Result<IssuedToken, DomainError> {
        policy::authorize(caller, Action::CreateToken(&request.account_id))?;
        policy::check_grant(caller, &request.scopes, request.expire_time)?;
        let now = Timestamp::now();
        if request.expire_time.is_some_and(|e| e <= now) {
            return Err(DomainError::invalid("expire_time", "must be in the future"));
        }
        if self
            .store
            .account_by_id(&request.account_id)
            .await?
            .is_none()
        {
            return Err(DomainError::AccountNotFound);
        }
        self.issue_token(request, now).await
    }

    async fn issue_token(
        &self,
        request: TokenRequest,
        now: Timestamp,
    ) -> Result<IssuedToken, DomainError> {
        let secret = Secret::generate(CredentialKind::PersonalAccessToken);
        let token = Token {
            id: TokenId::generate(),
            account_id: request.account_id,
            name: request.name,
            scopes: request.scopes,
            create_time: now,
            expire_time: request.expire_time,
            revoke_time: None,
        };
        let new = NewToken {
            token,
            digest: secret.digest(),
        };
        self.store.create_token(&new, now).await?;
        Ok(IssuedToken {
            secret,
            token: new.token,
        })
    }

    /// `GetToken`. Another account's token is reported as not found.
    pub async fn get_token(&self, caller: &Principal, id: &TokenId) -> Result<Token, DomainError> {
        let token = self
            .store
            .token_by_id(id)
            .await?
            .ok_or(DomainError::TokenNotFound)?;
        visible(caller, token, |account| Action::ReadTokens(account))
    }

    /// `ListTokens`.
    pub async fn list_tokens(
        &self,
        caller: &Principal,
        account: &AccountId,
        page: PageRequest,
    ) -> Result<(Vec<Token>, String), DomainError> {
        policy::authorize(caller, Action::ReadTokens(account))?;
        if caller.is_operator() && self.store.account_by_id(account).await?.is_none() {
            return Err(DomainError::AccountNotFound);
        }
        let found = self
            .store
            .list_tokens(account, page.after.as_deref(), page.fetch_limit())
            .await?;
        Ok(page.finish(&tokens_listing(account), found, |t| t.id.as_str()))
    }

    /// `RevokeToken`: idempotent. Another account's token is reported as not
    /// found.
    pub async fn revoke_token(
        &self,
        caller: &Principal,
        id: &TokenId,
    ) -> Result<Token, DomainError> {
        let token = self
            .store
            .token_by_id(id)
            .await?
            .ok_or(DomainError::TokenNotFound)?;
        visible(caller, token, |account| Action::RevokeToken(account))?;
        self.store
            .revoke_token(id, Timestamp::now())
            .await?
            .ok_or(DomainError::TokenNotFound)
    }

    /// `identity bootstrap-operator`: makes sure an operator robot named
    /// `username` exists and issues it a new full-access token that never
    /// expires. Refuses to turn an existing non-operator into one.
    pub async fn bootstrap_operator(&self, username: Username) -> Result<IssuedToken, DomainError> {
        let account = match self.store.account_by_username(&username.key()).await? {
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
                match self.insert_account(new).await {
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
            account_id: account.id,
            scopes: Scopes::full(),
            expire_time: None,
        };
        self.issue_token(request, Timestamp::now()).await
    }
}

/// Returns `token` if `caller` may perform `action` (built for the token's
/// account); hides other accounts' tokens as not found, but reports a missing
/// scope.
fn visible(
    caller: &Principal,
    token: Token,
    action: fn(&AccountId) -> Action<'_>,
) -> Result<Token, DomainError> {
    match policy::authorize(caller, action(&token.account_id)) {
        Ok(()) => Ok(token),
        Err(DomainError::NotAllowed(_)) => Err(DomainError::TokenNotFound),
        Err(other) => Err(other),
    }
}

fn without_hash(mut account: Account) -> Account {
    account.password_hash = None;
    account
}
