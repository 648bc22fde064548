//! The command line: `identity`'s commands and the settings each reads,
//! as clap parses them (from flags, the environment, and through
//! [`super::file`] a TOML file), and how each becomes a [`Config`]. The
//! binary (`main.rs`) parses these and dispatches.

use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use crate::{
    api::layers::forwarded::TrustedProxies,
    config::{self, Config, ConnectionLimits, ListenAddress, LogFormat, TlsFiles},
    domain::{
        IdentitySettings,
        password::PasswordPolicy,
        retention::RetentionSettings,
        throttle::{SignInRates, ThrottleSettings},
        verifier::{VerifierClients, VerifierMode, VerifierRule},
    },
    storage::{PoolOptions, SecretUrl},
};

/// A gRPC identity service: personal accounts, sessions and personal access
/// tokens.
#[derive(Debug, Parser)]
#[command(
    name = "identity",
    version = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("IDENTITY_BUILD_COMMIT"), ")"),
    subcommand_required = true
)]
pub struct Cli {
    /// A TOML file of settings, keyed by the flags' names with `_` for `-`
    /// (e.g. `listen_addr = "0.0.0.0:50051"`). Environment variables and
    /// flags override it; each command reads the keys it uses.
    #[arg(long, env = "IDENTITY_CONFIG", value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

/// The commands; each reads only the settings it uses (`--help` lists
/// them).
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve gRPC (the default when no command is given).
    Serve(Box<ServeSettings>),
    /// Apply database migrations and exit.
    Migrate(DatabaseCommand),
    /// Create an operator robot account if it does not exist, and print one
    /// new personal access token for it on stdout. The database must have
    /// its schema already (`identity migrate`, or a server started on it).
    BootstrapOperator(BootstrapOperator),
    /// Inspect the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate `serve`'s configuration (defaults, file, environment,
    /// flags) by every rule `serve` applies before it touches the network
    /// (TLS files read, the database URL understood, listen addresses
    /// resolved), and print the effective settings, secrets redacted, as a
    /// TOML file that `--config` accepts. Exits non-zero, naming the
    /// setting, if invalid.
    Check(Box<ServeSettings>),
}

/// The database a command works on.
#[derive(Debug, Clone, Args)]
pub struct DatabaseSettings {
    /// Database URL: postgres://user:password@host/db or sqlite:path.
    // Checked in `config`, not by clap, whose errors would echo the value
    // (and its password).
    #[arg(long, env = "DATABASE_URL", default_value = Config::DEFAULT_DATABASE_URL,
          hide_env_values = true)]
    database_url: String,
    /// Apply pending migrations at start-up.
    #[arg(long, env = "IDENTITY_MIGRATE", default_value_t = true, action = clap::ArgAction::Set)]
    migrate: bool,
    /// Most database connections per replica.
    #[arg(long, env = "IDENTITY_DB_MAX_CONNECTIONS", default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    db_max_connections: u32,
    /// How long a query waits for a free connection (e.g. 5s).
    #[arg(long, env = "IDENTITY_DB_ACQUIRE_TIMEOUT", default_value = "5s", value_parser = config::parse_duration)]
    db_acquire_timeout: Duration,
    /// Database connections per replica held by the token and session
    /// lookups (cache misses), beside the pool, batching concurrent misses;
    /// 0 (the default): each lookup uses the pool.
    #[arg(long, env = "IDENTITY_DB_LOOKUP_CONNECTIONS", default_value_t = 0,
          value_parser = clap::value_parser!(u32).range(0..=64))]
    db_lookup_connections: u32,
    /// PostgreSQL: keep statements prepared per connection (on), or send
    /// each unnamed, in a transaction of its own (off: for a pooler in
    /// transaction mode, such as PgBouncer).
    #[arg(long, env = "IDENTITY_DATABASE_STATEMENT_CACHE", default_value = "on",
          value_parser = config::parse_on_off, action = clap::ArgAction::Set)]
    database_statement_cache: bool,
    /// PostgreSQL: the connection for LISTEN, migrations and the retention
    /// lock (direct, or a session-mode pool); DATABASE_URL when unset.
    // Checked in `config`, as DATABASE_URL is.
    #[arg(long, env = "IDENTITY_DATABASE_LISTEN_URL", hide_env_values = true)]
    database_listen_url: Option<String>,
    /// PostgreSQL: a hot standby that cache-miss verifications may read
    /// from when it is fresh enough; every write goes to DATABASE_URL.
    // Checked in `config`, as DATABASE_URL is.
    #[arg(long, env = "IDENTITY_DATABASE_READ_URL", hide_env_values = true)]
    database_read_url: Option<String>,
    /// PostgreSQL: how replicas hear each other's changes: notify
    /// (LISTEN/NOTIFY) or poll (a table of changes each replica reads every
    /// poll interval, for engines without LISTEN/NOTIFY).
    #[arg(long, env = "IDENTITY_CHANGE_FEED", default_value = "notify",
          value_parser = config::parse_change_feed)]
    change_feed: config::ChangeFeedKind,
    /// How often a replica reads the table of changes with the polled feed
    /// (1ms to 250ms: the cache is trusted only up to 1s after a poll).
    #[arg(long, env = "IDENTITY_CHANGE_FEED_POLL_INTERVAL", default_value = "25ms",
          value_parser = config::parse_poll_interval)]
    change_feed_poll_interval: Duration,
}

/// How a command logs (to stderr).
#[derive(Debug, Clone, Args)]
pub struct LogSettings {
    /// Log filter, in tracing's EnvFilter syntax (e.g. info, identity=debug).
    #[arg(long, env = "IDENTITY_LOG", default_value = "info")]
    log: String,
    /// Log format: text (human-readable) or json (one object per line).
    #[arg(long, env = "IDENTITY_LOG_FORMAT", default_value = "text",
          value_parser = config::parse_log_format)]
    pub log_format: LogFormat,
}

/// `migrate`: the database and logging only.
#[derive(Debug, Clone, Args)]
pub struct DatabaseCommand {
    #[command(flatten)]
    pub database: DatabaseSettings,
    #[command(flatten)]
    pub logging: LogSettings,
}

/// `bootstrap-operator`: the database, logging, and the token limit it
/// is held to.
#[derive(Debug, Clone, Args)]
pub struct BootstrapOperator {
    /// The operator account's username.
    #[arg(long)]
    pub username: String,
    #[command(flatten)]
    database: DatabaseSettings,
    #[command(flatten)]
    pub logging: LogSettings,
    #[command(flatten)]
    tokens: TokenLimit,
}

/// The limit on an account's live tokens, which every token issued obeys.
#[derive(Debug, Clone, Args)]
pub struct TokenLimit {
    /// Most live tokens one account may have; CreateToken beyond it is
    /// refused with RESOURCE_EXHAUSTED (rotation is not).
    #[arg(long, env = "IDENTITY_MAX_TOKENS_PER_ACCOUNT", default_value_t = IdentitySettings::DEFAULT_MAX_TOKENS_PER_ACCOUNT,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    max_tokens_per_account: u32,
}

/// Everything `serve` reads (and `config check` checks); each flag mirrors
/// an environment variable.
#[derive(Debug, Clone, Args)]
pub struct ServeSettings {
    /// Address to serve gRPC on: host:port, the host an IP address or a
    /// name (bound to the first address it resolves to).
    #[arg(long, env = "IDENTITY_LISTEN_ADDR", default_value = Config::DEFAULT_LISTEN_ADDR,
          value_parser = ListenAddress::parse)]
    listen_addr: ListenAddress,
    #[command(flatten)]
    database: DatabaseSettings,
    #[command(flatten)]
    pub logging: LogSettings,
    #[command(flatten)]
    tokens: TokenLimit,
    /// Threads computing argon2 password hashes (default: cores minus one).
    #[arg(long, env = "IDENTITY_HASH_CONCURRENCY", value_parser = clap::value_parser!(u16).range(1..))]
    hash_concurrency: Option<u16>,
    /// How long a session lasts after sign-in (e.g. 12h).
    #[arg(long, env = "IDENTITY_SESSION_TTL", default_value = "12h", value_parser = config::parse_duration)]
    session_ttl: Duration,
    /// Fewest characters a new password may have.
    #[arg(long, env = "IDENTITY_PASSWORD_MIN_CHARS", default_value_t = 15,
          value_parser = clap::value_parser!(u16).range(8..=256))]
    password_min_chars: u16,
    /// Lifetime of a new token whose request names no expiry (e.g. 90d).
    #[arg(long, env = "IDENTITY_TOKEN_DEFAULT_TTL", default_value = "90d", value_parser = config::parse_duration)]
    token_default_ttl: Duration,
    /// Longest lifetime a new token may have (e.g. 365d).
    #[arg(long, env = "IDENTITY_TOKEN_MAX_TTL", default_value = "365d", value_parser = config::parse_duration)]
    token_max_ttl: Duration,
    /// Allow robot accounts tokens that never expire (CreateToken never_expires).
    #[arg(long, env = "IDENTITY_ALLOW_NON_EXPIRING_ROBOT_TOKENS", default_value_t = false,
          action = clap::ArgAction::Set)]
    allow_non_expiring_robot_tokens: bool,
    /// How long a rotated token keeps working after RotateToken (e.g. 5m).
    #[arg(long, env = "IDENTITY_ROTATION_GRACE", default_value = "0s", value_parser = config::parse_duration)]
    rotation_grace: Duration,
    /// Leak reports (RevokeLeakedToken) allowed per client address per minute.
    #[arg(long, env = "IDENTITY_LEAK_REPORTS_PER_MINUTE", default_value_t = 30,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    leak_reports_per_minute: u32,
    /// Consecutive failed sign-ins per username that cost no wait; each
    /// further failure makes the next attempt wait.
    #[arg(long, env = "IDENTITY_SIGN_IN_FREE_FAILURES", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(0..=100))]
    sign_in_free_failures: u32,
    /// Failed sign-ins per client address that cost no wait; each further
    /// failure makes the next attempt from it wait.
    #[arg(long, env = "IDENTITY_SIGN_IN_ADDRESS_FREE_FAILURES", default_value_t = 20,
          value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    sign_in_address_free_failures: u32,
    /// The first sign-in backoff delay; it doubles with each further failure (e.g. 1s).
    #[arg(long, env = "IDENTITY_SIGN_IN_BACKOFF_BASE", default_value = "1s", value_parser = config::parse_duration)]
    sign_in_backoff_base: Duration,
    /// The longest sign-in backoff delay (e.g. 15m).
    #[arg(long, env = "IDENTITY_SIGN_IN_BACKOFF_MAX", default_value = "15m", value_parser = config::parse_duration)]
    sign_in_backoff_max: Duration,
    /// Consecutive failed sign-ins after which password sign-in for a
    /// username stops until an operator's EnableAccount (at most 100).
    #[arg(long, env = "IDENTITY_SIGN_IN_LOCKOUT_FAILURES", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    sign_in_lockout_failures: u32,
    /// How long a client address's failed sign-ins are remembered after its
    /// last attempt (e.g. 24h).
    #[arg(long, env = "IDENTITY_SIGN_IN_ADDRESS_MEMORY", default_value = "24h", value_parser = config::parse_duration)]
    sign_in_address_memory: Duration,
    /// Password checks (sign-ins and ChangePassword, right or wrong) each
    /// replica starts per username per minute; more are refused with
    /// RESOURCE_EXHAUSTED before any hashing.
    #[arg(long, env = "IDENTITY_SIGN_IN_ACCOUNT_PER_MINUTE", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    sign_in_account_per_minute: u32,
    /// Password checks each replica starts per client address (IPv6: per
    /// /64) per minute.
    #[arg(long, env = "IDENTITY_SIGN_IN_ADDRESS_PER_MINUTE", default_value_t = 60,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    sign_in_address_per_minute: u32,
    /// Tokens each replica creates per account per minute (in bursts up to
    /// that many); more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "IDENTITY_TOKEN_CREATIONS_PER_MINUTE", default_value_t = IdentitySettings::DEFAULT_TOKEN_CREATIONS_PER_MINUTE,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    token_creations_per_minute: u32,
    /// Proxies (CIDR blocks, comma-separated, e.g. 10.0.0.0/8,fd00::/8)
    /// whose x-forwarded-for names the client address; empty: the header is
    /// ignored and the TCP peer is the client.
    // Checked in `validate`, not by clap, whose errors would echo the value.
    #[arg(
        long,
        env = "IDENTITY_TRUSTED_PROXIES",
        default_value = "",
        hide_env_values = true
    )]
    trusted_proxies: String,
    /// Verdicts the verification cache holds at most (0 turns it off).
    #[arg(long, env = "IDENTITY_CACHE_ENTRIES", default_value_t = 100_000)]
    cache_entries: usize,
    /// How long a cached verdict is trusted at most (e.g. 30s).
    #[arg(long, env = "IDENTITY_CACHE_TTL", default_value = "30s", value_parser = config::parse_duration)]
    cache_ttl: Duration,
    /// Calls served at once across all connections, each from the arrival
    /// of its whole request until its answer is produced; more are refused
    /// with RESOURCE_EXHAUSTED rather than queued.
    #[arg(long, env = "IDENTITY_MAX_CONCURRENT_REQUESTS", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_concurrent_requests: u32,
    /// Concurrent streams (calls) one HTTP/2 connection may open.
    #[arg(long, env = "IDENTITY_MAX_STREAMS_PER_CONNECTION", default_value_t = 128,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_streams_per_connection: u32,
    /// Longest a call may run before it is cancelled (e.g. 10s); a shorter
    /// grpc-timeout from the client wins.
    #[arg(long, env = "IDENTITY_REQUEST_TIMEOUT", default_value = "10s", value_parser = config::parse_duration)]
    request_timeout: Duration,
    /// Serve gRPC server reflection, so that grpcurl and buf curl need no
    /// .proto files. Turn off to expose only the API itself.
    #[arg(long, env = "IDENTITY_REFLECTION", default_value_t = true, action = clap::ArgAction::Set)]
    reflection: bool,
    /// Largest request message accepted, in bytes (at least 65536, so the
    /// largest legitimate request always fits); larger ones get
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "IDENTITY_MAX_MESSAGE_BYTES", default_value_t = Config::DEFAULT_MAX_MESSAGE_BYTES as u32,
          value_parser = clap::value_parser!(u32).range(65_536..=67_108_864))]
    max_message_bytes: u32,
    /// Async runtime worker threads (default: one per core).
    #[arg(long, env = "IDENTITY_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: Option<u16>,
    /// Largest tolerated offset between this replica's wall clock and the
    /// PostgreSQL server's (e.g. 1s): beyond it the replica reports
    /// NOT_SERVING and refuses calls until its clock is back within it.
    #[arg(long, env = "IDENTITY_MAX_CLOCK_SKEW", default_value = "1s", value_parser = config::parse_duration)]
    max_clock_skew: Duration,
    /// How long shutdown waits for in-flight calls (e.g. 30s).
    #[arg(long, env = "IDENTITY_DRAIN_TIMEOUT", default_value = "30s", value_parser = config::parse_duration)]
    drain_timeout: Duration,
    /// PEM file with the server's certificate chain, leaf first; with
    /// --tls-key, gRPC is served over TLS (plaintext when both are unset).
    #[arg(long, env = "IDENTITY_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// PEM file with the private key of the --tls-cert certificate.
    #[arg(long, env = "IDENTITY_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// PEM file with the CA certificates that sign client certificates;
    /// when set, every caller must present one (mutual TLS).
    #[arg(long, env = "IDENTITY_TLS_CLIENT_CA")]
    tls_client_ca: Option<PathBuf>,
    /// How often the TLS files are read again to pick up new ones (e.g. 10s).
    #[arg(long, env = "IDENTITY_TLS_RELOAD_INTERVAL", default_value = "10s", value_parser = config::parse_duration)]
    tls_reload_interval: Duration,
    /// Longest a client may take to complete the TLS handshake (e.g. 10s).
    #[arg(long, env = "IDENTITY_TLS_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = config::parse_duration)]
    tls_handshake_timeout: Duration,
    /// Who may call VerifyToken: scope (a credential with tokens:verify),
    /// client (a client certificate named in --verify-clients, no
    /// credential) or client-and-scope (both).
    #[arg(long, env = "IDENTITY_VERIFY_AUTH", default_value = "scope", value_parser = clap::value_parser!(VerifierMode))]
    verify_auth: VerifierMode,
    /// Client certificate names (DNS or URI SANs, comma-separated) allowed
    /// to call VerifyToken when --verify-auth is client or client-and-scope.
    #[arg(long, env = "IDENTITY_VERIFY_CLIENTS", default_value = "", value_parser = parse_verify_clients)]
    verify_clients: VerifierClients,
    /// Address to serve Prometheus metrics on (HTTP, /metrics), or off;
    /// the host an IP address or a name.
    #[arg(long, env = "IDENTITY_METRICS_ADDR", default_value = Config::DEFAULT_METRICS_ADDR,
          value_parser = parse_metrics_addr)]
    metrics_addr: MetricsAddr,
    /// Also serve grpc.health.v1.Health alone, in plaintext, on this address
    /// (e.g. 0.0.0.0:8081): for probes that cannot speak TLS, such as
    /// Kubernetes' native gRPC probes. Unset: health is served on the main
    /// port only.
    #[arg(long, env = "IDENTITY_HEALTH_LISTEN_ADDR", value_parser = ListenAddress::parse)]
    health_listen_addr: Option<ListenAddress>,
    /// Address to serve the Access Tokens web page on (over TLS when gRPC
    /// is), or off; the host an IP address or a name.
    #[arg(long, env = "IDENTITY_WEB_ADDR", default_value = Config::DEFAULT_WEB_ADDR, value_parser = parse_metrics_addr)]
    web_addr: MetricsAddr,
    /// The origin browsers reach the web page at, e.g.
    /// https://id.example.com behind a TLS-terminating proxy: the page
    /// answers to that host alone, accepts forms from that origin alone, and
    /// over https:// marks its cookies Secure. Unset: its own address (over
    /// plaintext, to IP addresses and localhost only).
    #[arg(long, env = "IDENTITY_WEB_ORIGIN", value_parser = crate::web::PublicOrigin::parse)]
    web_origin: Option<crate::web::PublicOrigin>,
    /// How long sessions, tokens and sign-in counters are kept after they
    /// stopped working (e.g. 30d), or off to keep them for ever.
    #[arg(long, env = "IDENTITY_RETENTION", default_value = "30d",
          value_parser = config::parse_retention)]
    retention: Retention,
    /// How long audit events are kept (e.g. 400d), or off to keep them for
    /// ever.
    #[arg(long, env = "IDENTITY_AUDIT_RETENTION", default_value = "400d",
          value_parser = config::parse_retention)]
    audit_retention: Retention,
    /// How often what is past retention is purged (e.g. 1h).
    #[arg(long, env = "IDENTITY_RETENTION_INTERVAL", default_value = "1h",
          value_parser = config::parse_duration)]
    retention_interval: Duration,
    /// Connections each listener keeps open at once; more are closed at
    /// accept.
    #[arg(long, env = "IDENTITY_MAX_CONNECTIONS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    max_connections: u32,
    /// How long a connection may stay open with no call in flight before it
    /// is closed (e.g. 5m).
    #[arg(long, env = "IDENTITY_IDLE_TIMEOUT", default_value = "5m", value_parser = config::parse_duration)]
    idle_timeout: Duration,
    /// How long a new connection may take to send the HTTP/2 preface, after
    /// any TLS handshake (e.g. 10s).
    #[arg(long, env = "IDENTITY_PREFACE_TIMEOUT", default_value = "10s", value_parser = config::parse_duration)]
    preface_timeout: Duration,
    /// Health Check calls each listener serves at once, and open Watch
    /// streams and open reflection streams each as a budget of its own,
    /// apart from the API's limit; more are refused with
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "IDENTITY_MAX_HEALTH_REQUESTS", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    max_health_requests: u32,
}

/// A retention: how long, or `None` for ever (`off`).
type Retention = Option<Duration>;

/// `--metrics-addr` and `--web-addr`: an address, or none when off.
#[derive(Debug, Clone)]
struct MetricsAddr(Option<ListenAddress>);

fn parse_metrics_addr(raw: &str) -> Result<MetricsAddr, String> {
    match raw.trim() {
        "" | "off" => Ok(MetricsAddr(None)),
        addr => ListenAddress::parse(addr)
            .map(|addr| MetricsAddr(Some(addr)))
            .map_err(|why| format!("{why}; or off")),
    }
}

/// `--verify-clients`: [`VerifierClients::parse`], its refusal naming the bad
/// entry by its position (1 for the first, counting every comma) rather
/// than repeating it.
fn parse_verify_clients(raw: &str) -> Result<VerifierClients, String> {
    for (i, entry) in raw.split(',').enumerate() {
        if VerifierClients::parse(entry).is_err() {
            return Err(format!(
                "entry {} must be a client name of printable ASCII without spaces",
                i + 1
            ));
        }
    }
    VerifierClients::parse(raw).map_err(|_| "the list cannot be used".to_owned())
}

/// How a message names a setting: by where its value came from (see
/// [`config::file::Layered::origin`]).
pub type Origin<'a> = dyn Fn(&str) -> String + 'a;

impl DatabaseSettings {
    /// The defaults with this database, its URL checked.
    pub fn config(&self, origin: &Origin<'_>) -> Result<Config, String> {
        config::parse_database_url(&self.database_url)
            .map_err(|why| format!("{}: {why}", origin("database_url")))?;
        let mut config = Config::with_database(self.database_url.clone());
        config.migrate = self.migrate;
        if let Some(listen_url) = &self.database_listen_url {
            config::parse_listen_url(listen_url, &self.database_url)
                .map_err(|why| format!("{}: {why}", origin("database_listen_url")))?;
        }
        if let Some(read_url) = &self.database_read_url {
            config::parse_listen_url(read_url, &self.database_url)
                .map_err(|why| format!("{}: {why}", origin("database_read_url")))?;
        }
        config::check_pooler_settings(
            &self.database_url,
            self.database_statement_cache,
            self.database_listen_url.is_some(),
        )
        .map_err(|why| format!("{}: {why}", origin("database_statement_cache")))?;
        let change_feed = config::change_feed(
            &self.database_url,
            self.change_feed,
            self.change_feed_poll_interval,
        )
        .map_err(|why| format!("{}: {why}", origin("change_feed")))?;
        // The polled feed carries no WAL positions yet, which a standby's
        // answers are held to (README, "Read replicas").
        if self.database_read_url.is_some()
            && matches!(change_feed, crate::storage::ChangeFeed::Poll { .. })
        {
            return Err(format!(
                "{} needs {} = notify: the polled change feed does not yet carry the primary's \
                 WAL positions a standby's answers are held to",
                origin("database_read_url"),
                origin("change_feed"),
            ));
        }
        config.pool = PoolOptions {
            max_connections: self.db_max_connections,
            acquire_timeout: self.db_acquire_timeout,
            lookup_connections: self.db_lookup_connections,
            statement_cache: self.database_statement_cache,
            listen_url: self.database_listen_url.clone().map(SecretUrl::new),
            read_url: self.database_read_url.clone().map(SecretUrl::new),
            change_feed,
        };
        Ok(config)
    }
}

impl LogSettings {
    /// The log filter, checked.
    pub fn filter(&self, origin: &Origin<'_>) -> Result<EnvFilter, String> {
        EnvFilter::try_new(&self.log).map_err(|err| format!("{}: {err}", origin("log")))
    }
}

impl BootstrapOperator {
    pub fn config(&self, origin: &Origin<'_>) -> Result<Config, String> {
        let mut config = self.database.config(origin)?;
        config.identity.max_tokens_per_account = self.tokens.max_tokens_per_account;
        Ok(config)
    }
}

impl ServeSettings {
    /// The server's configuration: the cross-setting rules that flags
    /// alone cannot express checked, and the listen addresses resolved.
    pub fn config(&self, origin: &Origin<'_>) -> Result<Config, String> {
        self.validate(origin)?;
        let resolve = |id: &str, addr: &ListenAddress| {
            addr.resolve()
                .map_err(|why| format!("{}: {why}", origin(id)))
        };
        let mut config = self.database.config(origin)?;
        config.listen_addr = resolve("listen_addr", &self.listen_addr)?;
        if let Some(n) = self.hash_concurrency {
            config.hash_concurrency = usize::from(n);
        }
        config.identity = IdentitySettings {
            session_ttl: self.session_ttl,
            password_policy: PasswordPolicy {
                min_chars: usize::from(self.password_min_chars),
                ..PasswordPolicy::default()
            },
            token_default_ttl: self.token_default_ttl,
            token_max_ttl: self.token_max_ttl,
            allow_non_expiring_robot_tokens: self.allow_non_expiring_robot_tokens,
            rotation_grace: self.rotation_grace,
            cache_entries: self.cache_entries,
            cache_ttl: self.cache_ttl,
            sign_in_throttle: ThrottleSettings {
                account_free_failures: self.sign_in_free_failures,
                address_free_failures: self.sign_in_address_free_failures,
                base_delay: self.sign_in_backoff_base,
                max_delay: self.sign_in_backoff_max,
                lockout_failures: self.sign_in_lockout_failures,
                address_memory: self.sign_in_address_memory,
            },
            sign_in_rates: SignInRates {
                account_per_minute: self.sign_in_account_per_minute,
                address_per_minute: self.sign_in_address_per_minute,
            },
            max_tokens_per_account: self.tokens.max_tokens_per_account,
            token_creations_per_minute: self.token_creations_per_minute,
        };
        config.max_concurrent_requests = self.max_concurrent_requests;
        config.max_streams_per_connection = self.max_streams_per_connection;
        config.request_timeout = self.request_timeout;
        config.reflection = self.reflection;
        config.max_message_bytes = self.max_message_bytes as usize;
        config.drain_timeout = self.drain_timeout;
        config.max_clock_skew = self.max_clock_skew;
        config.leak_reports_per_minute = self.leak_reports_per_minute;
        // `validate` has checked that the certificate and key come together.
        config.tls = self
            .tls_cert
            .clone()
            .zip(self.tls_key.clone())
            .map(|(cert, key)| TlsFiles {
                cert,
                key,
                client_ca: self.tls_client_ca.clone(),
            });
        config.tls_reload_interval = self.tls_reload_interval;
        config.tls_handshake_timeout = self.tls_handshake_timeout;
        config.verifiers = VerifierRule {
            mode: self.verify_auth,
            clients: self.verify_clients.clone(),
        };
        // `validate` has checked the list; nothing is trusted otherwise.
        config.trusted_proxies = TrustedProxies::parse(&self.trusted_proxies).unwrap_or_default();
        config.metrics_addr = match &self.metrics_addr.0 {
            Some(addr) => Some(resolve("metrics_addr", addr)?),
            None => None,
        };
        config.health_listen_addr = match &self.health_listen_addr {
            Some(addr) => Some(resolve("health_listen_addr", addr)?),
            None => None,
        };
        config.web_addr = match &self.web_addr.0 {
            Some(addr) => Some(resolve("web_addr", addr)?),
            None => None,
        };
        config.web_origin = self.web_origin.clone();
        config.connections = ConnectionLimits {
            max_connections: self.max_connections as usize,
            idle_timeout: self.idle_timeout,
            preface_timeout: self.preface_timeout,
            max_health_requests: self.max_health_requests as usize,
        };
        config.log_format = self.logging.log_format;
        config.retention = RetentionSettings {
            credentials: self.retention,
            audit: self.audit_retention,
            interval: self.retention_interval,
            ..RetentionSettings::default()
        };
        Ok(config)
    }

    /// Cross-setting checks that flags alone cannot express, naming each
    /// setting by `origin`.
    fn validate(&self, origin: &Origin<'_>) -> Result<(), String> {
        let positive = |id: &str, value: Duration| {
            if value.is_zero() {
                Err(format!("{} must be positive", origin(id)))
            } else {
                Ok(())
            }
        };
        if self.token_default_ttl > self.token_max_ttl {
            return Err(format!(
                "{} must not exceed {}",
                origin("token_default_ttl"),
                origin("token_max_ttl")
            ));
        }
        positive("token_default_ttl", self.token_default_ttl)?;
        positive("max_clock_skew", self.max_clock_skew)?;
        positive("request_timeout", self.request_timeout)?;
        positive("sign_in_backoff_base", self.sign_in_backoff_base)?;
        if self.sign_in_backoff_max < self.sign_in_backoff_base
            || self.sign_in_backoff_max > Duration::from_secs(7 * 24 * 60 * 60)
        {
            return Err(format!(
                "{} must be between {} and 7d",
                origin("sign_in_backoff_max"),
                origin("sign_in_backoff_base")
            ));
        }
        if self.sign_in_address_memory < self.sign_in_backoff_max {
            return Err(format!(
                "{} must not be shorter than {}",
                origin("sign_in_address_memory"),
                origin("sign_in_backoff_max")
            ));
        }
        positive("retention_interval", self.retention_interval)?;
        TrustedProxies::parse(&self.trusted_proxies)
            .map_err(|why| format!("{}: {why}", origin("trusted_proxies")))?;
        positive("idle_timeout", self.idle_timeout)?;
        positive("preface_timeout", self.preface_timeout)?;
        positive("session_ttl", self.session_ttl)?;
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(format!(
                "{} and {} go together: set both or neither",
                origin("tls_cert"),
                origin("tls_key")
            ));
        }
        if self.tls_client_ca.is_some() && self.tls_cert.is_none() {
            return Err(format!(
                "{} needs {} and {}",
                origin("tls_client_ca"),
                origin("tls_cert"),
                origin("tls_key")
            ));
        }
        Ok(())
    }
}
