//! Deadlines: every call ends by the earlier of the server's own limit
//! (`IDENTITY_REQUEST_TIMEOUT`) and the deadline the client sent in its
//! `grpc-timeout` header. A call that reaches it is answered
//! DEADLINE_EXCEEDED, as gRPC clients expect (tonic's own timeout answers
//! CANCELLED), and its handler is dropped: work it had not committed is not
//! done. A `grpc-timeout` that is not valid (more than eight digits, an
//! unknown unit) is ignored and the server's limit applies.
//!
//! The deadline does not cover the response body of a streaming call
//! (health `Watch`, reflection), which ends when the client goes away; the
//! service's own RPCs are unary, so theirs is complete when the handler
//! returns.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tower::{Layer, Service};

use crate::api::status;

/// A tower layer that ends calls at their deadline; see the module.
#[derive(Debug, Clone, Copy)]
pub struct DeadlineLayer {
    limit: Duration,
}

impl DeadlineLayer {
    /// Ends every call after `limit` at most.
    pub fn new(limit: Duration) -> Self {
        Self { limit }
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Deadline {
            inner,
            limit: self.limit,
        }
    }
}

/// The service [`DeadlineLayer`] produces.
#[derive(Debug, Clone)]
pub struct Deadline<S> {
    inner: S,
    limit: Duration,
}

impl<S, B> Service<http::Request<B>> for Deadline<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let timeout = request
            .headers()
            .get("grpc-timeout")
            .and_then(|value| parse_grpc_timeout(value.as_bytes()))
            .map_or(self.limit, |client| client.min(self.limit));
        let call = self.inner.call(request);
        Box::pin(async move {
            match tokio::time::timeout(timeout, call).await {
                Ok(result) => result,
                Err(_) => Ok(status::deadline_exceeded().into_http()),
            }
        })
    }
}

/// A `grpc-timeout` value: at most eight ASCII digits and a unit (`H`, `M`,
/// `S`, `m`, `u`, `n`), as the gRPC over HTTP/2 specification defines it.
pub fn parse_grpc_timeout(raw: &[u8]) -> Option<Duration> {
    let (&unit, digits) = raw.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let value: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(value * 3600),
        b'M' => Duration::from_secs(value * 60),
        b'S' => Duration::from_secs(value),
        b'm' => Duration::from_millis(value),
        b'u' => Duration::from_micros(value),
        b'n' => Duration::from_nanos(value),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_as_the_specification_says() {
        assert_eq!(parse_grpc_timeout(b"5S"), Some(Duration::from_secs(5)));
        assert_eq!(
            parse_grpc_timeout(b"250m"),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            parse_grpc_timeout(b"99999999H"),
            Some(Duration::from_secs(99_999_999 * 3600))
        );
        assert_eq!(parse_grpc_timeout(b"1n"), Some(Duration::from_nanos(1)));
        for bad in [&b""[..], b"S", b"123456789S", b"5s", b"-5S", b"5", b"1.5S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }
}
