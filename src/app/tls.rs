//! TLS for the gRPC listener, with a certificate that can be replaced while
//! the server runs.
//!
//! tonic's own TLS cannot change its certificate, so the server accepts TCP
//! itself. An accept task takes each connection, admits it under the
//! listener's connection limit (see `listen`), sets `TCP_NODELAY`, and
//! hands it to a handshake task of its own, bounded by the handshake
//! timeout, so that a slow or silent client never holds up the others.
//! Completed connections reach the server through a channel as
//! [`TlsConnection`]s, whose connect info is [`TlsPeer`]: the peer's address
//! and the names of the client certificate the handshake verified.
//!
//! A reload task reads the PEM files every reload interval. When their
//! contents change it builds a new rustls `ServerConfig` and swaps it in for
//! new handshakes; connections already open keep theirs. Files that do not
//! load are logged and the previous configuration kept. No error or log
//! line here holds a file's contents: the key is a secret.

use std::{
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
    server::WebPkiClientVerifier,
};
use sha2::{Digest as _, Sha256};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tonic::transport::server::Connected;

use super::listen::{Accepted, Admission, Gate, accepted_stream};
use crate::{
    api::auth::{ClientNames, TlsPeer},
    config::{Config, TlsFiles},
};

const CERT: &str = "IDENTITY_TLS_CERT";
const KEY: &str = "IDENTITY_TLS_KEY";
const CLIENT_CA: &str = "IDENTITY_TLS_CLIENT_CA";

/// Why the TLS files could not be loaded. Never holds their contents.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{setting} ({}): {source}", .path.display())]
    Read {
        /// The setting that names the file.
        setting: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A file was read but does not hold what it should.
    #[error("{setting} ({}): {problem}", .path.display())]
    Invalid {
        /// The setting that names the file.
        setting: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// rustls refused the certificate chain and key (for example, the key
    /// does not belong to the certificate).
    #[error("{CERT} and {KEY}: {0}")]
    Certificate(rustls::Error),
}

/// TLS as loaded at start-up: the files, the current rustls configuration,
/// and how to serve with it.
pub struct Tls {
    files: TlsFiles,
    reload_interval: Duration,
    handshake_timeout: Duration,
    current: Arc<ServerConfig>,
    digest: [u8; 32],
}

impl Tls {
    /// Loads the files `config` names, or `None` when TLS is off. Fails when
    /// they cannot be read or do not hold a usable certificate and key.
    pub fn load(config: &Config) -> Result<Option<Self>, TlsError> {
        let Some(files) = &config.tls else {
            return Ok(None);
        };
        let contents = Contents::read(files)?;
        let current = Arc::new(contents.server_config(files)?);
        Ok(Some(Self {
            files: files.clone(),
            reload_interval: config.tls_reload_interval,
            handshake_timeout: config.tls_handshake_timeout,
            current,
            digest: contents.digest(),
        }))
    }

    /// Whether callers must present a client certificate.
    pub fn is_mutual(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// Starts accepting TLS connections on `listener`, each admitted by
    /// `gate`, and reloading the files; the connections come out of the
    /// returned receiver. Both tasks end when it is dropped (when the
    /// server stops accepting), which closes the listener.
    pub fn incoming(
        self,
        listener: TcpListener,
        gate: Gate,
    ) -> mpsc::Receiver<Accepted<TlsConnection>> {
        let (config_tx, config_rx) = watch::channel(Arc::clone(&self.current));
        tokio::spawn(reload(
            self.files,
            self.reload_interval,
            self.digest,
            config_tx,
        ));
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(accept(
            listener,
            gate,
            config_rx,
            self.handshake_timeout,
            tx,
        ));
        rx
    }
}

/// One accepted connection whose handshake completed.
pub struct TlsConnection {
    stream: TlsStream<TcpStream>,
    peer: TlsPeer,
}

impl Connected for TlsConnection {
    type ConnectInfo = TlsPeer;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// Accepts connections until `connections` is closed, admitting each
/// through `gate` (a refused one is closed at once) and handing it to a
/// handshake task with the configuration current at that moment.
async fn accept(
    listener: TcpListener,
    gate: Gate,
    config: watch::Receiver<Arc<ServerConfig>>,
    handshake_timeout: Duration,
    connections: mpsc::Sender<Accepted<TlsConnection>>,
) {
    loop {
        let accepted = tokio::select! {
            () = connections.closed() => return,
            accepted = listener.accept() => accepted,
        };
        let Some((stream, remote_addr)) = accepted_stream(accepted).await else {
            continue;
        };
        let Some(admission) = gate.admit() else {
            continue;
        };
        let acceptor = TlsAcceptor::from(Arc::clone(&config.borrow()));
        tokio::spawn(handshake(
            acceptor,
            stream,
            (remote_addr, admission),
            handshake_timeout,
            connections.clone(),
        ));
    }
}

/// Completes the handshake of one connection within `timeout` and passes it
/// on; a client that fails or is too slow is dropped. Logged at DEBUG only:
/// scanners and plaintext clients are common, and none of them is an error
/// of this server.
async fn handshake(
    acceptor: TlsAcceptor,
    stream: TcpStream,
    (remote_addr, admission): (SocketAddr, Admission),
    timeout: Duration,
    connections: mpsc::Sender<Accepted<TlsConnection>>,
) {
    let stream = match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(err)) => {
            tracing::debug!(%remote_addr, error = %err, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%remote_addr, ?timeout, "TLS handshake timed out");
            return;
        }
    };
    let client = client_names(stream.get_ref().1.peer_certificates());
    let peer = TlsPeer {
        remote_addr,
        client: Arc::new(client),
    };
    // Fails only when the server has stopped accepting: the connection is
    // then dropped.
    let _ = connections
        .send(Accepted {
            io: TlsConnection { stream, peer },
            admission,
        })
        .await;
}

/// The names of the leaf of a client certificate chain that rustls has
/// verified (or none, when the server asks for no client certificate).
fn client_names(chain: Option<&[CertificateDer<'_>]>) -> ClientNames {
    let Some(leaf) = chain.and_then(<[_]>::first) else {
        return ClientNames::default();
    };
    match webpki::EndEntityCert::try_from(leaf) {
        Ok(cert) => ClientNames::new(cert.valid_dns_names(), cert.valid_uri_names()),
        // rustls parsed it to verify it: this does not happen.
        Err(_) => ClientNames::default(),
    }
}

/// Reads the files every `interval` until nobody listens to `current`, and
/// swaps in a new configuration when their contents change and load.
async fn reload(
    files: TlsFiles,
    interval: Duration,
    mut digest: [u8; 32],
    current: watch::Sender<Arc<ServerConfig>>,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate, and the files have just been read.
    ticks.tick().await;
    let mut unreadable: Option<String> = None;
    loop {
        tokio::select! {
            () = current.closed() => return,
            _ = ticks.tick() => {}
        }
        let read = {
            let files = files.clone();
            tokio::task::spawn_blocking(move || Contents::read(&files)).await
        };
        let contents = match read {
            Ok(Ok(contents)) => contents,
            Ok(Err(err)) => {
                // Say so once, not every interval.
                let message = err.to_string();
                if unreadable.as_ref() != Some(&message) {
                    tracing::warn!(error = %message, "cannot read the TLS files; keeping the current certificate");
                    unreadable = Some(message);
                }
                continue;
            }
            Err(err) => {
                tracing::warn!(error = %err, "reading the TLS files failed");
                continue;
            }
        };
        if unreadable.take().is_some() {
            tracing::info!("the TLS files can be read again");
        }
        let new_digest = contents.digest();
        if new_digest == digest {
            continue;
        }
        // Each new content is judged once: bad files are reported once, and
        // whatever replaces them is loaded.
        digest = new_digest;
        match contents.server_config(&files) {
            Ok(config) => {
                current.send_replace(Arc::new(config));
                tracing::info!(
                    cert = %files.cert.display(),
                    "TLS files changed: new connections use the new certificate"
                );
            }
            Err(err) => tracing::warn!(
                error = %err,
                "TLS files changed but do not load; keeping the current certificate"
            ),
        }
    }
}

/// The bytes of the TLS files, read together.
struct Contents {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

impl Contents {
    fn read(files: &TlsFiles) -> Result<Self, TlsError> {
        Ok(Self {
            cert: read_file(CERT, &files.cert)?,
            key: read_file(KEY, &files.key)?,
            client_ca: files
                .client_ca
                .as_deref()
                .map(|path| read_file(CLIENT_CA, path))
                .transpose()?,
        })
    }

    /// A digest of the contents, to notice a change without keeping the key.
    fn digest(&self) -> [u8; 32] {
        let mut hasher = Sha256::new();
        for part in [Some(&self.cert), Some(&self.key), self.client_ca.as_ref()] {
            let part = part.map_or(&[][..], Vec::as_slice);
            hasher.update((part.len() as u64).to_be_bytes());
            hasher.update(part);
        }
        hasher.finalize().into()
    }

    /// The rustls configuration these contents describe: the chain and key,
    /// the client certificate verifier if a client CA is set, and HTTP/2
    /// (gRPC) as the only ALPN protocol.
    fn server_config(&self, files: &TlsFiles) -> Result<ServerConfig, TlsError> {
        let chain = certificates(CERT, &files.cert, &self.cert)?;
        let key = PrivateKeyDer::from_pem_slice(&self.key).map_err(|err| {
            let problem = match err {
                rustls::pki_types::pem::Error::NoItemsFound => "holds no PEM private key",
                _ => "is not valid PEM",
            };
            invalid(KEY, &files.key, problem)
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Certificate)?;
        let builder = match (&self.client_ca, &files.client_ca) {
            (Some(pem), Some(path)) => {
                let mut roots = RootCertStore::empty();
                for cert in certificates(CLIENT_CA, path, pem)? {
                    roots
                        .add(cert)
                        .map_err(|err| invalid(CLIENT_CA, path, &err.to_string()))?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|err| invalid(CLIENT_CA, path, &err.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
            _ => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(chain, key)
            .map_err(TlsError::Certificate)?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }
}

fn read_file(setting: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        setting,
        path: path.to_owned(),
        source,
    })
}

/// The certificates of a PEM file; at least one.
fn certificates(
    setting: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| invalid(setting, path, "is not valid PEM"))?;
    if certs.is_empty() {
        return Err(invalid(setting, path, "holds no PEM certificate"));
    }
    Ok(certs)
}

fn invalid(setting: &'static str, path: &Path, problem: &str) -> TlsError {
    TlsError::Invalid {
        setting,
        path: path.to_owned(),
        problem: problem.to_owned(),
    }
}
