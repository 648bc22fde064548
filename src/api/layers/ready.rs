//! Failing fast while the database is unreachable: once the health watcher
//! has seen the database stop answering (health NOT_SERVING), every call but
//! health checks and reflection is refused at once with UNAVAILABLE, instead
//! of each waiting out the pool's acquire timeout for a connection that
//! cannot be opened. Calls are admitted again as soon as the watcher sees
//! the database answer.
//!
//! No call is lost to this that could have succeeded: on PostgreSQL, while
//! the database is away the change channel is down too, so the verification
//! cache is bypassed and every call needs the database; on SQLite the
//! watcher fails only when the file itself cannot be used.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use tower::{Layer, Service};

/// Whether the database answered the health watcher's last probe (and, at
/// start-up, whether its schema has been checked or migrated), with this
/// replica's clock within `IDENTITY_MAX_CLOCK_SKEW` of the database's. Shared by the
/// watcher, which sets it, and [`ReadyLayer`], which reads it.
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// Not ready until [`Readiness::set`] says so.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records whether the database answers.
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Release);
    }

    /// Whether the database answered last.
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// A tower layer that refuses calls with UNAVAILABLE while the database is
/// unreachable.
#[derive(Debug, Clone)]
pub struct ReadyLayer {
    readiness: Readiness,
    retry_after: Duration,
}

impl ReadyLayer {
    /// Refuses calls while `readiness` is false, telling clients to retry
    /// after `retry_after` (the health probe's interval: no sooner can the
    /// service notice the database is back).
    pub fn new(readiness: Readiness, retry_after: Duration) -> Self {
        Self {
            readiness,
            retry_after,
        }
    }
}

impl<S> Layer<S> for ReadyLayer {
    type Service = Ready<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Ready {
            inner,
            readiness: self.readiness.clone(),
            retry_after: self.retry_after,
        }
    }
}

/// The service [`ReadyLayer`] produces.
#[derive(Debug, Clone)]
pub struct Ready<S> {
    inner: S,
    readiness: Readiness,
    retry_after: Duration,
}

/// Paths that never need the database.
fn exempt(path: &str) -> bool {
    path.starts_with("/grpc.health.") || path.starts_with("/grpc.reflection.")
}

impl<S, B> Service<http::Request<B>> for Ready<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ReadyFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if self.readiness.is_ready() || exempt(request.uri().path()) {
            return ReadyFuture::Admitted {
                inner: self.inner.call(request),
            };
        }
        let status = crate::api::status::store_unreachable(self.retry_after);
        ReadyFuture::Refused {
            response: Some(status.into_http()),
        }
    }
}

pin_project_lite::pin_project! {
    /// The response of [`Ready`]: the inner call, or an immediate refusal.
    #[project = ReadyProjection]
    pub enum ReadyFuture<F> {
        /// Running.
        Admitted { #[pin] inner: F },
        /// Refused.
        Refused { response: Option<http::Response<tonic::body::Body>> },
    }
}

impl<F, E> Future for ReadyFuture<F>
where
    F: Future<Output = Result<http::Response<tonic::body::Body>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            ReadyProjection::Admitted { inner } => inner.poll(cx),
            ReadyProjection::Refused { response } => match response.take() {
                Some(response) => Poll::Ready(Ok(response)),
                None => panic!("ReadyFuture polled after completion"),
            },
        }
    }
}
