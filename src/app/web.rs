//! The web page's listener (`IDENTITY_WEB_ADDR`): takes connections from
//! the same accept loops as gRPC (plaintext, or TLS with the same
//! certificate settings and reloading), under the same per-listener
//! connection limit, and serves [`crate::web::Site`] on them: HTTP/1.1 in
//! plaintext, HTTP/2 over TLS (the TLS acceptor offers `h2` only, which
//! every browser speaks). Stops with the rest of the server: on shutdown it
//! stops accepting and lets each connection finish its request.
//!
//! A client holds nothing for long, as on the gRPC listener: HTTP/1.1
//! headers must arrive within [`HEADER_TIMEOUT`] (also the keep-alive wait
//! for the next request), an HTTP/2 connection must send its preface within
//! the preface timeout, a connection with no request in flight is closed
//! after the idle timeout, and a request (its body included) is answered
//! `408` once the request timeout has passed.

use std::{
    convert::Infallible, future::Future, net::SocketAddr, pin::pin, sync::Arc, time::Duration,
};

use hyper::{
    body::Incoming,
    server::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::{mpsc, watch},
    task::JoinSet,
};
use tonic::transport::server::{Connected, TcpConnectInfo};

use super::listen::{Accepted, IDLE_CLOSE_GRACE, InFlight, Limits, Preface, idle};
use crate::{api::auth::TlsPeer, web::Site};

/// How long a client may take to send a request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The peer address of a connection's connect info.
pub trait PeerAddr {
    /// The peer's address, when known.
    fn peer_addr(&self) -> Option<SocketAddr>;
}

impl PeerAddr for TcpConnectInfo {
    fn peer_addr(&self) -> Option<SocketAddr> {
        self.remote_addr()
    }
}

impl PeerAddr for TlsPeer {
    fn peer_addr(&self) -> Option<SocketAddr> {
        Some(self.remote_addr)
    }
}

/// Serves `site` on every connection from `incoming` (HTTP/2 if `http2`,
/// else HTTP/1.1) under `limits`, each request within `request_timeout`,
/// until `shutdown` completes, then closes the listener and returns once
/// every connection has finished gracefully.
pub async fn serve<IO>(
    mut incoming: mpsc::Receiver<Accepted<IO>>,
    site: Site,
    http2: bool,
    limits: Limits,
    request_timeout: Duration,
    shutdown: impl Future<Output = ()>,
) where
    IO: Connected + AsyncRead + AsyncWrite + Unpin + Send + 'static,
    IO::ConnectInfo: PeerAddr,
{
    let (stop_tx, stop_rx) = watch::channel(());
    let mut connections = JoinSet::new();
    let mut shutdown = pin!(shutdown);
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            next = incoming.recv() => match next {
                Some(accepted) => {
                    connections.spawn(connection(
                        accepted,
                        site.clone(),
                        http2,
                        limits.clone(),
                        request_timeout,
                        stop_rx.clone(),
                    ));
                }
                None => break,
            },
        }
    }
    drop(incoming);
    drop(stop_rx);
    let _ = stop_tx.send(());
    while connections.join_next().await.is_some() {}
}

/// Serves hyper connection `$conn` until it closes: gracefully once
/// `$stop` changes, or once no request has been in flight (`$in_flight`)
/// for `$idle_timeout`, dropping it if it has not closed
/// [`IDLE_CLOSE_GRACE`] after that. (A macro only because hyper's HTTP/1.1
/// and HTTP/2 connections share no trait for `graceful_shutdown`.)
macro_rules! drive {
    ($conn:expr, $stop:expr, $in_flight:expr, $idle_timeout:expr) => {{
        let mut conn = pin!($conn);
        let mut closing = false;
        let mut idle_closed = false;
        loop {
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(err) = result {
                        tracing::debug!(listener = "web", error = %err, "connection ended with an error");
                    }
                    break;
                }
                _ = $stop.changed(), if !closing => {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
                () = idle(&mut $in_flight, $idle_timeout), if !closing => {
                    tracing::debug!(listener = "web", "closing an idle connection");
                    closing = true;
                    idle_closed = true;
                    conn.as_mut().graceful_shutdown();
                }
                () = tokio::time::sleep(IDLE_CLOSE_GRACE), if idle_closed => break,
            }
        }
    }};
}

async fn connection<IO>(
    accepted: Accepted<IO>,
    site: Site,
    http2: bool,
    limits: Limits,
    request_timeout: Duration,
    mut stop: watch::Receiver<()>,
) where
    IO: Connected + AsyncRead + AsyncWrite + Unpin + Send + 'static,
    IO::ConnectInfo: PeerAddr,
{
    let Accepted { io, admission } = accepted;
    let Some(peer) = io.connect_info().peer_addr() else {
        return;
    };
    let (busy, mut in_flight) = watch::channel(0_usize);
    let busy = Arc::new(busy);
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let site = site.clone();
        let call = InFlight::begin(Arc::clone(&busy));
        async move {
            // The deadline covers reading the body too, so a client that
            // trickles it holds the connection no longer than a request may
            // take.
            let page = match tokio::time::timeout(request_timeout, site.handle(request, peer)).await
            {
                Ok(page) => page,
                Err(_) => site.timed_out(),
            };
            drop(call);
            Ok::<_, Infallible>(page)
        }
    });
    if http2 {
        let io = TokioIo::new(Preface::new(io, limits.preface_timeout));
        let conn = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_concurrent_streams(32)
            .serve_connection(io, service);
        drive!(conn, stop, in_flight, limits.idle_timeout);
    } else {
        let io = TokioIo::new(io);
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .max_buf_size(64 * 1024)
            .serve_connection(io, service);
        drive!(conn, stop, in_flight, limits.idle_timeout);
    }
    drop(admission);
}
