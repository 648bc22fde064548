//! The grant rule as an invariant (`policy::check_grant`): nothing created
//! or changed with a credential holds a power the credential lacks.
//!
//! Every kind of caller of the authorization matrix (`authz.rs`, whose
//! callers this reuses), and a few whose powers the matrix does not vary (a
//! limited-use token, a short-lived one, an operator's session and an
//! operator's limited-use token, a token limited to resources), tries
//! everything a caller can create or change: accounts of each role
//! (created, and enabled again), tokens with every combination of the
//! built-in scopes (none included), a few resource sets, with and
//! without an expiry beyond the caller's, with and without a use limit
//! beyond the caller's, for its own account, another person's and an
//! operator's; rotations and renewals of tokens more and less powerful than
//! the caller; and tokens rotating and renewing themselves. Each answer is
//! checked twice: whenever a call succeeds, what it produced is compared,
//! power by power, with the caller's powers (as `VerifyToken` reports them);
//! and every answer, success or refusal, must be the one the rule gives.

use std::{
    collections::BTreeSet,
    sync::Arc,
    time::{Duration, SystemTime},
};

use tonic::{Code, Status, transport::Channel};

use crate::authz::{Caller, Rpc, World};
use crate::both_backends;
use crate::support::{PASSWORD, TestApp, bearer, pb, reason};
use pb::tokens_service_client::TokensServiceClient;

/// What a live credential may do, as `VerifyToken` reports it.
#[derive(Debug, Clone)]
struct Power {
    account_id: String,
    operator: bool,
    session: bool,
    token_id: String,
    /// `None` for full access.
    scopes: Option<BTreeSet<String>>,
    /// `None` for every resource.
    resources: Option<BTreeSet<String>>,
    /// `None` for never.
    expire: Option<SystemTime>,
    uses: Option<i64>,
}

impl Power {
    fn allows(&self, scope: &str) -> bool {
        self.scopes.as_ref().is_none_or(|s| s.contains(scope))
    }

    /// Whether `scopes` (empty: full access) are within this credential's.
    fn covers(&self, scopes: &[String]) -> bool {
        match &self.scopes {
            None => true,
            Some(have) => !scopes.is_empty() && scopes.iter().all(|s| have.contains(s)),
        }
    }

    /// Whether `resources` (empty: every resource) are within this
    /// credential's, patterns included.
    fn covers_resources(&self, resources: &[String]) -> bool {
        match &self.resources {
            None => true,
            Some(have) => {
                !resources.is_empty()
                    && resources
                        .iter()
                        .all(|r| have.iter().any(|h| resource_covers(h, r)))
            }
        }
    }

    /// Whether a credential created with this one may expire at `expire`
    /// (`None`: never). A session speaks for its account: no bound.
    fn outlived_by(&self, expire: Option<SystemTime>) -> bool {
        !self.session
            && self
                .expire
                .is_some_and(|limit| expire.is_none_or(|e| e > limit))
    }
}

/// Whether the resource entry `have` allows everything `entry` does,
/// restated: the same name, or a pattern `p/*` and an entry strictly below
/// `p/` (a name, or a narrower pattern).
fn resource_covers(have: &str, entry: &str) -> bool {
    have == entry
        || have
            .strip_suffix('*')
            .is_some_and(|prefix| entry.len() > prefix.len() && entry.starts_with(prefix))
}

/// The resources of [`Who::ResourceToken`].
const CALLER_RESOURCES: [&str; 2] = ["orgs/b", "projects/a/*"];

/// Who calls.
#[derive(Debug, Clone, Copy)]
enum Who {
    /// A caller of the authorization matrix.
    Matrix(Caller),
    /// Alice's token with `tokens:write` and `tokens:read`, limited to a
    /// million uses (every call spends one).
    LimitedToken,
    /// Alice's token with `tokens:write`, for two hours.
    ShortLivedToken,
    /// A person operator's session.
    OperatorSession,
    /// The operator's full-access token, limited to a million uses.
    OperatorLimitedToken,
    /// Alice's token with `tokens:write` and `tokens:read`, limited to
    /// [`CALLER_RESOURCES`].
    ResourceToken,
}

/// The extra callers' credentials.
struct Extras {
    limited: String,
    short_lived: String,
    operator_session: String,
    operator_limited: String,
    resource_limited: String,
}

/// What a case asks for a token's expiry.
#[derive(Debug, Clone, Copy)]
enum Expiry {
    /// Nothing: the server's default, capped at a calling token's expiry.
    Default,
    /// This time.
    At(SystemTime),
    /// `never_expires`.
    Never,
}

/// One thing a caller tries.
#[derive(Debug, Clone)]
enum Act {
    CreateAccount {
        operator: bool,
    },
    EnableAccount {
        account_id: String,
        operator: bool,
    },
    CreateToken {
        account_id: String,
        operator_account: bool,
        scopes: Vec<String>,
        resources: Vec<String>,
        expiry: Expiry,
        max_uses: Option<i64>,
    },
    Rotate {
        victim: pb::Token,
        operator_account: bool,
    },
    Renew {
        victim: pb::Token,
        operator_account: bool,
        expiry: Expiry,
    },
}

#[derive(Debug, Clone)]
struct Case {
    who: Who,
    /// The `authorization` metadata.
    auth: Option<String>,
    /// The caller's powers; `None` for a credential that is not live.
    power: Option<Power>,
    act: Act,
}

/// What a case must answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ok,
    /// Any UNAUTHENTICATED.
    Unauthenticated,
    Err(Code, &'static str),
}

const SCOPE_MISSING: Outcome = Outcome::Err(Code::PermissionDenied, "ERROR_REASON_SCOPE_MISSING");
const NOT_ALLOWED: Outcome = Outcome::Err(Code::PermissionDenied, "ERROR_REASON_NOT_ALLOWED");
const ESCALATION: Outcome = Outcome::Err(Code::PermissionDenied, "ERROR_REASON_ESCALATION");
const HIDDEN: Outcome = Outcome::Err(Code::NotFound, "ERROR_REASON_TOKEN_NOT_FOUND");
const LIFETIME: Outcome = Outcome::Err(Code::InvalidArgument, "ERROR_REASON_TOKEN_LIFETIME");

const BUILT_IN: [&str; 5] = [
    "accounts:read",
    "accounts:write",
    "tokens:read",
    "tokens:write",
    "tokens:verify",
];

/// Every subset of the built-in scopes, the empty one (full access) first.
fn every_scope_set() -> Vec<Vec<String>> {
    (0..32_u8)
        .map(|mask| {
            (0..5)
                .filter(|i| mask & (1 << i) != 0)
                .map(|i| BUILT_IN[i].to_owned())
                .collect()
        })
        .collect()
}

fn time(ts: Option<&prost_types::Timestamp>) -> Option<SystemTime> {
    ts.map(|ts| SystemTime::try_from(*ts).expect("a valid timestamp"))
}

fn timestamp(at: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(at)
}

/// The answer the grant rule (and the authorization around it) gives.
fn expected(case: &Case) -> Outcome {
    let Some(p) = &case.power else {
        return Outcome::Unauthenticated;
    };
    match &case.act {
        Act::CreateAccount { operator } | Act::EnableAccount { operator, .. } => {
            if !p.allows("accounts:write") {
                SCOPE_MISSING
            } else if !p.operator {
                NOT_ALLOWED
            } else if *operator
                && (p.scopes.is_some()
                    || p.resources.is_some()
                    || (!p.session && (p.expire.is_some() || p.uses.is_some())))
            {
                // An account outlives any expiring or limited-use token.
                ESCALATION
            } else if !p.session && p.uses.is_some() {
                ESCALATION
            } else {
                Outcome::Ok
            }
        }
        Act::CreateToken {
            account_id,
            scopes,
            resources,
            expiry,
            ..
        } => {
            if !p.allows("tokens:write") {
                return SCOPE_MISSING;
            }
            if !(p.operator || &p.account_id == account_id) {
                return NOT_ALLOWED;
            }
            token_grant(p, scopes, resources, *expiry, false, false)
        }
        Act::Rotate { victim, .. } => {
            if !p.allows("tokens:write") {
                return SCOPE_MISSING;
            }
            if !(p.operator || p.account_id == victim.account_id) {
                return HIDDEN;
            }
            let expiry = match time(victim.expire_time.as_ref()) {
                Some(at) => Expiry::At(at),
                None => Expiry::Never,
            };
            let itself = p.token_id == victim.token_id;
            token_grant(
                p,
                &victim.scopes,
                &victim.resources,
                expiry,
                itself,
                !itself,
            )
        }
        Act::Renew { victim, expiry, .. } => {
            if !p.allows("tokens:write") {
                return SCOPE_MISSING;
            }
            if !(p.operator || p.account_id == victim.account_id) {
                return HIDDEN;
            }
            if p.token_id == victim.token_id {
                return NOT_ALLOWED;
            }
            token_grant(p, &victim.scopes, &victim.resources, *expiry, false, false)
        }
    }
}

/// The token part of the rule, for a caller allowed to act on the account.
/// `rotates_other`: a rotation of a token other than the caller, whose new
/// secret only a session may receive.
fn token_grant(
    p: &Power,
    scopes: &[String],
    resources: &[String],
    expiry: Expiry,
    itself: bool,
    rotates_other: bool,
) -> Outcome {
    let expire = match expiry {
        // Capped at the caller's own expiry: never beyond it.
        Expiry::Default => p.expire,
        Expiry::At(at) => Some(at),
        // The test server allows no token without expiry, for anyone.
        Expiry::Never if !itself => return LIFETIME,
        Expiry::Never => None,
    };
    if !p.covers(scopes) || !p.covers_resources(resources) || p.outlived_by(expire) {
        return ESCALATION;
    }
    if !p.session && p.uses.is_some() && !itself {
        return ESCALATION;
    }
    if !p.session && rotates_other {
        return ESCALATION;
    }
    Outcome::Ok
}

/// Runs a case: `Some(problem)` if the answer or its result is wrong.
async fn try_case(app: &TestApp, n: usize, case: &Case) -> Option<String> {
    let auth = case.auth.as_deref();
    let answer: Result<Option<String>, Status> = match &case.act {
        Act::CreateAccount { operator } => app
            .accounts()
            .create_account(crate::authz::request(
                pb::CreateAccountRequest {
                    username: format!("grant-{n}"),
                    kind: pb::AccountKind::Robot as i32,
                    role: if *operator {
                        pb::AccountRole::Operator as i32
                    } else {
                        pb::AccountRole::User as i32
                    },
                    ..Default::default()
                },
                auth,
            ))
            .await
            .map(|r| account_beyond(case, r.into_inner().account.expect("account"))),
        Act::EnableAccount { account_id, .. } => app
            .accounts()
            .enable_account(crate::authz::request(
                pb::EnableAccountRequest {
                    account_id: account_id.clone(),
                },
                auth,
            ))
            .await
            .map(|r| account_beyond(case, r.into_inner().account.expect("account"))),
        Act::CreateToken {
            account_id,
            operator_account,
            scopes,
            resources,
            expiry,
            max_uses,
        } => {
            let (expire_time, never_expires) = match expiry {
                Expiry::Default => (None, false),
                Expiry::At(at) => (Some(timestamp(*at)), false),
                Expiry::Never => (None, true),
            };
            app.tokens()
                .create_token(crate::authz::request(
                    pb::CreateTokenRequest {
                        account_id: account_id.clone(),
                        name: format!("grant-{n}"),
                        scopes: scopes.clone(),
                        resources: resources.clone(),
                        expire_time,
                        max_uses: *max_uses,
                        never_expires,
                        ttl: None,
                    },
                    auth,
                ))
                .await
                .map(|r| {
                    let token = r.into_inner().token.expect("token");
                    let problem = token_beyond(case, &token, *operator_account);
                    problem.or_else(|| {
                        (token.account_id != *account_id)
                            .then(|| format!("a token for another account: {token:?}"))
                    })
                })
        }
        Act::Rotate {
            victim,
            operator_account,
        } => app
            .tokens()
            .rotate_token(crate::authz::request(
                pb::RotateTokenRequest {
                    token_id: victim.token_id.clone(),
                },
                auth,
            ))
            .await
            .map(|r| {
                let r = r.into_inner();
                let successor = r.token.expect("token");
                let previous = r.previous.expect("previous");
                // Rotation changes the secret, nothing else: no fresh
                // lifetime, no fresh uses.
                let same = successor.account_id == victim.account_id
                    && successor.scopes == victim.scopes
                    && successor.resources == victim.resources
                    && successor.expire_time == victim.expire_time
                    && successor.max_uses == victim.max_uses
                    // The uses left move to the successor: never more than
                    // the victim had, and the old secret keeps none.
                    && successor.uses_remaining <= victim.uses_remaining
                    && previous.uses_remaining == victim.uses_remaining.map(|_| 0);
                token_beyond(case, &successor, *operator_account).or_else(|| {
                    (!same)
                        .then(|| format!("the successor differs: {successor:?} from {previous:?}"))
                })
            }),
        Act::Renew {
            victim,
            operator_account,
            ..
        } => app
            .tokens()
            .renew_token(crate::authz::request(
                pb::RenewTokenRequest {
                    token_id: victim.token_id.clone(),
                    expire_time: match &case.act {
                        Act::Renew {
                            expiry: Expiry::At(at),
                            ..
                        } => Some(timestamp(*at)),
                        _ => None,
                    },
                    never_expires: matches!(
                        case.act,
                        Act::Renew {
                            expiry: Expiry::Never,
                            ..
                        }
                    ),
                },
                auth,
            ))
            .await
            .map(|r| {
                let token = r.into_inner().token.expect("token");
                let same = token.token_id == victim.token_id
                    && token.scopes == victim.scopes
                    && token.resources == victim.resources
                    && token.uses_remaining == victim.uses_remaining;
                token_beyond(case, &token, *operator_account).or_else(|| {
                    (!same).then(|| format!("renewal changed more than the expiry: {token:?}"))
                })
            }),
    };
    let want = expected(case);
    let got = match &answer {
        Ok(_) => Outcome::Ok,
        Err(status) if status.code() == Code::Unauthenticated => Outcome::Unauthenticated,
        Err(status) => Outcome::Err(status.code(), "?"),
    };
    let mut problems = Vec::new();
    if let Ok(Some(beyond)) = &answer {
        problems.push(format!("ESCALATION: {beyond}"));
    }
    let matches = match (want, &answer) {
        (Outcome::Err(code, why), Err(status)) => status.code() == code && reason(status) == why,
        _ => want == got,
    };
    if !matches {
        problems.push(format!(
            "expected {want:?}, got {:?}",
            answer.as_ref().map(drop)
        ));
    }
    (!problems.is_empty()).then(|| {
        format!(
            "{:?} doing {:?} with {:?}: {}",
            case.who,
            case.act,
            case.power,
            problems.join("; ")
        )
    })
}

/// What makes an account given power more powerful than its caller, if
/// anything: the operator role needs an operator's full access.
fn account_beyond(case: &Case, account: pb::Account) -> Option<String> {
    let Some(p) = &case.power else {
        return Some("a dead credential changed an account".into());
    };
    let operator = account.role == pb::AccountRole::Operator as i32;
    if !p.operator {
        return Some(format!("a user gave an account power: {account:?}"));
    }
    (operator && (p.scopes.is_some() || p.resources.is_some()))
        .then(|| format!("a scoped or resource-limited token gave the operator role: {account:?}"))
}

/// What makes `token` more powerful than the caller, if anything.
fn token_beyond(case: &Case, token: &pb::Token, operator_account: bool) -> Option<String> {
    let Some(p) = &case.power else {
        return Some("a dead credential made a token".into());
    };
    let mut beyond = Vec::new();
    if !(p.operator || p.account_id == token.account_id) {
        beyond.push("another account");
    }
    if operator_account && !p.operator {
        beyond.push("an operator's token from a user");
    }
    if !p.covers(&token.scopes) {
        beyond.push("scopes");
    }
    if !p.covers_resources(&token.resources) {
        beyond.push("resources");
    }
    if p.outlived_by(time(token.expire_time.as_ref())) {
        beyond.push("expiry");
    }
    let itself = p.token_id == token.token_id
        || matches!(&case.act, Act::Rotate { victim, .. } if victim.token_id == p.token_id);
    if !p.session
        && let Some(left) = p.uses
        && (!itself || token.uses_remaining.is_none_or(|u| u > left))
    {
        beyond.push("uses");
    }
    (!beyond.is_empty()).then(|| format!("{} beyond the caller's: {token:?}", beyond.join(", ")))
}

/// The caller's credential for `rpc`, and its powers if it is live.
async fn credential(
    app: &TestApp,
    world: &World,
    extras: &Extras,
    who: Who,
    rpc: Rpc,
) -> (Option<String>, Option<Power>) {
    let auth = match who {
        Who::Matrix(caller) => world.authorization(app, rpc, caller).await,
        Who::LimitedToken => Some(format!("Bearer {}", extras.limited)),
        Who::ShortLivedToken => Some(format!("Bearer {}", extras.short_lived)),
        Who::OperatorSession => Some(format!("Bearer {}", extras.operator_session)),
        Who::OperatorLimitedToken => Some(format!("Bearer {}", extras.operator_limited)),
        Who::ResourceToken => Some(format!("Bearer {}", extras.resource_limited)),
    };
    let secret = auth.as_deref().and_then(|a| a.strip_prefix("Bearer "));
    let power = match secret {
        Some(secret) => {
            let verdict = app.verify(secret, &[]).await;
            verdict.principal.filter(|_| verdict.active).map(|p| Power {
                account_id: p.account_id,
                operator: p.account_role == pb::AccountRole::Operator as i32,
                session: p.credential_kind == pb::CredentialKind::Session as i32,
                token_id: p.token_id,
                scopes: (!p.scopes.is_empty()).then(|| p.scopes.into_iter().collect()),
                resources: (!p.resources.is_empty()).then(|| p.resources.into_iter().collect()),
                expire: time(p.expire_time.as_ref()),
                uses: p.uses_remaining,
            })
        }
        None => None,
    };
    (auth, power)
}

/// A token of `account_id`'s, made by the operator for a case to rotate or
/// renew.
async fn victim(
    mut tokens: TokensServiceClient<Channel>,
    operator: String,
    account_id: String,
    name: String,
    scopes: Vec<String>,
    expire: SystemTime,
    max_uses: Option<i64>,
) -> pb::Token {
    tokens
        .create_token(bearer(
            pb::CreateTokenRequest {
                account_id,
                name,
                scopes,
                resources: vec![],
                expire_time: Some(timestamp(expire)),
                max_uses,
                never_expires: false,
                ttl: None,
            },
            &operator,
        ))
        .await
        .expect("create a victim")
        .into_inner()
        .token
        .expect("token")
}

/// A token of Alice's, made with her session.
async fn alice_token(
    app: &TestApp,
    world: &World,
    session: &str,
    name: &str,
    scopes: &[&str],
    expire: Option<SystemTime>,
    max_uses: Option<i64>,
) -> String {
    app.tokens()
        .create_token(bearer(
            pb::CreateTokenRequest {
                account_id: world.alice.account.account_id.clone(),
                name: name.into(),
                scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
                resources: vec![],
                expire_time: expire.map(timestamp),
                max_uses,
                never_expires: false,
                ttl: None,
            },
            session,
        ))
        .await
        .expect("create a token of Alice's")
        .into_inner()
        .secret
}

async fn extras(app: &TestApp, world: &World, alice_session: &str) -> Extras {
    let hours = |h: u64| SystemTime::now() + Duration::from_secs(h * 60 * 60);
    let limited = alice_token(
        app,
        world,
        alice_session,
        "grant-limited",
        &["tokens:write", "tokens:read"],
        None,
        Some(1_000_000),
    )
    .await;
    let short_lived = alice_token(
        app,
        world,
        alice_session,
        "grant-short-lived",
        &["tokens:write"],
        Some(hours(2)),
        None,
    )
    .await;
    app.accounts()
        .create_account(bearer(
            pb::CreateAccountRequest {
                username: "root".into(),
                password: PASSWORD.into(),
                kind: pb::AccountKind::Person as i32,
                role: pb::AccountRole::Operator as i32,
                ..Default::default()
            },
            &app.operator_token,
        ))
        .await
        .expect("create a person operator");
    let operator_session = crate::support::sign_in(app, "root", PASSWORD)
        .await
        .expect("sign in as the person operator");
    let ops = ops_account(app).await;
    let operator_limited = app
        .tokens()
        .create_token(bearer(
            pb::CreateTokenRequest {
                account_id: ops.account_id,
                name: "grant-limited".into(),
                max_uses: Some(1_000_000),
                ..Default::default()
            },
            &app.operator_token,
        ))
        .await
        .expect("create a limited operator token")
        .into_inner()
        .secret;
    let resource_limited = app
        .tokens()
        .create_token(bearer(
            pb::CreateTokenRequest {
                account_id: world.alice.account.account_id.clone(),
                name: "grant-resources".into(),
                scopes: vec!["tokens:write".into(), "tokens:read".into()],
                resources: CALLER_RESOURCES.map(str::to_owned).to_vec(),
                ..Default::default()
            },
            alice_session,
        ))
        .await
        .expect("create a resource-limited token")
        .into_inner()
        .secret;
    Extras {
        limited,
        short_lived,
        operator_session,
        operator_limited,
        resource_limited,
    }
}

async fn ops_account(app: &TestApp) -> pb::Account {
    app.accounts()
        .get_account(bearer(
            pb::GetAccountRequest {
                lookup: Some(pb::get_account_request::Lookup::Username("ops".into())),
            },
            &app.operator_token,
        ))
        .await
        .expect("look up the operator")
        .into_inner()
        .account
        .expect("account")
}

/// Every case for one caller.
async fn cases_for(
    app: &TestApp,
    world: &World,
    extras: &Extras,
    who: Who,
    targets: &[(String, bool)],
    label: &str,
) -> Vec<Case> {
    let mut cases = Vec::new();
    let case = |auth: &Option<String>, power: &Option<Power>, act| Case {
        who,
        auth: auth.clone(),
        power: power.clone(),
        act,
    };

    // Accounts: created with each role, and enabled again.
    let (auth, power) = credential(app, world, extras, who, Rpc::CreateAccount).await;
    for operator in [false, true] {
        cases.push(case(&auth, &power, Act::CreateAccount { operator }));
    }
    let (auth, power) = credential(app, world, extras, who, Rpc::EnableAccount).await;
    for (account_id, operator) in targets.iter().skip(1) {
        cases.push(case(
            &auth,
            &power,
            Act::EnableAccount {
                account_id: account_id.clone(),
                operator: *operator,
            },
        ));
    }

    // Tokens: the caller's own account, another person's, an operator's.
    let (auth, power) = credential(app, world, extras, who, Rpc::CreateToken).await;
    let now = SystemTime::now();
    let hour = now + Duration::from_secs(60 * 60);
    // Just beyond the caller's expiry, or far off for a caller that has none.
    let beyond = power
        .as_ref()
        .and_then(|p| p.expire)
        .map_or(now + Duration::from_secs(200 * 24 * 60 * 60), |e| {
            e + Duration::from_secs(60)
        });
    let expiries = [
        Expiry::Default,
        Expiry::At(hour),
        Expiry::At(beyond),
        Expiry::Never,
    ];
    let own = power
        .as_ref()
        .map_or(world.alice.account.account_id.clone(), |p| {
            p.account_id.clone()
        });
    let own_operator = power.as_ref().is_some_and(|p| p.operator);
    let mut token_targets = vec![(own, own_operator)];
    token_targets.extend(targets.iter().skip(1).cloned());
    for (t, (account_id, operator_account)) in token_targets.iter().enumerate() {
        for scopes in every_scope_set() {
            // The full cross product on a live caller's own account (a use
            // limit of a million is within an unlimited caller's and beyond
            // a limited one's); each scope set once on the others (where
            // only the account decides more), and for a dead credential
            // (refused before anything is looked at).
            let combinations: Vec<(Expiry, Option<i64>)> = if t == 0 && power.is_some() {
                expiries
                    .iter()
                    .flat_map(|&e| [None, Some(1_000_000)].map(|u| (e, u)))
                    .collect()
            } else {
                vec![(Expiry::Default, None)]
            };
            for (expiry, max_uses) in combinations {
                cases.push(case(
                    &auth,
                    &power,
                    Act::CreateToken {
                        account_id: account_id.clone(),
                        operator_account: *operator_account,
                        scopes: scopes.clone(),
                        resources: Vec::new(),
                        expiry,
                        max_uses,
                    },
                ));
            }
        }
    }
    // Resources: a few sets, on the caller's own account, against every
    // caller's (every resource, or CALLER_RESOURCES).
    if power.is_some() {
        let (account_id, operator_account) = &token_targets[0];
        for scopes in [&[][..], &["tokens:read"]] {
            for resources in [
                &["projects/a/x"][..],
                &["projects/a/*"],
                &["projects/a/x/*", "orgs/b"],
                &["projects/a"],
                &["projects/b", "orgs/b"],
            ] {
                cases.push(case(
                    &auth,
                    &power,
                    Act::CreateToken {
                        account_id: account_id.clone(),
                        operator_account: *operator_account,
                        scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
                        resources: resources.iter().map(|r| (*r).to_owned()).collect(),
                        expiry: Expiry::Default,
                        max_uses: None,
                    },
                ));
            }
        }
    }

    // Rotations and renewals of tokens more and less powerful than the
    // caller, of each target account.
    let (rotate_auth, rotate_power) = credential(app, world, extras, who, Rpc::RotateToken).await;
    let (renew_auth, renew_power) = credential(app, world, extras, who, Rpc::RenewToken).await;
    let shapes: [(&[&str], SystemTime, Option<i64>); 6] = [
        (&[], hour, None),
        (&["tokens:write"], hour, Some(5)),
        (&["tokens:read", "tokens:verify"], hour, None),
        (&[], beyond, None),
        (&["tokens:write"], beyond, None),
        (&["tokens:write"], hour, None),
    ];
    // The victims are made all at once (each by its own task), then used in
    // order.
    let mut made = Vec::new();
    for (t, (account_id, operator_account)) in token_targets.iter().enumerate() {
        for (s, &(scopes, expire, max_uses)) in shapes.iter().enumerate() {
            let pair = ["rotate", "renew"].map(|what| {
                tokio::spawn(victim(
                    app.tokens(),
                    app.operator_token.clone(),
                    account_id.clone(),
                    format!("{label}-{what}-{t}-{s}"),
                    scopes.iter().map(|s| (*s).to_owned()).collect(),
                    expire,
                    max_uses,
                ))
            });
            made.push((*operator_account, pair));
        }
    }
    for (operator_account, [rotated, renewed]) in made {
        let rotated = rotated.await.expect("a victim");
        let renewed = renewed.await.expect("a victim");
        cases.push(case(
            &rotate_auth,
            &rotate_power,
            Act::Rotate {
                victim: rotated,
                operator_account,
            },
        ));
        for expiry in expiries {
            cases.push(case(
                &renew_auth,
                &renew_power,
                Act::Renew {
                    victim: renewed.clone(),
                    operator_account,
                    expiry,
                },
            ));
        }
    }
    cases
}

/// Runs `cases` a few at a time; the problems found.
///
/// Four at a time on SQLite, sixteen on PostgreSQL: SQLite commits one write
/// at a time, each with an fsync, so more at once only lengthen the queue
/// for its write lock (on a loaded machine, sixteen queued writers waited
/// past the 5 s busy timeout) without finishing any sooner.
async fn run_all(app: &Arc<TestApp>, cases: Vec<Case>) -> Vec<String> {
    let at_once = if app.db.url.starts_with("sqlite:") {
        4
    } else {
        16
    };
    let cases = Arc::new(cases);
    let mut problems = Vec::new();
    let mut tasks = tokio::task::JoinSet::new();
    let mut next = 0;
    loop {
        while tasks.len() < at_once && next < cases.len() {
            let (app, cases, n) = (Arc::clone(app), Arc::clone(&cases), next);
            tasks.spawn(async move { try_case(&app, n, &cases[n]).await });
            next += 1;
        }
        match tasks.join_next().await {
            Some(result) => problems.extend(result.expect("a case panicked")),
            None => break,
        }
    }
    problems
}

async fn nothing_created_with_a_credential_holds_more_than_the_credential(app: TestApp) {
    let world = World::build(&app).await;
    let alice_session = world
        .authorization(&app, Rpc::CreateToken, Caller::OwnSession)
        .await
        .expect("a session")
        .trim_start_matches("Bearer ")
        .to_owned();
    let extras = extras(&app, &world, &alice_session).await;
    let ops = ops_account(&app).await;
    // A person and an operator to enable again (both enabled already:
    // enabling is idempotent, and its rule applies all the same).
    let (carol, _) = app.person("carol").await;
    let targets = [
        (String::new(), false),
        (carol.account_id.clone(), false),
        (ops.account_id.clone(), true),
    ];

    let mut whos: Vec<Who> = Caller::ALL.iter().map(|&c| Who::Matrix(c)).collect();
    whos.extend([
        Who::LimitedToken,
        Who::ShortLivedToken,
        Who::OperatorSession,
        Who::OperatorLimitedToken,
        Who::ResourceToken,
    ]);
    let mut cases = Vec::new();
    for (w, &who) in whos.iter().enumerate() {
        cases.extend(cases_for(&app, &world, &extras, who, &targets, &format!("w{w}")).await);
    }

    // Tokens rotating and renewing themselves: the renewal is refused,
    // the rotation keeps expiry and uses.
    let hours = |h: u64| SystemTime::now() + Duration::from_secs(h * 60 * 60);
    let mut selves = Vec::new();
    for (i, (scopes, max_uses)) in [
        (&[][..], None),
        (&["tokens:write"][..], None),
        (&["tokens:write"][..], Some(5)),
        (&[][..], Some(5)),
    ]
    .into_iter()
    .enumerate()
    {
        let name = format!("self-{i}");
        let secret = alice_token(
            &app,
            &world,
            &alice_session,
            &name,
            scopes,
            Some(hours(3)),
            max_uses,
        )
        .await;
        let verdict = app.verify(&secret, &[]).await;
        let p = verdict.principal.expect("live");
        let token = pb::Token {
            token_id: p.token_id.clone(),
            account_id: p.account_id.clone(),
            scopes: p.scopes.clone(),
            expire_time: p.expire_time,
            max_uses,
            uses_remaining: p.uses_remaining,
            ..Default::default()
        };
        let power = Power {
            account_id: p.account_id,
            operator: false,
            session: false,
            token_id: p.token_id,
            scopes: (!p.scopes.is_empty()).then(|| p.scopes.into_iter().collect()),
            resources: None,
            expire: time(p.expire_time.as_ref()),
            uses: p.uses_remaining,
        };
        let auth = Some(format!("Bearer {secret}"));
        selves.push(Case {
            who: Who::Matrix(Caller::OwnScopedToken),
            auth: auth.clone(),
            power: Some(power.clone()),
            act: Act::Renew {
                victim: token.clone(),
                operator_account: false,
                expiry: Expiry::At(hours(1)),
            },
        });
        selves.push(Case {
            who: Who::Matrix(Caller::OwnScopedToken),
            auth,
            power: Some(power),
            act: Act::Rotate {
                victim: token,
                operator_account: false,
            },
        });
    }

    let total = cases.len() + selves.len();
    let app = Arc::new(app);
    let mut problems = run_all(&app, cases).await;
    // One at a time, in order: the renewal before the rotation.
    for (n, case) in selves.iter().enumerate() {
        problems.extend(try_case(&app, 1_000_000 + n, case).await);
    }
    assert!(
        problems.is_empty(),
        "{} of {total} cases answered otherwise:\n{}",
        problems.len(),
        problems.join("\n")
    );
}
both_backends!(nothing_created_with_a_credential_holds_more_than_the_credential);

// ---------------------------------------------------------------------------
// The review's reproductions, one by one.

async fn a_scoped_operator_token_cannot_make_an_operator(app: TestApp) {
    let ops = ops_account(&app).await;
    let (_, scoped) = app
        .token(
            &app.operator_token,
            &ops.account_id,
            "accounts-only",
            &["accounts:write"],
        )
        .await;
    let create = |token: String, username: &str| {
        let mut accounts = app.accounts();
        let request = bearer(
            pb::CreateAccountRequest {
                username: username.into(),
                password: PASSWORD.into(),
                kind: pb::AccountKind::Person as i32,
                role: pb::AccountRole::Operator as i32,
                ..Default::default()
            },
            &token,
        );
        async move { accounts.create_account(request).await }
    };
    crate::support::assert_status(
        create(scoped.clone(), "mallory").await,
        Code::PermissionDenied,
        "ERROR_REASON_ESCALATION",
    );
    // Nothing was created: there is no one to sign in as.
    crate::support::assert_status(
        crate::support::sign_in(&app, "mallory", PASSWORD).await,
        Code::Unauthenticated,
        "ERROR_REASON_SIGN_IN_FAILED",
    );
    // The same token may still make users; a full-access one, operators.
    app.accounts()
        .create_account(bearer(
            pb::CreateAccountRequest {
                username: "user".into(),
                kind: pb::AccountKind::Robot as i32,
                ..Default::default()
            },
            &scoped,
        ))
        .await
        .expect("a scoped operator token creates a user");
    let root = create(app.operator_token.clone(), "root")
        .await
        .expect("a full-access operator token creates an operator")
        .into_inner()
        .account
        .expect("account");

    // Enabling a disabled operator gives its power back: the same rule.
    app.accounts()
        .disable_account(bearer(
            pb::DisableAccountRequest {
                account_id: root.account_id.clone(),
            },
            &scoped,
        ))
        .await
        .expect("disable");
    crate::support::assert_status(
        app.accounts()
            .enable_account(bearer(
                pb::EnableAccountRequest {
                    account_id: root.account_id.clone(),
                },
                &scoped,
            ))
            .await,
        Code::PermissionDenied,
        "ERROR_REASON_ESCALATION",
    );
    assert!(
        crate::support::sign_in(&app, "root", PASSWORD)
            .await
            .is_err(),
        "root stays disabled"
    );
    app.accounts()
        .enable_account(bearer(
            pb::EnableAccountRequest {
                account_id: root.account_id.clone(),
            },
            &app.operator_token,
        ))
        .await
        .expect("a full-access operator token enables an operator");
    let session = crate::support::sign_in(&app, "root", PASSWORD)
        .await
        .expect("root is back");
    app.accounts()
        .disable_account(bearer(
            pb::DisableAccountRequest {
                account_id: root.account_id.clone(),
            },
            &app.operator_token,
        ))
        .await
        .expect("disable again");
    app.accounts()
        .enable_account(bearer(
            pb::EnableAccountRequest {
                account_id: root.account_id,
            },
            &session,
        ))
        .await
        .expect_err("a disabled account's session is dead");
}
both_backends!(a_scoped_operator_token_cannot_make_an_operator);

async fn a_limited_use_token_mints_nothing_and_rotation_keeps_its_uses_and_expiry(app: TestApp) {
    let (alice, session) = app.person("alice").await;
    let ten_minutes = SystemTime::now() + Duration::from_secs(10 * 60);
    let limited = |name: &str, max_uses: i64| pb::CreateTokenRequest {
        account_id: alice.account_id.clone(),
        name: name.into(),
        scopes: vec!["tokens:write".into()],
        resources: vec![],
        expire_time: Some(timestamp(ten_minutes)),
        max_uses: Some(max_uses),
        never_expires: false,
        ttl: None,
    };
    let one_time = app
        .tokens()
        .create_token(bearer(limited("one-time", 1), &session))
        .await
        .expect("create")
        .into_inner();
    crate::support::assert_status(
        app.tokens()
            .create_token(bearer(
                pb::CreateTokenRequest {
                    account_id: alice.account_id.clone(),
                    name: "child".into(),
                    scopes: vec!["tokens:write".into()],
                    ..Default::default()
                },
                &one_time.secret,
            ))
            .await,
        Code::PermissionDenied,
        "ERROR_REASON_ESCALATION",
    );

    // A 4-use, 10-minute token rotates itself again and again: each
    // successor has the uses left and the same absolute expiry.
    let created = app
        .tokens()
        .create_token(bearer(limited("ci", 4), &session))
        .await
        .expect("create")
        .into_inner();
    let first = created.token.expect("token");
    let (mut secret, mut id) = (created.secret, first.token_id.clone());
    let mut left = Vec::new();
    loop {
        let rotated = app
            .tokens()
            .rotate_token(bearer(
                pb::RotateTokenRequest {
                    token_id: id.clone(),
                },
                &secret,
            ))
            .await;
        let Ok(rotated) = rotated else {
            // Its last use admits the call, which then finds the token
            // exhausted; after that it is refused at the door.
            let status = rotated.expect_err("refused");
            assert!(
                matches!(
                    status.code(),
                    Code::FailedPrecondition | Code::Unauthenticated
                ),
                "the uses ran out: {status:?}"
            );
            break;
        };
        let rotated = rotated.into_inner();
        let successor = rotated.token.expect("token");
        assert_eq!(
            successor.expire_time, first.expire_time,
            "no fresh lifetime"
        );
        assert_eq!(successor.max_uses, Some(4));
        // The uses move: the old secret keeps none.
        assert_eq!(rotated.previous.expect("previous").uses_remaining, Some(0));
        left.push(successor.uses_remaining.expect("limited"));
        (secret, id) = (rotated.secret, successor.token_id);
        assert!(left.len() < 10, "rotation refilled the uses: {left:?}");
    }
    assert_eq!(
        left,
        [3, 2, 1],
        "each rotation spends one use and passes on the rest"
    );
}
both_backends!(a_limited_use_token_mints_nothing_and_rotation_keeps_its_uses_and_expiry);

async fn renewal_needs_a_credential_that_may_create_the_token_never_the_token_itself(app: TestApp) {
    let (alice, session) = app.person("alice").await;
    let hours = |h: u64| SystemTime::now() + Duration::from_secs(h * 60 * 60);
    let created = app
        .tokens()
        .create_token(bearer(
            pb::CreateTokenRequest {
                account_id: alice.account_id.clone(),
                name: "ci".into(),
                scopes: vec!["tokens:write".into(), "project:publish".into()],
                expire_time: Some(timestamp(hours(1))),
                ..Default::default()
            },
            &session,
        ))
        .await
        .expect("create")
        .into_inner();
    let token = created.token.expect("token");
    let renew = |caller: String, expire: SystemTime| {
        let mut tokens = app.tokens();
        let request = bearer(
            pb::RenewTokenRequest {
                token_id: token.token_id.clone(),
                expire_time: Some(timestamp(expire)),
                never_expires: false,
            },
            &caller,
        );
        async move { tokens.renew_token(request).await }
    };
    crate::support::assert_status(
        renew(created.secret.clone(), hours(2)).await,
        Code::PermissionDenied,
        "ERROR_REASON_NOT_ALLOWED",
    );
    // Another token of Alice's without `project:publish` holds less.
    let (_, writer) = app
        .token(&session, &alice.account_id, "writer", &["tokens:write"])
        .await;
    crate::support::assert_status(
        renew(writer, hours(2)).await,
        Code::PermissionDenied,
        "ERROR_REASON_ESCALATION",
    );
    // A short-lived token that holds the scopes cannot extend it beyond itself.
    let short = app
        .tokens()
        .create_token(bearer(
            pb::CreateTokenRequest {
                account_id: alice.account_id.clone(),
                name: "short".into(),
                scopes: vec!["tokens:write".into(), "project:publish".into()],
                expire_time: Some(timestamp(hours(3))),
                ..Default::default()
            },
            &session,
        ))
        .await
        .expect("create")
        .into_inner()
        .secret;
    crate::support::assert_status(
        renew(short.clone(), hours(4)).await,
        Code::PermissionDenied,
        "ERROR_REASON_ESCALATION",
    );
    let within = renew(short, hours(2))
        .await
        .expect("within its own expiry")
        .into_inner()
        .token
        .expect("token");
    assert_eq!(
        time(within.expire_time.as_ref()).map(|t| t > hours(1)),
        Some(true)
    );
    // Her session gives it a new lifetime; the secret stays the same.
    let renewed = renew(session.clone(), hours(24 * 30))
        .await
        .expect("renew")
        .into_inner()
        .token
        .expect("token");
    assert_eq!(
        (renewed.token_id.as_str(), renewed.scopes.clone()),
        (token.token_id.as_str(), token.scopes.clone())
    );
    assert!(time(renewed.expire_time.as_ref()) > time(token.expire_time.as_ref()));
    assert_eq!(
        app.verify(&created.secret, &[])
            .await
            .principal
            .expect("active")
            .expire_time,
        renewed.expire_time
    );
    let events = app
        .audit(&alice.account_id, &[pb::AuditEventType::TokenRenewed])
        .await;
    assert_eq!(events.len(), 2, "{events:?}");
}
both_backends!(renewal_needs_a_credential_that_may_create_the_token_never_the_token_itself);
