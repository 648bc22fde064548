use crate::domain::verdict::{InactiveReason, Verification};

/// `identity_verify_token_verdicts_total` by verdict, registered once so
/// that counting a `VerifyToken` answer is one atomic increment.
pub(super) struct VerdictCounters {
    active: metrics::Counter,
    /// Indexed by [`InactiveReason::index`].
    inactive: [metrics::Counter; InactiveReason::ALL.len()],
}

impl VerdictCounters {
    const NAME: &str = "identity_verify_token_verdicts_total";

    pub(super) fn new() -> Self {
        Self {
            active: metrics::counter!(Self::NAME, "verdict" => "active"),
            inactive: InactiveReason::ALL
                .map(|reason| metrics::counter!(Self::NAME, "verdict" => reason.label())),
        }
    }

    pub(super) fn count(&self, verification: &Verification) {
        match verification.reason() {
            None => self.active.increment(1),
            Some(reason) => self.inactive[reason.index()].increment(1),
        }
    }
}
