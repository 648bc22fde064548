//! The parsers of single settings: log format, metrics and listen
//! addresses, the database URL, durations and retention periods. Each
//! checks one value and says what is wrong without repeating a secret.

use std::{net::SocketAddr, time::Duration};

use super::{
    LogFormat,
    redact::{percent_decode, redact_url_secrets},
};
use crate::storage::ChangeFeed;

/// Parses `text` or `json`.
pub fn parse_log_format(raw: &str) -> Result<LogFormat, String> {
    match raw {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        _ => Err("expected text or json".to_owned()),
    }
}

/// Parses a metrics listen address, or `off` (or nothing) for none. An IP
/// address only: see [`ListenAddress`] for host names.
pub fn parse_metrics_addr(raw: &str) -> Result<Option<SocketAddr>, String> {
    match raw.trim() {
        "" | "off" => Ok(None),
        addr => addr
            .parse()
            .map(Some)
            .map_err(|_| "expected host:port such as 127.0.0.1:9464, or off".to_owned()),
    }
}

/// A listen address as configured: `host:port`, where the host is an IP
/// address (`127.0.0.1`, `[::1]`) or a name (`localhost`,
/// `identity.internal`) that is resolved at start-up. A name is bound to
/// the first address the system resolver gives for it (as `getaddrinfo`
/// orders them); to listen on every interface use `0.0.0.0` or `[::]`.
/// Parsing checks the syntax only; [`ListenAddress::resolve`] looks the
/// name up. Neither's errors repeat the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenAddress {
    host: String,
    port: u16,
}

impl ListenAddress {
    /// Parses `host:port` (an IPv6 address in brackets).
    pub fn parse(raw: &str) -> Result<Self, String> {
        const EXPECTED: &str =
            "expected host:port, such as 127.0.0.1:50051, [::1]:50051 or localhost:50051";
        // `SocketAddr` would parse `[fe80::1%1]` and the address alone be
        // kept, binding another interface's address than the one meant.
        if raw.contains('%') {
            return Err(
                "IPv6 zone ids (`%` after the address) are not supported: use an address without one, such as [::1]:50051 or [::]:50051"
                    .to_owned(),
            );
        }
        if let Ok(addr) = raw.parse::<SocketAddr>() {
            return Ok(Self {
                host: addr.ip().to_string(),
                port: addr.port(),
            });
        }
        let (host, port) = raw.rsplit_once(':').ok_or(EXPECTED)?;
        let port = port
            .parse::<u16>()
            .map_err(|_| "expected a port number (0 to 65535) after the last `:`".to_owned())?;
        // A host name: letters, digits, `-` and `.` (RFC 1123), at most 253.
        let valid_name = !host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !valid_name {
            return Err(EXPECTED.to_owned());
        }
        Ok(Self {
            host: host.to_owned(),
            port,
        })
    }

    /// The address to bind: the host itself if it is an IP address, else
    /// the first address the system resolver gives for the name.
    pub fn resolve(&self) -> Result<SocketAddr, String> {
        let ip = self.host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = ip.parse::<std::net::IpAddr>() {
            return Ok(SocketAddr::new(ip, self.port));
        }
        std::net::ToSocketAddrs::to_socket_addrs(&(self.host.as_str(), self.port))
            .ok()
            .and_then(|mut addrs| addrs.next())
            .ok_or_else(|| "the host name does not resolve to any address".to_owned())
    }
}

/// Checks that a database URL names a supported backend and can be
/// understood (its port a number, its `sslmode` a known one, ...), without
/// connecting: the one rule for the URL, applied by the command line
/// before anything starts and by [`crate::app::check`]. The message never
/// holds the URL's secrets.
pub fn parse_database_url(raw: &str) -> Result<String, String> {
    let supported = ["postgres://", "postgresql://", "sqlite:"];
    if !supported.iter().any(|prefix| raw.starts_with(prefix)) {
        return Err(
            "expected a URL starting with postgres://, postgresql:// or sqlite:".to_owned(),
        );
    }
    crate::storage::check_url(raw).map_err(|err| {
        // The cause says what is wrong ("invalid port number").
        let mut why = String::new();
        let mut cause = std::error::Error::source(&err);
        while let Some(inner) = cause {
            why = inner.to_string();
            cause = inner.source();
        }
        if why.is_empty() {
            why = err.to_string();
        }
        redact_url_secrets(&format!("cannot be used: {why}"), raw)
    })?;
    check_url_files(raw)?;
    Ok(raw.to_owned())
}

/// `on` or `off`.
pub fn parse_on_off(raw: &str) -> Result<bool, String> {
    match raw {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err("expected on or off".to_owned()),
    }
}

/// Checks `IDENTITY_DATABASE_LISTEN_URL`: a PostgreSQL URL, understood as
/// the database URL is, and only beside a PostgreSQL database URL. The
/// message never holds either URL's secrets.
pub fn parse_listen_url(raw: &str, database_url: &str) -> Result<(), String> {
    if !(raw.starts_with("postgres://") || raw.starts_with("postgresql://")) {
        return Err("expected a URL starting with postgres:// or postgresql://".to_owned());
    }
    if !(database_url.starts_with("postgres://") || database_url.starts_with("postgresql://")) {
        return Err("applies to a PostgreSQL DATABASE_URL only".to_owned());
    }
    parse_database_url(raw).map(drop)
}

/// Refuses the statement cache off without a listen URL: it is off for a
/// pooler in transaction mode, through which `LISTEN` would not hear the
/// other replicas' revocations (and the advisory locks would not hold),
/// so the change channel must have a connection of its own.
pub fn check_pooler_settings(
    database_url: &str,
    statement_cache: bool,
    listen_url: bool,
) -> Result<(), String> {
    let postgres =
        database_url.starts_with("postgres://") || database_url.starts_with("postgresql://");
    if !statement_cache && !postgres {
        return Err("applies to a PostgreSQL DATABASE_URL only".to_owned());
    }
    if !statement_cache && !listen_url {
        return Err("off is for a pooler in transaction mode, which LISTEN cannot pass: \
                    set IDENTITY_DATABASE_LISTEN_URL to a direct connection (or a session-mode pool)"
            .to_owned());
    }
    Ok(())
}

/// `IDENTITY_CHANGE_FEED`, before it is checked against the database URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeFeedKind {
    /// `notify`.
    Notify,
    /// `poll`.
    Poll,
}

/// `notify` or `poll`.
pub fn parse_change_feed(raw: &str) -> Result<ChangeFeedKind, String> {
    match raw {
        "notify" => Ok(ChangeFeedKind::Notify),
        "poll" => Ok(ChangeFeedKind::Poll),
        _ => Err("expected notify or poll".to_owned()),
    }
}

/// The longest poll interval accepted: the cache is trusted only up to
/// `CHANNEL_MAX_SILENCE` (1 s) after the start of the last successful poll,
/// so a longer interval would leave it bypassed much of the time, and four
/// polls fit in the bound at this one.
const MAX_POLL_INTERVAL: Duration = Duration::from_millis(250);

/// `IDENTITY_CHANGE_FEED_POLL_INTERVAL`: a duration from 1ms to 250ms.
pub fn parse_poll_interval(raw: &str) -> Result<Duration, String> {
    let interval = parse_duration(raw)?;
    if interval.is_zero() {
        return Err("expected a positive duration, such as 25ms".to_owned());
    }
    if interval > MAX_POLL_INTERVAL {
        return Err(
            "at most 250ms: the verification cache is trusted only up to 1s after a poll"
                .to_owned(),
        );
    }
    Ok(interval)
}

/// The change feed the settings ask for. `poll` is refused on SQLite: the
/// database is this process's own file, and no other replica writes to it.
pub fn change_feed(
    database_url: &str,
    kind: ChangeFeedKind,
    interval: Duration,
) -> Result<ChangeFeed, String> {
    match kind {
        ChangeFeedKind::Notify => Ok(ChangeFeed::Notify),
        ChangeFeedKind::Poll
            if database_url.starts_with("postgres://")
                || database_url.starts_with("postgresql://") =>
        {
            Ok(ChangeFeed::Poll { interval })
        }
        ChangeFeedKind::Poll => Err("poll applies to a PostgreSQL DATABASE_URL only: \
                                     on SQLite no other replica shares the database"
            .to_owned()),
    }
}

/// The query parameters of a PostgreSQL URL that name files the driver
/// reads when it connects.
const FILE_URL_PARAMETERS: &[&str] = &["sslrootcert", "sslcert", "sslkey"];

/// Checks that every file a PostgreSQL URL names (`sslrootcert`,
/// `sslcert`, `sslkey`) can be opened for reading; their contents are left
/// to the driver. The message names the parameter, never the URL.
fn check_url_files(raw: &str) -> Result<(), String> {
    if raw.starts_with("sqlite:") {
        return Ok(());
    }
    let before_fragment = raw.split('#').next().unwrap_or(raw);
    let query = before_fragment.split_once('?').map_or("", |(_, q)| q);
    for pair in query.split('&') {
        let Some((key, value)) = pair.split_once('=') else {
            continue;
        };
        let key = percent_decode(key).to_ascii_lowercase();
        if !FILE_URL_PARAMETERS.contains(&key.as_str()) {
            continue;
        }
        let path = percent_decode(&value.replace('+', " "));
        // libpq's `sslrootcert=system`: the system's trust store.
        if key == "sslrootcert" && path == "system" {
            continue;
        }
        if let Err(err) = std::fs::File::open(&path) {
            return Err(format!(
                "the file named by the URL's {key} parameter cannot be read: {}",
                io_reason(&err)
            ));
        }
    }
    Ok(())
}

/// An I/O error's reason without any path (the standard library's message
/// holds none, but its `Display` adds the OS error code).
fn io_reason(err: &std::io::Error) -> String {
    match err.kind() {
        std::io::ErrorKind::NotFound => "no such file".to_owned(),
        std::io::ErrorKind::PermissionDenied => "permission denied".to_owned(),
        _ => err.kind().to_string(),
    }
}

/// Parses a retention: a positive duration (see [`parse_duration`]), or
/// `off` to keep for ever. Zero is refused: it would delete rows the moment
/// they stop working, which is `off`'s opposite and easy to set by mistake.
pub fn parse_retention(raw: &str) -> Result<Option<Duration>, String> {
    if raw.trim() == "off" {
        return Ok(None);
    }
    match parse_duration(raw)? {
        zero if zero.is_zero() => {
            Err("expected a positive duration, or off to keep for ever".into())
        }
        retention => Ok(Some(retention)),
    }
}

/// Parses a duration such as `500ms`, `30s`, `15m`, `12h` or `7d`.
pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    let split = raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len());
    let (number, unit) = raw.split_at(split);
    let value: u64 = number
        .parse()
        .map_err(|_| "expected a number followed by ms, s, m, h or d".to_owned())?;
    let millis = match unit {
        "ms" => Some(value),
        "s" => value.checked_mul(1_000),
        "m" => value.checked_mul(60_000),
        "h" => value.checked_mul(3_600_000),
        "d" => value.checked_mul(86_400_000),
        _ => return Err("expected a unit of ms, s, m, h or d after the number".to_owned()),
    };
    millis
        .map(Duration::from_millis)
        .ok_or_else(|| "the duration is too large".to_owned())
}
