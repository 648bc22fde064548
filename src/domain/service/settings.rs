use std::time::Duration;

use crate::domain::{
    password::PasswordPolicy,
    throttle::{SignInRates, ThrottleSettings},
};

/// Tunable rules of the domain.
#[derive(Debug, Clone)]
pub struct IdentitySettings {
    /// How long a session lasts after sign-in.
    pub session_ttl: Duration,
    /// What a new password must satisfy.
    pub password_policy: PasswordPolicy,
    /// Lifetime of a new token whose request gives no expiry.
    pub token_default_ttl: Duration,
    /// Longest lifetime a new token may have.
    pub token_max_ttl: Duration,
    /// Whether robot accounts may have tokens that never expire.
    pub allow_non_expiring_robot_tokens: bool,
    /// How long a rotated token keeps working after its rotation.
    pub rotation_grace: Duration,
    /// Verdicts the verification cache holds at most (0 turns it off).
    pub cache_entries: usize,
    /// How long a cached verdict is trusted at most, whatever notifications
    /// say: the bound on staleness should a change notification be lost
    /// without the channel noticing.
    pub cache_ttl: Duration,
    /// How failed sign-ins are limited.
    pub sign_in_throttle: ThrottleSettings,
    /// How many password checks, right or wrong, each replica starts per
    /// username and per address.
    pub sign_in_rates: SignInRates,
    /// Most live tokens one account may have (`CreateToken` beyond it is
    /// refused; rotation replaces a token and is not).
    pub max_tokens_per_account: u32,
    /// Tokens each replica creates per account per minute, in bursts up to
    /// that many.
    pub token_creations_per_minute: u32,
}

impl IdentitySettings {
    /// The default of [`Self::max_tokens_per_account`]: far more than any
    /// account needs (one token per integration, plus the children its
    /// tokens create), and small enough that one account's tokens stay a
    /// bounded cost: a leak report or an account deletion revokes at most
    /// this many at once (one notification each), and a listing is a few
    /// pages.
    pub const DEFAULT_MAX_TOKENS_PER_ACCOUNT: u32 = 1000;
    /// The default of [`Self::token_creations_per_minute`]: one a second
    /// sustained, ample for any provisioning script, while a stolen
    /// credential looping `CreateToken` makes at most that many rows (and
    /// reaches the cap in no less than a quarter of an hour).
    pub const DEFAULT_TOKEN_CREATIONS_PER_MINUTE: u32 = 60;
}

impl Default for IdentitySettings {
    fn default() -> Self {
        const DAY: u64 = 24 * 60 * 60;
        Self {
            session_ttl: Duration::from_secs(12 * 60 * 60),
            password_policy: PasswordPolicy::default(),
            token_default_ttl: Duration::from_secs(90 * DAY),
            token_max_ttl: Duration::from_secs(365 * DAY),
            allow_non_expiring_robot_tokens: false,
            rotation_grace: Duration::ZERO,
            cache_entries: 100_000,
            cache_ttl: Duration::from_secs(30),
            sign_in_throttle: ThrottleSettings::default(),
            sign_in_rates: SignInRates::default(),
            max_tokens_per_account: Self::DEFAULT_MAX_TOKENS_PER_ACCOUNT,
            token_creations_per_minute: Self::DEFAULT_TOKEN_CREATIONS_PER_MINUTE,
        }
    }
}
