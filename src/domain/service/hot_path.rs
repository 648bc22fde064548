use std::sync::Arc;

use crate::domain::store::TokenUse;
use crate::domain::verdict::{InactiveReason, Verdict, Verification};
use crate::domain::{
    DomainError,
    account::{Account, AccountKind},
    audit::Origin,
    cache::Cached,
    credential::{self, CredentialKind, Malformed, ParsedCredential},
    policy::Principal,
    resource::Resources,
    scope::Scopes,
    time::Timestamp,
    token::{Session, Token, TokenState},
    verifier::Verifier,
};

use super::{Identity, without_hash};

impl Identity {
    /// Authenticates a caller from the credential it sent, if any. Anything
    /// but an active credential is an error. A successful authentication is a
    /// use of the credential: it spends one use of a limited-use token and
    /// may record the token's last use (from `origin`).
    pub async fn authenticate(
        &self,
        credential: Option<&str>,
        origin: &Origin,
    ) -> Result<Arc<Principal>, DomainError> {
        let raw = credential.ok_or(DomainError::CredentialMissing)?;
        let verdict = match self.inspect(credential::parse(raw)).await? {
            Verdict::Active(principal) => self.admit(principal, &origin.address).await?,
            inactive => inactive,
        };
        match verdict {
            Verdict::Active(principal) => Ok(principal),
            Verdict::Inactive(reason) => Err(DomainError::CredentialInvalid(reason.describe())),
        }
    }

    /// Notes an admitted verifier (see [`crate::domain::verifier::VerifierRule::admit`],
    /// the one rule of who may ask `VerifyToken`): a robot's credential is
    /// remembered for the verifier-expiry gauge. The handler calls it before
    /// it parses the request, as soon as the caller is admitted.
    pub fn note_verifier(&self, verifier: &Verifier) {
        // Robots only: a verifier is a service, and robots are made by
        // operators, so no ordinary user can move the gauge or raise the
        // warning with a `tokens:verify` token of their own.
        if let Some(caller) = verifier.principal()
            && caller.account.kind == AccountKind::Robot
        {
            self.verifier_credentials
                .note(&caller.credential_id, caller.expire_time, self.now());
        }
    }

    /// `VerifyToken`: the verdict on `credential` (as parsed; a malformed
    /// one is an inactive verdict) for an admitted verifier (only
    /// [`crate::domain::verifier::VerifierRule::admit`] makes one, so holding it is the
    /// permission to ask), requiring
    /// the `required` scopes and then the `resources` (checked on every
    /// verification, cached or not). An active verdict is a use of the
    /// credential, from `client`.
    pub async fn verify(
        &self,
        _admitted: &Verifier,
        credential: Result<ParsedCredential, Malformed>,
        required: &Scopes,
        resources: &Resources,
        client: &Origin,
    ) -> Result<Verification, DomainError> {
        let verification = match self.inspect(credential).await? {
            // An empty requirement asks for nothing; each named scope must be
            // allowed (full access allows every scope). What is missing is
            // listed only on this refusal path: an active answer allocates
            // nothing for it.
            Verdict::Active(principal) if !required.names().all(|s| principal.scopes.allows(s)) => {
                Verification::MissingScopes(
                    required
                        .names()
                        .filter(|s| !principal.scopes.allows(s))
                        .map(str::to_owned)
                        .collect(),
                )
            }
            // Then each required resource must be allowed, by the same rule
            // (and as cheaply on the active path).
            Verdict::Active(principal) if !principal.resources.allows_all(resources) => {
                Verification::MissingResources(
                    resources
                        .names()
                        .filter(|r| !principal.resources.allows(r))
                        .map(str::to_owned)
                        .collect(),
                )
            }
            Verdict::Active(principal) => match self.admit(principal, &client.address).await? {
                Verdict::Active(principal) => Verification::Active(principal),
                Verdict::Inactive(reason) => Verification::Inactive(reason),
            },
            Verdict::Inactive(reason) => Verification::Inactive(reason),
        };
        self.verdicts.count(&verification);
        Ok(verification)
    }

    /// Looks a credential up and judges it: the core of both authentication
    /// and `VerifyToken`. A malformed credential costs no I/O; a cached one
    /// usually costs none either. Changes nothing: see [`Self::admit`].
    async fn inspect(
        &self,
        credential: Result<ParsedCredential, Malformed>,
    ) -> Result<Verdict, DomainError> {
        let Ok(ParsedCredential { kind, digest }) = credential else {
            return Ok(Verdict::Inactive(InactiveReason::Malformed));
        };
        let now = self.now();
        if let Some(cached) = self.cache.get(&digest) {
            return Ok(judge_cached(cached, now));
        }
        let epoch = self.cache.epoch();
        let found = match kind {
            CredentialKind::PersonalAccessToken => self
                .store
                .token_for_verdict(&digest)
                .await?
                .map(|(token, account)| {
                    (
                        token.state(now),
                        token.retire_time,
                        token_principal(token, account),
                    )
                }),
            CredentialKind::Session => {
                self.store
                    .session_for_verdict(&digest)
                    .await?
                    .map(|(session, account)| {
                        (
                            session.state(now),
                            None,
                            session_principal(session, account),
                        )
                    })
            }
        };
        let (verdict, retire_time) = match found {
            None => (Verdict::Inactive(InactiveReason::Unknown), None),
            Some((state, retire_time, principal)) => {
                let verdict = match state {
                    TokenState::Revoked => Verdict::Inactive(InactiveReason::Revoked),
                    TokenState::Expired => Verdict::Inactive(InactiveReason::Expired),
                    TokenState::Exhausted => Verdict::Inactive(InactiveReason::Exhausted),
                    TokenState::Active if principal.account.is_disabled() => {
                        Verdict::Inactive(InactiveReason::AccountDisabled)
                    }
                    TokenState::Active => Verdict::Active(Arc::new(principal)),
                };
                (verdict, retire_time)
            }
        };
        let cached = match &verdict {
            // Each use of a limited-use token must reach the store.
            Verdict::Active(principal) if principal.uses_remaining.is_some() => None,
            Verdict::Active(principal) => Some(Cached::Active {
                principal: Arc::clone(principal),
                retire_time,
            }),
            Verdict::Inactive(reason) => Some(Cached::Inactive(*reason)),
        };
        if let Some(cached) = cached {
            self.cache.put(&digest, cached, epoch);
        }
        Ok(verdict)
    }

    /// Turns an active inspection into a use: spends one use of a
    /// limited-use token (atomically, so N concurrent uses of a token with K
    /// left succeed exactly K times) and records the token's last use in the
    /// background, at most once a minute.
    async fn admit(
        &self,
        mut principal: Arc<Principal>,
        address: &str,
    ) -> Result<Verdict, DomainError> {
        if principal.credential != CredentialKind::PersonalAccessToken {
            return Ok(Verdict::Active(principal));
        }
        if principal.uses_remaining.is_some() {
            let now = self.now();
            match self
                .store
                .consume_use(&principal.credential_id, now)
                .await?
            {
                Some(left) => Arc::make_mut(&mut principal).uses_remaining = Some(left),
                // No use left, or revoked or expired since it was read:
                // say which (a rare path, worth one more read).
                None => {
                    let reason = match self.store.token_by_id(&principal.credential_id).await? {
                        Some(token) => match token.state(now) {
                            TokenState::Revoked => InactiveReason::Revoked,
                            TokenState::Expired => InactiveReason::Expired,
                            TokenState::Exhausted | TokenState::Active => InactiveReason::Exhausted,
                        },
                        None => InactiveReason::Unknown,
                    };
                    return Ok(Verdict::Inactive(reason));
                }
            }
        }
        let now = self.now();
        if self
            .uses
            .due(&principal.credential_id, principal.last_used_time, now)
        {
            self.uses.push(TokenUse {
                id: principal.credential_id.clone(),
                at: now,
                address: address.to_owned(),
            });
        }
        Ok(Verdict::Active(principal))
    }
}

/// The verdict on a cached credential at `now`: expiry and the end of a
/// rotation's grace period are re-checked on every hit.
fn judge_cached(cached: Cached, now: Timestamp) -> Verdict {
    match cached {
        Cached::Inactive(reason) => Verdict::Inactive(reason),
        Cached::Active { retire_time, .. } if retire_time.is_some_and(|r| r <= now) => {
            Verdict::Inactive(InactiveReason::Revoked)
        }
        Cached::Active { principal, .. } if principal.expire_time.is_some_and(|e| e <= now) => {
            Verdict::Inactive(InactiveReason::Expired)
        }
        Cached::Active { principal, .. } => Verdict::Active(principal),
    }
}

/// The principal of an active token: the one a cache miss builds, and the
/// one a new token's verdict is pre-warmed with (`tokens.rs`).
pub(super) fn token_principal(token: Token, account: Account) -> Principal {
    // The end of a rotation's grace period ends the token as surely as its
    // expiry: report whichever comes first. (A revoked token has no
    // principal.)
    let expire_time = match (token.expire_time, token.retire_time) {
        (Some(expire), Some(retire)) => Some(expire.min(retire)),
        (expire, retire) => expire.or(retire),
    };
    Principal {
        account: Arc::new(without_hash(account)),
        credential: CredentialKind::PersonalAccessToken,
        credential_id: token.id,
        scopes: token.scopes,
        resources: token.resources,
        expire_time,
        uses_remaining: token.uses_remaining,
        last_used_time: token.last_used_time,
    }
}

fn session_principal(session: Session, account: Account) -> Principal {
    Principal {
        account: Arc::new(without_hash(account)),
        credential: CredentialKind::Session,
        credential_id: session.id,
        scopes: Scopes::full(),
        resources: Resources::all(),
        expire_time: Some(session.expire_time),
        uses_remaining: None,
        last_used_time: None,
    }
}
