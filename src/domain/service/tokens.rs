//! Personal access tokens: issuing, reading, revoking, rotating, and leak
//! reports.

use std::{sync::Arc, time::Duration};

use super::{Identity, hot_path::token_principal, visible};
use crate::domain::{
    DomainError, FieldViolation,
    account::{Account, AccountId, AccountKind},
    audit::{AuditEvent, EventType, Origin},
    cache::{Cached, Invalidation},
    credential::{self, CredentialKind, Digest, LeakedCredentials, Secret},
    page::{PageRequest, tokens_listing},
    policy::{self, Action, Grant, Principal, TokenGrant},
    resource::Resources,
    scope::Scopes,
    store::TokenFilter,
    time::Timestamp,
    token::{Creator, NewToken, Token, TokenId, TokenName, TokenState},
};

/// A validated request to issue a token.
#[derive(Debug)]
pub struct TokenRequest {
    /// The account the token acts for.
    pub account_id: AccountId,
    /// Which integration holds it.
    pub name: TokenName,
    /// Its scopes; empty for full access.
    pub scopes: Scopes,
    /// Its resources; empty for every resource of the account.
    pub resources: Resources,
    /// When it stops working; `None` for the server's default lifetime.
    pub expire_time: Option<Timestamp>,
    /// The request field `expire_time` came from (`expire_time`, or `ttl`),
    /// for messages about it.
    pub expire_field: &'static str,
    /// Ask for a token that never expires (robots, where allowed).
    pub never_expires: bool,
    /// Its use limit, if any.
    pub max_uses: Option<i64>,
}

/// A new token: its secret (shown once) and metadata.
#[derive(Debug)]
pub struct IssuedToken {
    /// The secret.
    pub secret: Secret,
    /// The metadata.
    pub token: Token,
}

/// The outcome of a rotation.
#[derive(Debug)]
pub struct Rotated {
    /// The successor and its secret.
    pub issued: IssuedToken,
    /// The rotated token as it now stands.
    pub previous: Token,
}

pub use crate::domain::credential::MAX_LEAKED_SECRETS;

/// The largest use limit accepted.
pub const MAX_USES: i64 = 1_000_000;

impl Identity {
    /// `CreateToken`.
    pub async fn create_token(
        &self,
        caller: &Principal,
        origin: &Origin,
        request: TokenRequest,
    ) -> Result<IssuedToken, DomainError> {
        policy::authorize(caller, Action::CreateToken(&request.account_id))?;
        if let Some(uses) = request.max_uses
            && !(1..=MAX_USES).contains(&uses)
        {
            return Err(DomainError::invalid(
                "max_uses",
                format!("must be between 1 and {MAX_USES}"),
            ));
        }
        // Before the account is read: its fields go into the pre-warmed
        // verdict (see `Self::prewarm`).
        let epoch = self.cache.epoch();
        let account = self
            .store
            .account_by_id(&request.account_id)
            .await?
            .ok_or(DomainError::AccountNotFound)?;
        // Per account, whoever creates: a stolen credential looping here
        // (or an operator's script gone wrong) makes at most this many rows
        // a minute on each replica; the live-token cap, in the store, bounds
        // the total.
        self.token_creations
            .take(
                &[(
                    account.id.as_str(),
                    self.settings.token_creations_per_minute,
                )],
                std::time::Instant::now(),
            )
            .map_err(|wait| {
                metrics::counter!("identity_token_creations_rate_limited_total").increment(1);
                DomainError::TokenCreationRateLimited(wait)
            })?;
        let now = self.now();
        let expire_time = self.lifetime(
            caller,
            &account,
            request.never_expires,
            request.expire_time,
            request.expire_field,
            now,
        )?;
        policy::check_grant(
            caller,
            &Grant::Token(TokenGrant {
                account: &account.id,
                role: account.role,
                scopes: &request.scopes,
                resources: &request.resources,
                expire_time,
                uses: request.max_uses,
                successor_of: None,
            }),
        )?;
        let issued = self
            .issue_token(&account, request, expire_time, now, origin, Some(caller))
            .await?;
        self.prewarm(&issued.secret.digest(), &issued.token, account, epoch);
        Ok(issued)
    }

    /// Puts the verdict a cache miss would build for `token`, just committed
    /// for `account`, into this replica's cache, so that the token's first
    /// verification here is a hit. Exactly the rules of the miss path: only
    /// an active token of an enabled account, never a limited-use one (each
    /// use must reach the store), its principal built by the same function,
    /// and only if no eviction that could concern it happened since `epoch`,
    /// read before `account` (and everything else the verdict is made of)
    /// was read from the store. A revocation, disable or sign-out racing the
    /// creation therefore either refuses the put or, landing after it,
    /// evicts what it put.
    fn prewarm(&self, digest: &Digest, token: &Token, account: Account, epoch: u64) {
        if token.uses_remaining.is_some()
            || token.state(self.now()) != TokenState::Active
            || account.is_disabled()
        {
            return;
        }
        let retire_time = token.retire_time;
        let principal = Arc::new(token_principal(token.clone(), account));
        self.cache.put(
            digest,
            Cached::Active {
                principal,
                retire_time,
            },
            epoch,
        );
    }

    /// The expiry a new (or renewed) token gets, under the server's lifetime
    /// policy, from what the request asked for.
    fn lifetime(
        &self,
        caller: &Principal,
        account: &Account,
        never_expires: bool,
        expire_time: Option<Timestamp>,
        expire_field: &'static str,
        now: Timestamp,
    ) -> Result<Option<Timestamp>, DomainError> {
        let settings = &self.settings;
        match (never_expires, expire_time) {
            (true, Some(_)) => Err(DomainError::invalid(
                "never_expires",
                format!("cannot be combined with {expire_field}"),
            )),
            (true, None)
                if account.kind == AccountKind::Robot
                    && settings.allow_non_expiring_robot_tokens =>
            {
                Ok(None)
            }
            (true, None) => Err(DomainError::TokenLifetime(FieldViolation::new(
                "never_expires",
                "tokens without expiry are allowed only for robot accounts, and only where the server is configured to allow them",
            ))),
            (false, Some(expire)) if expire <= now => {
                Err(DomainError::invalid(expire_field, "must be in the future"))
            }
            (false, Some(expire)) if expire > now.saturating_add(settings.token_max_ttl) => {
                Err(DomainError::TokenLifetime(FieldViolation::new(
                    expire_field,
                    format!(
                        "must be at most {} from now (the server's maximum token lifetime)",
                        describe(settings.token_max_ttl)
                    ),
                )))
            }
            (false, Some(expire)) => Ok(Some(expire)),
            (false, None) => {
                let default = now.saturating_add(settings.token_default_ttl);
                // A token created by a token never outlives it.
                let cap = match caller.credential {
                    CredentialKind::PersonalAccessToken => caller.expire_time,
                    CredentialKind::Session => None,
                };
                Ok(Some(cap.map_or(default, |cap| cap.min(default))))
            }
        }
    }

    pub(super) async fn issue_token(
        &self,
        account: &Account,
        request: TokenRequest,
        expire_time: Option<Timestamp>,
        now: Timestamp,
        origin: &Origin,
        actor: Option<&Principal>,
    ) -> Result<IssuedToken, DomainError> {
        // A token created with a personal access token is a child of that
        // token's family, and dies with it; one created with a session (or
        // by bootstrap-operator) is nobody's child.
        let parent_family_id = match actor {
            Some(actor) if actor.credential == CredentialKind::PersonalAccessToken => Some(
                self.store
                    .token_by_id(&actor.credential_id)
                    .await?
                    .ok_or(DomainError::CredentialInvalid(
                        "the credential no longer exists",
                    ))?
                    .family_id,
            ),
            _ => None,
        };
        let secret = Secret::generate(CredentialKind::PersonalAccessToken);
        let id = TokenId::generate();
        let token = Token {
            parent_family_id,
            family_id: id.clone(),
            id,
            account_id: request.account_id,
            name: request.name,
            scopes: request.scopes,
            resources: request.resources,
            create_time: now,
            expire_time,
            revoke_time: None,
            retire_time: None,
            max_uses: request.max_uses,
            uses_remaining: request.max_uses,
            last_used_time: None,
            last_used_address: String::new(),
            replaced_by: None,
        };
        let event = AuditEvent::new(EventType::TokenCreated, origin, actor, self.now())
            .account(&account.id, account.username.as_str())
            .credential(&token.id);
        let new = NewToken {
            token,
            digest: secret.digest(),
            creator: actor.map(Creator::of),
        };
        // The store reads the clock again once it holds the account's lock:
        // the credential asking may expire while it waits.
        self.store
            .create_token(
                &new,
                &*self.clock,
                self.settings.max_tokens_per_account,
                &event,
            )
            .await?;
        Ok(IssuedToken {
            secret,
            token: new.token,
        })
    }

    /// `GetToken`. Another account's token is reported as not found.
    pub async fn get_token(&self, caller: &Principal, id: &TokenId) -> Result<Token, DomainError> {
        // Scope first, so that a caller without it learns nothing about
        // which ids exist.
        policy::authorize(caller, Action::ReadTokens(Some(&caller.account.id)))?;
        let token = self
            .store
            .token_by_id(id)
            .await?
            .ok_or(DomainError::TokenNotFound)?;
        visible(caller, token, |account| Action::ReadTokens(Some(account)))
    }

    /// `ListTokens`: one account's tokens, or (`None`, operators only)
    /// every account's, oldest first either way.
    pub async fn list_tokens(
        &self,
        caller: &Principal,
        account: Option<&AccountId>,
        filter: TokenFilter,
        page: PageRequest,
    ) -> Result<(Vec<Token>, String), DomainError> {
        policy::authorize(caller, Action::ReadTokens(account))?;
        let after = page.after.as_deref();
        let found = match account {
            Some(account) => {
                if caller.is_operator() && self.store.account_by_id(account).await?.is_none() {
                    return Err(DomainError::AccountNotFound);
                }
                self.store
                    .list_tokens(account, &filter, after, page.fetch_limit())
                    .await?
            }
            None => {
                self.store
                    .list_all_tokens(&filter, after, page.fetch_limit())
                    .await?
            }
        };
        Ok(page.finish(&tokens_listing(account), found, |t| t.id.as_str()))
    }

    /// `RevokeToken`: idempotent. Another account's token is reported as not
    /// found.
    pub async fn revoke_token(
        &self,
        caller: &Principal,
        origin: &Origin,
        id: &TokenId,
    ) -> Result<Token, DomainError> {
        policy::authorize(caller, Action::RevokeToken(&caller.account.id))?;
        let token = self
            .store
            .token_by_id(id)
            .await?
            .ok_or(DomainError::TokenNotFound)?;
        let token = visible(caller, token, |account| Action::RevokeToken(account))?;
        let username = self.username_of(caller, &token.account_id).await?;
        let event = AuditEvent::new(EventType::TokenRevoked, origin, Some(caller), self.now())
            .account(&token.account_id, &username)
            .credential(&token.id);
        // What the caller revokes is the token as it read it: if that was
        // its family's live token, a rotation that lands before the
        // revocation's write cannot keep a successor alive (the store then
        // revokes the whole family, successors included). A token read as
        // already rotated out is revoked alone.
        let seen_live = token.replaced_by.is_none();
        let store = Arc::clone(&self.store);
        let clock = Arc::clone(&self.clock);
        let target = id.clone();
        let revoked = self
            .commit_then_evict(
                async move {
                    store
                        .revoke_token(&target, seen_live, clock.now(), &event)
                        .await
                },
                {
                    let id = id.clone();
                    move |cache, revoked| {
                        cache.evict(&Invalidation::Credential(id));
                        if let Some((_, cascaded)) = revoked {
                            cache.evict_credentials(cascaded);
                        }
                    }
                },
            )
            .await?;
        let (token, _) = revoked.ok_or(DomainError::TokenNotFound)?;
        Ok(token)
    }

    /// `RotateToken`. `presented` is the call's raw credential: presenting
    /// an already-rotated token here revokes its whole family.
    pub async fn rotate_token(
        &self,
        presented: Option<&str>,
        origin: &Origin,
        id: &TokenId,
    ) -> Result<Rotated, DomainError> {
        self.detect_reuse(presented, origin).await?;
        let caller = self.authenticate(presented, origin).await?;
        policy::authorize(&caller, Action::RotateToken(&caller.account.id))?;
        // Before the reads the successor's verdict is made of: see
        // `Self::prewarm`.
        let epoch = self.cache.epoch();
        let old = self
            .store
            .token_by_id(id)
            .await?
            .ok_or(DomainError::TokenNotFound)?;
        let old = visible(&caller, old, |account| Action::RotateToken(account))?;
        let now = self.now();
        require_live(&old, now)?;
        let account = self
            .store
            .account_by_id(&old.account_id)
            .await?
            .ok_or(DomainError::TokenNotFound)?;
        // Rotation replaces the secret and nothing else: the successor keeps
        // the original absolute expiry and the uses left, so that rotating
        // cannot extend a token's life or refill its uses. A new lifetime is
        // RenewToken's, under the grant rule.
        let expire_time = old.expire_time;
        policy::check_grant(
            &caller,
            &Grant::Token(TokenGrant {
                account: &old.account_id,
                role: account.role,
                scopes: &old.scopes,
                resources: &old.resources,
                expire_time,
                uses: old.uses_remaining,
                successor_of: Some(&old.id),
            }),
        )?;

        let secret = Secret::generate(CredentialKind::PersonalAccessToken);
        let successor = Token {
            id: TokenId::generate(),
            account_id: old.account_id.clone(),
            name: old.name.clone(),
            scopes: old.scopes.clone(),
            resources: old.resources.clone(),
            create_time: now,
            expire_time,
            revoke_time: None,
            retire_time: None,
            max_uses: old.max_uses,
            uses_remaining: old.uses_remaining,
            last_used_time: None,
            last_used_address: String::new(),
            family_id: old.family_id.clone(),
            replaced_by: None,
            parent_family_id: old.parent_family_id.clone(),
        };
        let event = AuditEvent::new(EventType::TokenRotated, origin, Some(&caller), self.now())
            .account(&old.account_id, account.username.as_str())
            .credential(&successor.id);
        let new = NewToken {
            token: successor,
            digest: secret.digest(),
            creator: Some(Creator::of(&caller)),
        };
        let retire_old_at = now.saturating_add(self.settings.rotation_grace);
        let (store, clock) = (Arc::clone(&self.store), Arc::clone(&self.clock));
        let (old_id, evicted) = (old.id.clone(), old.id.clone());
        let (previous, new) = self
            .commit_then_evict(
                async move {
                    // The store reads the clock again once it holds the
                    // account's lock: the token may expire while it waits.
                    let previous = store
                        .rotate_token(&old_id, &new, retire_old_at, &*clock, &event)
                        .await?;
                    Ok((previous, new))
                },
                move |cache, (previous, _): &(Option<Token>, NewToken)| {
                    if previous.is_some() {
                        cache.evict(&Invalidation::Credential(evicted));
                    }
                },
            )
            .await?;
        let Some(previous) = previous else {
            // Someone rotated or revoked it between our read and our write
            // (a revocation holds whatever time it names): say which.
            return Err(match self.store.token_by_id(&old.id).await? {
                Some(token) if token.replaced_by.is_none() => {
                    match require_live(&token, self.now()) {
                        Err(err) => err,
                        Ok(()) => DomainError::TokenInactive("revoked"),
                    }
                }
                _ => DomainError::TokenAlreadyRotated,
            });
        };
        self.prewarm(&new.digest, &new.token, account, epoch);
        Ok(Rotated {
            issued: IssuedToken {
                secret,
                token: new.token,
            },
            previous,
        })
    }

    /// `RenewToken`: gives a live token a new lifetime (`expire_time`, or the
    /// server's default lifetime from now, or never with `never_expires`),
    /// keeping its secret, scopes and uses. Needs a credential that may
    /// create such a token (the grant rule), and never the token itself.
    /// Another account's token is reported as not found.
    pub async fn renew_token(
        &self,
        caller: &Principal,
        origin: &Origin,
        id: &TokenId,
        expire_time: Option<Timestamp>,
        never_expires: bool,
    ) -> Result<Token, DomainError> {
        policy::authorize(caller, Action::RenewToken(&caller.account.id))?;
        let token = self
            .store
            .token_by_id(id)
            .await?
            .ok_or(DomainError::TokenNotFound)?;
        let token = visible(caller, token, |account| Action::RenewToken(account))?;
        if caller.credential_id == token.id {
            return Err(DomainError::NotAllowed(
                "a token cannot renew itself: renew it with a session of its account, or as an operator",
            ));
        }
        let now = self.now();
        require_live(&token, now)?;
        let account = self
            .store
            .account_by_id(&token.account_id)
            .await?
            .ok_or(DomainError::TokenNotFound)?;
        let expire_time = self.lifetime(
            caller,
            &account,
            never_expires,
            expire_time,
            "expire_time",
            now,
        )?;
        policy::check_grant(
            caller,
            &Grant::Token(TokenGrant {
                account: &token.account_id,
                role: account.role,
                scopes: &token.scopes,
                resources: &token.resources,
                expire_time,
                uses: token.uses_remaining,
                successor_of: None,
            }),
        )?;
        let event = AuditEvent::new(EventType::TokenRenewed, origin, Some(caller), self.now())
            .account(&account.id, account.username.as_str())
            .credential(&token.id);
        let (store, clock) = (Arc::clone(&self.store), Arc::clone(&self.clock));
        let (target, evicted) = (id.clone(), id.clone());
        let (owner, creator) = (token.account_id.clone(), Creator::of(caller));
        self.commit_then_evict(
            async move {
                // The store reads the clock again once it holds the
                // account's lock: the token may expire while it waits.
                store
                    .renew_token(
                        &target,
                        &owner,
                        expire_time,
                        Some(&creator),
                        &*clock,
                        &event,
                    )
                    .await
            },
            move |cache, renewed: &Option<Token>| {
                if renewed.is_some() {
                    cache.evict(&Invalidation::Credential(evicted));
                }
            },
        )
        .await
        // Its account deleted (with its tokens) since our read: as if we
        // had read after the deletion.
        .map_err(|err| match err {
            DomainError::AccountNotFound => DomainError::TokenNotFound,
            err => err,
        })?
        // Revoked, rotated, expired or used up between our read and our
        // write (or while the write waited for its lock).
        .ok_or(DomainError::TokenInactive("no longer active"))
    }

    /// If `presented` is a personal access token that was already rotated,
    /// revokes its family and fails with [`DomainError::CredentialReused`].
    async fn detect_reuse(
        &self,
        presented: Option<&str>,
        origin: &Origin,
    ) -> Result<(), DomainError> {
        let Some(Ok(parsed)) = presented.map(credential::parse) else {
            return Ok(());
        };
        if parsed.kind != CredentialKind::PersonalAccessToken {
            return Ok(());
        }
        let Some((token, account)) = self.store.token_by_digest(&parsed.digest).await? else {
            return Ok(());
        };
        if token.replaced_by.is_none() {
            return Ok(());
        }
        // The attempt (a rotation with a secret already rotated out) is
        // refused: the event's outcome is a failure. The family's
        // revocation, its consequence, took effect; its descendants'
        // `token.revoked` events say so.
        let event = AuditEvent::new(EventType::TokenReuseDetected, origin, None, self.now())
            .account(&account.id, account.username.as_str())
            .credential(&token.id)
            .failed();
        let store = Arc::clone(&self.store);
        let clock = Arc::clone(&self.clock);
        let family = token.family_id.clone();
        // Exactly what was revoked: the family and its descendants, which
        // may belong to other accounts (an operator's token creates tokens
        // for anyone).
        let revoked = self
            .commit_then_evict(
                async move { store.revoke_family(&family, clock.now(), &event).await },
                |cache, revoked: &Vec<TokenId>| cache.evict_credentials(revoked),
            )
            .await?;
        tracing::warn!(
            token_id = token.id.as_str(),
            family_id = token.family_id.as_str(),
            revoked = revoked.len(),
            "a rotated token was presented again: revoked its family"
        );
        Err(DomainError::CredentialReused)
    }

    /// `RevokeLeakedToken`: revokes whichever of the `leaked` credentials
    /// are live, and says nothing about which were.
    pub async fn revoke_leaked(
        &self,
        origin: &Origin,
        leaked: LeakedCredentials,
    ) -> Result<(), DomainError> {
        let mut tokens = Vec::new();
        let mut sessions = Vec::new();
        for parsed in leaked.credentials() {
            match parsed.kind {
                CredentialKind::PersonalAccessToken => tokens.push(parsed.digest),
                CredentialKind::Session => sessions.push(parsed.digest),
            }
        }
        let template = AuditEvent::new(EventType::TokenLeaked, origin, None, self.now());
        let store = Arc::clone(&self.store);
        let clock = Arc::clone(&self.clock);
        // Exactly what was revoked (with cascaded descendants), here; the
        // store announced each id to every other replica.
        let revoked = self
            .commit_then_evict(
                async move {
                    store
                        .revoke_leaked(&tokens, &sessions, clock.now(), &template)
                        .await
                },
                |cache, revoked: &Vec<TokenId>| cache.evict_credentials(revoked),
            )
            .await?;
        tracing::info!(
            reported = leaked.reported(),
            revoked = revoked.len(),
            "leak report processed"
        );
        Ok(())
    }
}

impl Identity {
    /// The username of `account` for an audit event: the caller's own
    /// (no lookup) or read from the store; empty if the account is gone.
    async fn username_of(
        &self,
        caller: &Principal,
        account: &AccountId,
    ) -> Result<String, DomainError> {
        if &caller.account.id == account {
            return Ok(caller.account.username.as_str().to_owned());
        }
        Ok(self
            .store
            .account_by_id(account)
            .await?
            .map(|a| a.username.as_str().to_owned())
            .unwrap_or_default())
    }
}

/// Refuses to change a token that was rotated already or is no longer
/// active at `now` (rotation and renewal both act on live tokens only).
fn require_live(token: &Token, now: Timestamp) -> Result<(), DomainError> {
    if token.replaced_by.is_some() {
        return Err(DomainError::TokenAlreadyRotated);
    }
    match token.state(now) {
        TokenState::Active => Ok(()),
        TokenState::Expired => Err(DomainError::TokenInactive("expired")),
        TokenState::Revoked => Err(DomainError::TokenInactive("revoked")),
        TokenState::Exhausted => Err(DomainError::TokenInactive("exhausted")),
    }
}

/// A duration in the largest whole unit that fits: "365 days", "12 hours".
fn describe(duration: Duration) -> String {
    let secs = duration.as_secs();
    match secs {
        s if s % 86_400 == 0 => format!("{} days", s / 86_400),
        s if s % 3_600 == 0 => format!("{} hours", s / 3_600),
        s => format!("{s} seconds"),
    }
}
