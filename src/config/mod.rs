//! The service's configuration: one typed value, built by the command line
//! (defaults, an optional TOML file, `IDENTITY_*` environment variables and
//! flags: see [`cli`] and [`file`]) or directly by tests. Each setting is validated where it is parsed, and a bad one
//! fails start-up with a message that names it.

pub mod cli;
pub mod file;
mod parse;
mod redact;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use crate::{
    api::layers::forwarded::TrustedProxies,
    domain::{
        IdentitySettings,
        retention::RetentionSettings,
        verifier::{VerifierMode, VerifierRule},
    },
    storage::PoolOptions,
};

pub use parse::{
    ChangeFeedKind, ListenAddress, change_feed, check_pooler_settings, parse_change_feed,
    parse_database_url, parse_duration, parse_listen_url, parse_log_format, parse_metrics_addr,
    parse_on_off, parse_poll_interval, parse_retention,
};
pub(crate) use redact::redact_url;
pub use redact::redact_url_secrets;

/// Everything the server needs to start.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where to listen for gRPC (use port 0 for any free port).
    pub listen_addr: SocketAddr,
    /// Which database: `postgres://…`, `postgresql://…` or `sqlite:<path>`.
    /// May hold a password, so it is never logged whole.
    pub database_url: String,
    /// Apply pending migrations at start-up.
    pub migrate: bool,
    /// Database connection pool settings.
    pub pool: PoolOptions,
    /// Most argon2 hashes computed at once; further sign-ins queue.
    pub hash_concurrency: usize,
    /// Domain rules: session lifetime, password policy.
    pub identity: IdentitySettings,
    /// How long shutdown waits for in-flight calls before giving up.
    pub drain_timeout: Duration,
    /// How often the database is probed for the health service.
    pub health_interval: Duration,
    /// Largest tolerated offset between this replica's wall clock and the
    /// database's (PostgreSQL), measured at start-up and on every health
    /// probe: beyond it the replica reports NOT_SERVING.
    pub max_clock_skew: Duration,
    /// Leak reports (`RevokeLeakedToken`) allowed per client address per
    /// minute.
    pub leak_reports_per_minute: u32,
    /// Calls served at once; more are shed with RESOURCE_EXHAUSTED.
    pub max_concurrent_requests: u32,
    /// Concurrent HTTP/2 streams per connection.
    pub max_streams_per_connection: u32,
    /// Longest a call may run.
    pub request_timeout: Duration,
    /// Serve gRPC server reflection (v1 and v1alpha), so that clients such
    /// as grpcurl need no `.proto` files.
    pub reflection: bool,
    /// Serve gRPC over TLS with these files; plaintext when `None`.
    pub tls: Option<TlsFiles>,
    /// How often the TLS files are read again to pick up new certificates.
    pub tls_reload_interval: Duration,
    /// Longest a client may take to complete its TLS handshake.
    pub tls_handshake_timeout: Duration,
    /// Who may call `VerifyToken` (the verifier rule).
    pub verifiers: VerifierRule,
    /// The proxies whose `x-forwarded-for` names the client address
    /// (`IDENTITY_TRUSTED_PROXIES`); empty: the TCP peer is the client.
    pub trusted_proxies: TrustedProxies,
    /// Largest request message accepted, in bytes; larger ones are refused
    /// with RESOURCE_EXHAUSTED before they are read.
    pub max_message_bytes: usize,
    /// Where to serve Prometheus metrics over HTTP (`/metrics`), apart from
    /// gRPC; `None` turns metrics off (no recorder, no listener).
    pub metrics_addr: Option<SocketAddr>,
    /// How log lines are written.
    pub log_format: LogFormat,
    /// Where to serve `grpc.health.v1.Health` alone, in plaintext, besides
    /// the main port: for probes that cannot speak TLS. `None`: nowhere.
    pub health_listen_addr: Option<SocketAddr>,
    /// Where to serve the Access Tokens web page (`src/web`), over TLS when
    /// gRPC is; `None` turns it off. The binary's default is
    /// [`Self::DEFAULT_WEB_ADDR`]; a `Config` built in code has it off.
    pub web_addr: Option<SocketAddr>,
    /// The origin browsers reach the web page at (`IDENTITY_WEB_ORIGIN`),
    /// e.g. behind a TLS-terminating proxy; `None`: its own address.
    pub web_origin: Option<crate::web::PublicOrigin>,
    /// What is purged when, and how often (see `domain::retention`).
    pub retention: RetentionSettings,
    /// What one listener lets its clients hold: connections, idle time,
    /// health calls.
    pub connections: ConnectionLimits,
}

/// Limits that apply to each listener (the main port and the plaintext
/// health port) separately.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections open at once (TLS handshakes included); one more is
    /// closed at accept.
    pub max_connections: usize,
    /// How long a connection may stay open with no call in flight before
    /// the server closes it (gracefully, with GOAWAY).
    pub idle_timeout: Duration,
    /// How long a new connection (after its TLS handshake) may take to send
    /// the HTTP/2 preface.
    pub preface_timeout: Duration,
    /// Health Check calls served at once, and open Watch streams and open
    /// reflection streams each as a budget of its own.
    pub max_health_requests: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            idle_timeout: Duration::from_secs(300),
            preface_timeout: Duration::from_secs(10),
            max_health_requests: 256,
        }
    }
}

/// The PEM files TLS is served from. They are read at start-up and again
/// every `tls_reload_interval`, so replacing them rotates the certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain, leaf first (`IDENTITY_TLS_CERT`).
    pub cert: PathBuf,
    /// The leaf's private key: PKCS#8, PKCS#1 or SEC1 (`IDENTITY_TLS_KEY`).
    pub key: PathBuf,
    /// CA certificates that sign the client certificates callers must
    /// present (`IDENTITY_TLS_CLIENT_CA`); `None` asks for none.
    pub client_ca: Option<PathBuf>,
}

/// How log lines are written (to stderr).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (coloured on a terminal).
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// How an error names the setting `id` (a flag's name with `_` for `-`)
/// when it does not know where the value came from: its environment
/// variable and its flag, as in `IDENTITY_CACHE_TTL (--cache-ttl)`. The
/// command line names each setting by where it was given instead.
pub fn setting_name(id: &str) -> String {
    let env = if id == "database_url" {
        "DATABASE_URL".to_owned()
    } else {
        format!("IDENTITY_{}", id.to_ascii_uppercase())
    };
    format!("{env} (--{})", id.replace('_', "-"))
}

impl Config {
    /// The listen address of a fresh `cargo run`.
    pub const DEFAULT_LISTEN_ADDR: &str = "127.0.0.1:50051";
    /// The database of a fresh `cargo run`: a SQLite file in the working
    /// directory.
    pub const DEFAULT_DATABASE_URL: &str = "sqlite:identity.db";
    /// The request size limit of a fresh `cargo run`: 128 KiB. The largest
    /// legitimate request, a leak report of 1000 credentials, is about
    /// 46 KB.
    pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 128 * 1024;
    /// Where a fresh `cargo run` serves metrics: loopback only, since the
    /// endpoint has no authentication.
    pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9464";
    /// Where a fresh `cargo run` serves the Access Tokens page: loopback.
    pub const DEFAULT_WEB_ADDR: &str = "127.0.0.1:8080";

    /// The defaults, with `database_url` in place of the default database.
    pub fn with_database(database_url: impl Into<String>) -> Self {
        Self {
            listen_addr: Self::DEFAULT_LISTEN_ADDR
                .parse()
                .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 50051))),
            database_url: database_url.into(),
            migrate: true,
            pool: PoolOptions::default(),
            hash_concurrency: default_hash_concurrency(),
            identity: IdentitySettings::default(),
            drain_timeout: Duration::from_secs(30),
            health_interval: Duration::from_secs(2),
            max_clock_skew: Duration::from_secs(1),
            leak_reports_per_minute: 30,
            max_concurrent_requests: 1024,
            max_streams_per_connection: 128,
            request_timeout: Duration::from_secs(10),
            reflection: true,
            tls: None,
            tls_reload_interval: Duration::from_secs(10),
            tls_handshake_timeout: Duration::from_secs(10),
            verifiers: VerifierRule::default(),
            trusted_proxies: TrustedProxies::default(),
            max_message_bytes: Self::DEFAULT_MAX_MESSAGE_BYTES,
            metrics_addr: parse_metrics_addr(Self::DEFAULT_METRICS_ADDR).unwrap_or(None),
            log_format: LogFormat::Text,
            health_listen_addr: None,
            web_addr: None,
            web_origin: None,
            retention: RetentionSettings::default(),
            connections: ConnectionLimits::default(),
        }
    }

    /// Checks the TLS and `VerifyToken` settings against each other: a
    /// message naming the settings (by [`setting_name`]) when they disagree.
    pub fn check_tls(&self) -> Result<(), String> {
        self.check_tls_naming(&setting_name)
    }

    /// [`Self::check_tls`], naming each setting by `name(id)`: the command
    /// line passes a `name` that says where each value came from.
    pub fn check_tls_naming(&self, name: &dyn Fn(&str) -> String) -> Result<(), String> {
        if self.tls_reload_interval.is_zero() {
            return Err(format!("{} must be positive", name("tls_reload_interval")));
        }
        if self.tls_handshake_timeout.is_zero() {
            return Err(format!(
                "{} must be positive",
                name("tls_handshake_timeout")
            ));
        }
        if self.tls.is_some()
            && let Some(origin) = self.web_origin.as_ref().filter(|o| !o.is_https())
        {
            return Err(format!(
                "{} = {origin} is plaintext, but the web page is served over TLS (with {} and \
                 {}): use https://",
                name("web_origin"),
                name("tls_cert"),
                name("tls_key"),
            ));
        }
        let auth = self.verifiers.mode;
        let mutual = self.tls.as_ref().is_some_and(|t| t.client_ca.is_some());
        if auth.needs_client() && !mutual {
            return Err(format!(
                "{} = {auth} needs client certificates: set {}, with {} and {}",
                name("verify_auth"),
                name("tls_client_ca"),
                name("tls_cert"),
                name("tls_key"),
            ));
        }
        if auth.needs_client() && self.verifiers.clients.is_empty() {
            return Err(format!(
                "{} = {auth} needs {}: the client certificate names allowed to call VerifyToken",
                name("verify_auth"),
                name("verify_clients"),
            ));
        }
        if auth == VerifierMode::Scope && !self.verifiers.clients.is_empty() {
            return Err(format!(
                "{} is used only when {} is client or client-and-scope",
                name("verify_clients"),
                name("verify_auth"),
            ));
        }
        Ok(())
    }

    /// Checks that no two listeners (gRPC, metrics, plaintext health, web) would
    /// take the same port: a message naming both settings by `name(id)`.
    pub fn check_listeners_naming(&self, name: &dyn Fn(&str) -> String) -> Result<(), String> {
        let listeners = [
            ("listen_addr", Some(self.listen_addr)),
            ("metrics_addr", self.metrics_addr),
            ("health_listen_addr", self.health_listen_addr),
            ("web_addr", self.web_addr),
        ];
        for (i, (first, a)) in listeners.iter().enumerate() {
            for (second, b) in &listeners[i + 1..] {
                if let (Some(a), Some(b)) = (a, b)
                    && listeners_collide(*a, *b)
                {
                    return Err(format!(
                        "{} and {} would listen on the same port: give each its own",
                        name(first),
                        name(second)
                    ));
                }
            }
        }
        Ok(())
    }

    /// The database URL with any password replaced, for logs.
    pub fn redacted_database_url(&self) -> String {
        redact_url(&self.database_url)
    }

    /// `text` (an error message about the database, say) with every secret
    /// of the database URL replaced by `***`.
    pub fn redact_database_secrets(&self, text: &str) -> String {
        let text = redact_url_secrets(text, &self.database_url);
        let text = match &self.pool.listen_url {
            Some(listen_url) => redact_url_secrets(&text, listen_url.expose()),
            None => text,
        };
        match &self.pool.read_url {
            Some(read_url) => redact_url_secrets(&text, read_url.expose()),
            None => text,
        }
    }
}

/// Whether two listen addresses (resolved) cannot both be bound: the same
/// port, not 0 (any free port), and addresses that overlap: equal, or
/// either the unspecified address of the other's family. `[::]` overlaps
/// every IPv4 address too, since an IPv6 socket bound to it also accepts
/// IPv4 (the default on Linux).
pub fn listeners_collide(a: SocketAddr, b: SocketAddr) -> bool {
    if a.port() == 0 || a.port() != b.port() {
        return false;
    }
    let (a, b) = (a.ip(), b.ip());
    a == b
        || (a.is_unspecified() && (a.is_ipv6() || a.is_ipv4() == b.is_ipv4()))
        || (b.is_unspecified() && (b.is_ipv6() || a.is_ipv4() == b.is_ipv4()))
}

/// One argon2 hash per core but one: hashing is CPU-bound, and a flood of
/// sign-ins must leave a core for verification, the hot path.
pub fn default_hash_concurrency() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("12h"), Ok(Duration::from_secs(43_200)));
        for bad in ["", "12", "h", "1.5h", "-1s", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn listeners_collide_on_one_port_and_overlapping_addresses() {
        let at = |raw: &str| raw.parse::<SocketAddr>().expect("address");
        for (a, b) in [
            ("127.0.0.1:5", "127.0.0.1:5"),
            ("0.0.0.0:5", "127.0.0.1:5"),
            ("127.0.0.1:5", "0.0.0.0:5"),
            ("[::]:5", "[::1]:5"),
            ("[::]:5", "127.0.0.1:5"),
        ] {
            assert!(listeners_collide(at(a), at(b)), "{a} {b}");
        }
        for (a, b) in [
            ("127.0.0.1:0", "127.0.0.1:0"),
            ("127.0.0.1:5", "127.0.0.1:6"),
            ("127.0.0.1:5", "127.0.0.2:5"),
            ("[::1]:5", "127.0.0.1:5"),
            ("0.0.0.0:5", "[::1]:5"),
        ] {
            assert!(!listeners_collide(at(a), at(b)), "{a} {b}");
        }
        assert!(ListenAddress::parse("[fe80::1%1]:50077").is_err());
        assert!(ListenAddress::parse("[fe80::1%eth0]:50077").is_err());
    }

    #[test]
    fn database_urls_are_checked_and_redacted() {
        assert!(parse_database_url("sqlite:x.db").is_ok());
        assert!(parse_database_url("mysql://x").is_err());
        assert_eq!(
            redact_url("postgres://app:hunter2@db:5432/identity"),
            "postgres://app:***@db:5432/identity"
        );
        assert_eq!(
            redact_url("postgres://app@db/identity"),
            "postgres://app@db/identity"
        );
        assert_eq!(redact_url("sqlite:identity.db"), "sqlite:identity.db");
    }

    #[test]
    fn passwords_in_the_query_are_redacted_too() {
        assert_eq!(
            redact_url(
                "postgres://identity@db/identity?sslmode=require&password=s3cret&sslpassword=k3y"
            ),
            "postgres://identity@db/identity?sslmode=require&password=***&sslpassword=***"
        );
        assert_eq!(
            redact_url("postgres://u:p%40ss@db/x?PassWord=a&%70assword=b#frag"),
            "postgres://u:***@db/x?PassWord=***&%70assword=***#frag"
        );
        // Unescaped '#', '/' and '?' in a password (an invalid URL, which
        // is then reported with the URL itself).
        for url in [
            "postgres://identity:Pg-s3c#retpw@127.0.0.1:55433/identity",
            "postgres://identity:a/b?c#dpw@db/x?sslmode=require",
        ] {
            let redacted = redact_url(url);
            assert!(
                redacted.starts_with("postgres://identity:***@"),
                "{redacted}"
            );
            for part in ["s3c", "retpw", "a/b", "dpw"] {
                assert!(!redacted.contains(part), "{part} in {redacted}");
            }
            let message = format!("invalid port number in {url}");
            assert!(
                !redact_url_secrets(&message, url).contains("pw"),
                "{message}"
            );
        }
        let url = "postgres://u:p%40ssw0rd@db/x?password=q%2Bpw+1";
        let message = format!("cannot connect to {url}: bad p@ssw0rd or q+pw 1 or q%2Bpw+1");
        let redacted = redact_url_secrets(&message, url);
        for secret in ["p@ssw0rd", "p%40ssw0rd", "q+pw 1", "q%2Bpw+1"] {
            assert!(!redacted.contains(secret), "{secret} in {redacted}");
        }
    }
}
