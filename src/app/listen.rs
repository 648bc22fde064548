//! How each listener (the main gRPC port and the plaintext health port)
//! takes and serves connections, with every resource a client can hold
//! bounded:
//!
//! - **Connections**: at most `max_connections` open per listener, counted
//!   from accept (so TLS handshakes in progress count too). One more is
//!   closed at once and counted in `identity_connections_refused_total`.
//! - **The HTTP/2 preface**: a client must send it within
//!   `preface_timeout` of the connection being ready (after the TLS
//!   handshake, when there is one), or the connection is closed.
//! - **Idleness**: a connection with no call in flight for `idle_timeout`
//!   is closed gracefully (GOAWAY, so a client knows nothing was lost and
//!   reconnects when it next calls). A call in flight, a `Watch` stream
//!   included, keeps it open; keepalive pings do not.
//! - **Streams**: at most `max_streams` concurrent streams per connection.
//! - **Responses the client does not take in**: a response waiting on the
//!   client (no flow-control window granted, or the socket not read) for
//!   `send_timeout` to twice that closes the connection; and a call's
//!   response is produced in full before it is sent, so what the call held
//!   inside the stack is given back first (see [`super::send`]).
//! - **Streams the server resets** because of the client's protocol errors
//!   ("MadeYouReset", CVE-2025-8671): after [`MAX_LOCAL_RESETS`] on one
//!   connection it is closed with GOAWAY (ENHANCE_YOUR_CALM). tonic's own
//!   server turns this limit off, which is one reason the server serves
//!   connections with hyper itself.
//!
//! Every request of a connection carries the connection's connect info
//! (`TcpConnectInfo` in plaintext, `TlsPeer` over TLS) in its extensions,
//! as tonic's server would attach it. Nothing here reads request contents.

use std::{
    convert::Infallible,
    future::Future,
    io,
    pin::{Pin, pin},
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use hyper::{body::Incoming, server::conn::http2};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch},
    task::JoinSet,
    time::Sleep,
};
use tonic::{body::Body, transport::server::Connected};

use super::send::{MIN_SEND_TIMEOUT, Sending, Stalls};
use tower::{Service, ServiceExt as _};

/// Streams one connection may make the server reset (by sending frames
/// that are errors on a stream) before the connection is closed: hyper's
/// own default, which tonic's server replaces with "no limit".
pub const MAX_LOCAL_RESETS: usize = 1024;

/// The limits of one listener.
#[derive(Debug, Clone)]
pub struct Limits {
    /// The listener's name in metrics and logs: `grpc` or `health`.
    pub listener: &'static str,
    /// Connections open at once.
    pub max_connections: usize,
    /// Concurrent HTTP/2 streams per connection.
    pub max_streams: u32,
    /// Longest wait for the client's HTTP/2 preface.
    pub preface_timeout: Duration,
    /// Longest a connection may stay open without a call in flight.
    pub idle_timeout: Duration,
    /// HTTP/2 keepalive: the ping interval and how long an answer may take;
    /// `None` sends no pings.
    pub keepalive: Option<(Duration, Duration)>,
    /// How long a response may wait on the client before the connection is
    /// closed (at least [`super::send::MIN_SEND_TIMEOUT`]; the wait that
    /// closes it is between this and twice this).
    pub send_timeout: Duration,
}

/// Counts the connections of one listener and refuses those beyond its
/// limit.
#[derive(Debug, Clone)]
pub struct Gate {
    permits: Arc<Semaphore>,
    listener: &'static str,
}

impl Gate {
    /// Admits at most `limits.max_connections` at once.
    pub fn new(limits: &Limits) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(limits.max_connections.max(1))),
            listener: limits.listener,
        }
    }

    /// A place for one more connection, or `None` (counted) when the
    /// listener is full.
    pub fn admit(&self) -> Option<Admission> {
        match Arc::clone(&self.permits).try_acquire_owned() {
            Ok(permit) => {
                metrics::gauge!(OPEN, "listener" => self.listener).increment(1.0);
                Some(Admission {
                    _permit: permit,
                    listener: self.listener,
                })
            }
            Err(_) => {
                metrics::counter!(REFUSED, "listener" => self.listener).increment(1);
                None
            }
        }
    }
}

/// The metric of connections open, by listener.
pub const OPEN: &str = "identity_connections_open";
/// The metric of connections closed at accept because the listener was
/// full, by listener.
pub const REFUSED: &str = "identity_connections_refused_total";
/// The metric counting connections closed because a response waited on
/// its client too long, by listener.
pub const STALLED: &str = "identity_connections_stalled_total";

/// One connection's place under its listener's limit, held until the
/// connection closes.
#[derive(Debug)]
pub struct Admission {
    _permit: OwnedSemaphorePermit,
    listener: &'static str,
}

impl Drop for Admission {
    fn drop(&mut self) {
        metrics::gauge!(OPEN, "listener" => self.listener).decrement(1.0);
    }
}

/// A connection that was admitted, ready for HTTP/2.
pub struct Accepted<IO> {
    /// The stream (TCP, or TLS over TCP).
    pub io: IO,
    /// Its place under the limit.
    pub admission: Admission,
}

/// Accepts plaintext connections on `listener` until the returned receiver
/// is dropped (which closes the listener), admitting each through `gate`.
pub fn accept_plaintext(listener: TcpListener, gate: Gate) -> mpsc::Receiver<Accepted<TcpStream>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = tx.closed() => return,
                accepted = listener.accept() => accepted,
            };
            let Some((stream, _)) = accepted_stream(accepted).await else {
                continue;
            };
            // Refused connections are dropped (closed) here.
            let Some(admission) = gate.admit() else {
                continue;
            };
            if tx
                .send(Accepted {
                    io: stream,
                    admission,
                })
                .await
                .is_err()
            {
                return;
            }
        }
    });
    rx
}

/// The stream (with `TCP_NODELAY` set) and peer address of a successful
/// accept; `None` after
/// an error, having waited a little when the error is not the connection's
/// own (out of file descriptors: retrying at once would spin).
pub async fn accepted_stream(
    accepted: io::Result<(TcpStream, std::net::SocketAddr)>,
) -> Option<(TcpStream, std::net::SocketAddr)> {
    match accepted {
        Ok((stream, remote_addr)) => {
            if let Err(err) = stream.set_nodelay(true) {
                tracing::debug!(%remote_addr, error = %err, "cannot set TCP_NODELAY");
            }
            Some((stream, remote_addr))
        }
        Err(err) if is_per_connection(&err) => None,
        Err(err) => {
            tracing::warn!(error = %err, "cannot accept connections; retrying");
            tokio::time::sleep(Duration::from_millis(100)).await;
            None
        }
    }
}

/// Whether an accept error concerns only the connection being accepted.
fn is_per_connection(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    )
}

/// Serves HTTP/2 with `service` on every connection from `incoming` until
/// `shutdown` completes; then stops accepting (dropping `incoming`, which
/// closes the listener), asks every connection to finish gracefully
/// (GOAWAY; calls in flight complete) and returns when all have closed.
pub async fn serve<IO, S>(
    mut incoming: mpsc::Receiver<Accepted<IO>>,
    service: S,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) where
    IO: Connected + AsyncRead + AsyncWrite + Unpin + Send + 'static,
    IO::ConnectInfo: Clone + Send + Sync + 'static,
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_streams)
        .max_local_error_reset_streams(MAX_LOCAL_RESETS);
    if let Some((interval, timeout)) = limits.keepalive {
        builder
            .keep_alive_interval(interval)
            .keep_alive_timeout(timeout);
    }
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
                        service.clone(),
                        builder.clone(),
                        limits.clone(),
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

/// Serves one connection until it closes: gracefully when the server stops
/// or the connection has been idle too long.
async fn connection<IO, S>(
    accepted: Accepted<IO>,
    service: S,
    builder: http2::Builder<TokioExecutor>,
    limits: Limits,
    mut stop: watch::Receiver<()>,
) where
    IO: Connected + AsyncRead + AsyncWrite + Unpin + Send + 'static,
    IO::ConnectInfo: Clone + Send + Sync + 'static,
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let Accepted { io, admission } = accepted;
    let (busy, mut in_flight) = watch::channel(0_usize);
    let stalls = Arc::new(Stalls::default());
    let service = PerConnection {
        inner: service,
        info: io.connect_info(),
        busy: Arc::new(busy),
        stalls: Arc::clone(&stalls),
    };
    let io = TokioIo::new(Preface::new(io, limits.preface_timeout));
    let mut conn = pin!(builder.serve_connection(io, TowerToHyperService::new(service)));
    let mut closing = false;
    let mut idle_closed = false;
    let period = limits.send_timeout.max(MIN_SEND_TIMEOUT);
    let mut stall_check = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    stall_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(err) = result {
                    tracing::debug!(listener = limits.listener, error = %err, "connection ended with an error");
                }
                break;
            }
            // Dropping the connection ends its streams, and so drops their
            // responses and whatever they hold.
            _ = stall_check.tick() => if stalls.turn() {
                tracing::debug!(listener = limits.listener, "closing a connection whose client does not take its responses in");
                metrics::counter!(STALLED, "listener" => limits.listener).increment(1);
                break;
            },
            _ = stop.changed(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            () = idle(&mut in_flight, limits.idle_timeout), if !closing => {
                tracing::debug!(listener = limits.listener, "closing an idle connection");
                closing = true;
                idle_closed = true;
                conn.as_mut().graceful_shutdown();
            }
            // Nothing was in flight: a client that does not take part in
            // closing loses nothing when the connection is dropped.
            () = tokio::time::sleep(IDLE_CLOSE_GRACE), if idle_closed => break,
        }
    }
    drop(admission);
}

/// Completes once no call has been in flight for `timeout`.
pub(super) async fn idle(in_flight: &mut watch::Receiver<usize>, timeout: Duration) {
    loop {
        if *in_flight.borrow_and_update() == 0 {
            match tokio::time::timeout(timeout, in_flight.changed()).await {
                Err(_) => return,
                Ok(Ok(())) => {}
                Ok(Err(_)) => std::future::pending().await,
            }
        } else if in_flight.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// The service of one connection: attaches the connect info to each
/// request, counts the calls in flight (a call ends when its response
/// body has been sent or dropped), and produces each response before it is
/// sent ([`Sending`]).
#[derive(Clone)]
struct PerConnection<S, I> {
    inner: S,
    info: I,
    busy: Arc<watch::Sender<usize>>,
    stalls: Arc<Stalls>,
}

impl<S, I> Service<http::Request<Incoming>> for PerConnection<S, I>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    I: Clone + Send + Sync + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Incoming>) -> Self::Future {
        let mut request = request.map(Body::new);
        request.extensions_mut().insert(self.info.clone());
        let call = InFlight::begin(Arc::clone(&self.busy));
        let inner = self.inner.clone();
        let stalls = Arc::clone(&self.stalls);
        Box::pin(async move {
            let (parts, body) = inner.oneshot(request).await?.into_parts();
            let body = Sending::produce(body, stalls, call).await;
            Ok(http::Response::from_parts(parts, Body::new(body)))
        })
    }
}

/// One call in flight on a connection, until dropped.
pub(super) struct InFlight(Arc<watch::Sender<usize>>);

impl InFlight {
    pub(super) fn begin(busy: Arc<watch::Sender<usize>>) -> Self {
        busy.send_modify(|n| *n += 1);
        Self(busy)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

/// How long a connection closed for idleness may take to finish closing
/// (the client answering the GOAWAY's ping) before it is dropped.
pub(super) const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(10);

/// The HTTP/2 client preface: the first bytes a client must send.
const PREFACE_LEN: usize = 24;

/// A stream that fails its reads once `timeout` has passed before the
/// client's first [`PREFACE_LEN`] bytes (its HTTP/2 preface) arrived, so a
/// connection that never starts HTTP/2 is closed.
pub(super) struct Preface<IO> {
    io: IO,
    /// Preface bytes still to come.
    remaining: usize,
    /// When the preface is due; `None` once it has arrived.
    deadline: Option<Pin<Box<Sleep>>>,
}

impl<IO> Preface<IO> {
    pub(super) fn new(io: IO, timeout: Duration) -> Self {
        Self {
            io,
            remaining: PREFACE_LEN,
            deadline: Some(Box::pin(tokio::time::sleep(timeout))),
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Preface<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.io).poll_read(cx, buf);
        let Some(deadline) = this.deadline.as_mut() else {
            return poll;
        };
        match poll {
            Poll::Ready(Ok(())) => {
                this.remaining = this.remaining.saturating_sub(buf.filled().len() - before);
                if this.remaining == 0 {
                    this.deadline = None;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => match deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no HTTP/2 preface within the preface timeout",
                ))),
                Poll::Pending => Poll::Pending,
            },
            other => other,
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Preface<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
