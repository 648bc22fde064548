//! Who may do what. Every rule of the service is in [`authorize`]: one match
//! over [`Action`], so a new action cannot compile without a rule, and the
//! rules can be read in one place.
//!
//! The rules: operators may act on every account; everyone else on their own
//! account only. A personal access token is further limited to its scopes and
//! can never sign in or out. A session carries its account's full access,
//! except `VerifyToken`, which needs `tokens:verify` granted by name (RFC
//! 7662: introspection is for protected resources, not for people).
//! Who may call `VerifyToken` at all (a credential, a client certificate, or
//! both) is the verifier rule, [`super::verifier::VerifierRule::admit`],
//! which asks this scope rule when it needs a credential.
//!
//! What a caller may *give* is one more rule, [`check_grant`]: nothing
//! created or changed with a credential may hold a power the credential
//! lacks. Every path that hands out power (an account's role, a token's
//! scopes, lifetime, uses and account) describes what it hands out as a
//! [`Grant`] and asks it.
use std::sync::Arc;

use super::{
    DomainError,
    account::{Account, AccountId, Role},
    credential::CredentialKind,
    resource::Resources,
    scope::{self, Scopes},
    time::Timestamp,
    token::TokenId,
};

/// An authenticated caller: an account and the credential it presented.
#[derive(Debug, Clone)]
pub struct Principal {
    /// The account the credential speaks for. Its password hash is cleared.
    /// Shared: the verification cache keeps one copy per account for all of
    /// its cached credentials.
    pub account: Arc<Account>,
    /// Session or personal access token.
    pub credential: CredentialKind,
    /// The session's or token's id.
    pub credential_id: TokenId,
    /// What the credential is limited to (full for sessions).
    pub scopes: Scopes,
    /// The resources the credential may be used on (every resource of the
    /// account for sessions).
    pub resources: Resources,
    /// When the credential expires, if ever.
    pub expire_time: Option<Timestamp>,
    /// Uses left for a limited-use token (after this use, once admitted).
    pub uses_remaining: Option<i64>,
    /// When the token was last recorded as used, if ever (tokens only).
    pub last_used_time: Option<Timestamp>,
}

impl Principal {
    /// Whether the caller is an operator.
    pub fn is_operator(&self) -> bool {
        self.account.role == Role::Operator
    }

    /// Whether the caller may act on `account`'s resources.
    pub fn owns_or_operates(&self, account: &AccountId) -> bool {
        self.is_operator() || &self.account.id == account
    }
}

/// Something a caller wants to do.
#[derive(Debug, Clone, Copy)]
pub enum Action<'a> {
    /// Create an account.
    CreateAccount,
    /// Read one account.
    ReadAccount(&'a AccountId),
    /// List all accounts.
    ListAccounts,
    /// End the calling session.
    SignOut,
    /// Issue a token for an account.
    CreateToken(&'a AccountId),
    /// Read an account's tokens, or every account's (`None`).
    ReadTokens(Option<&'a AccountId>),
    /// Revoke one of an account's tokens.
    RevokeToken(&'a AccountId),
    /// Introspect a credential.
    VerifyToken,
    /// Rotate one of an account's tokens.
    RotateToken(&'a AccountId),
    /// Give one of an account's tokens a new lifetime.
    RenewToken(&'a AccountId),
    /// Change the caller's own password.
    ChangePassword,
    /// End every session of an account.
    SignOutEverywhere(&'a AccountId),
    /// Disable or enable an account.
    SuspendAccount(&'a AccountId),
    /// Delete an account.
    DeleteAccount(&'a AccountId),
    /// Read audit events: of one account, or of all (`None`).
    ReadAudit(Option<&'a AccountId>),
    /// Learn who the caller itself is.
    GetCaller,
}

/// Decides whether `caller` may perform `action`: `Ok(())` or the refusal.
pub fn authorize(caller: &Principal, action: Action<'_>) -> Result<(), DomainError> {
    match action {
        Action::CreateAccount => {
            require_scope(caller, scope::ACCOUNTS_WRITE)?;
            require_operator(caller)
        }
        Action::ReadAccount(target) => {
            require_scope(caller, scope::ACCOUNTS_READ)?;
            require_owner(caller, target)
        }
        Action::ListAccounts => {
            require_scope(caller, scope::ACCOUNTS_READ)?;
            require_operator(caller)
        }
        Action::SignOut | Action::ChangePassword => require_session(caller),
        Action::CreateToken(target)
        | Action::RevokeToken(target)
        | Action::RotateToken(target)
        | Action::RenewToken(target) => {
            require_scope(caller, scope::TOKENS_WRITE)?;
            require_owner(caller, target)
        }
        // Reading every account's at once is an operator's view of the
        // fleet, as for the audit log.
        Action::ReadTokens(target) => {
            require_scope(caller, scope::TOKENS_READ)?;
            match target {
                Some(target) => require_owner(caller, target),
                None => require_operator(caller),
            }
        }
        // Named explicitly: full access (a session, an unscoped token) does
        // not include it.
        Action::VerifyToken => require_explicit_scope(caller, scope::TOKENS_VERIFY),
        // Ending one's own sessions or deleting one's own account is signing
        // out: it takes a session. Doing it to another account is an
        // operator's administrative act.
        Action::SignOutEverywhere(target) | Action::DeleteAccount(target) => {
            if &caller.account.id == target {
                require_session(caller)
            } else {
                require_scope(caller, scope::ACCOUNTS_WRITE)?;
                require_operator(caller)
            }
        }
        Action::SuspendAccount(_) => {
            require_scope(caller, scope::ACCOUNTS_WRITE)?;
            require_operator(caller)
        }
        Action::ReadAudit(target) => {
            require_scope(caller, scope::ACCOUNTS_READ)?;
            match target {
                Some(target) => require_owner(caller, target),
                None => require_operator(caller),
            }
        }
        // Any live credential may learn what it is itself: what VerifyToken
        // would say about it, no more (no email), and no scope is needed to
        // know one's own scopes.
        Action::GetCaller => Ok(()),
    }
}

/// What something created or changed with a credential will be able to do:
/// the powers [`check_grant`] weighs against the creator's.
#[derive(Debug, Clone, Copy)]
pub enum Grant<'a> {
    /// An account of `role` comes to hold power: it is created, or enabled
    /// again (which brings its credentials back to life). The account's own
    /// password gives it the full access of its role.
    Account {
        /// Its role.
        role: Role,
    },
    /// A credential comes to hold power: a new token, a rotation's
    /// successor, or a token given a new lifetime.
    Token(TokenGrant<'a>),
}

/// The powers of a token being created or changed.
///
/// A new power of tokens is a new field here and a new comparison in [`check_grant`]: the exhaustive
/// destructuring there makes forgetting the comparison a compile error.
#[derive(Debug, Clone, Copy)]
pub struct TokenGrant<'a> {
    /// The account it acts for.
    pub account: &'a AccountId,
    /// That account's role (an operator's token acts on every account).
    pub role: Role,
    /// What it is limited to; empty for full access.
    pub scopes: &'a Scopes,
    /// The resources it may be used on; empty for every resource.
    pub resources: &'a Resources,
    /// When it stops working; `None` for never.
    pub expire_time: Option<Timestamp>,
    /// The uses it will have left; `None` for unlimited.
    pub uses: Option<i64>,
    /// The token this one replaces (rotation): when that is the calling
    /// token itself, its remaining uses move to the result instead of being
    /// copied, so a limited-use token may do it.
    pub successor_of: Option<&'a TokenId>,
}

/// The grant rule: whether `caller` may create or change something with the
/// powers of `grant`. Nothing may hold a power its creator lacks:
///
/// - **role**: the operator role (a new operator account, or one enabled
///   again) needs an operator's session or full-access token (limited to
///   no resources), which already holds every power an operator account has; a token of an operator's
///   account needs an operator. A user account's power reaches only its own,
///   new or suspended, account, so `accounts:write` of an operator suffices.
/// - **account**: a token acts only for an account the caller may act on.
/// - **scopes**: a subset of the caller's (full access only from full access).
/// - **resources**: a subset of the caller's, patterns included
///   ([`Resources::is_subset_of`]; every resource only from every resource,
///   which a session always has).
/// - **lifetime**: a personal access token grants no later expiry than its
///   own (never-expiring only from never-expiring). A session speaks for
///   its account's password: what it creates is not bound to its life.
/// - **uses**: a limited-use personal access token creates and renews no
///   tokens at all (each creation would copy its remaining uses, so uses
///   would multiply); rotating itself moves its remaining uses to the
///   successor, which is no more than it holds.
pub fn check_grant(caller: &Principal, grant: &Grant<'_>) -> Result<(), DomainError> {
    let token = match grant {
        Grant::Account { role } => {
            let pat = caller.credential == CredentialKind::PersonalAccessToken;
            // An account lives until it is deleted: a token that will expire
            // or run out of uses holds no such lifetime to give.
            let bounded = pat && (caller.expire_time.is_some() || caller.uses_remaining.is_some());
            return match role {
                // An operator reaches every resource of every account: a
                // token limited to some resources holds no such reach.
                Role::Operator
                    if !(caller.is_operator()
                        && caller.scopes.is_full()
                        && caller.resources.is_all())
                        || bounded =>
                {
                    Err(DomainError::Escalation(
                        "only an operator's session, or an operator's full-access token without expiry, use limit or resources, may give the operator role",
                    ))
                }
                Role::User if pat && caller.uses_remaining.is_some() => Err(
                    DomainError::Escalation("a limited-use token cannot create or enable accounts"),
                ),
                Role::Operator | Role::User => Ok(()),
            };
        }
        Grant::Token(token) => token,
    };
    let TokenGrant {
        account,
        role,
        scopes,
        resources,
        expire_time,
        uses,
        successor_of,
    } = *token;
    if !caller.owns_or_operates(account) {
        return Err(DomainError::NotAllowed(
            "only the account itself or an operator may do this",
        ));
    }
    if role == Role::Operator && !caller.is_operator() {
        return Err(DomainError::Escalation(
            "only an operator may give a token of an operator",
        ));
    }
    if !scopes.is_subset_of(&caller.scopes) {
        return Err(DomainError::Escalation(
            "the new token's scopes must be a subset of the calling token's scopes",
        ));
    }
    if !resources.is_subset_of(&caller.resources) {
        return Err(DomainError::Escalation(
            "the new token's resources must be a subset of the calling token's resources",
        ));
    }
    if caller.credential == CredentialKind::Session {
        return Ok(());
    }
    // Rotating another token hands its new secret to the caller, and that
    // secret would outlive the calling token (it stays in its own family,
    // not the caller's): a token may rotate only itself.
    if successor_of.is_some_and(|old| old != &caller.credential_id) {
        return Err(DomainError::Escalation(
            "a personal access token may rotate only itself; rotate other tokens with a session",
        ));
    }
    if let Some(limit) = caller.expire_time
        && expire_time.is_none_or(|e| e > limit)
    {
        return Err(DomainError::Escalation(
            "the new token cannot expire later than the calling token",
        ));
    }
    if let Some(left) = caller.uses_remaining {
        if successor_of != Some(&caller.credential_id) {
            return Err(DomainError::Escalation(
                "a limited-use token cannot create or renew tokens",
            ));
        }
        if uses.is_none_or(|u| u > left) {
            return Err(DomainError::Escalation(
                "the new token cannot have more uses than the calling token has left",
            ));
        }
    }
    Ok(())
}

fn require_scope(caller: &Principal, scope: &'static str) -> Result<(), DomainError> {
    if caller.scopes.allows(scope) {
        Ok(())
    } else {
        Err(DomainError::ScopeMissing(scope))
    }
}

fn require_explicit_scope(caller: &Principal, scope: &'static str) -> Result<(), DomainError> {
    if caller.scopes.names().any(|s| s == scope) {
        Ok(())
    } else {
        Err(DomainError::ScopeMissing(scope))
    }
}

fn require_session(caller: &Principal) -> Result<(), DomainError> {
    match caller.credential {
        CredentialKind::Session => Ok(()),
        CredentialKind::PersonalAccessToken => Err(DomainError::SessionRequired),
    }
}

fn require_operator(caller: &Principal) -> Result<(), DomainError> {
    if caller.is_operator() {
        Ok(())
    } else {
        Err(DomainError::NotAllowed("only operators may do this"))
    }
}

fn require_owner(caller: &Principal, target: &AccountId) -> Result<(), DomainError> {
    if caller.owns_or_operates(target) {
        Ok(())
    } else {
        Err(DomainError::NotAllowed(
            "only the account itself or an operator may do this",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::account::{AccountKind, Email, Username};

    /// The built-in scopes, each a bit of a mask; bit 5 stands for every
    /// other scope, which only full access holds.
    const BUILT_IN: [&str; 5] = [
        scope::ACCOUNTS_READ,
        scope::ACCOUNTS_WRITE,
        scope::TOKENS_READ,
        scope::TOKENS_WRITE,
        scope::TOKENS_VERIFY,
    ];
    const FULL_MASK: u8 = 0b11_1111;

    /// Resource sets of the grid, with what each reaches as a mask over
    /// probe names, written out by hand for the oracle: bit 0 `projects/a`,
    /// 1 `projects/a/x`, 2 `projects/a/y` (any other name below
    /// `projects/a/`), 3 `projects/a/x/y`, 4 `orgs/b`, 5 any other name.
    /// The empty set is every resource.
    const RESOURCE_SETS: [(&[&str], u8); 6] = [
        (&[], 0b11_1111),
        (&["projects/a"], 0b00_0001),
        (&["projects/a/x"], 0b00_0010),
        (&["projects/a/*"], 0b00_1110),
        (&["projects/a/x/*"], 0b00_1000),
        (&["orgs/b", "projects/a"], 0b01_0001),
    ];
    /// The caller's resource sets (indices into [`RESOURCE_SETS`]): every
    /// resource, a pattern, and two names.
    const CALLER_RESOURCE_SETS: [usize; 3] = [0, 3, 5];

    fn resources(index: usize) -> (Resources, u8) {
        let (names, reach) = RESOURCE_SETS[index];
        (Resources::parse("r", names).expect("valid"), reach)
    }

    /// The scopes of `mask` (0 meaning full access), and what they reach
    /// as a mask, for the oracle.
    fn scopes(mask: u8) -> (Scopes, u8) {
        if mask == 0 {
            return (Scopes::full(), FULL_MASK);
        }
        let names: Vec<&str> = (0..5)
            .filter(|i| mask & (1 << i) != 0)
            .map(|i| BUILT_IN[i])
            .collect();
        (Scopes::parse("s", &names).expect("valid"), mask)
    }

    fn account(role: Role) -> Account {
        Account {
            id: AccountId::generate(),
            username: Username::parse("u", "someone").expect("valid"),
            email: Email::default(),
            kind: AccountKind::Person,
            role,
            password_hash: None,
            create_time: Timestamp::from_micros(0),
            disable_time: None,
            credentials_generation: 0,
        }
    }

    fn principal(
        role: Role,
        credential: CredentialKind,
        scopes: Scopes,
        expire_time: Option<Timestamp>,
        uses_remaining: Option<i64>,
    ) -> Principal {
        Principal {
            account: Arc::new(account(role)),
            credential,
            credential_id: TokenId::generate(),
            scopes,
            resources: Resources::all(),
            expire_time,
            uses_remaining,
            last_used_time: None,
        }
    }

    const T: i64 = 1_000_000_000;

    /// The rule restated as "the result's powers are within the caller's",
    /// power by power, independently of how `check_grant` is written.
    #[allow(clippy::too_many_arguments)]
    fn within(
        caller_role: Role,
        kind: CredentialKind,
        caller_reach: u8,
        caller_resource_reach: u8,
        caller_expiry: Option<i64>,
        caller_uses: Option<i64>,
        own_account: bool,
        target_role: Role,
        reach: u8,
        resource_reach: u8,
        expiry: Option<i64>,
        uses: Option<i64>,
        replaces_caller: bool,
        replaces_other: bool,
    ) -> bool {
        let operator = caller_role == Role::Operator;
        let account_ok = own_account || operator;
        let role_ok = target_role == Role::User || operator;
        let pat = kind == CredentialKind::PersonalAccessToken;
        let scopes_ok = reach & !caller_reach == 0;
        let resources_ok = resource_reach & !caller_resource_reach == 0;
        let rotation_ok = !pat || !replaces_other;
        let expiry_ok = !pat
            || match caller_expiry {
                None => true,
                Some(limit) => expiry.is_some_and(|e| e <= limit),
            };
        let uses_ok = !pat
            || match caller_uses {
                None => true,
                Some(left) => replaces_caller && uses.is_some_and(|u| u <= left),
            };
        account_ok && role_ok && scopes_ok && resources_ok && expiry_ok && uses_ok && rotation_ok
    }

    #[test]
    fn nothing_granted_holds_more_than_its_granter_over_every_case() {
        let roles = [Role::User, Role::Operator];
        let kinds = [CredentialKind::Session, CredentialKind::PersonalAccessToken];
        let caller_expiries = [None, Some(T)];
        let expiries = [None, Some(T - 1), Some(T), Some(T + 1)];
        let caller_uses = [None, Some(0), Some(2)];
        let uses = [None, Some(1), Some(2), Some(3)];
        let mut checked = 0_u64;
        for caller_role in roles {
            for kind in kinds {
                // A session always has full access, to every resource.
                let (caller_masks, caller_resource_sets): (Vec<u8>, &[usize]) = match kind {
                    CredentialKind::Session => (vec![0], &[0]),
                    CredentialKind::PersonalAccessToken => {
                        ((0..32).collect(), &CALLER_RESOURCE_SETS)
                    }
                };
                // The resource dimension is crossed in full with a few scope
                // sets (none, all five, the caller's own), and otherwise
                // sampled, to keep the grid's running time in bounds.
                let crossed = |mask: u8| [0, 0b1_1111].contains(&mask);
                for (caller_mask, &caller_set) in caller_masks.iter().flat_map(|&m| {
                    let sets = if crossed(m) {
                        caller_resource_sets
                    } else {
                        &[0][..]
                    };
                    sets.iter().map(move |r| (m, r))
                }) {
                    for caller_expiry in caller_expiries {
                        for caller_left in caller_uses {
                            if kind == CredentialKind::Session && caller_left.is_some() {
                                continue;
                            }
                            let (caller_scopes, caller_reach) = scopes(caller_mask);
                            let (caller_resources, caller_resource_reach) = resources(caller_set);
                            let caller = Principal {
                                resources: caller_resources,
                                ..principal(
                                    caller_role,
                                    kind,
                                    caller_scopes,
                                    caller_expiry.map(Timestamp::from_micros),
                                    caller_left,
                                )
                            };
                            // Accounts of each role.
                            for role in roles {
                                let allowed =
                                    check_grant(&caller, &Grant::Account { role }).is_ok();
                                let pat = kind == CredentialKind::PersonalAccessToken;
                                let bounded =
                                    pat && (caller_expiry.is_some() || caller_left.is_some());
                                let expected = match role {
                                    Role::User => !(pat && caller_left.is_some()),
                                    Role::Operator => {
                                        caller_role == Role::Operator
                                            && caller_mask == 0
                                            && caller_set == 0
                                            && !bounded
                                    }
                                };
                                assert_eq!(allowed, expected, "account {role:?} by {caller:?}");
                                checked += 1;
                            }
                            // Tokens: of the caller's own account or another
                            // of each role, every scope set, expiry, use
                            // count, resource set, new or replacing the caller
                            // (rotation of itself) or another token.
                            let other_user = AccountId::generate();
                            let targets = [
                                (true, caller_role, &caller.account.id),
                                (false, Role::User, &other_user),
                                (false, Role::Operator, &other_user),
                            ];
                            let other_token = TokenId::generate();
                            for (own, target_role, target) in targets {
                                for (mask, set) in (0..32).flat_map(|m| {
                                    let sets: Vec<usize> = if crossed(m) || m == caller_mask {
                                        (0..RESOURCE_SETS.len()).collect()
                                    } else {
                                        vec![0, usize::from(m) % RESOURCE_SETS.len()]
                                    };
                                    sets.into_iter().map(move |r| (m, r))
                                }) {
                                    let (requested, reach) = scopes(mask);
                                    let (wanted_resources, resource_reach) = resources(set);
                                    for expiry in expiries {
                                        for wanted_uses in uses {
                                            for successor_of in [
                                                None,
                                                Some(&caller.credential_id),
                                                Some(&other_token),
                                            ] {
                                                let grant = Grant::Token(TokenGrant {
                                                    account: target,
                                                    role: target_role,
                                                    scopes: &requested,
                                                    resources: &wanted_resources,
                                                    expire_time: expiry.map(Timestamp::from_micros),
                                                    uses: wanted_uses,
                                                    successor_of,
                                                });
                                                let result = check_grant(&caller, &grant);
                                                let expected = within(
                                                    caller_role,
                                                    kind,
                                                    caller_reach,
                                                    caller_resource_reach,
                                                    caller_expiry,
                                                    caller_left,
                                                    own,
                                                    target_role,
                                                    reach,
                                                    resource_reach,
                                                    expiry,
                                                    wanted_uses,
                                                    successor_of == Some(&caller.credential_id),
                                                    successor_of == Some(&other_token),
                                                );
                                                assert_eq!(
                                                    result.is_ok(),
                                                    expected,
                                                    "{grant:?} by {caller:?}: {result:?}"
                                                );
                                                if let Err(err) = result {
                                                    assert!(
                                                        matches!(
                                                            err,
                                                            DomainError::Escalation(_)
                                                                | DomainError::NotAllowed(_)
                                                        ),
                                                        "{err:?}"
                                                    );
                                                }
                                                checked += 1;
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        assert!(checked > 100_000, "the grid shrank: {checked} cases");
    }

    #[test]
    fn only_a_token_granted_tokens_verify_by_name_may_verify() {
        for role in [Role::User, Role::Operator] {
            let session = principal(role, CredentialKind::Session, Scopes::full(), None, None);
            let full = principal(
                role,
                CredentialKind::PersonalAccessToken,
                Scopes::full(),
                None,
                None,
            );
            for caller in [&session, &full] {
                assert!(matches!(
                    authorize(caller, Action::VerifyToken),
                    Err(DomainError::ScopeMissing(scope::TOKENS_VERIFY))
                ));
            }
            for mask in 1..32_u8 {
                let (scopes, _) = scopes(mask);
                let token = principal(
                    role,
                    CredentialKind::PersonalAccessToken,
                    scopes,
                    None,
                    None,
                );
                let allowed = authorize(&token, Action::VerifyToken).is_ok();
                assert_eq!(allowed, mask & (1 << 4) != 0, "{token:?}");
            }
        }
    }
}
