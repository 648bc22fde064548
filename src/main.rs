//! The `identity` command: `serve` (the default), `migrate`, and
//! `bootstrap-operator`. Reads the configuration from flags and environment
//! variables, sets up logging, and hands over to [`identity::app`].

#![forbid(unsafe_code)]

use std::{net::SocketAddr, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand};
use identity::{
    app::{self, App},
    config::{self, Config, LogFormat},
    domain::{Identity, IdentitySettings, account::Username, password::PasswordPolicy},
    storage::PoolOptions,
};
use tracing_subscriber::EnvFilter;

/// A gRPC identity service: personal accounts, sessions and personal access
/// tokens.
#[derive(Debug, Parser)]
#[command(name = "identity", version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    settings: Settings,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve gRPC (the default when no command is given).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Create an operator robot account if it does not exist, and print one
    /// new personal access token for it on stdout.
    BootstrapOperator {
        /// The operator account's username.
        #[arg(long)]
        username: String,
    },
}

/// Settings shared by every command; each flag mirrors an environment
/// variable.
#[derive(Debug, Args)]
struct Settings {
    /// Address to serve gRPC on.
    #[arg(long, env = "IDENTITY_LISTEN_ADDR", default_value = Config::DEFAULT_LISTEN_ADDR, global = true)]
    listen_addr: SocketAddr,
    /// Database URL: postgres://user:password@host/db or sqlite:path.
    // Checked in `validate`, not by clap, whose errors would echo the value
    // (and its password).
    #[arg(long, env = "DATABASE_URL", default_value = Config::DEFAULT_DATABASE_URL,
          global = true, hide_env_values = true)]
    database_url: String,
    /// Apply pending migrations at start-up.
    #[arg(long, env = "IDENTITY_MIGRATE", default_value_t = true, action = clap::ArgAction::Set, global = true)]
    migrate: bool,
    /// Most database connections per replica.
    #[arg(long, env = "IDENTITY_DB_MAX_CONNECTIONS", default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..=1000), global = true)]
    db_max_connections: u32,
    /// How long a query waits for a free connection (e.g. 5s).
    #[arg(long, env = "IDENTITY_DB_ACQUIRE_TIMEOUT", default_value = "5s", value_parser = config::parse_duration, global = true)]
    db_acquire_timeout: Duration,
    /// Threads computing argon2 password hashes (default: cores minus one).
    #[arg(long, env = "IDENTITY_HASH_CONCURRENCY", value_parser = clap::value_parser!(u16).range(1..), global = true)]
    hash_concurrency: Option<u16>,
    /// How long a session lasts after sign-in (e.g. 12h).
    #[arg(long, env = "IDENTITY_SESSION_TTL", default_value = "12h", value_parser = config::parse_duration, global = true)]
    session_ttl: Duration,
    /// Fewest characters a new password may have.
    #[arg(long, env = "IDENTITY_PASSWORD_MIN_CHARS", default_value_t = 15,
          value_parser = clap::value_parser!(u16).range(8..=256), global = true)]
    password_min_chars: u16,
    /// Lifetime of a new token whose request names no expiry (e.g. 90d).
    #[arg(long, env = "IDENTITY_TOKEN_DEFAULT_TTL", default_value = "90d", value_parser = config::parse_duration, global = true)]
    token_default_ttl: Duration,
    /// Longest lifetime a new token may have (e.g. 365d).
    #[arg(long, env = "IDENTITY_TOKEN_MAX_TTL", default_value = "365d", value_parser = config::parse_duration, global = true)]
    token_max_ttl: Duration,
    /// Allow robot accounts tokens that never expire (CreateToken never_expires).
    #[arg(long, env = "IDENTITY_ALLOW_NON_EXPIRING_ROBOT_TOKENS", default_value_t = false,
          action = clap::ArgAction::Set, global = true)]
    allow_non_expiring_robot_tokens: bool,
    /// How long a rotated token keeps working after RotateToken (e.g. 5m).
    #[arg(long, env = "IDENTITY_ROTATION_GRACE", default_value = "0s", value_parser = config::parse_duration, global = true)]
    rotation_grace: Duration,
    /// Leak reports (RevokeLeakedToken) allowed per client address per minute.
    #[arg(long, env = "IDENTITY_LEAK_REPORTS_PER_MINUTE", default_value_t = 30,
          value_parser = clap::value_parser!(u32).range(1..=100_000), global = true)]
    leak_reports_per_minute: u32,
    /// Verdicts the verification cache holds at most (0 turns it off).
    #[arg(
        long,
        env = "IDENTITY_CACHE_ENTRIES",
        default_value_t = 100_000,
        global = true
    )]
    cache_entries: usize,
    /// How long a cached verdict is trusted at most (e.g. 30s).
    #[arg(long, env = "IDENTITY_CACHE_TTL", default_value = "30s", value_parser = config::parse_duration, global = true)]
    cache_ttl: Duration,
    /// Calls served at once across all connections; more are refused with
    /// RESOURCE_EXHAUSTED rather than queued.
    #[arg(long, env = "IDENTITY_MAX_CONCURRENT_REQUESTS", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..), global = true)]
    max_concurrent_requests: u32,
    /// Concurrent streams (calls) one HTTP/2 connection may open.
    #[arg(long, env = "IDENTITY_MAX_STREAMS_PER_CONNECTION", default_value_t = 128,
          value_parser = clap::value_parser!(u32).range(1..), global = true)]
    max_streams_per_connection: u32,
    /// Longest a call may run before it is cancelled (e.g. 10s); a shorter
    /// grpc-timeout from the client wins.
    #[arg(long, env = "IDENTITY_REQUEST_TIMEOUT", default_value = "10s", value_parser = config::parse_duration, global = true)]
    request_timeout: Duration,
    /// Async runtime worker threads (default: one per core).
    #[arg(long, env = "IDENTITY_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024), global = true)]
    worker_threads: Option<u16>,
    /// How long shutdown waits for in-flight calls (e.g. 30s).
    #[arg(long, env = "IDENTITY_DRAIN_TIMEOUT", default_value = "30s", value_parser = config::parse_duration, global = true)]
    drain_timeout: Duration,
    /// Log filter, in tracing's EnvFilter syntax (e.g. info, identity=debug).
    #[arg(long, env = "IDENTITY_LOG", default_value = "info", global = true)]
    log: String,
    /// Log format: text (human-readable) or json (one object per line).
    #[arg(long, env = "IDENTITY_LOG_FORMAT", default_value = "text",
          value_parser = config::parse_log_format, global = true)]
    log_format: LogFormat,
    /// Address to serve Prometheus metrics on (HTTP, /metrics), or off.
    #[arg(long, env = "IDENTITY_METRICS_ADDR", default_value = Config::DEFAULT_METRICS_ADDR,
          value_parser = parse_metrics_addr, global = true)]
    metrics_addr: MetricsAddr,
}

/// `--metrics-addr`: an address, or none when metrics are off.
#[derive(Debug, Clone, Copy)]
struct MetricsAddr(Option<SocketAddr>);

fn parse_metrics_addr(raw: &str) -> Result<MetricsAddr, String> {
    config::parse_metrics_addr(raw).map(MetricsAddr)
}

impl Settings {
    fn into_config(self) -> Config {
        let mut config = Config::with_database(self.database_url);
        config.listen_addr = self.listen_addr;
        config.migrate = self.migrate;
        config.pool = PoolOptions {
            max_connections: self.db_max_connections,
            acquire_timeout: self.db_acquire_timeout,
        };
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
        };
        config.max_concurrent_requests = self.max_concurrent_requests;
        config.max_streams_per_connection = self.max_streams_per_connection;
        config.request_timeout = self.request_timeout;
        config.drain_timeout = self.drain_timeout;
        config.leak_reports_per_minute = self.leak_reports_per_minute;
        config.metrics_addr = self.metrics_addr.0;
        config.log_format = self.log_format;
        config
    }

    /// Cross-setting checks that flags alone cannot express.
    fn validate(&self) -> Result<(), String> {
        config::parse_database_url(&self.database_url)
            .map_err(|why| format!("DATABASE_URL (--database-url): {why}"))?;
        if self.token_default_ttl > self.token_max_ttl {
            return Err(
                "IDENTITY_TOKEN_DEFAULT_TTL (--token-default-ttl) must not exceed IDENTITY_TOKEN_MAX_TTL (--token-max-ttl)".into(),
            );
        }
        if self.token_default_ttl.is_zero() {
            return Err("IDENTITY_TOKEN_DEFAULT_TTL (--token-default-ttl) must be positive".into());
        }
        if self.request_timeout.is_zero() {
            return Err("IDENTITY_REQUEST_TIMEOUT (--request-timeout) must be positive".into());
        }
        if self.session_ttl.is_zero() {
            return Err("IDENTITY_SESSION_TTL (--session-ttl) must be positive".into());
        }
        Ok(())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = match EnvFilter::try_new(&cli.settings.log) {
        Ok(filter) => filter,
        Err(err) => {
            eprintln!("error: invalid IDENTITY_LOG / --log filter: {err}");
            return ExitCode::FAILURE;
        }
    };
    // Logs go to stderr: stdout is reserved for command output such as the
    // token printed by bootstrap-operator.
    identity::observability::init_logging(cli.settings.log_format, filter);

    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(threads) = cli.settings.worker_threads {
        builder.worker_threads(usize::from(threads));
    }
    let runtime = match builder.build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(message) = cli.settings.validate() {
        eprintln!("error: {message}");
        return ExitCode::FAILURE;
    }
    let config = cli.settings.into_config();
    let result = runtime.block_on(async move {
        match cli.command.unwrap_or(Command::Serve) {
            Command::Serve => {
                let app = App::build(config).await?;
                app.run_until(shutdown_signal()).await
            }
            Command::Migrate => {
                app::migrate(&config).await?;
                tracing::info!("migrations applied");
                Ok(())
            }
            Command::BootstrapOperator { username } => bootstrap(config, &username).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = %err, "exiting");
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

/// `bootstrap-operator`: prints exactly one line on stdout, the token.
async fn bootstrap(config: Config, username: &str) -> Result<(), app::AppError> {
    let username = Username::parse("--username", username)?;
    let identity: Identity = app::open_identity(&config).await?;
    let issued = identity.bootstrap_operator(username).await?;
    tracing::info!(
        account_id = issued.token.account_id.as_str(),
        token_id = issued.token.id.as_str(),
        "issued an operator token"
    );
    println!("{}", issued.secret.expose());
    Ok(())
}

/// Completes on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %err, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                tracing::error!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
