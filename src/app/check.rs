//! The rules applied to a configuration before anything touches the
//! network, shared by `serve` and `identity config check`.

use super::{AppError, tls};
use crate::config::Config;

/// Every rule `serve` applies to its configuration before it touches the
/// network, naming each setting by `name(id)` (see
/// [`crate::config::setting_name`]): the TLS and `VerifyToken` settings
/// against each other, the TLS files read and parsed, and the database URL
/// understood. [`App::build`] runs it first, and `identity config check`
/// runs it too, so that the check cannot pass what serving refuses. Binds,
/// resolves and connects nothing. Returns the TLS loaded (`None` when off).
pub fn check(config: &Config, name: &dyn Fn(&str) -> String) -> Result<Option<tls::Tls>, AppError> {
    config.check_tls_naming(name).map_err(AppError::Config)?;
    config
        .check_listeners_naming(name)
        .map_err(AppError::Config)?;
    let tls = tls::Tls::load(config).map_err(|err| tls_error(&err, name))?;
    crate::config::parse_database_url(&config.database_url)
        .map_err(|why| AppError::Config(format!("{}: {why}", name("database_url"))))?;
    Ok(tls)
}

/// A TLS loading error as a message naming the file's setting by
/// `name(id)` (the variable, the flag or the file's key that gave it).
fn tls_error(err: &tls::TlsError, name: &dyn Fn(&str) -> String) -> AppError {
    let id = |setting: &str| match setting {
        "IDENTITY_TLS_KEY" => "tls_key",
        "IDENTITY_TLS_CLIENT_CA" => "tls_client_ca",
        _ => "tls_cert",
    };
    AppError::Config(match err {
        tls::TlsError::Read {
            setting,
            path,
            source,
        } => format!("TLS: {} ({}): {source}", name(id(setting)), path.display()),
        tls::TlsError::Invalid {
            setting,
            path,
            problem,
        } => format!("TLS: {} ({}): {problem}", name(id(setting)), path.display()),
        tls::TlsError::Certificate(source) => format!(
            "TLS: {} and {}: {source}",
            name("tls_cert"),
            name("tls_key")
        ),
    })
}
