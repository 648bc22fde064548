//! The web page's listener (`IDENTITY_WEB_ADDR`): takes connections from
//! the same accept loops as gRPC (plaintext, or TLS with the same
//! certificate settings and reloading), under the same per-listener
//! connection limit, and serves [`crate::web::Site`] on them: HTTP/1.1 in
//! plaintext, HTTP/2 over TLS (the TLS acceptor offers `h2` only, which
//! every browser speaks). Stops with the rest of the server: on shutdown it
//! stops accepting and lets each connection finish its request.

use std::{convert::Infallible, future::Future, net::SocketAddr, pin::pin, time::Duration};

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

use super::listen::Accepted;
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
/// else HTTP/1.1) until `shutdown` completes, then closes the listener and
/// returns once every connection has finished gracefully.
pub async fn serve<IO>(
    mut incoming: mpsc::Receiver<Accepted<IO>>,
    site: Site,
    http2: bool,
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
                    connections.spawn(connection(accepted, site.clone(), http2, stop_rx.clone()));
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

/// Serves hyper connection `$conn` until it closes, gracefully once
/// `$stop` changes.
macro_rules! drive {
    ($conn:expr, $stop:expr) => {{
        let mut conn = pin!($conn);
        let mut closing = false;
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
            }
        }
    }};
}

async fn connection<IO>(
    accepted: Accepted<IO>,
    site: Site,
    http2: bool,
    mut stop: watch::Receiver<()>,
) where
    IO: Connected + AsyncRead + AsyncWrite + Unpin + Send + 'static,
    IO::ConnectInfo: PeerAddr,
{
    let Accepted { io, admission } = accepted;
    let Some(peer) = io.connect_info().peer_addr() else {
        return;
    };
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let site = site.clone();
        async move { Ok::<_, Infallible>(site.handle(request, peer).await) }
    });
    let io = TokioIo::new(io);
    if http2 {
        let conn = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_concurrent_streams(32)
            .serve_connection(io, service);
        drive!(conn, stop);
    } else {
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .max_buf_size(64 * 1024)
            .serve_connection(io, service);
        drive!(conn, stop);
    }
    drop(admission);
}
