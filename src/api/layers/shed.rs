//! Load shedding: at most a configured number of calls run at once across
//! all connections. A call beyond that is refused with RESOURCE_EXHAUSTED
//! (with a short RetryInfo) without waiting for a permit, instead of
//! waiting in an unbounded queue, so an overloaded replica stays responsive
//! and clients can back off or try another replica. The refusal is sent once
//! the rest of the call's request has arrived, for at most
//! [`DRAIN_TIMEOUT`] and `drain_limit` bytes (see [`ShedFuture::Shed`]).
//!
//! Health calls (`grpc.health.v1.Health`) have budgets of their own
//! (`IDENTITY_MAX_HEALTH_REQUESTS` per listener, once for `Check` and once
//! for `Watch`), so that a flood of API calls never makes a probe fail (an
//! orchestrator would mistake load for death), while health work stays
//! bounded too: beyond its budget a health call is refused the same way. A
//! call keeps its permit until its response has been sent, so a `Watch`
//! stream holds one for as long as it is open; that is why `Watch` streams
//! have a budget apart from `Check`, the call probes make: streams that
//! anyone can hold open must never starve the probes.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};

use http_body::{Frame, SizeHint};
use prost::bytes::{Buf as _, Bytes};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::{Layer, Service};

use crate::domain::DomainError;

/// A tower layer that sheds calls beyond `limit` in flight, and health
/// `Check` calls and `Watch` streams each beyond `health_limit`.
#[derive(Debug, Clone)]
pub struct ShedLayer {
    permits: Arc<Semaphore>,
    checks: Arc<Semaphore>,
    watches: Arc<Semaphore>,
    drain_limit: usize,
}

impl ShedLayer {
    /// Allows `limit` calls, `health_limit` health checks and
    /// `health_limit` health watches at once.
    /// A refused call's request is read to its end first if it is at most
    /// `drain_limit` bytes (the largest message accepted, with its gRPC
    /// frame header).
    pub fn new(limit: usize, health_limit: usize, drain_limit: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(limit.max(1))),
            checks: Arc::new(Semaphore::new(health_limit.max(1))),
            watches: Arc::new(Semaphore::new(health_limit.max(1))),
            drain_limit,
        }
    }
}

impl<S> Layer<S> for ShedLayer {
    type Service = Shed<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Shed {
            inner,
            permits: Arc::clone(&self.permits),
            checks: Arc::clone(&self.checks),
            watches: Arc::clone(&self.watches),
            drain_limit: self.drain_limit,
        }
    }
}

/// The service [`ShedLayer`] produces.
#[derive(Debug, Clone)]
pub struct Shed<S> {
    inner: S,
    permits: Arc<Semaphore>,
    checks: Arc<Semaphore>,
    watches: Arc<Semaphore>,
    drain_limit: usize,
}

/// How long a refused call's request is waited for before the refusal is
/// sent anyway: a client's data follows its headers within a round trip,
/// and a client that sends none holds its stream no longer than this.
pub const DRAIN_TIMEOUT: Duration = Duration::from_millis(250);

impl<S, B> Service<http::Request<B>> for Shed<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    B: http_body::Body + Unpin,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ShedFuture<S::Future, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path();
        let permits = if !path.starts_with("/grpc.health.") {
            &self.permits
        } else if path.ends_with("/Watch") {
            &self.watches
        } else {
            &self.checks
        };
        match Arc::clone(permits).try_acquire_owned() {
            Ok(permit) => ShedFuture::Admitted {
                inner: self.inner.call(request),
                permit: Some(permit),
            },
            Err(_) => {
                let status = crate::api::status::to_status(DomainError::RateLimited(
                    Duration::from_millis(50),
                ));
                ShedFuture::Shed {
                    body: Some(request.into_body()),
                    drained: 0,
                    limit: self.drain_limit,
                    timer: None,
                    response: Some(status.into_http()),
                }
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// The response of [`Shed`]: the inner call holding its permit (which
    /// then passes to the response body), or a refusal.
    #[project = ShedProjection]
    pub enum ShedFuture<F, B> {
        /// Running, with its permit.
        Admitted { #[pin] inner: F, permit: Option<OwnedSemaphorePermit> },
        /// Refused, once the request's body has been read to its end (at
        /// most `limit` bytes, for at most [`DRAIN_TIMEOUT`]). Answered
        /// before the client's request had ended,
        /// HTTP/2 would end the stream with a reset, and the server counts
        /// the streams it resets: after `app::listen::MAX_LOCAL_RESETS` on
        /// one connection it closes the connection (the MadeYouReset guard),
        /// so a client whose calls were shed a thousand times lost every
        /// call in flight on it ("broken pipe").
        Shed {
            body: Option<B>,
            drained: usize,
            limit: usize,
            timer: Option<Pin<Box<tokio::time::Sleep>>>,
            response: Option<http::Response<tonic::body::Body>>,
        },
    }
}

impl<F, E, B> Future for ShedFuture<F, B>
where
    F: Future<Output = Result<http::Response<tonic::body::Body>, E>>,
    B: http_body::Body + Unpin,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            ShedProjection::Admitted { inner, permit } => {
                let response = ready!(inner.poll(cx))?;
                let permit = permit.take();
                Poll::Ready(Ok(
                    response.map(|body| tonic::body::Body::new(HoldingBody::new(body, permit)))
                ))
            }
            ShedProjection::Shed {
                body,
                drained,
                limit,
                timer,
                response,
            } => {
                while let Some(request) = body.as_mut() {
                    if request.is_end_stream() || *drained > *limit {
                        break;
                    }
                    match Pin::new(request).poll_frame(cx) {
                        Poll::Ready(Some(Ok(frame))) => {
                            *drained += frame.data_ref().map_or(0, |data| data.remaining());
                        }
                        Poll::Ready(Some(Err(_)) | None) => break,
                        Poll::Pending => {
                            let timer = timer
                                .get_or_insert_with(|| Box::pin(tokio::time::sleep(DRAIN_TIMEOUT)));
                            if timer.as_mut().poll(cx).is_ready() {
                                break;
                            }
                            return Poll::Pending;
                        }
                    }
                }
                *body = None;
                match response.take() {
                    Some(response) => Poll::Ready(Ok(response)),
                    None => panic!("ShedFuture polled after completion"),
                }
            }
        }
    }
}

/// A response body that holds something until the response is done: a
/// call's permit here, a connection's in-flight count in `app::listen`, so
/// that a call stays counted while its response (a `Watch` stream, say) is
/// still being sent.
pub struct HoldingBody<T> {
    body: tonic::body::Body,
    _held: T,
}

impl<T> HoldingBody<T> {
    /// `body`, holding `held` until it is dropped.
    pub fn new(body: tonic::body::Body, held: T) -> Self {
        Self { body, _held: held }
    }
}

impl<T: Unpin> http_body::Body for HoldingBody<T> {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
