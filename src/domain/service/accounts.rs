//! Accounts, passwords and sessions.

use std::sync::Arc;

use super::{Identity, without_hash};
use crate::domain::{
    DomainError,
    account::{Account, AccountId, AccountKind, Email, Role, Username},
    audit::{AuditEvent, EventType, Origin},
    cache::Invalidation,
    credential::{CredentialKind, Secret},
    page::{ACCOUNTS_LISTING, PageRequest},
    password::{HashTicket, Password},
    policy::{self, Action, Grant, Principal},
    throttle::{
        InFlight, InFlightAttempt, MAX_IN_FLIGHT_WAIT, Next, Refusal, ThrottleClaim, address_key,
    },
    time::Timestamp,
    token::{Session, TokenId},
};

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

impl Identity {
    /// `CreateAccount`.
    pub async fn create_account(
        &self,
        caller: &Principal,
        origin: &Origin,
        new: NewAccount,
    ) -> Result<Account, DomainError> {
        policy::authorize(caller, Action::CreateAccount)?;
        policy::check_grant(caller, &Grant::Account { role: new.role })?;
        self.insert_account(new, origin, Some(caller)).await
    }

    pub(super) async fn insert_account(
        &self,
        new: NewAccount,
        origin: &Origin,
        actor: Option<&Principal>,
    ) -> Result<Account, DomainError> {
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
            create_time: self.now(),
            disable_time: None,
            credentials_generation: 0,
        };
        let event = AuditEvent::new(EventType::AccountCreated, origin, actor, self.now())
            .account(&account.id, account.username.as_str());
        self.store.create_account(&account, &event).await?;
        // Failures counted against the name before it had an account (or
        // under a deleted account of that name) are not the new account's.
        self.store
            .reset_sign_in_failures(&account.username.key())
            .await?;
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

    /// `SignIn`. Unknown usernames, robots, disabled accounts and wrong
    /// passwords fail alike: the same error after the same steps (a throttle
    /// claim, one lookup, one argon2 verification, one audit event), so
    /// neither the answer nor its timing tells them apart. Every checked
    /// attempt is audited. An attempt the throttle refuses checks no
    /// password (see [`crate::domain::throttle`]).
    pub async fn sign_in(
        &self,
        origin: &Origin,
        username: &Username,
        password: Password,
    ) -> Result<SignedIn, DomainError> {
        let key = username.key();
        self.limit_password_checks(origin, &key)?;
        let claimed = self.claim_password_check(origin, &key, None).await?;
        let account = self.store.account_by_username(&key).await?;
        let hash = account.as_ref().and_then(|a| a.password_hash.clone());
        let matches = self
            .hasher
            .verify_ticketed(password, hash, &claimed.ticket)
            .await?;
        let event = AuditEvent::new(EventType::SignIn, origin, None, self.now());
        let account = match account {
            Some(account)
                if matches && account.kind == AccountKind::Person && !account.is_disabled() =>
            {
                account
            }
            other => {
                // Counted by cause for operators (a spike of unknown users
                // is enumeration, of wrong passwords guessing); the caller
                // still learns nothing, and no label names the account.
                let cause = match &other {
                    None => "unknown_user",
                    Some(account) if account.kind != AccountKind::Person => "not_a_person",
                    Some(account) if account.password_hash.is_none() => "no_password",
                    Some(_) if !matches => "wrong_password",
                    Some(_) => "account_disabled",
                };
                metrics::counter!("identity_sign_in_failures_total", "cause" => cause).increment(1);
                let event = match &other {
                    Some(account) => event.account(&account.id, account.username.as_str()),
                    None => event,
                };
                self.store.record_event(&event.failed()).await?;
                return Err(DomainError::SignInFailed);
            }
        };
        let [account_claim, address_claim] = &claimed.claims;
        self.store
            .sign_in_succeeded(&account_claim.subject, &address_claim.subject)
            .await?;
        let secret = Secret::generate(CredentialKind::Session);
        let now = self.now();
        let session = Session {
            id: TokenId::generate(),
            account_id: account.id.clone(),
            create_time: now,
            expire_time: now.saturating_add(self.settings.session_ttl),
            revoke_time: None,
        };
        let event = event
            .account(&account.id, account.username.as_str())
            .credential(&session.id);
        // The session is born only if the credentials checked above are
        // still the account's: a password change, sign-out everywhere or
        // disabling that committed since the account was read moved its
        // generation on. Such a sign-in fails as a wrong password would (the
        // password it checked is no longer the password), but it is not a
        // failed attempt: the password was right when it was checked, and
        // `sign_in_succeeded` has already taken the attempt back.
        if !self
            .store
            .create_session(
                &session,
                &secret.digest(),
                account.credentials_generation,
                &event,
            )
            .await?
        {
            metrics::counter!("identity_sign_in_failures_total", "cause" => "credentials_changed")
                .increment(1);
            let event = AuditEvent::new(EventType::SignIn, origin, None, self.now())
                .account(&account.id, account.username.as_str());
            self.store.record_event(&event.failed()).await?;
            return Err(DomainError::SignInFailed);
        }
        Ok(SignedIn {
            secret,
            session,
            account: without_hash(account),
        })
    }

    /// `SignOut`: ends the caller's own session.
    pub async fn sign_out(&self, caller: &Principal, origin: &Origin) -> Result<(), DomainError> {
        policy::authorize(caller, Action::SignOut)?;
        let event = AuditEvent::new(EventType::SignedOut, origin, Some(caller), self.now())
            .account(&caller.account.id, caller.account.username.as_str())
            .credential(&caller.credential_id);
        let store = std::sync::Arc::clone(&self.store);
        let clock = std::sync::Arc::clone(&self.clock);
        let session = caller.credential_id.clone();
        self.commit_then_evict(
            async move { store.revoke_session(&session, clock.now(), &event).await },
            {
                let session = caller.credential_id.clone();
                move |cache, _: &_| cache.evict(&Invalidation::Credential(session))
            },
        )
        .await?;
        Ok(())
    }

    /// `ChangePassword`: needs the current password; ends every other
    /// session. Returns how many ended. A wrong current password is audited
    /// and fails like a failed sign-in.
    pub async fn change_password(
        &self,
        caller: &Principal,
        origin: &Origin,
        current: Password,
        new: Password,
    ) -> Result<u64, DomainError> {
        policy::authorize(caller, Action::ChangePassword)?;
        let account = self
            .store
            .account_by_id(&caller.account.id)
            .await?
            .ok_or(DomainError::AccountNotFound)?;
        let event = AuditEvent::new(EventType::PasswordChanged, origin, Some(caller), self.now())
            .account(&account.id, account.username.as_str());
        // Checking the current password is a password guess like a sign-in:
        // a stolen session must not be a way around the throttle.
        let key = account.username.key();
        self.limit_password_checks(origin, &key)?;
        let claimed = self
            .claim_password_check(origin, &key, Some(caller))
            .await?;
        let [_, address_claim] = &claimed.claims;
        if !self
            .hasher
            .verify_ticketed(current, account.password_hash.clone(), &claimed.ticket)
            .await?
        {
            self.store.record_event(&event.failed()).await?;
            return Err(DomainError::SignInFailed);
        }
        // A correct current password, like a successful sign-in, clears the
        // username's failures.
        self.store
            .sign_in_succeeded(&key, &address_claim.subject)
            .await?;
        let hash = self.hasher.hash(new).await?;
        let store = Arc::clone(&self.store);
        let clock = Arc::clone(&self.clock);
        let (id, keep) = (account.id.clone(), caller.credential_id.clone());
        let evicted = account.id.clone();
        self.commit_then_evict(
            async move {
                store
                    .set_password(&id, &hash, &keep, clock.now(), &event)
                    .await
            },
            move |cache, _| cache.evict(&Invalidation::Account(evicted)),
        )
        .await
    }

    /// `SignOutEverywhere`: ends every session of an account. Returns how
    /// many ended.
    pub async fn sign_out_everywhere(
        &self,
        caller: &Principal,
        origin: &Origin,
        id: &AccountId,
    ) -> Result<u64, DomainError> {
        policy::authorize(caller, Action::SignOutEverywhere(id))?;
        let account = self
            .store
            .account_by_id(id)
            .await?
            .ok_or(DomainError::AccountNotFound)?;
        let event = AuditEvent::new(
            EventType::SignedOutEverywhere,
            origin,
            Some(caller),
            self.now(),
        )
        .account(&account.id, account.username.as_str());
        let store = std::sync::Arc::clone(&self.store);
        let clock = std::sync::Arc::clone(&self.clock);
        let account = id.clone();
        let evicted = id.clone();
        self.commit_then_evict(
            async move { store.revoke_sessions(&account, clock.now(), &event).await },
            move |cache, _: &_| cache.evict(&Invalidation::Account(evicted)),
        )
        .await
    }

    /// `DisableAccount` (`disable`) and `EnableAccount`.
    pub async fn set_account_disabled(
        &self,
        caller: &Principal,
        origin: &Origin,
        id: &AccountId,
        disable: bool,
    ) -> Result<Account, DomainError> {
        policy::authorize(caller, Action::SuspendAccount(id))?;
        if disable && &caller.account.id == id {
            return Err(DomainError::SelfLockout);
        }
        let account = self
            .store
            .account_by_id(id)
            .await?
            .ok_or(DomainError::AccountNotFound)?;
        if !disable {
            // Enabling an account gives its credentials back their power.
            policy::check_grant(caller, &Grant::Account { role: account.role })?;
        }
        let kind = if disable {
            EventType::AccountDisabled
        } else {
            EventType::AccountEnabled
        };
        let event = AuditEvent::new(kind, origin, Some(caller), self.now())
            .account(&account.id, account.username.as_str());
        let at = disable.then(|| self.now());
        let store = Arc::clone(&self.store);
        let (target, evicted) = (id.clone(), id.clone());
        let account = self
            .commit_then_evict(
                async move { store.set_account_disabled(&target, at, &event).await },
                move |cache, _| cache.evict(&Invalidation::Account(evicted)),
            )
            .await?;
        let account = account.ok_or(DomainError::AccountNotFound)?;
        if !disable {
            // Enabling is also how an operator lifts a sign-in lock.
            self.store
                .reset_sign_in_failures(&account.username.key())
                .await?;
        }
        Ok(without_hash(account))
    }

    /// Takes one password check from the username's and the address's
    /// buckets of [`crate::domain::throttle::SignInRates`] on this replica,
    /// or refuses it (RATE_LIMITED, with the wait) before anything else:
    /// neither the store nor argon2 sees a refused check.
    fn limit_password_checks(
        &self,
        origin: &Origin,
        username_key: &str,
    ) -> Result<(), DomainError> {
        let rates = self.settings.sign_in_rates;
        let account = format!("account:{username_key}");
        let address = format!("address:{}", address_key(&origin.address));
        self.password_checks
            .take(
                &[
                    (&account, rates.account_per_minute),
                    (&address, rates.address_per_minute),
                ],
                std::time::Instant::now(),
            )
            .map_err(|wait| {
                metrics::counter!("identity_password_checks_rate_limited_total").increment(1);
                DomainError::RateLimited(wait)
            })
    }

    /// Counts a password check by `username_key` from `origin` against the
    /// username's and the address's sign-in counters, or refuses it, before
    /// any hashing, while either is in backoff or locked. The first refusal
    /// of each block is audited (once, not per attempt, so that refused
    /// attempts cost the store little). Returns the counted check, to hold
    /// until its outcome is recorded (see [`ClaimedCheck`]).
    ///
    /// Refused while other attempts on the username are in flight on this
    /// replica, it waits for one of them to resolve and claims again (see
    /// [`crate::domain::throttle::InFlight`]).
    async fn claim_password_check(
        &self,
        origin: &Origin,
        username_key: &str,
        actor: Option<&Principal>,
    ) -> Result<ClaimedCheck, DomainError> {
        let throttle = &self.settings.sign_in_throttle;
        let give_up = tokio::time::Instant::now() + MAX_IN_FLIGHT_WAIT;
        // Registered before the claim, so that a concurrent attempt refused
        // by this one's claim sees it in flight.
        let mut attempt = InFlight::enter(&self.in_flight, username_key);
        let (now, counters) = loop {
            let resolved_before = self.in_flight.resolved(username_key);
            let now = self.now();
            let claims = throttle.claims(username_key, &origin.address, now);
            let Some(counters) = self.store.claim_sign_in(&claims, now).await? else {
                attempt.resume();
                return Ok(ClaimedCheck {
                    claims,
                    claimed_at: now,
                    ticket: HashTicket::new(),
                    store: Arc::clone(&self.store),
                    _in_flight: attempt,
                });
            };
            if counters.iter().any(|c| c.first_refusal) {
                let mut event =
                    AuditEvent::new(EventType::SignInThrottled, origin, actor, self.now()).failed();
                if let Some(account) = self.store.account_by_username(username_key).await? {
                    event = event.account(&account.id, account.username.as_str());
                }
                self.store.record_event(&event).await?;
            }
            if matches!(throttle.refusal(&counters, now), Refusal::Locked) {
                break (now, counters);
            }
            match attempt.pause(resolved_before) {
                Next::Refuse => break (now, counters),
                Next::Retry => attempt.resume(),
                Next::Wait(woken) => {
                    let gave_up = tokio::time::timeout_at(give_up, woken).await.is_err();
                    attempt.resume();
                    if gave_up {
                        break (now, counters);
                    }
                }
            }
        };
        match throttle.refusal(&counters, now) {
            Refusal::Backoff(wait) => Err(DomainError::SignInThrottled(wait)),
            Refusal::Locked => Err(DomainError::SignInLocked),
        }
    }

    /// `DeleteAccount`: the account, its sessions and its tokens go at once,
    /// and the tokens descended from its tokens in other accounts are
    /// revoked; its audit events stay.
    pub async fn delete_account(
        &self,
        caller: &Principal,
        origin: &Origin,
        id: &AccountId,
    ) -> Result<(), DomainError> {
        policy::authorize(caller, Action::DeleteAccount(id))?;
        if caller.is_operator() && &caller.account.id == id {
            return Err(DomainError::SelfLockout);
        }
        let account = self
            .store
            .account_by_id(id)
            .await?
            .ok_or(DomainError::AccountNotFound)?;
        let event = AuditEvent::new(EventType::AccountDeleted, origin, Some(caller), self.now())
            .account(&account.id, account.username.as_str());
        let store = Arc::clone(&self.store);
        let (target, evicted) = (id.clone(), id.clone());
        let deleted = self
            .commit_then_evict(
                async move { store.delete_account(&target, &event).await },
                move |cache, deleted: &Option<Vec<TokenId>>| {
                    if let Some(descendants) = deleted {
                        cache.evict(&Invalidation::Account(evicted));
                        cache.evict_credentials(descendants);
                    }
                },
            )
            .await?;
        deleted.map(drop).ok_or(DomainError::AccountNotFound)
    }
}

/// A password check counted against the sign-in throttle (its claims, for
/// [`crate::domain::store::Store::sign_in_succeeded`]), holding its place among
/// the attempts in flight until its outcome is recorded.
///
/// A check whose password was never verified gives its claim back when
/// dropped: refused by a full hashing queue, failed before hashing, or
/// abandoned by a call that ended while its job waited in the queue. Such
/// an attempt guessed nothing, so it must not move its username towards a
/// lockout: a flood that fills the queue would otherwise lock out the
/// owner signing in with the right password. Once a thread started
/// verifying, the claim stands whatever the caller does (the ticket says
/// which happened, exactly once).
struct ClaimedCheck {
    claims: [ThrottleClaim; 2],
    /// When the claims were counted: a give-back undoes only a count that
    /// began by then, never one a reset started since.
    claimed_at: Timestamp,
    ticket: HashTicket,
    store: Arc<dyn crate::domain::store::Store>,
    _in_flight: InFlightAttempt,
}

impl Drop for ClaimedCheck {
    fn drop(&mut self) {
        if !self.ticket.withdraw() {
            return;
        }
        // Dropped outside a runtime only at shutdown: the claim then stands,
        // which errs on the side of the throttle.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        metrics::counter!("identity_sign_in_claims_given_back_total").increment(1);
        let (store, claims, at) = (
            Arc::clone(&self.store),
            self.claims.clone(),
            self.claimed_at,
        );
        runtime.spawn(async move {
            if let Err(err) = store.give_back_sign_in(&claims, at).await {
                tracing::warn!(error = %err, "could not give back an unchecked sign-in attempt");
            }
        });
    }
}
