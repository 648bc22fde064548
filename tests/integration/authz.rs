//! The authorization matrix: every RPC, called by every kind of caller, on
//! both backends, answers as the policy (`src/domain/policy.rs`) and the
//! proto's documented errors say.
//!
//! The table must keep up with the API: a method in the descriptor set that
//! has no rule in `guard::RULES`, or no row for some kind of caller, fails the
//! test, and so does a row or a rule for a method that does not exist.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::{Duration, SystemTime},
};

use identity::api::{
    ERROR_DOMAIN, FILE_DESCRIPTOR_SET,
    layers::guard::{Access, RULES},
};
use prost::Message as _;
use tonic::{Code, Request, Status, metadata::MetadataValue};
use tonic_types::StatusExt as _;

use crate::both_backends;
use crate::support::{PASSWORD, TestApp, bearer, pb};
use pb::{ErrorReason, audit_service_client::AuditServiceClient};

/// Declares a fieldless enum with `ALL`, its variants in order, so that the
/// coverage checks cannot miss a new variant.
macro_rules! enum_with_all {
    ($(#[$meta:meta])* enum $name:ident { $($(#[$vmeta:meta])* $variant:ident,)+ }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
        pub(crate) enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            pub(crate) const ALL: &[$name] = &[$($name::$variant),+];
        }
    };
}

enum_with_all! {
    /// Every method of the `identity.v1` services; the variant's name is the
    /// method's name, except for the fleet-wide forms of a method (what it
    /// does without an account_id), which are rows of their own.
    enum Rpc {
        CreateAccount,
        GetAccount,
        ListAccounts,
        SignIn,
        SignOut,
        ChangePassword,
        SignOutEverywhere,
        DisableAccount,
        EnableAccount,
        DeleteAccount,
        ListAuditEvents,
        CreateToken,
        GetToken,
        ListTokens,
        RevokeToken,
        VerifyToken,
        RotateToken,
        RenewToken,
        RevokeLeakedToken,
        GetCaller,
        /// ListAuditEvents without an account_id: every account's events.
        ListAllAuditEvents,
        /// ListTokens without an account_id: every account's tokens.
        ListAllTokens,
    }
}

impl Rpc {
    /// The gRPC path, as `guard::RULES` and the descriptor set name it.
    fn path(self) -> String {
        let service = match self {
            Rpc::CreateAccount
            | Rpc::GetAccount
            | Rpc::ListAccounts
            | Rpc::SignIn
            | Rpc::SignOut
            | Rpc::ChangePassword
            | Rpc::SignOutEverywhere
            | Rpc::DisableAccount
            | Rpc::EnableAccount
            | Rpc::DeleteAccount => "AccountsService",
            Rpc::ListAuditEvents | Rpc::ListAllAuditEvents => "AuditService",
            Rpc::CreateToken
            | Rpc::GetToken
            | Rpc::ListTokens
            | Rpc::RevokeToken
            | Rpc::VerifyToken
            | Rpc::RotateToken
            | Rpc::RenewToken
            | Rpc::RevokeLeakedToken
            | Rpc::GetCaller
            | Rpc::ListAllTokens => "TokensService",
        };
        let method = match self {
            Rpc::ListAllAuditEvents => "ListAuditEvents".to_owned(),
            Rpc::ListAllTokens => "ListTokens".to_owned(),
            _ => format!("{self:?}"),
        };
        format!("/identity.v1.{service}/{method}")
    }

    /// The built-in scope a personal access token needs for this RPC; `None`
    /// where no scope helps (signing in and out and changing the password
    /// need a session; leak reports need nothing).
    fn scope(self) -> Option<&'static str> {
        match self {
            Rpc::CreateAccount
            | Rpc::SignOutEverywhere
            | Rpc::DisableAccount
            | Rpc::EnableAccount
            | Rpc::DeleteAccount => Some("accounts:write"),
            Rpc::GetAccount
            | Rpc::ListAccounts
            | Rpc::ListAuditEvents
            | Rpc::ListAllAuditEvents => Some("accounts:read"),
            Rpc::SignIn
            | Rpc::SignOut
            | Rpc::ChangePassword
            | Rpc::RevokeLeakedToken
            | Rpc::GetCaller => None,
            Rpc::CreateToken | Rpc::RevokeToken | Rpc::RotateToken | Rpc::RenewToken => {
                Some("tokens:write")
            }
            Rpc::GetToken | Rpc::ListTokens | Rpc::ListAllTokens => Some("tokens:read"),
            Rpc::VerifyToken => Some("tokens:verify"),
        }
    }

    /// Whether a successful call destroys something of the account it acts
    /// on that other rows need (its password, its sessions, the account
    /// itself), so that it must not act on Alice.
    fn destroys_its_target(self) -> bool {
        matches!(
            self,
            Rpc::ChangePassword | Rpc::SignOutEverywhere | Rpc::DeleteAccount
        )
    }
}

enum_with_all! {
    /// Who calls, and on whose resources. Unless said otherwise the call acts
    /// on Alice's resources (her account, one of her tokens), or on a
    /// stand-in's where it should destroy them (see `perform`).
    enum Caller {
        /// No `authorization` metadata at all.
        Anonymous,
        /// `authorization: Bearer garbage`.
        Malformed,
        /// `authorization: Basic ...`: not the Bearer scheme.
        NotBearer,
        /// Alice's own session.
        OwnSession,
        /// Alice's own token with exactly the scope the RPC needs (her
        /// full-access token where no scope applies).
        OwnScopedToken,
        /// Alice's own token with only `project:read`.
        OwnTokenWithoutScope,
        /// Bob's full-access token.
        OtherPerson,
        /// The robot's full-access token, on the robot's own resources.
        RobotOnItself,
        /// The robot's full-access token.
        RobotOnPerson,
        /// The harness's full-access operator token.
        Operator,
        /// An operator token with exactly the scope the RPC needs (the full
        /// one where no scope applies): shows that the scope suffices for the
        /// operator-only RPCs too.
        OperatorScopedToken,
        /// Alice's full-access token, past its expiry.
        ExpiredToken,
        /// Alice's full-access token, revoked.
        RevokedToken,
        /// A session of Alice's that she signed out of.
        SignedOutSession,
    }
}

/// What a call must answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Success.
    Ok,
    /// This code, with an ErrorInfo of this reason.
    Err(Code, ErrorReason),
}

const OK: Expect = Expect::Ok;
const MISSING: Expect = Expect::Err(Code::Unauthenticated, ErrorReason::CredentialMissing);
const INVALID: Expect = Expect::Err(Code::Unauthenticated, ErrorReason::CredentialInvalid);
const NOT_ALLOWED: Expect = Expect::Err(Code::PermissionDenied, ErrorReason::NotAllowed);
const NO_SCOPE: Expect = Expect::Err(Code::PermissionDenied, ErrorReason::ScopeMissing);
const SESSION_ONLY: Expect = Expect::Err(Code::PermissionDenied, ErrorReason::SessionRequired);
/// Another account's token is reported as not found, not as forbidden.
const HIDDEN: Expect = Expect::Err(Code::NotFound, ErrorReason::TokenNotFound);
/// Beyond what the credential holds (the grant rule).
const ESCALATION: Expect = Expect::Err(Code::PermissionDenied, ErrorReason::Escalation);

/// One cell of the matrix.
#[derive(Debug, Clone, Copy)]
struct Row {
    rpc: Rpc,
    caller: Caller,
    expect: Expect,
}

const fn row(rpc: Rpc, caller: Caller, expect: Expect) -> Row {
    Row {
        rpc,
        caller,
        expect,
    }
}

/// The matrix: for each RPC, one row per kind of caller.
const ROWS: &[Row] = {
    use Caller::*;
    use Rpc::*;
    &[
        // Operators only; `accounts:write`. The scope is checked first.
        row(CreateAccount, Anonymous, MISSING),
        row(CreateAccount, Malformed, INVALID),
        row(CreateAccount, NotBearer, INVALID),
        row(CreateAccount, OwnSession, NOT_ALLOWED),
        row(CreateAccount, OwnScopedToken, NOT_ALLOWED),
        row(CreateAccount, OwnTokenWithoutScope, NO_SCOPE),
        row(CreateAccount, OtherPerson, NOT_ALLOWED),
        row(CreateAccount, RobotOnItself, NOT_ALLOWED),
        row(CreateAccount, RobotOnPerson, NOT_ALLOWED),
        row(CreateAccount, Operator, OK),
        row(CreateAccount, OperatorScopedToken, OK),
        row(CreateAccount, ExpiredToken, INVALID),
        row(CreateAccount, RevokedToken, INVALID),
        row(CreateAccount, SignedOutSession, INVALID),
        // Own account or operator; `accounts:read`.
        row(GetAccount, Anonymous, MISSING),
        row(GetAccount, Malformed, INVALID),
        row(GetAccount, NotBearer, INVALID),
        row(GetAccount, OwnSession, OK),
        row(GetAccount, OwnScopedToken, OK),
        row(GetAccount, OwnTokenWithoutScope, NO_SCOPE),
        row(GetAccount, OtherPerson, NOT_ALLOWED),
        row(GetAccount, RobotOnItself, OK),
        row(GetAccount, RobotOnPerson, NOT_ALLOWED),
        row(GetAccount, Operator, OK),
        row(GetAccount, OperatorScopedToken, OK),
        row(GetAccount, ExpiredToken, INVALID),
        row(GetAccount, RevokedToken, INVALID),
        row(GetAccount, SignedOutSession, INVALID),
        // Operators only; `accounts:read`.
        row(ListAccounts, Anonymous, MISSING),
        row(ListAccounts, Malformed, INVALID),
        row(ListAccounts, NotBearer, INVALID),
        row(ListAccounts, OwnSession, NOT_ALLOWED),
        row(ListAccounts, OwnScopedToken, NOT_ALLOWED),
        row(ListAccounts, OwnTokenWithoutScope, NO_SCOPE),
        row(ListAccounts, OtherPerson, NOT_ALLOWED),
        row(ListAccounts, RobotOnItself, NOT_ALLOWED),
        row(ListAccounts, RobotOnPerson, NOT_ALLOWED),
        row(ListAccounts, Operator, OK),
        row(ListAccounts, OperatorScopedToken, OK),
        row(ListAccounts, ExpiredToken, INVALID),
        row(ListAccounts, RevokedToken, INVALID),
        row(ListAccounts, SignedOutSession, INVALID),
        // Needs no credential, and does not authenticate the one it gets: it
        // only refuses a Bearer value that *starts with* `idpat_`, valid or
        // not. Anything else (garbage, another scheme, a dead session) is
        // ignored and the sign-in goes ahead.
        row(SignIn, Anonymous, OK),
        row(SignIn, Malformed, OK),
        row(SignIn, NotBearer, OK),
        row(SignIn, OwnSession, OK),
        row(SignIn, OwnScopedToken, SESSION_ONLY),
        row(SignIn, OwnTokenWithoutScope, SESSION_ONLY),
        row(SignIn, OtherPerson, SESSION_ONLY),
        row(SignIn, RobotOnItself, SESSION_ONLY),
        row(SignIn, RobotOnPerson, SESSION_ONLY),
        row(SignIn, Operator, SESSION_ONLY),
        row(SignIn, OperatorScopedToken, SESSION_ONLY),
        row(SignIn, ExpiredToken, SESSION_ONLY),
        row(SignIn, RevokedToken, SESSION_ONLY),
        row(SignIn, SignedOutSession, OK),
        // A live session only; any live personal access token is refused.
        row(SignOut, Anonymous, MISSING),
        row(SignOut, Malformed, INVALID),
        row(SignOut, NotBearer, INVALID),
        row(SignOut, OwnSession, OK),
        row(SignOut, OwnScopedToken, SESSION_ONLY),
        row(SignOut, OwnTokenWithoutScope, SESSION_ONLY),
        row(SignOut, OtherPerson, SESSION_ONLY),
        row(SignOut, RobotOnItself, SESSION_ONLY),
        row(SignOut, RobotOnPerson, SESSION_ONLY),
        row(SignOut, Operator, SESSION_ONLY),
        row(SignOut, OperatorScopedToken, SESSION_ONLY),
        row(SignOut, ExpiredToken, INVALID),
        row(SignOut, RevokedToken, INVALID),
        row(SignOut, SignedOutSession, INVALID),
        // The caller's own password, with a live session only: the policy is
        // checked before the request is read. The successful row changes
        // the password of a stand-in (see `perform`), not Alice's.
        row(ChangePassword, Anonymous, MISSING),
        row(ChangePassword, Malformed, INVALID),
        row(ChangePassword, NotBearer, INVALID),
        row(ChangePassword, OwnSession, OK),
        row(ChangePassword, OwnScopedToken, SESSION_ONLY),
        row(ChangePassword, OwnTokenWithoutScope, SESSION_ONLY),
        row(ChangePassword, OtherPerson, SESSION_ONLY),
        row(ChangePassword, RobotOnItself, SESSION_ONLY),
        row(ChangePassword, RobotOnPerson, SESSION_ONLY),
        row(ChangePassword, Operator, SESSION_ONLY),
        row(ChangePassword, OperatorScopedToken, SESSION_ONLY),
        row(ChangePassword, ExpiredToken, INVALID),
        row(ChangePassword, RevokedToken, INVALID),
        row(ChangePassword, SignedOutSession, INVALID),
        // On one's own account a session only, whatever a token's scopes; on
        // another's, operators only, with `accounts:write`. The successful
        // rows act on a stand-in.
        row(SignOutEverywhere, Anonymous, MISSING),
        row(SignOutEverywhere, Malformed, INVALID),
        row(SignOutEverywhere, NotBearer, INVALID),
        row(SignOutEverywhere, OwnSession, OK),
        row(SignOutEverywhere, OwnScopedToken, SESSION_ONLY),
        row(SignOutEverywhere, OwnTokenWithoutScope, SESSION_ONLY),
        row(SignOutEverywhere, OtherPerson, NOT_ALLOWED),
        row(SignOutEverywhere, RobotOnItself, SESSION_ONLY),
        row(SignOutEverywhere, RobotOnPerson, NOT_ALLOWED),
        row(SignOutEverywhere, Operator, OK),
        row(SignOutEverywhere, OperatorScopedToken, OK),
        row(SignOutEverywhere, ExpiredToken, INVALID),
        row(SignOutEverywhere, RevokedToken, INVALID),
        row(SignOutEverywhere, SignedOutSession, INVALID),
        // Operators only, even on one's own account; `accounts:write`. A
        // successful row is undone at once (see `perform`).
        row(DisableAccount, Anonymous, MISSING),
        row(DisableAccount, Malformed, INVALID),
        row(DisableAccount, NotBearer, INVALID),
        row(DisableAccount, OwnSession, NOT_ALLOWED),
        row(DisableAccount, OwnScopedToken, NOT_ALLOWED),
        row(DisableAccount, OwnTokenWithoutScope, NO_SCOPE),
        row(DisableAccount, OtherPerson, NOT_ALLOWED),
        row(DisableAccount, RobotOnItself, NOT_ALLOWED),
        row(DisableAccount, RobotOnPerson, NOT_ALLOWED),
        row(DisableAccount, Operator, OK),
        row(DisableAccount, OperatorScopedToken, OK),
        row(DisableAccount, ExpiredToken, INVALID),
        row(DisableAccount, RevokedToken, INVALID),
        row(DisableAccount, SignedOutSession, INVALID),
        // As DisableAccount; enabling an enabled account changes nothing.
        row(EnableAccount, Anonymous, MISSING),
        row(EnableAccount, Malformed, INVALID),
        row(EnableAccount, NotBearer, INVALID),
        row(EnableAccount, OwnSession, NOT_ALLOWED),
        row(EnableAccount, OwnScopedToken, NOT_ALLOWED),
        row(EnableAccount, OwnTokenWithoutScope, NO_SCOPE),
        row(EnableAccount, OtherPerson, NOT_ALLOWED),
        row(EnableAccount, RobotOnItself, NOT_ALLOWED),
        row(EnableAccount, RobotOnPerson, NOT_ALLOWED),
        row(EnableAccount, Operator, OK),
        row(EnableAccount, OperatorScopedToken, OK),
        row(EnableAccount, ExpiredToken, INVALID),
        row(EnableAccount, RevokedToken, INVALID),
        row(EnableAccount, SignedOutSession, INVALID),
        // As SignOutEverywhere. The successful rows delete a stand-in.
        row(DeleteAccount, Anonymous, MISSING),
        row(DeleteAccount, Malformed, INVALID),
        row(DeleteAccount, NotBearer, INVALID),
        row(DeleteAccount, OwnSession, OK),
        row(DeleteAccount, OwnScopedToken, SESSION_ONLY),
        row(DeleteAccount, OwnTokenWithoutScope, SESSION_ONLY),
        row(DeleteAccount, OtherPerson, NOT_ALLOWED),
        row(DeleteAccount, RobotOnItself, SESSION_ONLY),
        row(DeleteAccount, RobotOnPerson, NOT_ALLOWED),
        row(DeleteAccount, Operator, OK),
        row(DeleteAccount, OperatorScopedToken, OK),
        row(DeleteAccount, ExpiredToken, INVALID),
        row(DeleteAccount, RevokedToken, INVALID),
        row(DeleteAccount, SignedOutSession, INVALID),
        // Own account's events or operator; `accounts:read`. Every row names
        // the target's account (listing everything is for operators only).
        row(ListAuditEvents, Anonymous, MISSING),
        row(ListAuditEvents, Malformed, INVALID),
        row(ListAuditEvents, NotBearer, INVALID),
        row(ListAuditEvents, OwnSession, OK),
        row(ListAuditEvents, OwnScopedToken, OK),
        row(ListAuditEvents, OwnTokenWithoutScope, NO_SCOPE),
        row(ListAuditEvents, OtherPerson, NOT_ALLOWED),
        row(ListAuditEvents, RobotOnItself, OK),
        row(ListAuditEvents, RobotOnPerson, NOT_ALLOWED),
        row(ListAuditEvents, Operator, OK),
        row(ListAuditEvents, OperatorScopedToken, OK),
        row(ListAuditEvents, ExpiredToken, INVALID),
        row(ListAuditEvents, RevokedToken, INVALID),
        row(ListAuditEvents, SignedOutSession, INVALID),
        // Every account's events: operators only; `accounts:read`.
        row(ListAllAuditEvents, Anonymous, MISSING),
        row(ListAllAuditEvents, Malformed, INVALID),
        row(ListAllAuditEvents, NotBearer, INVALID),
        row(ListAllAuditEvents, OwnSession, NOT_ALLOWED),
        row(ListAllAuditEvents, OwnScopedToken, NOT_ALLOWED),
        row(ListAllAuditEvents, OwnTokenWithoutScope, NO_SCOPE),
        row(ListAllAuditEvents, OtherPerson, NOT_ALLOWED),
        row(ListAllAuditEvents, RobotOnItself, NOT_ALLOWED),
        row(ListAllAuditEvents, RobotOnPerson, NOT_ALLOWED),
        row(ListAllAuditEvents, Operator, OK),
        row(ListAllAuditEvents, OperatorScopedToken, OK),
        row(ListAllAuditEvents, ExpiredToken, INVALID),
        row(ListAllAuditEvents, RevokedToken, INVALID),
        row(ListAllAuditEvents, SignedOutSession, INVALID),
        // Own account or operator; `tokens:write`.
        row(CreateToken, Anonymous, MISSING),
        row(CreateToken, Malformed, INVALID),
        row(CreateToken, NotBearer, INVALID),
        row(CreateToken, OwnSession, OK),
        row(CreateToken, OwnScopedToken, OK),
        row(CreateToken, OwnTokenWithoutScope, NO_SCOPE),
        row(CreateToken, OtherPerson, NOT_ALLOWED),
        row(CreateToken, RobotOnItself, OK),
        row(CreateToken, RobotOnPerson, NOT_ALLOWED),
        row(CreateToken, Operator, OK),
        row(CreateToken, OperatorScopedToken, OK),
        row(CreateToken, ExpiredToken, INVALID),
        row(CreateToken, RevokedToken, INVALID),
        row(CreateToken, SignedOutSession, INVALID),
        // Own tokens or operator; `tokens:read`. A missing scope is reported
        // as such (PERMISSION_DENIED, which the proto does not list here).
        row(GetToken, Anonymous, MISSING),
        row(GetToken, Malformed, INVALID),
        row(GetToken, NotBearer, INVALID),
        row(GetToken, OwnSession, OK),
        row(GetToken, OwnScopedToken, OK),
        row(GetToken, OwnTokenWithoutScope, NO_SCOPE),
        row(GetToken, OtherPerson, HIDDEN),
        row(GetToken, RobotOnItself, OK),
        row(GetToken, RobotOnPerson, HIDDEN),
        row(GetToken, Operator, OK),
        row(GetToken, OperatorScopedToken, OK),
        row(GetToken, ExpiredToken, INVALID),
        row(GetToken, RevokedToken, INVALID),
        row(GetToken, SignedOutSession, INVALID),
        // Own account or operator; `tokens:read`.
        row(ListTokens, Anonymous, MISSING),
        row(ListTokens, Malformed, INVALID),
        row(ListTokens, NotBearer, INVALID),
        row(ListTokens, OwnSession, OK),
        row(ListTokens, OwnScopedToken, OK),
        row(ListTokens, OwnTokenWithoutScope, NO_SCOPE),
        row(ListTokens, OtherPerson, NOT_ALLOWED),
        row(ListTokens, RobotOnItself, OK),
        row(ListTokens, RobotOnPerson, NOT_ALLOWED),
        row(ListTokens, Operator, OK),
        row(ListTokens, OperatorScopedToken, OK),
        row(ListTokens, ExpiredToken, INVALID),
        row(ListTokens, RevokedToken, INVALID),
        row(ListTokens, SignedOutSession, INVALID),
        // Every account's tokens: operators only; `tokens:read`. Default
        // deny: whoever may list their own tokens may not list everyone's.
        row(ListAllTokens, Anonymous, MISSING),
        row(ListAllTokens, Malformed, INVALID),
        row(ListAllTokens, NotBearer, INVALID),
        row(ListAllTokens, OwnSession, NOT_ALLOWED),
        row(ListAllTokens, OwnScopedToken, NOT_ALLOWED),
        row(ListAllTokens, OwnTokenWithoutScope, NO_SCOPE),
        row(ListAllTokens, OtherPerson, NOT_ALLOWED),
        row(ListAllTokens, RobotOnItself, NOT_ALLOWED),
        row(ListAllTokens, RobotOnPerson, NOT_ALLOWED),
        row(ListAllTokens, Operator, OK),
        row(ListAllTokens, OperatorScopedToken, OK),
        row(ListAllTokens, ExpiredToken, INVALID),
        row(ListAllTokens, RevokedToken, INVALID),
        row(ListAllTokens, SignedOutSession, INVALID),
        // Own tokens or operator; `tokens:write`. As GetToken.
        row(RevokeToken, Anonymous, MISSING),
        row(RevokeToken, Malformed, INVALID),
        row(RevokeToken, NotBearer, INVALID),
        row(RevokeToken, OwnSession, OK),
        row(RevokeToken, OwnScopedToken, OK),
        row(RevokeToken, OwnTokenWithoutScope, NO_SCOPE),
        row(RevokeToken, OtherPerson, HIDDEN),
        row(RevokeToken, RobotOnItself, OK),
        row(RevokeToken, RobotOnPerson, HIDDEN),
        row(RevokeToken, Operator, OK),
        row(RevokeToken, OperatorScopedToken, OK),
        row(RevokeToken, ExpiredToken, INVALID),
        row(RevokeToken, RevokedToken, INVALID),
        row(RevokeToken, SignedOutSession, INVALID),
        // Anyone authenticated with a token granted `tokens:verify` by name
        // may introspect any credential, whoever it belongs to. Full access
        // (sessions, unscoped tokens, the operator's included) does not
        // include the scope.
        row(VerifyToken, Anonymous, MISSING),
        row(VerifyToken, Malformed, INVALID),
        row(VerifyToken, NotBearer, INVALID),
        row(VerifyToken, OwnSession, NO_SCOPE),
        row(VerifyToken, OwnScopedToken, OK),
        row(VerifyToken, OwnTokenWithoutScope, NO_SCOPE),
        row(VerifyToken, OtherPerson, NO_SCOPE),
        row(VerifyToken, RobotOnItself, NO_SCOPE),
        row(VerifyToken, RobotOnPerson, NO_SCOPE),
        row(VerifyToken, Operator, NO_SCOPE),
        row(VerifyToken, OperatorScopedToken, OK),
        row(VerifyToken, ExpiredToken, INVALID),
        row(VerifyToken, RevokedToken, INVALID),
        row(VerifyToken, SignedOutSession, INVALID),
        // Own tokens or operator; `tokens:write`. As RevokeToken, except that
        // the call authenticates itself (to detect the reuse of a rotated
        // token, which no row presents): the answers are the same.
        row(RotateToken, Anonymous, MISSING),
        row(RotateToken, Malformed, INVALID),
        row(RotateToken, NotBearer, INVALID),
        row(RotateToken, OwnSession, OK),
        row(RotateToken, OwnScopedToken, ESCALATION),
        row(RotateToken, OwnTokenWithoutScope, NO_SCOPE),
        row(RotateToken, OtherPerson, HIDDEN),
        row(RotateToken, RobotOnItself, ESCALATION),
        row(RotateToken, RobotOnPerson, HIDDEN),
        row(RotateToken, Operator, ESCALATION),
        row(RotateToken, OperatorScopedToken, ESCALATION),
        row(RotateToken, ExpiredToken, INVALID),
        row(RotateToken, RevokedToken, INVALID),
        row(RotateToken, SignedOutSession, INVALID),
        // Own tokens or operator; `tokens:write`, and within the caller's
        // own powers (the grant rule; `grants.rs` tries every case). As
        // RevokeToken.
        row(RenewToken, Anonymous, MISSING),
        row(RenewToken, Malformed, INVALID),
        row(RenewToken, NotBearer, INVALID),
        row(RenewToken, OwnSession, OK),
        row(RenewToken, OwnScopedToken, OK),
        row(RenewToken, OwnTokenWithoutScope, NO_SCOPE),
        row(RenewToken, OtherPerson, HIDDEN),
        row(RenewToken, RobotOnItself, OK),
        row(RenewToken, RobotOnPerson, HIDDEN),
        row(RenewToken, Operator, OK),
        row(RenewToken, OperatorScopedToken, OK),
        row(RenewToken, ExpiredToken, INVALID),
        row(RenewToken, RevokedToken, INVALID),
        row(RenewToken, SignedOutSession, INVALID),
        // Anyone, without authentication: the `authorization` metadata is not
        // even read, so a garbled or dead credential is no obstacle either.
        row(RevokeLeakedToken, Anonymous, OK),
        row(RevokeLeakedToken, Malformed, OK),
        row(RevokeLeakedToken, NotBearer, OK),
        row(RevokeLeakedToken, OwnSession, OK),
        row(RevokeLeakedToken, OwnScopedToken, OK),
        row(RevokeLeakedToken, OwnTokenWithoutScope, OK),
        row(RevokeLeakedToken, OtherPerson, OK),
        row(RevokeLeakedToken, RobotOnItself, OK),
        row(RevokeLeakedToken, RobotOnPerson, OK),
        row(RevokeLeakedToken, Operator, OK),
        row(RevokeLeakedToken, OperatorScopedToken, OK),
        row(RevokeLeakedToken, ExpiredToken, OK),
        row(RevokeLeakedToken, RevokedToken, OK),
        row(RevokeLeakedToken, SignedOutSession, OK),
        // Any live credential, whatever its scopes: it learns only what it
        // is itself.
        row(GetCaller, Anonymous, MISSING),
        row(GetCaller, Malformed, INVALID),
        row(GetCaller, NotBearer, INVALID),
        row(GetCaller, OwnSession, OK),
        row(GetCaller, OwnScopedToken, OK),
        row(GetCaller, OwnTokenWithoutScope, OK),
        row(GetCaller, OtherPerson, OK),
        row(GetCaller, RobotOnItself, OK),
        row(GetCaller, RobotOnPerson, OK),
        row(GetCaller, Operator, OK),
        row(GetCaller, OperatorScopedToken, OK),
        row(GetCaller, ExpiredToken, INVALID),
        row(GetCaller, RevokedToken, INVALID),
        row(GetCaller, SignedOutSession, INVALID),
    ]
};

/// Every method of every `identity.v1` service in the served descriptor set,
/// as a gRPC path.
fn served_methods() -> BTreeSet<String> {
    let set = prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET)
        .expect("decode the descriptor set");
    let mut methods = BTreeSet::new();
    for file in set.file.iter().filter(|f| f.package() == "identity.v1") {
        for service in &file.service {
            for method in &service.method {
                methods.insert(format!("/identity.v1.{}/{}", service.name(), method.name()));
            }
        }
    }
    methods
}

/// Fails unless `listed` (what `what` names) holds exactly the `served`
/// methods, naming the missing and the stale ones.
#[track_caller]
fn assert_same_methods(what: &str, listed: &BTreeSet<String>, served: &BTreeSet<String>) {
    let missing: Vec<_> = served.difference(listed).collect();
    let stale: Vec<_> = listed.difference(served).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "{what} must name exactly the served methods; missing: {missing:?}, \
         naming methods that are not served: {stale:?}"
    );
}

/// The table, the guard's rules and the served methods name the same
/// methods, and every method has exactly one row per kind of caller.
fn assert_the_matrix_covers_the_api() {
    let served = served_methods();
    assert!(
        !served.is_empty(),
        "no identity.v1 methods in the descriptor set"
    );

    let ruled: BTreeSet<String> = RULES.iter().map(|(path, _)| (*path).to_owned()).collect();
    assert_eq!(
        ruled.len(),
        RULES.len(),
        "a method is listed twice in guard::RULES"
    );
    assert_same_methods("guard::RULES", &ruled, &served);
    let modelled: BTreeSet<String> = Rpc::ALL.iter().map(|rpc| rpc.path()).collect();
    assert_same_methods("the matrix's Rpc", &modelled, &served);
    let in_rows: BTreeSet<String> = ROWS.iter().map(|row| row.rpc.path()).collect();
    assert_same_methods("the matrix's rows", &in_rows, &served);

    let mut cells: BTreeMap<(Rpc, Caller), usize> = BTreeMap::new();
    for row in ROWS {
        *cells.entry((row.rpc, row.caller)).or_default() += 1;
    }
    let mut wrong = Vec::new();
    for &rpc in Rpc::ALL {
        for &caller in Caller::ALL {
            match cells.get(&(rpc, caller)).copied().unwrap_or(0) {
                1 => {}
                n => wrong.push(format!("{rpc:?} × {caller:?}: {n} rows")),
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "every cell needs exactly one row: {wrong:#?}"
    );

    // The guard's notion of who may reach a method agrees with the table.
    for &rpc in Rpc::ALL {
        let access = RULES
            .iter()
            .find(|(path, _)| *path == rpc.path())
            .map(|&(_, access)| access)
            .expect("checked above");
        let anonymous = ROWS
            .iter()
            .find(|row| row.rpc == rpc && row.caller == Caller::Anonymous)
            .expect("checked above")
            .expect;
        match access {
            Access::Anonymous => assert_eq!(anonymous, OK, "{rpc:?} is Anonymous in RULES"),
            // The default IDENTITY_VERIFY_AUTH (scope) needs a credential;
            // tests/integration/tls.rs covers the client certificate modes.
            Access::Authenticated | Access::Verifier => {
                assert_eq!(anonymous, MISSING, "{rpc:?} needs a credential in RULES");
            }
        }
    }
}

/// One account's resources that a call can target.
pub(crate) struct Target {
    pub(crate) account: pb::Account,
    /// One of its tokens, for GetToken.
    token_id: String,
    /// A live credential of it, for VerifyToken to inspect.
    credential: String,
}

/// Everything the rows use, set up once per backend run (and the grant
/// rule's invariant test, `grants.rs`, reuses).
pub(crate) struct World {
    pub(crate) alice: Target,
    robot: Target,
    alice_session: String,
    alice_full: String,
    /// Alice's tokens with exactly one built-in scope, by scope.
    alice_scoped: BTreeMap<&'static str, String>,
    alice_unscoped: String,
    alice_expired: String,
    alice_revoked: String,
    alice_signed_out: String,
    bob_full: String,
    robot_full: String,
    /// The operator's tokens with exactly one built-in scope, by scope.
    operator_scoped: BTreeMap<&'static str, String>,
}

/// Now plus `after`, at full precision.
fn in_the_future(after: Duration) -> (SystemTime, prost_types::Timestamp) {
    let at = SystemTime::now() + after;
    (at, prost_types::Timestamp::from(at))
}

/// The built-in scopes the RPCs need, each once.
fn built_in_scopes() -> BTreeSet<&'static str> {
    Rpc::ALL.iter().filter_map(|rpc| rpc.scope()).collect()
}

async fn sign_in(app: &TestApp, username: &str) -> String {
    app.accounts()
        .sign_in(pb::SignInRequest {
            username: username.into(),
            password: PASSWORD.into(),
        })
        .await
        .expect("sign in")
        .into_inner()
        .session_token
}

impl World {
    pub(crate) async fn build(app: &TestApp) -> Self {
        let (alice, alice_session) = app.person("alice").await;
        // Created first, so that its short life runs out while the rest is
        // set up.
        let (expiry, expire_time) = in_the_future(Duration::from_secs(1));
        let alice_expired = app
            .tokens()
            .create_token(bearer(
                pb::CreateTokenRequest {
                    account_id: alice.account_id.clone(),
                    name: "expired".into(),
                    expire_time: Some(expire_time),
                    ..Default::default()
                },
                &alice_session,
            ))
            .await
            .expect("create a short-lived token")
            .into_inner()
            .secret;

        let (_, alice_full) = app
            .token(&alice_session, &alice.account_id, "full", &[])
            .await;
        let (alice_target, _) = app
            .token(&alice_session, &alice.account_id, "target", &[])
            .await;
        let (_, alice_unscoped) = app
            .token(
                &alice_session,
                &alice.account_id,
                "unscoped",
                &["project:read"],
            )
            .await;
        let (revoked, alice_revoked) = app
            .token(&alice_session, &alice.account_id, "revoked", &[])
            .await;
        app.tokens()
            .revoke_token(bearer(
                pb::RevokeTokenRequest {
                    token_id: revoked.token_id,
                },
                &alice_session,
            ))
            .await
            .expect("revoke");
        let alice_signed_out = sign_in(app, "alice").await;
        app.accounts()
            .sign_out(bearer(pb::SignOutRequest {}, &alice_signed_out))
            .await
            .expect("sign out");

        let (bob, bob_session) = app.person("bob").await;
        let (_, bob_full) = app.token(&bob_session, &bob.account_id, "full", &[]).await;

        let robot = app.robot("robot").await;
        let (_, robot_full) = app
            .token(&app.operator_token, &robot.account_id, "full", &[])
            .await;
        let (robot_target, _) = app
            .token(&app.operator_token, &robot.account_id, "target", &[])
            .await;

        let operator_id = app
            .verify(&app.operator_token, &[])
            .await
            .principal
            .expect("the operator token is active")
            .account_id;
        let mut alice_scoped = BTreeMap::new();
        let mut operator_scoped = BTreeMap::new();
        for scope in built_in_scopes() {
            let name = format!("only-{scope}");
            let (_, secret) = app
                .token(&alice_session, &alice.account_id, &name, &[scope])
                .await;
            alice_scoped.insert(scope, secret);
            let (_, secret) = app
                .token(&app.operator_token, &operator_id, &name, &[scope])
                .await;
            operator_scoped.insert(scope, secret);
        }

        // Let the short-lived token's life run out: the server's clock
        // moves past its expiry.
        if let Ok(left) = expiry.duration_since(SystemTime::now()) {
            app.clock().advance(left + Duration::from_millis(10));
        }

        Self {
            alice: Target {
                account: alice,
                token_id: alice_target.token_id,
                credential: alice_full.clone(),
            },
            robot: Target {
                account: robot,
                token_id: robot_target.token_id,
                credential: robot_full.clone(),
            },
            alice_session,
            alice_full,
            alice_scoped,
            alice_unscoped,
            alice_expired,
            alice_revoked,
            alice_signed_out,
            bob_full,
            robot_full,
            operator_scoped,
        }
    }

    /// Whose resources `caller` acts on.
    pub(crate) fn target(&self, caller: Caller) -> &Target {
        match caller {
            Caller::RobotOnItself => &self.robot,
            _ => &self.alice,
        }
    }

    /// The `authorization` metadata `caller` sends to `rpc`, if any.
    pub(crate) async fn authorization(
        &self,
        app: &TestApp,
        rpc: Rpc,
        caller: Caller,
    ) -> Option<String> {
        let scoped = |tokens: &BTreeMap<&'static str, String>, full: &str| match rpc.scope() {
            Some(scope) => tokens[scope].clone(),
            None => full.to_owned(),
        };
        let token = match caller {
            Caller::Anonymous => return None,
            Caller::Malformed => "garbage".to_owned(),
            Caller::NotBearer => return Some("Basic YWxpY2U6c2VjcmV0".to_owned()),
            // SignOut ends the session that calls it: that cell gets a
            // session of its own, so Alice's stays live for the other rows.
            Caller::OwnSession if rpc == Rpc::SignOut => sign_in(app, "alice").await,
            Caller::OwnSession => self.alice_session.clone(),
            Caller::OwnScopedToken => scoped(&self.alice_scoped, &self.alice_full),
            Caller::OwnTokenWithoutScope => self.alice_unscoped.clone(),
            Caller::OtherPerson => self.bob_full.clone(),
            Caller::RobotOnItself | Caller::RobotOnPerson => self.robot_full.clone(),
            Caller::Operator => app.operator_token.clone(),
            Caller::OperatorScopedToken => scoped(&self.operator_scoped, &app.operator_token),
            Caller::ExpiredToken => self.alice_expired.clone(),
            Caller::RevokedToken => self.alice_revoked.clone(),
            Caller::SignedOutSession => self.alice_signed_out.clone(),
        };
        Some(format!("Bearer {token}"))
    }
}

/// `message` with `authorization` metadata when there is one.
pub(crate) fn request<T>(message: T, authorization: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(value) = authorization {
        request.metadata_mut().insert(
            "authorization",
            MetadataValue::try_from(value).expect("ascii metadata"),
        );
    }
    request
}

/// A password that meets the default policy, other than [`PASSWORD`].
const NEW_PASSWORD: &str = "granite lantern 9 orchard";

/// Issues a live token of `account_id`'s, as the operator, for one row.
async fn issue(
    app: &TestApp,
    account_id: &str,
    name: &str,
    scopes: &[&str],
    expire_time: Option<prost_types::Timestamp>,
) -> pb::CreateTokenResponse {
    app.tokens()
        .create_token(bearer(
            pb::CreateTokenRequest {
                account_id: account_id.to_owned(),
                name: name.to_owned(),
                scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
                expire_time,
                ..Default::default()
            },
            &app.operator_token,
        ))
        .await
        .expect("issue a token for the row")
        .into_inner()
}

/// Performs row number `n`: a valid request for `row.rpc` on the caller's
/// target, sent with the caller's metadata.
async fn perform(app: &TestApp, world: &World, n: usize, row: Row) -> Result<(), Status> {
    let target = world.target(row.caller);
    // Names of things a row creates are unique per row.
    let unique = format!("row-{n}");
    // A row that expects a destructive call to succeed acts on a stand-in
    // for Alice: a person created for the row, whose own session stands in
    // for hers. Her other credentials, made once, have no stand-in, so those
    // rows (and the robot's on itself) keep their targets; so do the rows
    // that expect a refusal.
    let has_a_stand_in = !matches!(
        row.caller,
        Caller::OwnScopedToken
            | Caller::OwnTokenWithoutScope
            | Caller::ExpiredToken
            | Caller::RevokedToken
            | Caller::SignedOutSession
            | Caller::RobotOnItself
    );
    let stand_in = if row.rpc.destroys_its_target() && row.expect == Expect::Ok && has_a_stand_in {
        Some(app.person(&unique).await)
    } else {
        None
    };
    let (account_id, authorization) = match &stand_in {
        Some((account, session)) if row.caller == Caller::OwnSession => (
            account.account_id.clone(),
            Some(format!("Bearer {session}")),
        ),
        Some((account, _)) => (
            account.account_id.clone(),
            world.authorization(app, row.rpc, row.caller).await,
        ),
        None => (
            target.account.account_id.clone(),
            world.authorization(app, row.rpc, row.caller).await,
        ),
    };
    let auth = authorization.as_deref();
    match row.rpc {
        Rpc::CreateAccount => app
            .accounts()
            .create_account(request(
                pb::CreateAccountRequest {
                    username: unique,
                    kind: pb::AccountKind::Robot as i32,
                    ..Default::default()
                },
                auth,
            ))
            .await
            .map(drop),
        Rpc::GetAccount => app
            .accounts()
            .get_account(request(
                pb::GetAccountRequest {
                    lookup: Some(pb::get_account_request::Lookup::AccountId(account_id)),
                },
                auth,
            ))
            .await
            .map(drop),
        Rpc::ListAccounts => app
            .accounts()
            .list_accounts(request(pb::ListAccountsRequest::default(), auth))
            .await
            .map(drop),
        Rpc::SignIn => app
            .accounts()
            .sign_in(request(
                pb::SignInRequest {
                    username: target.account.username.clone(),
                    password: PASSWORD.into(),
                },
                auth,
            ))
            .await
            .map(drop),
        Rpc::SignOut => app
            .accounts()
            .sign_out(request(pb::SignOutRequest {}, auth))
            .await
            .map(drop),
        Rpc::ChangePassword => app
            .accounts()
            .change_password(request(
                pb::ChangePasswordRequest {
                    current_password: PASSWORD.into(),
                    new_password: NEW_PASSWORD.into(),
                },
                auth,
            ))
            .await
            .map(drop),
        Rpc::SignOutEverywhere => app
            .accounts()
            .sign_out_everywhere(request(pb::SignOutEverywhereRequest { account_id }, auth))
            .await
            .map(drop),
        Rpc::DisableAccount => {
            let disabled = app
                .accounts()
                .disable_account(request(
                    pb::DisableAccountRequest {
                        account_id: account_id.clone(),
                    },
                    auth,
                ))
                .await
                .map(drop);
            if disabled.is_ok() {
                // The other rows need the account enabled.
                app.accounts()
                    .enable_account(bearer(
                        pb::EnableAccountRequest { account_id },
                        &app.operator_token,
                    ))
                    .await
                    .expect("enable the account again");
            }
            disabled
        }
        Rpc::EnableAccount => app
            .accounts()
            .enable_account(request(pb::EnableAccountRequest { account_id }, auth))
            .await
            .map(drop),
        Rpc::DeleteAccount => app
            .accounts()
            .delete_account(request(pb::DeleteAccountRequest { account_id }, auth))
            .await
            .map(drop),
        Rpc::ListAuditEvents => AuditServiceClient::new(app.channel.clone())
            .list_audit_events(request(
                pb::ListAuditEventsRequest {
                    account_id,
                    ..Default::default()
                },
                auth,
            ))
            .await
            .map(drop),
        Rpc::ListAllAuditEvents => AuditServiceClient::new(app.channel.clone())
            .list_audit_events(request(pb::ListAuditEventsRequest::default(), auth))
            .await
            .map(drop),
        Rpc::ListAllTokens => app
            .tokens()
            .list_tokens(request(pb::ListTokensRequest::default(), auth))
            .await
            .map(drop),
        Rpc::CreateToken => app
            .tokens()
            .create_token(request(
                pb::CreateTokenRequest {
                    account_id,
                    name: unique,
                    // Within what every caller allowed to create it holds,
                    // the `tokens:write`-only tokens included.
                    scopes: vec!["tokens:write".into()],
                    ..Default::default()
                },
                auth,
            ))
            .await
            .map(drop),
        Rpc::GetToken => app
            .tokens()
            .get_token(request(
                pb::GetTokenRequest {
                    token_id: target.token_id.clone(),
                },
                auth,
            ))
            .await
            .map(drop),
        Rpc::ListTokens => app
            .tokens()
            .list_tokens(request(
                pb::ListTokensRequest {
                    account_id,
                    ..Default::default()
                },
                auth,
            ))
            .await
            .map(drop),
        Rpc::RevokeToken => {
            // A live token of the target's, issued for this row alone.
            let (victim, _) = app
                .token(&app.operator_token, &account_id, &unique, &[])
                .await;
            app.tokens()
                .revoke_token(request(
                    pb::RevokeTokenRequest {
                        token_id: victim.token_id,
                    },
                    auth,
                ))
                .await
                .map(drop)
        }
        Rpc::VerifyToken => app
            .tokens()
            .verify_token(request(
                pb::VerifyTokenRequest {
                    token: target.credential.clone(),
                    ..Default::default()
                },
                auth,
            ))
            .await
            .map(drop),
        Rpc::RotateToken => {
            // A live token of the target's, issued for this row alone, within
            // what every caller allowed to rotate it holds (its scopes and
            // its lifetime): a successor beyond the caller's own would be an
            // escalation. It is not the caller itself, so only sessions may
            // rotate it: a token may rotate only itself.
            let (_, within) = in_the_future(Duration::from_secs(60 * 60));
            let victim = issue(app, &account_id, &unique, &["tokens:write"], Some(within)).await;
            app.tokens()
                .rotate_token(request(
                    pb::RotateTokenRequest {
                        token_id: victim.token.expect("token").token_id,
                    },
                    auth,
                ))
                .await
                .map(drop)
        }
        Rpc::RenewToken => {
            // A live token of the target's, issued for this row alone, given
            // a new lifetime within what every caller allowed to renew it
            // holds.
            let (_, within) = in_the_future(Duration::from_secs(60 * 60));
            let victim = issue(app, &account_id, &unique, &["tokens:write"], Some(within)).await;
            let (_, renewed) = in_the_future(Duration::from_secs(2 * 60 * 60));
            app.tokens()
                .renew_token(request(
                    pb::RenewTokenRequest {
                        token_id: victim.token.expect("token").token_id,
                        expire_time: Some(renewed),
                        never_expires: false,
                    },
                    auth,
                ))
                .await
                .map(drop)
        }
        Rpc::RevokeLeakedToken => {
            // A live token of the target's, issued for this row alone, and
            // something that is no credential at all.
            let victim = issue(app, &account_id, &unique, &[], None).await;
            app.tokens()
                .revoke_leaked_token(request(
                    pb::RevokeLeakedTokenRequest {
                        secrets: vec![victim.secret, "garbage".into()],
                    },
                    auth,
                ))
                .await
                .map(drop)
        }
        Rpc::GetCaller => app
            .tokens()
            .get_caller(request(pb::GetCallerRequest {}, auth))
            .await
            .map(drop),
    }
}

/// How `result` differs from `row.expect`, if it does.
fn mismatch(row: Row, result: &Result<(), Status>) -> Option<String> {
    let (code, reason) = match (row.expect, result) {
        (Expect::Ok, Ok(())) => return None,
        (Expect::Ok, Err(status)) => return Some(format!("expected OK, got {status:?}")),
        (Expect::Err(code, reason), Ok(())) => {
            return Some(format!(
                "expected {code:?}/{}, got OK",
                reason.as_str_name()
            ));
        }
        (Expect::Err(code, reason), Err(_)) => (code, reason),
    };
    let status = result.as_ref().expect_err("matched above");
    let details = status.get_error_details();
    let info = details.error_info();
    let got_reason = info.map_or("", |i| i.reason.as_str());
    let got_domain = info.map_or("", |i| i.domain.as_str());
    let mut problems = Vec::new();
    if status.code() != code || got_reason != reason.as_str_name() {
        problems.push(format!(
            "expected {code:?}/{}, got {:?}/{got_reason}",
            reason.as_str_name(),
            status.code()
        ));
    }
    if got_domain != ERROR_DOMAIN {
        problems.push(format!("ErrorInfo domain {got_domain:?}"));
    }
    if reason == ErrorReason::ScopeMissing {
        let required = info.and_then(|i| i.metadata.get("required_scope"));
        if required.map(String::as_str) != row.rpc.scope() {
            problems.push(format!("required_scope {required:?}"));
        }
    }
    (!problems.is_empty()).then(|| format!("{} ({:?})", problems.join("; "), status.message()))
}

/// What a row's task panicked with.
fn panic_message(err: tokio::task::JoinError) -> String {
    match err.try_into_panic() {
        Ok(payload) => payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a non-string panic".to_owned()),
        Err(err) => err.to_string(),
    }
}

async fn every_rpc_answers_every_kind_of_caller_as_the_policy_says(app: TestApp) {
    assert_the_matrix_covers_the_api();
    let world = Arc::new(World::build(&app).await);
    let app = Arc::new(app);
    let mut failures = Vec::new();
    for (n, &row) in ROWS.iter().enumerate() {
        // A task per row, so that a row that panics (say, because an
        // earlier call that should have been refused deleted Alice) is
        // reported with the others instead of hiding them.
        let task = tokio::spawn({
            let (app, world) = (Arc::clone(&app), Arc::clone(&world));
            async move { perform(&app, &world, n, row).await }
        });
        let problem = match task.await {
            Ok(result) => mismatch(row, &result),
            Err(err) => Some(format!("the row panicked: {}", panic_message(err))),
        };
        if let Some(problem) = problem {
            failures.push(format!("{:?} by {:?}: {problem}", row.rpc, row.caller));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cells answered otherwise:\n{}",
        failures.len(),
        ROWS.len(),
        failures.join("\n")
    );
}
both_backends!(every_rpc_answers_every_kind_of_caller_as_the_policy_says);
