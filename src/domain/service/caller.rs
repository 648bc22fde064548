//! "Who am I": the caller's own account and credential.

use std::sync::Arc;

use super::Identity;
use crate::domain::{
    DomainError,
    policy::{self, Action, Principal},
};

impl Identity {
    /// `GetCaller`: the principal the request authenticated as, as
    /// authentication left it (a limited-use token has spent this call's
    /// use).
    pub fn get_caller(&self, caller: &Arc<Principal>) -> Result<Arc<Principal>, DomainError> {
        policy::authorize(caller, Action::GetCaller)?;
        Ok(Arc::clone(caller))
    }
}
