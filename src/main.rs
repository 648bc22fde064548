//! The `identity` command: `serve` (the default), `migrate`,
//! `bootstrap-operator` and `config check`, each reading only the settings
//! it uses. Reads the configuration from a file, environment variables and
//! flags, checks it, sets up logging, and hands over to [`identity::app`].

#![forbid(unsafe_code)]

use std::{ffi::OsString, process::ExitCode};

use clap::{CommandFactory as _, FromArgMatches as _};
use identity::{
    app::{self, App},
    config::{
        self, Config,
        cli::{Cli, Command, ConfigCommand, Origin},
    },
    domain::{Identity, account::Username},
};
use tracing_subscriber::EnvFilter;

/// What a command is to do, once its configuration has passed every check.
enum Job {
    Serve,
    Migrate,
    BootstrapOperator(String),
    ConfigCheck,
}

/// The configuration of the command `command`, checked by every rule it
/// applies before touching the network: its settings' own rules, the
/// rules [`app::check`] applies (TLS files, the database URL, the TLS and
/// `VerifyToken` settings together), and the log filter. `config check`
/// runs exactly what `serve` runs, so it passes only what `serve` accepts,
/// with the same message otherwise.
fn checked(
    command: &Command,
    origin: &Origin<'_>,
) -> Result<(Job, Config, EnvFilter, Option<u16>), String> {
    let (job, mut config, logging, threads) = match command {
        Command::Serve(settings) => (
            Job::Serve,
            settings.config(origin)?,
            &settings.logging,
            settings.worker_threads,
        ),
        Command::Config(ConfigCommand::Check(settings)) => (
            Job::ConfigCheck,
            settings.config(origin)?,
            &settings.logging,
            settings.worker_threads,
        ),
        Command::Migrate(migrate) => (
            Job::Migrate,
            migrate.database.config(origin)?,
            &migrate.logging,
            None,
        ),
        Command::BootstrapOperator(bootstrap) => (
            Job::BootstrapOperator(bootstrap.username.clone()),
            bootstrap.config(origin)?,
            &bootstrap.logging,
            None,
        ),
    };
    // Every command logs as configured, not only `serve`.
    config.log_format = logging.log_format;
    app::check(&config, origin).map_err(|err| describe(&err, &config, origin))?;
    let filter = logging.filter(origin)?;
    Ok((job, config, filter, threads))
}

/// `args` with `serve` inserted when no command is given (the first
/// argument, after any `--config FILE`, is not a command, help or the
/// version), so that `identity --listen-addr …` serves.
fn with_default_command(mut args: Vec<OsString>) -> Vec<OsString> {
    let names: Vec<String> = Cli::command()
        .get_subcommands()
        .map(|sub| sub.get_name().to_owned())
        .chain(["help".to_owned()])
        .collect();
    let mut i = 1;
    while let Some(arg) = args.get(i).map(|a| a.to_string_lossy().into_owned()) {
        if arg == "--config" {
            i += 2;
        } else if arg.starts_with("--config=") {
            i += 1;
        } else {
            break;
        }
    }
    // Settings before the command (`identity --log debug migrate`, as when
    // every setting was global) move after it, where the command reads
    // them (and refuses those it does not use).
    let leading_flag = args
        .get(i)
        .is_some_and(|a| a.to_string_lossy().starts_with('-'));
    if leading_flag
        && let Some(at) = (i + 1..args.len()).find(|&j| {
            let arg = args[j].to_string_lossy();
            names.iter().any(|n| *n == arg)
        })
    {
        args[i..=at].rotate_right(1);
    }
    let first = args.get(i).map(|a| a.to_string_lossy().into_owned());
    let given = match first.as_deref() {
        Some("-h" | "--help" | "-V" | "--version") => true,
        Some(name) => names.iter().any(|n| n == name),
        None => false,
    };
    if !given {
        args.insert(args.len().min(1), "serve".into());
    }
    args
}

fn main() -> ExitCode {
    let args = with_default_command(std::env::args_os().collect());
    let layered = match config::file::parse(Cli::command(), args, "config") {
        Ok(layered) => layered,
        Err(config::file::LayerError::Clap(err)) => err.exit(),
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::FAILURE;
        }
    };
    let cli = match Cli::from_arg_matches(&layered.matches) {
        Ok(cli) => cli,
        Err(err) => err.exit(),
    };
    let origin = |id: &str| layered.origin(id);
    let (job, config, filter, threads) = match checked(&cli.command, &origin) {
        Ok(checked) => checked,
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::FAILURE;
        }
    };
    if let Job::ConfigCheck = job {
        print!("{}", layered.render("config"));
        return ExitCode::SUCCESS;
    }
    // Logs go to stderr: stdout is reserved for command output such as the
    // token printed by bootstrap-operator.
    identity::observability::init_logging(config.log_format, filter);

    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(threads) = threads {
        builder.worker_threads(usize::from(threads));
    }
    let runtime = match builder.build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    // Kept to redact the database's secrets from the exit message.
    let redactor = config.clone();
    let result = runtime.block_on(async move {
        match job {
            Job::Serve => {
                let shutdown = shutdown_signal();
                let app = App::build(config).await?;
                app.run_until(shutdown).await
            }
            Job::Migrate => {
                app::migrate(&config).await?;
                tracing::info!(
                    database = %config.redacted_database_url(),
                    "migrations applied"
                );
                Ok(())
            }
            Job::BootstrapOperator(username) => bootstrap(config, &username).await,
            // Answered above, before logging and the runtime start.
            Job::ConfigCheck => Ok(()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let message = describe(&err, &redactor, &origin);
            tracing::error!(error = %message, "exiting");
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// `err` with its causes ("the database is unavailable: ... invalid peer
/// certificate"), every secret of the database URL redacted. sqlx's errors
/// carry neither the URL nor its password, but the message is redacted all
/// the same, so that no driver's wording can leak one.
fn describe(err: &app::AppError, config: &Config, origin: &Origin<'_>) -> String {
    let mut message = err.to_string();
    // The variants that name their setting by its variable: by where its
    // value came from instead, when that was not the default.
    let setting = match err {
        app::AppError::Bind { .. } => Some(("listen_addr", "IDENTITY_LISTEN_ADDR")),
        app::AppError::HealthBind { .. } => {
            Some(("health_listen_addr", "IDENTITY_HEALTH_LISTEN_ADDR"))
        }
        app::AppError::MetricsBind { .. } => Some(("metrics_addr", "IDENTITY_METRICS_ADDR")),
        app::AppError::WebBind { .. } => Some(("web_addr", "IDENTITY_WEB_ADDR")),
        app::AppError::Database { .. } | app::AppError::NoSchema { .. } => {
            Some(("database_url", "DATABASE_URL"))
        }
        _ => None,
    };
    if let Some((id, env)) = setting {
        let named = origin(id);
        if named != config::setting_name(id) {
            message = message.replacen(&format!("({env})"), &format!("({named})"), 1);
        }
    }
    let mut cause = std::error::Error::source(err);
    while let Some(inner) = cause {
        let text = inner.to_string();
        // Some messages already end with their source's.
        if !message.ends_with(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        cause = inner.source();
    }
    config.redact_database_secrets(&message)
}

/// `bootstrap-operator`: prints exactly one line on stdout, the token, and
/// says on stderr (in the log) which database it used.
async fn bootstrap(config: Config, username: &str) -> Result<(), app::AppError> {
    let username = Username::parse("--username", username)?;
    let identity: Identity = app::open_identity(&config).await?;
    let issued = identity.bootstrap_operator(username).await?;
    tracing::info!(
        database = %config.redacted_database_url(),
        account_id = issued.token.account_id.as_str(),
        token_id = issued.token.id.as_str(),
        "issued an operator token"
    );
    println!("{}", issued.secret.expose());
    Ok(())
}

/// Completes on SIGTERM or SIGINT (Ctrl-C). The handlers are installed
/// when this is called, not when the future is first polled, so that a
/// signal arriving just after `serving` is logged drains the server
/// instead of killing it.
fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let listen = |kind: SignalKind| {
            signal(kind)
                .map_err(|err| tracing::error!(error = %err, "cannot listen for a shutdown signal"))
                .ok()
        };
        let (mut terminate, mut interrupt) = (
            listen(SignalKind::terminate()),
            listen(SignalKind::interrupt()),
        );
        async move {
            tokio::select! {
                () = wait_for(terminate.as_mut()) => {}
                () = wait_for(interrupt.as_mut()) => {}
            }
        }
    }
    #[cfg(not(unix))]
    async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Completes when `signal` is received; never without one.
#[cfg(unix)]
async fn wait_for(signal: Option<&mut tokio::signal::unix::Signal>) {
    match signal {
        Some(signal) => drop(signal.recv().await),
        None => std::future::pending().await,
    }
}
