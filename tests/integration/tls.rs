//! TLS on the gRPC listener: calls over TLS, certificates replaced while the
//! server runs, mutual TLS, and `VerifyToken` restricted to client
//! certificates (`IDENTITY_VERIFY_AUTH`). Certificates are made here with
//! rcgen. The transport tests run on SQLite only (the store plays no part in
//! a handshake); the `VerifyToken` modes run on both stores.

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use identity::{
    app::App,
    config::{Config, TlsFiles},
    domain::verifier::{VerifierClients, VerifierMode, VerifierRule},
};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType, string::Ia5String,
};
use tokio::io::AsyncReadExt as _;
use tonic::{
    Code,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity as ClientIdentity},
};

use crate::support::{Backend, TestApp, assert_status, bearer, pb, plaintext, reason};
use pb::{
    accounts_service_client::AccountsServiceClient, tokens_service_client::TokensServiceClient,
};

/// A certificate authority for the tests.
pub(crate) struct Ca {
    pub(crate) issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, as PEM, and the certificate as DER.
pub(crate) struct Issued {
    cert_pem: String,
    key_pem: String,
    der: Vec<u8>,
}

impl Ca {
    pub(crate) fn new(name: &str) -> Self {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("CA key");
        Self {
            issuer: CertifiedIssuer::self_signed(params, key).expect("CA certificate"),
        }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for `names` (DNS names or IP addresses).
    pub(crate) fn server(&self, serial: u64, names: &[&str]) -> Issued {
        let mut params =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
                .expect("server names");
        params.serial_number = Some(serial.into());
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params)
    }

    /// A client certificate with DNS names `dns` and URIs `uris`.
    fn client(&self, dns: &[&str], uris: &[&str]) -> Issued {
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "a client");
        let ia5 = |s: &str| Ia5String::try_from(s).expect("an IA5 string");
        params.subject_alt_names = dns
            .iter()
            .map(|d| SanType::DnsName(ia5(d)))
            .chain(uris.iter().map(|u| SanType::URI(ia5(u))))
            .collect();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params)
    }

    fn issue(&self, mut params: CertificateParams) -> Issued {
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("certificate");
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }
}

/// Where the server's TLS files live, and writing them.
pub(crate) struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    pub(crate) fn new(server: &Issued, client_ca: Option<&Ca>) -> Self {
        let files = Self {
            dir: tempfile::tempdir().expect("temporary directory"),
        };
        files.replace(server);
        if let Some(ca) = client_ca {
            write_atomically(&files.dir.path().join("clients.pem"), &ca.pem());
        }
        files
    }

    /// The setting naming these files.
    pub(crate) fn tls(&self) -> TlsFiles {
        let client_ca = self.dir.path().join("clients.pem");
        TlsFiles {
            cert: self.dir.path().join("cert.pem"),
            key: self.dir.path().join("key.pem"),
            client_ca: client_ca.exists().then_some(client_ca),
        }
    }

    /// Replaces the certificate and key, as an operator (or cert-manager)
    /// would: each file renamed into place.
    fn replace(&self, server: &Issued) {
        write_atomically(&self.dir.path().join("cert.pem"), &server.cert_pem);
        write_atomically(&self.dir.path().join("key.pem"), &server.key_pem);
    }
}

fn write_atomically(path: &Path, contents: &str) {
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, contents).expect("write");
    std::fs::rename(&temporary, path).expect("rename");
}

/// A TLS endpoint for the server at `addr`, trusting `ca` and expecting the
/// server to be `name`, presenting `client` if given.
fn tls_endpoint(addr: SocketAddr, ca: &Ca, name: &str, client: Option<&Issued>) -> Endpoint {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca.pem()))
        .domain_name(name);
    if let Some(client) = client {
        tls = tls.identity(ClientIdentity::from_pem(&client.cert_pem, &client.key_pem));
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .expect("valid uri")
        .timeout(Duration::from_secs(10))
        .tls_config(tls)
        .expect("client TLS configuration")
}

/// An authenticated call (GetAccount of the operator, as the operator)
/// over a new connection from `endpoint`: its status.
async fn call_over(endpoint: Endpoint, token: &str) -> Result<(), tonic::Status> {
    let channel = match endpoint.connect().await {
        Ok(channel) => channel,
        Err(err) => return Err(tonic::Status::from_error(Box::new(err))),
    };
    call_on(&channel, token).await
}

/// The same call on an existing channel.
async fn call_on(channel: &Channel, token: &str) -> Result<(), tonic::Status> {
    AccountsServiceClient::new(channel.clone())
        .get_account(bearer(
            pb::GetAccountRequest {
                lookup: Some(pb::get_account_request::Lookup::Username("ops".into())),
            },
            token,
        ))
        .await
        .map(drop)
}

/// Asserts that a call failed in the transport (the connection was refused
/// or broken), not with an answer from the service.
#[track_caller]
fn assert_refused_by_transport(result: Result<(), tonic::Status>, what: &str) {
    let status = result.expect_err(what);
    let in_transport = std::error::Error::source(&status)
        .is_some_and(|source| source.is::<tonic::transport::Error>());
    assert!(
        in_transport && reason(&status).is_empty(),
        "{what}: a transport failure, not an answer: {status:?}"
    );
}

/// The leaf certificate the server at `addr` presents to a new connection
/// that trusts `ca` and expects `name`; an error when the handshake fails.
async fn served_certificate(addr: SocketAddr, ca: &Ca, name: &str) -> Result<Vec<u8>, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(ca.issuer.der().clone())
        .expect("a CA certificate");
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let server_name = rustls::pki_types::ServerName::try_from(name.to_owned()).expect("a name");
    let stream = connector
        .connect(server_name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let chain = stream
        .get_ref()
        .1
        .peer_certificates()
        .ok_or("no certificate")?;
    Ok(chain[0].to_vec())
}

/// Waits until new connections are served `expected`, for at most ten
/// seconds (the tests reload every 50 ms).
async fn wait_until_served(addr: SocketAddr, ca: &Ca, name: &str, expected: &Issued) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if served_certificate(addr, ca, name).await.as_ref() == Ok(&expected.der) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts a server on `backend` serving TLS from `files`, with `adjust`
/// applied, whose own channel trusts `ca` and presents `client`.
pub(crate) async fn spawn_tls(
    backend: Backend,
    files: &Files,
    ca: &Ca,
    client: Option<&Issued>,
    adjust: impl FnOnce(&mut Config),
) -> TestApp {
    let tls = files.tls();
    TestApp::spawn_with_endpoint(
        backend,
        |config| {
            config.tls = Some(tls);
            config.tls_reload_interval = Duration::from_millis(50);
            adjust(config);
        },
        |addr| tls_endpoint(addr, ca, "localhost", client),
    )
    .await
}

pub(crate) const SERVER_NAMES: &[&str] = &["localhost", "127.0.0.1"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_work_over_tls_and_a_plaintext_client_cannot_connect() {
    let ca = Ca::new("server CA");
    let files = Files::new(&ca.server(1, SERVER_NAMES), None);
    let app = spawn_tls(Backend::Sqlite, &files, &ca, None, |_| {}).await;

    call_on(&app.channel, &app.operator_token)
        .await
        .expect("a call over TLS works");
    // The audit log sees the peer's address through the TLS connect info.
    let (alice, _) = app.person("alice").await;
    let events = app.audit(&alice.account_id, &[]).await;
    assert!(!events.is_empty());
    for event in events {
        assert!(
            event.source_address.starts_with("127.0.0.1:"),
            "{:?}",
            event.source_address
        );
    }
    assert_refused_by_transport(
        call_over(plaintext(app.addr), &app.operator_token).await,
        "a plaintext client cannot talk to a TLS server",
    );
    let stranger = Ca::new("another CA");
    call_over(
        tls_endpoint(app.addr, &stranger, "localhost", None),
        &app.operator_token,
    )
    .await
    .expect_err("a client that does not trust the server's CA refuses it");
    app.stop().await;
}

/// Kubernetes' native gRPC probes cannot speak TLS: with
/// `IDENTITY_HEALTH_LISTEN_ADDR`, the health service alone is also served
/// in plaintext, and nothing else is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_health_port_serves_probes_and_nothing_else() {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };

    let ca = Ca::new("server CA");
    let files = Files::new(&ca.server(1, SERVER_NAMES), None);
    let app = spawn_tls(Backend::Sqlite, &files, &ca, None, |config| {
        config.health_listen_addr = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    })
    .await;
    let health_addr = app.health_addr.expect("a health listener");
    assert_ne!(health_addr, app.addr);
    let channel = plaintext(health_addr)
        .connect()
        .await
        .expect("connect in plaintext");
    let mut health = HealthClient::new(channel.clone());
    for service in ["", "liveness", "identity.v1.TokensService"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap_or_else(|e| panic!("health of {service:?}: {e:?}"))
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
    // The API is not there, with or without a token.
    let refused = call_on(&channel, &app.operator_token)
        .await
        .expect_err("the API on the health port");
    assert_eq!(refused.code(), Code::Unimplemented, "{refused:?}");
    // The main port still wants TLS.
    assert_refused_by_transport(
        call_over(plaintext(app.addr), &app.operator_token).await,
        "the main port stays TLS-only",
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_certificate_files_are_served_to_new_connections_without_a_restart() {
    let first_ca = Ca::new("first CA");
    let first = first_ca.server(1, SERVER_NAMES);
    let files = Files::new(&first, None);
    let app = spawn_tls(Backend::Sqlite, &files, &first_ca, None, |_| {}).await;
    assert_eq!(
        served_certificate(app.addr, &first_ca, "localhost").await,
        Ok(first.der.clone())
    );
    call_on(&app.channel, &app.operator_token)
        .await
        .expect("a call on the first certificate");

    // Another CA, another serial, another name.
    let second_ca = Ca::new("second CA");
    let second = second_ca.server(2, &["identity.example"]);
    files.replace(&second);
    wait_until_served(app.addr, &second_ca, "identity.example", &second).await;
    call_over(
        tls_endpoint(app.addr, &second_ca, "identity.example", None),
        &app.operator_token,
    )
    .await
    .expect("a new connection works with the new certificate");
    call_over(
        tls_endpoint(app.addr, &first_ca, "localhost", None),
        &app.operator_token,
    )
    .await
    .expect_err("new connections no longer get the old certificate");
    call_on(&app.channel, &app.operator_token)
        .await
        .expect("the connection opened before the reload still works: no restart");

    // A broken replacement (a certificate whose key is not in the key
    // file, then garbage) is refused and the current certificate kept.
    let orphan = second_ca.server(3, &["identity.example"]);
    std::fs::write(files.dir.path().join("cert.pem"), &orphan.cert_pem).expect("write");
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::write(files.dir.path().join("cert.pem"), "not a certificate").expect("write");
    std::fs::write(files.dir.path().join("key.pem"), "not a key").expect("write");
    // The reloader reads every 50 ms: give it many turns to get it wrong.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        served_certificate(app.addr, &second_ca, "identity.example").await,
        Ok(second.der.clone()),
        "the last good certificate is still served"
    );
    call_over(
        tls_endpoint(app.addr, &second_ca, "identity.example", None),
        &app.operator_token,
    )
    .await
    .expect("new connections still work");

    // Mending the files is picked up: the reloader survived the bad ones.
    let third = second_ca.server(4, SERVER_NAMES);
    files.replace(&third);
    wait_until_served(app.addr, &second_ca, "localhost", &third).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_neither_stalls_others_nor_keeps_its_connection() {
    let ca = Ca::new("server CA");
    let files = Files::new(&ca.server(1, SERVER_NAMES), None);
    let app = spawn_tls(Backend::Sqlite, &files, &ca, None, |config| {
        config.tls_handshake_timeout = Duration::from_millis(300);
    })
    .await;

    let mut silent = tokio::net::TcpStream::connect(app.addr)
        .await
        .expect("connect");
    call_over(
        tls_endpoint(app.addr, &ca, "localhost", None),
        &app.operator_token,
    )
    .await
    .expect("another client is served while the silent one waits");
    let mut buf = [0_u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut buf))
        .await
        .expect("the server closes the connection after the handshake timeout");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "the silent connection is closed: {read:?}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_refuses_callers_without_a_certificate_from_the_client_ca() {
    let server_ca = Ca::new("server CA");
    let clients_ca = Ca::new("clients CA");
    let rogue_ca = Ca::new("rogue CA");
    let files = Files::new(&server_ca.server(1, SERVER_NAMES), Some(&clients_ca));
    let member = clients_ca.client(&["batch.internal"], &[]);
    let app = spawn_tls(Backend::Sqlite, &files, &server_ca, Some(&member), |_| {}).await;

    call_on(&app.channel, &app.operator_token)
        .await
        .expect("a client with a certificate from the client CA is served");
    assert_refused_by_transport(
        call_over(
            tls_endpoint(app.addr, &server_ca, "localhost", None),
            &app.operator_token,
        )
        .await,
        "a client without a certificate is refused",
    );
    let rogue = rogue_ca.client(&["batch.internal"], &[]);
    assert_refused_by_transport(
        call_over(
            tls_endpoint(app.addr, &server_ca, "localhost", Some(&rogue)),
            &app.operator_token,
        )
        .await,
        "a certificate from another CA is refused, whatever its names",
    );
    app.stop().await;
}

#[tokio::test]
async fn inconsistent_or_unloadable_tls_settings_stop_start_up() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let database = format!("sqlite:{}", dir.path().join("identity.db").display());
    let ca = Ca::new("server CA");
    let files = Files::new(&ca.server(1, SERVER_NAMES), None);
    let build = |adjust: &dyn Fn(&mut Config)| {
        let mut config = Config::with_database(database.clone());
        config.listen_addr = SocketAddr::from(([127, 0, 0, 1], 0));
        adjust(&mut config);
        async move {
            match App::build(config).await {
                Ok(_) => String::new(),
                Err(err) => err.to_string(),
            }
        }
    };

    let missing = build(&|c| {
        c.tls = Some(TlsFiles {
            cert: dir.path().join("absent.pem"),
            ..files.tls()
        });
    })
    .await;
    assert!(missing.contains("IDENTITY_TLS_CERT"), "{missing}");

    std::fs::write(
        dir.path().join("garbage.pem"),
        "-----BEGIN PRIVATE KEY-----\nsecret\n",
    )
    .expect("write");
    let garbled = build(&|c| {
        c.tls = Some(TlsFiles {
            key: dir.path().join("garbage.pem"),
            ..files.tls()
        });
    })
    .await;
    assert!(garbled.contains("IDENTITY_TLS_KEY"), "{garbled}");
    assert!(
        !garbled.contains("secret"),
        "a key file's contents are never shown: {garbled}"
    );

    let other = ca.server(2, SERVER_NAMES);
    std::fs::write(dir.path().join("other-key.pem"), &other.key_pem).expect("write");
    let mismatched = build(&|c| {
        c.tls = Some(TlsFiles {
            key: dir.path().join("other-key.pem"),
            ..files.tls()
        });
    })
    .await;
    assert!(mismatched.contains("IDENTITY_TLS_KEY"), "{mismatched}");

    let without_client_ca = build(&|c| {
        c.tls = Some(files.tls());
        c.verifiers = VerifierRule {
            mode: VerifierMode::Client,
            clients: VerifierClients::parse("gateway.internal").expect("names"),
        };
    })
    .await;
    assert!(
        without_client_ca.contains("IDENTITY_TLS_CLIENT_CA"),
        "{without_client_ca}"
    );

    let unused_clients = build(&|c| {
        c.verifiers.clients = VerifierClients::parse("gateway.internal").expect("names");
    })
    .await;
    assert!(
        unused_clients.contains("IDENTITY_VERIFY_CLIENTS"),
        "{unused_clients}"
    );

    assert_eq!(
        build(&|c| c.tls = Some(files.tls())).await,
        "",
        "a good configuration starts"
    );
}

/// The parties of a `VerifyToken` authorization test: a server with mutual
/// TLS whose allowed verifiers are `gateway.internal` and a SPIFFE ID, and
/// channels for an allowed DNS name (the app's own), an allowed URI, and a
/// certificate outside the set; Alice's token to verify; and a robot's
/// tokens with and without `tokens:verify`.
struct Verifiers {
    app: TestApp,
    mesh: Channel,
    outsider: Channel,
    alice_id: String,
    alice_pat: String,
    robot_id: String,
    with_scope: String,
    without_scope: String,
    /// The TLS files, kept for as long as the server reads them.
    _files: Files,
}

const GATEWAY_URI: &str = "spiffe://example.org/ns/prod/sa/gateway";

impl Verifiers {
    async fn start(backend: Backend, auth: VerifierMode) -> Self {
        let server_ca = Ca::new("server CA");
        let clients_ca = Ca::new("clients CA");
        let files = Files::new(&server_ca.server(1, SERVER_NAMES), Some(&clients_ca));
        let gateway = clients_ca.client(&["Gateway.Internal"], &[]);
        let mesh = clients_ca.client(&[], &[GATEWAY_URI]);
        let outsider = clients_ca.client(
            &["batch.internal"],
            &["spiffe://example.org/ns/prod/sa/batch"],
        );
        let app = spawn_tls(backend, &files, &server_ca, Some(&gateway), |config| {
            config.verifiers = VerifierRule {
                mode: auth,
                clients: if auth.needs_client() {
                    VerifierClients::parse(&format!("gateway.internal, {GATEWAY_URI}"))
                        .expect("names")
                } else {
                    VerifierClients::default()
                },
            };
        })
        .await;
        let connect = |client: &Issued| {
            tls_endpoint(app.addr, &server_ca, "localhost", Some(client)).connect_lazy()
        };
        let mesh = connect(&mesh);
        let outsider = connect(&outsider);

        let (alice, session) = app.person("alice").await;
        let (_, alice_pat) = app
            .token(&session, &alice.account_id, "cli", &["project:read"])
            .await;
        let robot = app.robot("gateway").await;
        let (_, with_scope) = app
            .token(
                &app.operator_token,
                &robot.account_id,
                "verifier",
                &["tokens:verify", "tokens:read"],
            )
            .await;
        let (_, without_scope) = app
            .token(
                &app.operator_token,
                &robot.account_id,
                "reader",
                &["tokens:read"],
            )
            .await;
        Self {
            app,
            mesh,
            outsider,
            alice_id: alice.account_id,
            alice_pat,
            robot_id: robot.account_id,
            with_scope,
            without_scope,
            _files: files,
        }
    }

    /// VerifyToken of Alice's token on `channel`, with `token` as the bearer
    /// credential if given.
    async fn verify(
        &self,
        channel: &Channel,
        token: Option<&str>,
    ) -> Result<pb::VerifyTokenResponse, tonic::Status> {
        let message = pb::VerifyTokenRequest {
            token: self.alice_pat.clone(),
            required_scopes: vec!["project:read".into()],
            ..Default::default()
        };
        let request = match token {
            Some(token) => bearer(message, token),
            None => tonic::Request::new(message),
        };
        TokensServiceClient::new(channel.clone())
            .verify_token(request)
            .await
            .map(tonic::Response::into_inner)
    }

    /// Asserts that the call answered that Alice's token is active.
    #[track_caller]
    fn assert_active(&self, result: Result<pb::VerifyTokenResponse, tonic::Status>) {
        let verdict = result.expect("VerifyToken answers");
        assert!(verdict.active, "{verdict:?}");
        assert_eq!(
            verdict.principal.expect("principal").account_id,
            self.alice_id
        );
    }

    /// Asserts that the outsider, refused VerifyToken whatever it sends,
    /// can still call another RPC with its bearer token.
    async fn assert_outsider_refused_but_served_otherwise(&self) {
        assert_status(
            self.verify(&self.outsider, Some(&self.with_scope)).await,
            Code::PermissionDenied,
            "ERROR_REASON_NOT_ALLOWED",
        );
        assert_status(
            self.verify(&self.outsider, None).await,
            Code::PermissionDenied,
            "ERROR_REASON_NOT_ALLOWED",
        );
        TokensServiceClient::new(self.outsider.clone())
            .list_tokens(bearer(
                pb::ListTokensRequest {
                    account_id: self.robot_id.clone(),
                    ..Default::default()
                },
                &self.with_scope,
            ))
            .await
            .expect("the outsider's other calls are served");
    }
}

/// Defines `name::sqlite` and `name::postgres`, each running `run(backend)`.
macro_rules! on_both_stores {
    ($name:ident, $run:path) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                $run(crate::support::Backend::Sqlite).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                $run(crate::support::Backend::Postgres).await;
            }
        }
    };
}

async fn scope_mode(backend: Backend) {
    let v = Verifiers::start(backend, VerifierMode::Scope).await;
    // Any client certificate the CA signed will do; the credential decides.
    v.assert_active(v.verify(&v.outsider, Some(&v.with_scope)).await);
    v.assert_active(v.verify(&v.app.channel, Some(&v.with_scope)).await);
    assert_status(
        v.verify(&v.app.channel, None).await,
        Code::Unauthenticated,
        "ERROR_REASON_CREDENTIAL_MISSING",
    );
    assert_status(
        v.verify(&v.app.channel, Some(&v.without_scope)).await,
        Code::PermissionDenied,
        "ERROR_REASON_SCOPE_MISSING",
    );
    v.app.stop().await;
}
on_both_stores!(
    verify_auth_scope_needs_the_scope_whatever_the_certificate,
    super::scope_mode
);

async fn client_mode(backend: Backend) {
    let v = Verifiers::start(backend, VerifierMode::Client).await;
    // An allowed certificate needs no credential: by DNS name (matched
    // without regard to case) or by URI.
    v.assert_active(v.verify(&v.app.channel, None).await);
    v.assert_active(v.verify(&v.mesh, None).await);
    // The authorization header is not read: a credential without the scope
    // changes nothing.
    v.assert_active(v.verify(&v.app.channel, Some(&v.without_scope)).await);
    v.assert_outsider_refused_but_served_otherwise().await;
    v.app.stop().await;
}
on_both_stores!(
    verify_auth_client_needs_an_allowed_certificate_instead,
    super::client_mode
);

async fn client_and_scope_mode(backend: Backend) {
    let v = Verifiers::start(backend, VerifierMode::ClientAndScope).await;
    v.assert_active(v.verify(&v.app.channel, Some(&v.with_scope)).await);
    v.assert_active(v.verify(&v.mesh, Some(&v.with_scope)).await);
    assert_status(
        v.verify(&v.app.channel, None).await,
        Code::Unauthenticated,
        "ERROR_REASON_CREDENTIAL_MISSING",
    );
    assert_status(
        v.verify(&v.app.channel, Some(&v.without_scope)).await,
        Code::PermissionDenied,
        "ERROR_REASON_SCOPE_MISSING",
    );
    v.assert_outsider_refused_but_served_otherwise().await;
    v.app.stop().await;
}
on_both_stores!(
    verify_auth_client_and_scope_needs_both,
    super::client_and_scope_mode
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_silent_after_the_handshake_is_closed_at_the_preface_timeout() {
    let ca = Ca::new("server CA");
    let files = Files::new(&ca.server(1, SERVER_NAMES), None);
    let app = spawn_tls(Backend::Sqlite, &files, &ca, None, |config| {
        config.connections.preface_timeout = Duration::from_millis(300);
    })
    .await;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(ca.issuer.der().clone())
        .expect("a CA certificate");
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(app.addr)
        .await
        .expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("a name");
    let mut stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("the handshake completes");
    // The server speaks first (its SETTINGS), then gives up on the preface.
    let closed = tokio::time::timeout(Duration::from_secs(30), async {
        let mut buf = [0_u8; 256];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "a connection without an HTTP/2 preface stays open"
    );
    app.stop().await;
}
