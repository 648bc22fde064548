use crate::domain::verdict::Verification;

/// `identity_verify_token_verdicts_total` by verdict: the domain's own
/// sharded counters ([`crate::domain::counters`]), so that counting a
/// `VerifyToken` answer is one relaxed atomic addition on a cache line no
/// other core writes.
pub(super) struct VerdictCounters;

impl VerdictCounters {
    pub(super) fn new() -> Self {
        Self
    }

    pub(super) fn count(&self, verification: &Verification) {
        crate::domain::counters::count_verdict(verification);
    }
}
