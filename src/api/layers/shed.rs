//! Load shedding: at most a configured number of calls run at once across
//! all connections. A call beyond that is refused with RESOURCE_EXHAUSTED
//! (with a short RetryInfo) without waiting for a permit, instead of
//! waiting in an unbounded queue, so an overloaded replica stays responsive
//! and clients can back off or try another replica.
//!
//! A call asks for its permit once its whole request has arrived (read
//! ahead up to `drain_limit` bytes, the largest message accepted, under the
//! call's deadline), so a client that sends headers and never a message
//! holds no permit, only its own stream; and a refusal is never sent before
//! the client's request has ended, which would reset the stream (see
//! [`ShedFuture::Shed`]). The bytes of requests part read while they wait
//! for the rest are bounded across the listener by a budget
//! ([`READ_AHEAD_MESSAGES`] requests of the largest size); a request that
//! would exceed it is refused the same way, so clients that send most of a
//! large message and stop hold no more memory than that. Reflection
//! streams, whose requests last as long as the stream, take theirs at the
//! headers.
//!
//! Health calls (`grpc.health.v1.Health`) have budgets of their own
//! (`IDENTITY_MAX_HEALTH_REQUESTS` per listener, once for `Check` and once
//! for `Watch`), so that a flood of API calls never makes a probe fail (an
//! orchestrator would mistake load for death), while health work stays
//! bounded too: beyond its budget a health call is refused the same way.
//!
//! A call keeps its permit until its response has been produced: a unary
//! call's as soon as the listener has read its response body to the end
//! (before it is sent, see `app::listen`), a stream's for as long as it is
//! open. So the streams that anyone can hold open without a credential
//! have budgets apart from the calls that do work: `Watch` apart from
//! `Check` (the call probes make), and server reflection
//! (`grpc.reflection.*`, one stream per `grpcurl` run) apart from the API
//! (the same size as a health budget). Otherwise a thousand idle
//! reflection streams from one client refused every API call of every
//! client.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};

use http_body::{Body as _, Frame, SizeHint};
use prost::bytes::{Buf as _, Bytes};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::body::Body;
use tower::{Layer, Service};

use super::replay::Replay;
use crate::domain::DomainError;

/// A tower layer that sheds calls beyond `limit` in flight, and health
/// `Check` calls, `Watch` streams and reflection streams each beyond
/// `health_limit`.
#[derive(Debug, Clone)]
pub struct ShedLayer {
    permits: Arc<Semaphore>,
    checks: Arc<Semaphore>,
    watches: Arc<Semaphore>,
    reflections: Arc<Semaphore>,
    read_ahead: Arc<Semaphore>,
    drain_limit: usize,
}

/// How many requests of the largest size accepted may wait, part read, at
/// once: the read-ahead budget in bytes is this many times `drain_limit`
/// (32 MiB at the default 128 KiB).
pub const READ_AHEAD_MESSAGES: usize = 256;

impl ShedLayer {
    /// Allows `limit` calls, `health_limit` health checks, `health_limit`
    /// health watches and `health_limit` reflection streams at once.
    /// A refused call's request is read to its end first if it is at most
    /// `drain_limit` bytes (the largest message accepted, with its gRPC
    /// frame header).
    pub fn new(limit: usize, health_limit: usize, drain_limit: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(limit.max(1))),
            checks: Arc::new(Semaphore::new(health_limit.max(1))),
            watches: Arc::new(Semaphore::new(health_limit.max(1))),
            reflections: Arc::new(Semaphore::new(health_limit.max(1))),
            read_ahead: Arc::new(Semaphore::new(
                READ_AHEAD_MESSAGES
                    .saturating_mul(drain_limit.max(1))
                    .min(Semaphore::MAX_PERMITS),
            )),
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
            reflections: Arc::clone(&self.reflections),
            read_ahead: Arc::clone(&self.read_ahead),
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
    reflections: Arc<Semaphore>,
    read_ahead: Arc<Semaphore>,
    drain_limit: usize,
}

/// How long a refused call's request is waited for before the refusal is
/// sent anyway: a client's data follows its headers within a round trip,
/// and a client that sends none holds its stream no longer than this.
pub const DRAIN_TIMEOUT: Duration = Duration::from_millis(250);

impl<S> Service<http::Request<Body>> for Shed<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ShedFuture<S, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let path = request.uri().path();
        let limit = self.drain_limit;
        if path.starts_with("/grpc.reflection.") {
            // A stream's request does not end while the stream is open:
            // its place is taken at once.
            let permit = Arc::clone(&self.reflections).try_acquire_owned().ok();
            return ShedFuture::new(permit, &mut self.inner, request, limit);
        }
        let permits = Arc::clone(if !path.starts_with("/grpc.health.") {
            &self.permits
        } else if path.ends_with("/Watch") {
            &self.watches
        } else {
            &self.checks
        });
        // The service that was polled ready serves this call, once its
        // request has come; a clone stays for the next.
        let clone = self.inner.clone();
        let service = std::mem::replace(&mut self.inner, clone);
        let (parts, body) = request.into_parts();
        ShedFuture::Reading {
            service: Some(service),
            parts: Some(parts),
            body: Some(Replay::new(body)),
            held: None,
            permits,
            budget: Arc::clone(&self.read_ahead),
            limit,
        }
    }
}

impl<S, F> ShedFuture<S, F> {
    /// The call `request` on `inner` if it has its `permit`, else its
    /// refusal, once at most `limit` bytes more of its request have come.
    fn new(
        permit: Option<OwnedSemaphorePermit>,
        inner: &mut S,
        request: http::Request<Body>,
        limit: usize,
    ) -> Self
    where
        S: Service<http::Request<Body>, Future = F>,
    {
        match permit {
            Some(permit) => ShedFuture::Admitted {
                inner: inner.call(request),
                permit: Some(permit),
            },
            None => {
                let status = crate::api::status::to_status(DomainError::RateLimited(
                    Duration::from_millis(50),
                ));
                ShedFuture::Shed {
                    body: Some(request.into_body()),
                    drained: 0,
                    limit,
                    timer: None,
                    response: Some(status.into_http()),
                }
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// The response of [`Shed`]: the call's request being read, then the
    /// inner call holding its permit (which then passes to the response
    /// body), or a refusal.
    #[project = ShedProjection]
    pub enum ShedFuture<S, F> {
        /// Reading the request ahead, holding no place: a client that
        /// sends its headers and never its message would otherwise hold
        /// one until the call's deadline, and a thousand such streams,
        /// renewed, would refuse every other call. The bytes that wait
        /// are bounded by the read-ahead `budget`; a call that would
        /// exceed it is refused. Then `service` serves it if one of
        /// `permits` is free.
        Reading {
            service: Option<S>,
            parts: Option<http::request::Parts>,
            body: Option<Replay>,
            held: Option<OwnedSemaphorePermit>,
            permits: Arc<Semaphore>,
            budget: Arc<Semaphore>,
            limit: usize,
        },
        /// Running, with its permit.
        Admitted { #[pin] inner: F, permit: Option<OwnedSemaphorePermit> },
        /// Refused, once the request's body has been read to its end (at
        /// most `limit` bytes more, for at most [`DRAIN_TIMEOUT`]; a call
        /// read ahead has ended already unless it was oversize). Answered
        /// before the client's request had ended,
        /// HTTP/2 would end the stream with a reset, and the server counts
        /// the streams it resets: after `app::listen::MAX_LOCAL_RESETS` on
        /// one connection it closes the connection (the MadeYouReset guard),
        /// so a client whose calls were shed a thousand times lost every
        /// call in flight on it ("broken pipe").
        Shed {
            body: Option<Body>,
            drained: usize,
            limit: usize,
            timer: Option<Pin<Box<tokio::time::Sleep>>>,
            response: Option<http::Response<tonic::body::Body>>,
        },
    }
}

impl<S, F, E> Future for ShedFuture<S, F>
where
    S: Service<http::Request<Body>, Future = F>,
    F: Future<Output = Result<http::Response<tonic::body::Body>, E>>,
{
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            match self.as_mut().project() {
                ShedProjection::Reading {
                    service,
                    parts,
                    body,
                    held,
                    permits,
                    budget,
                    limit,
                } => {
                    let Some(replay) = body.as_mut() else {
                        panic!("ShedFuture polled after completion");
                    };
                    let within = ready!(replay.poll_read_until(cx, *limit, budget, held));
                    *held = None;
                    let permit = within
                        .then(|| Arc::clone(permits).try_acquire_owned().ok())
                        .flatten();
                    let limit = *limit;
                    let (Some(mut service), Some(parts), Some(replay)) =
                        (service.take(), parts.take(), body.take())
                    else {
                        panic!("ShedFuture polled after completion");
                    };
                    let request = http::Request::from_parts(parts, Body::new(replay));
                    let next = ShedFuture::new(permit, &mut service, request, limit);
                    self.set(next);
                }
                ShedProjection::Admitted { inner, permit } => {
                    let response = ready!(inner.poll(cx))?;
                    let permit = permit.take();
                    return Poll::Ready(Ok(
                        response.map(|body| tonic::body::Body::new(HoldingBody::new(body, permit)))
                    ));
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
                                let timer = timer.get_or_insert_with(|| {
                                    Box::pin(tokio::time::sleep(DRAIN_TIMEOUT))
                                });
                                if timer.as_mut().poll(cx).is_ready() {
                                    break;
                                }
                                return Poll::Pending;
                            }
                        }
                    }
                    *body = None;
                    return match response.take() {
                        Some(response) => Poll::Ready(Ok(response)),
                        None => panic!("ShedFuture polled after completion"),
                    };
                }
            }
        }
    }
}

/// A response body that holds something until the body is done (a call's
/// permit), so that a stream (a `Watch`, reflection) stays counted for as
/// long as it is open.
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
