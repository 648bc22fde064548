//! Response helpers: the security headers, error pages, assets and
//! redirects.

use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Bytes;

use super::{Page, Site, pages};
use crate::domain::DomainError;

impl Site {
    /// The answer to a request that was not complete within the request
    /// timeout (a body sent too slowly, say): `408`, with the security
    /// headers.
    pub fn timed_out(&self) -> Page {
        let mut page = message(StatusCode::REQUEST_TIMEOUT, "The request took too long.");
        self.secure_headers(page.headers_mut());
        page
    }

    pub(super) fn secure_headers(&self, headers: &mut HeaderMap) {
        let fixed = [
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
            ),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-store"),
            (header::X_FRAME_OPTIONS, "DENY"),
        ];
        for (name, value) in fixed {
            headers.insert(name, HeaderValue::from_static(value));
        }
        if self.secure {
            headers.insert(
                header::STRICT_TRANSPORT_SECURITY,
                HeaderValue::from_static("max-age=31536000"),
            );
        }
    }
}

/// The status and the message a person sees for a domain error: the
/// domain's own words (which never carry a secret), or for an unexpected
/// error none at all.
pub(super) fn problem(err: &DomainError) -> (StatusCode, String) {
    let status = match err {
        DomainError::InvalidArgument(_) | DomainError::TokenLifetime(_) => {
            StatusCode::UNPROCESSABLE_ENTITY
        }
        DomainError::SignInFailed
        | DomainError::CredentialInvalid(_)
        | DomainError::CredentialMissing => StatusCode::UNAUTHORIZED,
        DomainError::SignInThrottled(_)
        | DomainError::RateLimited(_)
        | DomainError::TokenCreationRateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
        DomainError::NotAllowed(_)
        | DomainError::ScopeMissing(_)
        | DomainError::SessionRequired
        | DomainError::Escalation(_)
        | DomainError::SignInLocked => StatusCode::FORBIDDEN,
        DomainError::AccountNotFound | DomainError::TokenNotFound => StatusCode::NOT_FOUND,
        DomainError::TokenNameTaken
        | DomainError::TokenLimitReached(_)
        | DomainError::CredentialReused
        | DomainError::TokenAlreadyRotated
        | DomainError::TokenInactive(_)
        | DomainError::UsernameTaken => StatusCode::CONFLICT,
        DomainError::HashingBusy(_) | DomainError::Unavailable(_) => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        DomainError::Internal(_) => {
            tracing::error!(error = %err, "the web page failed");
            StatusCode::INTERNAL_SERVER_ERROR
        }
        _ => StatusCode::BAD_REQUEST,
    };
    let text = match err {
        DomainError::SignInFailed => "Unknown username or wrong password.".to_owned(),
        DomainError::Unavailable(_) => {
            "The service cannot reach its database right now; try again shortly.".to_owned()
        }
        DomainError::Internal(_) => "Something went wrong; try again.".to_owned(),
        other => sentence(&other.to_string()),
    };
    (status, text)
}

/// `text` with a capital first letter and a full stop.
pub(super) fn sentence(text: &str) -> String {
    let mut chars = text.chars();
    let mut out: String = chars
        .next()
        .map(|c| c.to_uppercase().collect::<String>())
        .unwrap_or_default();
    out.push_str(chars.as_str());
    if !out.ends_with('.') {
        out.push('.');
    }
    out
}

/// A page saying what went wrong.
pub(super) fn failure(err: &DomainError) -> Page {
    let (status, text) = problem(err);
    message(status, &text)
}

pub(super) fn csrf_refused() -> Page {
    message(
        StatusCode::FORBIDDEN,
        "Refused: the form's security token is missing or wrong. Reload the page and try again.",
    )
}

pub(super) fn message(status: StatusCode, text: &str) -> Page {
    html_page(status, pages::message(status, text))
}

pub(super) fn html_page(status: StatusCode, body: String) -> Page {
    let mut page = Response::new(Full::new(Bytes::from(body)));
    *page.status_mut() = status;
    page.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    page
}

pub(super) fn asset(content_type: &'static str, body: &'static str) -> Page {
    let mut page = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    page.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    page
}

/// A 303 to one of the page's fixed paths (never with a secret in it).
pub(super) fn redirect(location: &'static str) -> Page {
    let mut page = Response::new(Full::new(Bytes::new()));
    *page.status_mut() = StatusCode::SEE_OTHER;
    page.headers_mut()
        .insert(header::LOCATION, HeaderValue::from_static(location));
    page
}
