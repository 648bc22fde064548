//! Load shedding: at most a configured number of calls run at once across
//! all connections. A call beyond that is refused at once with
//! RESOURCE_EXHAUSTED (with a short RetryInfo) instead of waiting in an
//! unbounded queue, so an overloaded replica stays responsive and clients
//! can back off or try another replica. Health checks are never shed, so an
//! orchestrator does not mistake load for death.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::{Layer, Service};

use crate::domain::DomainError;

/// A tower layer that sheds calls beyond `limit` in flight.
#[derive(Debug, Clone)]
pub struct ShedLayer {
    permits: Arc<Semaphore>,
}

impl ShedLayer {
    /// Allows `limit` calls at once.
    pub fn new(limit: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(limit.max(1))),
        }
    }
}

impl<S> Layer<S> for ShedLayer {
    type Service = Shed<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Shed {
            inner,
            permits: Arc::clone(&self.permits),
        }
    }
}

/// The service [`ShedLayer`] produces.
#[derive(Debug, Clone)]
pub struct Shed<S> {
    inner: S,
    permits: Arc<Semaphore>,
}

impl<S, B> Service<http::Request<B>> for Shed<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ShedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path().starts_with("/grpc.health.") {
            return ShedFuture::Admitted {
                inner: self.inner.call(request),
                _permit: None,
            };
        }
        match Arc::clone(&self.permits).try_acquire_owned() {
            Ok(permit) => ShedFuture::Admitted {
                inner: self.inner.call(request),
                _permit: Some(permit),
            },
            Err(_) => {
                let status =
                    super::status::to_status(DomainError::RateLimited(Duration::from_millis(50)));
                ShedFuture::Shed {
                    response: Some(status.into_http()),
                }
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// The response of [`Shed`]: the inner call holding its permit until it
    /// completes, or an immediate refusal.
    #[project = ShedProjection]
    pub enum ShedFuture<F> {
        /// Running, with its permit (none for exempt paths).
        Admitted { #[pin] inner: F, _permit: Option<OwnedSemaphorePermit> },
        /// Refused.
        Shed { response: Option<http::Response<tonic::body::Body>> },
    }
}

impl<F, E> Future for ShedFuture<F>
where
    F: Future<Output = Result<http::Response<tonic::body::Body>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            ShedProjection::Admitted { inner, .. } => inner.poll(cx),
            ShedProjection::Shed { response } => match response.take() {
                Some(response) => Poll::Ready(Ok(response)),
                None => panic!("ShedFuture polled after completion"),
            },
        }
    }
}
