//! The one place where domain errors become gRPC statuses, and where
//! requests that never became a message (too large, or not decodable; see
//! `api::codec`) get theirs.
//!
//! Every status carries a `google.rpc.ErrorInfo` whose reason is a value of
//! the proto's `ErrorReason` enum; bad input also carries a
//! `google.rpc.BadRequest` listing each invalid field. Internal errors reach
//! the client as an opaque message; their cause chain goes to the log.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt as _};

use super::{ERROR_DOMAIN, pb::ErrorReason};
use crate::domain::DomainError;

/// Lets handlers end a domain call with `?`: the status is [`to_status`]'s.
impl From<DomainError> for Status {
    fn from(err: DomainError) -> Self {
        to_status(err)
    }
}

/// Converts a domain error into the status sent to the client.
pub fn to_status(err: DomainError) -> Status {
    let (code, reason) = classify(&err);
    let mut details = ErrorDetails::new();
    let mut metadata = HashMap::new();
    match &err {
        DomainError::InvalidArgument(violations) => {
            for v in violations {
                details.add_bad_request_violation(v.field.clone(), v.description.clone());
            }
        }
        DomainError::TokenLifetime(v) => {
            details.add_bad_request_violation(v.field.clone(), v.description.clone());
        }
        DomainError::RateLimited(retry_after)
        | DomainError::SignInThrottled(retry_after)
        | DomainError::TokenCreationRateLimited(retry_after)
        | DomainError::HashingBusy(retry_after) => {
            details.set_retry_info(Some(*retry_after));
        }
        DomainError::ScopeMissing(scope) => {
            metadata.insert("required_scope".to_owned(), (*scope).to_owned());
        }
        DomainError::TokenLimitReached(max) => {
            metadata.insert("max_tokens".to_owned(), max.to_string());
        }
        DomainError::Unavailable(cause) => {
            tracing::warn!(error = %error_chain(cause), "store unavailable");
        }
        DomainError::Internal(cause) => {
            tracing::error!(error = %error_chain(cause.as_ref()), "internal error");
        }
        _ => {}
    }
    details.set_error_info(reason.as_str_name(), ERROR_DOMAIN, metadata);
    Status::with_error_details(code, err.to_string(), details)
}

/// INVALID_ARGUMENT for request bytes that are not a valid message of the
/// method's request type, naming `field` (a path such as
/// `expire_time.seconds`) in a BadRequest when decoding failed inside one.
/// `description` comes from the decoder and never holds the bytes sent.
pub fn undecodable(field: Option<&str>, description: String) -> Status {
    let mut details = ErrorDetails::new();
    let message = match field {
        Some(field) => {
            details.add_bad_request_violation(field, description.clone());
            format!("invalid argument: the request is not a valid message: {field}: {description}")
        }
        None => format!("invalid argument: the request is not a valid message: {description}"),
    };
    details.set_error_info(
        ErrorReason::InvalidArgument.as_str_name(),
        ERROR_DOMAIN,
        HashMap::new(),
    );
    Status::with_error_details(Code::InvalidArgument, message, details)
}

/// INVALID_ARGUMENT for a request whose HTTP/2 shape gRPC does not allow
/// here (trailers, or a second message on a unary call); `description`
/// says which, never what was sent.
pub fn malformed_request(description: &str) -> Status {
    let mut details = ErrorDetails::new();
    details.set_error_info(
        ErrorReason::InvalidArgument.as_str_name(),
        ERROR_DOMAIN,
        HashMap::new(),
    );
    Status::with_error_details(
        Code::InvalidArgument,
        format!("invalid argument: {description}"),
        details,
    )
}

/// RESOURCE_EXHAUSTED for a request message of `len` bytes, over the
/// server's limit of `max_bytes`; the ErrorInfo metadata `max_bytes` gives
/// the limit.
pub fn message_too_large(len: u64, max_bytes: usize) -> Status {
    let mut details = ErrorDetails::new();
    details.set_error_info(
        ErrorReason::MessageTooLarge.as_str_name(),
        ERROR_DOMAIN,
        HashMap::from([("max_bytes".to_owned(), max_bytes.to_string())]),
    );
    Status::with_error_details(
        Code::ResourceExhausted,
        format!("the request message is {len} bytes; this server accepts at most {max_bytes}"),
        details,
    )
}

/// UNAVAILABLE (reason `STORE_UNAVAILABLE`, with a RetryInfo of
/// `retry_after`) for a call refused at once because the database is known
/// to be unreachable (health reports NOT_SERVING). Not logged per call: the
/// health watcher logs the outage once.
pub fn store_unreachable(retry_after: std::time::Duration) -> Status {
    let mut details = ErrorDetails::new();
    details.set_retry_info(Some(retry_after));
    details.set_error_info(
        ErrorReason::StoreUnavailable.as_str_name(),
        ERROR_DOMAIN,
        HashMap::new(),
    );
    Status::with_error_details(
        Code::Unavailable,
        "the database is unreachable; try again later or another replica",
        details,
    )
}

/// DEADLINE_EXCEEDED for a call that reached its deadline (the client's
/// `grpc-timeout` or the server's `IDENTITY_REQUEST_TIMEOUT`, whichever came
/// first; see `api::deadline`). Like the deadline errors gRPC libraries
/// raise themselves, it carries no ErrorInfo: the code says it all, and
/// whether anything was done is unknown to the client either way.
pub fn deadline_exceeded() -> Status {
    Status::deadline_exceeded("deadline exceeded: the call did not finish in time")
}

/// The code and reason for each kind of domain error.
fn classify(err: &DomainError) -> (Code, ErrorReason) {
    match err {
        DomainError::InvalidArgument(_) => (Code::InvalidArgument, ErrorReason::InvalidArgument),
        DomainError::CredentialMissing => (Code::Unauthenticated, ErrorReason::CredentialMissing),
        DomainError::CredentialInvalid(_) => {
            (Code::Unauthenticated, ErrorReason::CredentialInvalid)
        }
        DomainError::SignInFailed => (Code::Unauthenticated, ErrorReason::SignInFailed),
        DomainError::NotAllowed(_) => (Code::PermissionDenied, ErrorReason::NotAllowed),
        DomainError::ScopeMissing(_) => (Code::PermissionDenied, ErrorReason::ScopeMissing),
        DomainError::SessionRequired => (Code::PermissionDenied, ErrorReason::SessionRequired),
        DomainError::Escalation(_) => (Code::PermissionDenied, ErrorReason::Escalation),
        DomainError::AccountNotFound => (Code::NotFound, ErrorReason::AccountNotFound),
        DomainError::TokenNotFound => (Code::NotFound, ErrorReason::TokenNotFound),
        DomainError::UsernameTaken => (Code::AlreadyExists, ErrorReason::UsernameTaken),
        DomainError::TokenNameTaken => (Code::AlreadyExists, ErrorReason::TokenNameTaken),
        DomainError::RateLimited(_) => (Code::ResourceExhausted, ErrorReason::RateLimited),
        DomainError::SignInThrottled(_) => (Code::ResourceExhausted, ErrorReason::SignInThrottled),
        DomainError::TokenCreationRateLimited(_) => {
            (Code::ResourceExhausted, ErrorReason::RateLimited)
        }
        DomainError::TokenLimitReached(_) => {
            (Code::ResourceExhausted, ErrorReason::TokenLimitReached)
        }
        DomainError::SignInLocked => (Code::FailedPrecondition, ErrorReason::SignInLocked),
        DomainError::CredentialReused => (Code::Unauthenticated, ErrorReason::CredentialReused),
        DomainError::TokenAlreadyRotated => {
            (Code::FailedPrecondition, ErrorReason::TokenAlreadyRotated)
        }
        DomainError::TokenInactive(_) => (Code::FailedPrecondition, ErrorReason::TokenInactive),
        DomainError::SelfLockout => (Code::FailedPrecondition, ErrorReason::SelfLockout),
        DomainError::TokenLifetime(_) => (Code::InvalidArgument, ErrorReason::TokenLifetime),
        // RESOURCE_EXHAUSTED, like the load shedding in `api::shed`: the
        // replica is busy, not down. UNAVAILABLE would say the store is
        // down, and clients retry it at once (gRPC retry policies list it),
        // feeding the very queue that is full; the RetryInfo asks them to
        // back off instead.
        DomainError::HashingBusy(_) => (Code::ResourceExhausted, ErrorReason::RateLimited),
        DomainError::Unavailable(_) => (Code::Unavailable, ErrorReason::StoreUnavailable),
        DomainError::Internal(_) => (Code::Internal, ErrorReason::Internal),
    }
}

/// An error and all its sources, joined for one log field.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
