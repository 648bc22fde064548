//! The tower layers every call passes through before its handler, in
//! order, outermost first: one function per listener, one line per layer.

use std::{convert::Infallible, time::Duration};

use tonic::{body::Body, service::Routes};
use tower::{Service, ServiceBuilder};

use crate::api::layers::{
    deadline::DeadlineLayer,
    forwarded::ClientAddressLayer,
    guard::DefaultDenyLayer,
    message_limit::MessageLimitLayer,
    observe::ObserveLayer,
    ready::{Readiness, ReadyLayer},
    shed::ShedLayer,
};
use crate::config::Config;

/// A gRPC message's frame header: a refused call's request is read to its
/// end if it is at most the largest message accepted plus this.
const GRPC_FRAME_HEADER: usize = 5;
/// Health requests are a service name: a refused one is read to its end up
/// to this.
const HEALTH_DRAIN_LIMIT: usize = 4096;

/// The service the gRPC listener serves: `routes` (the API, health and
/// reflection) under the layers below, outermost first.
pub(crate) fn grpc_stack(
    routes: Routes,
    config: &Config,
    readiness: Readiness,
) -> impl Service<
    http::Request<Body>,
    Response = http::Response<Body>,
    Error = Infallible,
    Future: Send + 'static,
> + Clone
+ Send
+ 'static {
    ServiceBuilder::new()
        // Outermost, so that every call is counted and logged with the code
        // it really got, the refusals of every layer below included (the
        // deadline's DEADLINE_EXCEEDED too).
        .layer(ObserveLayer::new())
        // Next, so that no call outlives its deadline, whatever waits below
        // (a shed permit, the database, a password hash).
        .layer(DeadlineLayer::new(config.request_timeout))
        // Resolves the client's address once, behind trusted proxies, for
        // everything below that reads it (the throttle, the leak-report
        // limiter, the audit log, a token's last use).
        .layer(ClientAddressLayer::new(config.trusted_proxies.clone()))
        // Bounds the calls in flight before any of them does real work, so
        // an overloaded replica answers RESOURCE_EXHAUSTED without queueing;
        // a call asks once its request has arrived, so waiting on a client's
        // bytes holds no place; health and reflection have budgets of their
        // own so probes and the API never starve.
        .layer(ShedLayer::new(
            config.max_concurrent_requests as usize,
            config.connections.max_health_requests,
            config.max_message_bytes.saturating_add(GRPC_FRAME_HEADER),
        ))
        // Default deny: a method with no authorization rule never reaches a
        // handler, even while the database is away.
        .layer(DefaultDenyLayer)
        // Refuses at once while the database is unreachable (telling the
        // client to retry after one health interval), rather than letting
        // each call wait out the pool for a connection; after the guard, so
        // an unknown method is PERMISSION_DENIED whatever the database does.
        .layer(ReadyLayer::new(readiness, config.health_interval))
        // Innermost: frames the request body right before the handler
        // decodes it, refusing oversize or malformed messages with the
        // right code.
        .layer(MessageLimitLayer::new(config.max_message_bytes))
        .service(routes.prepare())
}

/// The service the plaintext health listener serves: health alone.
pub(crate) fn health_stack(
    routes: Routes,
    request_timeout: Duration,
    max_health_requests: usize,
) -> impl Service<
    http::Request<Body>,
    Response = http::Response<Body>,
    Error = Infallible,
    Future: Send + 'static,
> + Clone
+ Send
+ 'static {
    ServiceBuilder::new()
        // No call outlives its deadline here either.
        .layer(DeadlineLayer::new(request_timeout))
        // Only health is served here: anything else is UNIMPLEMENTED, one
        // call at a time, and health within its own budget.
        .layer(ShedLayer::new(1, max_health_requests, HEALTH_DRAIN_LIMIT))
        .service(routes.prepare())
}
