//! The configuration file layer, and how a bad setting is reported.
//! Settings come, from lowest to highest precedence, from their defaults,
//! an optional TOML file (`--config` / `IDENTITY_CONFIG`), `IDENTITY_*`
//! environment variables (and `DATABASE_URL`), and flags.
//!
//! Every setting is one clap argument, so a file value is checked by the
//! same parser, with the same bounds, as the flag: a file key is an
//! argument's id (the flag's name with `_` for `-`, as in
//! `listen_addr = "0.0.0.0:50051"`), and the file's values become the
//! arguments' defaults, which the environment and flags override. A key
//! that names a setting of another command (`cache_ttl` for `migrate`) is
//! ignored, so that one file serves every command. A new setting therefore
//! needs nothing here.
//!
//! A value that does not parse is reported by where it came from (the
//! variable, the flag or the file's key) and why, never with the value,
//! which may be a secret: clap's own message quotes it.

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::OsString,
    fmt::Write as _,
    path::{Path, PathBuf},
};

use clap::{
    ArgMatches, Command,
    error::{ContextKind, ContextValue, ErrorKind},
    parser::ValueSource,
};

/// Settings whose values are secret or may embed one: `config check` shows
/// them redacted.
const SECRET_SETTINGS: &[&str] = &["database_url", "database_listen_url", "database_read_url"];

/// Why the settings could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// The command line is invalid in a way clap reports best (an unknown
    /// flag, a missing one), or help or the version was asked for: clap
    /// prints it and chooses the exit code.
    #[error(transparent)]
    Clap(#[from] clap::Error),
    /// An environment variable or a flag holds a value that cannot be
    /// used: the message names it and says why, never repeating the value.
    #[error("{0}")]
    Setting(String),
    /// The configuration file cannot be read or holds a bad setting.
    #[error("config file {path}: {problem}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the setting; never a value.
        problem: String,
    },
}

/// The parsed command line with the file merged in, and where each setting
/// came from.
#[derive(Debug)]
pub struct Layered {
    /// The merged matches, to build the typed settings from.
    pub matches: ArgMatches,
    /// The file read, if any.
    pub file: Option<PathBuf>,
    /// The ids of the settings the file supplied to the command being run
    /// (and neither the environment nor a flag overrode).
    pub from_file: BTreeSet<String>,
    command: Command,
}

/// Parses `args` (the program name first) with `command`, merging in the
/// TOML file named by the argument `config_arg`, if given.
pub fn parse(
    command: Command,
    args: Vec<OsString>,
    config_arg: &str,
) -> Result<Layered, LayerError> {
    let matches = command
        .clone()
        .try_get_matches_from(&args)
        .map_err(|err| setting_error(&command, &args, None, err))?;
    let Some(path) = matches.get_one::<PathBuf>(config_arg).cloned() else {
        return Ok(Layered {
            matches,
            file: None,
            from_file: BTreeSet::new(),
            command,
        });
    };
    let file_error = |problem: String| LayerError::File {
        path: path.clone(),
        problem,
    };
    let table = read_table(&path).map_err(file_error)?;

    let known = setting_ids(&command, config_arg);
    let mut values = BTreeMap::new();
    for (key, value) in &table {
        if !known.contains(key.as_str()) {
            return Err(file_error(format!(
                "unknown setting `{key}` (keys are the flags' names with `_` for `-`, \
                 e.g. listen_addr)"
            )));
        }
        let value = scalar(value).ok_or_else(|| {
            file_error(format!(
                "setting `{key}` must be a string, an integer, a boolean or a list of them"
            ))
        })?;
        values.insert(key.clone(), value);
    }

    // The environment and the command line parsed alone above, so a
    // failure now is the file's.
    let command = with_defaults(command, &values, config_arg);
    let matches = command
        .clone()
        .try_get_matches_from(&args)
        .map_err(|err| setting_error(&command, &args, Some(&path), err))?;
    let mut layered = Layered {
        matches,
        file: Some(path),
        from_file: BTreeSet::new(),
        command,
    };
    let (_, leaf) = layered.leaf();
    layered.from_file = values
        .into_keys()
        .filter(|id| {
            leaf.try_contains_id(id).unwrap_or(false)
                && leaf.value_source(id) == Some(ValueSource::DefaultValue)
        })
        .collect();
    Ok(layered)
}

impl Layered {
    /// The command being run (the innermost subcommand) and its matches.
    pub fn leaf(&self) -> (&Command, &ArgMatches) {
        let mut command = &self.command;
        let mut matches = &self.matches;
        while let Some((name, inner)) = matches.subcommand() {
            match command.find_subcommand(name) {
                Some(sub) => {
                    command = sub;
                    matches = inner;
                }
                None => break,
            }
        }
        (command, matches)
    }

    /// How a message names the setting `id`: by where its value came from
    /// (`IDENTITY_CACHE_TTL`, `--cache-ttl`, or `` `cache_ttl` in config
    /// file FILE ``), or by its variable and flag when it has its default.
    pub fn origin(&self, id: &str) -> String {
        let (command, matches) = self.leaf();
        let arg = command.get_arguments().find(|arg| arg.get_id() == id);
        let flag = || arg.and_then(clap::Arg::get_long).unwrap_or(id).to_owned();
        match matches.value_source(id) {
            Some(ValueSource::CommandLine) => format!("--{}", flag()),
            Some(ValueSource::EnvVariable) => arg.and_then(clap::Arg::get_env).map_or_else(
                || super::setting_name(id),
                |env| env.to_string_lossy().into_owned(),
            ),
            _ if self.from_file.contains(id) => match &self.file {
                Some(path) => format!("`{id}` in config file {}", path.display()),
                None => super::setting_name(id),
            },
            _ => super::setting_name(id),
        }
    }

    /// The effective settings as a TOML document that `--config` accepts,
    /// each with a comment saying where it came from, secrets redacted.
    pub fn render(&self, config_arg: &str) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# Effective configuration{}; secrets redacted.",
            self.file
                .as_ref()
                .map(|p| format!(" (file {})", p.display()))
                .unwrap_or_default()
        );
        let (command, matches) = self.leaf();
        for arg in command.get_arguments() {
            if !is_setting(arg, config_arg) {
                continue;
            }
            let id = arg.get_id().as_str();
            let origin = if self.from_file.contains(id) {
                "from the file".to_owned()
            } else {
                match matches.value_source(id) {
                    Some(ValueSource::DefaultValue) => "default".to_owned(),
                    Some(ValueSource::EnvVariable) => format!(
                        "from {}",
                        arg.get_env().map_or("the environment".into(), |e| e
                            .to_string_lossy()
                            .into_owned())
                    ),
                    Some(ValueSource::CommandLine) => {
                        format!("from --{}", arg.get_long().unwrap_or(id))
                    }
                    _ => "unset".to_owned(),
                }
            };
            let values: Vec<String> = matches
                .get_raw(id)
                .map(|raw| raw.map(|v| v.to_string_lossy().into_owned()).collect())
                .unwrap_or_default();
            if values.is_empty() {
                let _ = writeln!(out, "# {id} = (unset: built-in behaviour)");
                continue;
            }
            let mut value = values.join(",");
            if SECRET_SETTINGS.contains(&id) {
                value = super::redact_url(&value);
            }
            let _ = writeln!(out, "{id} = {}  # {origin}", render_value(&value));
        }
        out
    }
}

/// The ids of every setting of `command` and its subcommands.
fn setting_ids(command: &Command, config_arg: &str) -> BTreeSet<String> {
    let mut ids: BTreeSet<String> = command
        .get_arguments()
        .filter(|arg| is_setting(arg, config_arg))
        .map(|arg| arg.get_id().as_str().to_owned())
        .collect();
    for sub in command.get_subcommands() {
        ids.extend(setting_ids(sub, config_arg));
    }
    ids
}

/// `command` (and its subcommands) with the file's `values` as the
/// defaults of the settings they name.
fn with_defaults(
    mut command: Command,
    values: &BTreeMap<String, String>,
    config_arg: &str,
) -> Command {
    let ids: Vec<String> = command
        .get_arguments()
        .filter(|arg| is_setting(arg, config_arg))
        .map(|arg| arg.get_id().as_str().to_owned())
        .filter(|id| values.contains_key(id))
        .collect();
    for id in ids {
        let value = values[&id].clone();
        command = command.mut_arg(&id, |arg| arg.default_value(value));
    }
    let subcommands: Vec<String> = command
        .get_subcommands()
        .map(|sub| sub.get_name().to_owned())
        .collect();
    for name in subcommands {
        command = command.mut_subcommand(&name, |sub| with_defaults(sub, values, config_arg));
    }
    command
}

/// Rewrites clap's report of a value that does not parse so that it names
/// where the value came from (the flag if `args` holds it, else the file's
/// key when parsing with `file`'s values, else the environment variable)
/// and never repeats it. Other errors are left to clap.
fn setting_error(
    command: &Command,
    args: &[OsString],
    file: Option<&Path>,
    err: clap::Error,
) -> LayerError {
    if !matches!(
        err.kind(),
        ErrorKind::ValueValidation | ErrorKind::InvalidValue | ErrorKind::InvalidUtf8
    ) {
        return match file {
            // Not one value's fault: clap's first line, which then holds
            // no value.
            Some(path) => LayerError::File {
                path: path.to_owned(),
                problem: err
                    .render()
                    .to_string()
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .trim_start_matches("error: ")
                    .to_owned(),
            },
            None => LayerError::Clap(err),
        };
    }
    let Some(ContextValue::String(shown)) = err.get(ContextKind::InvalidArg) else {
        // clap does not say which value is not UTF-8: find it.
        if err.kind() == ErrorKind::InvalidUtf8
            && let Some(name) = non_utf8_setting(command, args)
        {
            return LayerError::Setting(format!("{name}: the value is not valid UTF-8"));
        }
        return LayerError::Clap(err);
    };
    // "--cache-ttl <CACHE_TTL>"
    let long = shown
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .trim_start_matches("--")
        .to_owned();
    let Some(arg) = find_arg(command, &long) else {
        return LayerError::Clap(err);
    };
    let reason = reason(&err);
    let id = arg.get_id().as_str().to_owned();
    let on_command_line = args.iter().skip(1).any(|a| {
        let a = a.to_string_lossy();
        a == format!("--{long}") || a.starts_with(&format!("--{long}="))
    });
    if on_command_line {
        return LayerError::Setting(format!("--{long}: {reason}"));
    }
    if let Some(path) = file {
        return LayerError::File {
            path: path.to_owned(),
            problem: format!("setting `{id}`: {reason}"),
        };
    }
    let name = arg.get_env().map_or_else(
        || super::setting_name(&id),
        |env| env.to_string_lossy().into_owned(),
    );
    LayerError::Setting(format!("{name}: {reason}"))
}

/// Where a value that is not UTF-8 was given: the flag (`--long VALUE` or
/// `--long=VALUE`) of `args`, else the environment variable of a setting
/// of `command` (or a subcommand).
fn non_utf8_setting(command: &Command, args: &[OsString]) -> Option<String> {
    for (i, arg) in args.iter().enumerate().skip(1) {
        if arg.to_str().is_some() {
            continue;
        }
        let bytes = arg.as_encoded_bytes();
        if bytes.starts_with(b"--")
            && let Some(eq) = bytes.iter().position(|&b| b == b'=')
        {
            return Some(String::from_utf8_lossy(&bytes[..eq]).into_owned());
        }
        if let Some(flag) = args.get(i - 1).and_then(|a| a.to_str())
            && flag.starts_with("--")
        {
            return Some(flag.to_owned());
        }
        return Some("an argument".to_owned());
    }
    fn from_env(command: &Command) -> Option<String> {
        command
            .get_arguments()
            .filter_map(clap::Arg::get_env)
            .find(|env| std::env::var_os(env).is_some_and(|v| v.to_str().is_none()))
            .map(|env| env.to_string_lossy().into_owned())
            .or_else(|| command.get_subcommands().find_map(from_env))
    }
    from_env(command)
}

/// The argument whose flag is `--long`, in `command` or a subcommand.
fn find_arg<'a>(command: &'a Command, long: &str) -> Option<&'a clap::Arg> {
    command
        .get_arguments()
        .find(|arg| arg.get_long() == Some(long))
        .or_else(|| {
            command
                .get_subcommands()
                .find_map(|sub| find_arg(sub, long))
        })
}

/// Why clap refused a value, in words that do not repeat it: the value
/// parser's reason with the value cut out, or the values allowed.
fn reason(err: &clap::Error) -> String {
    let value = match err.get(ContextKind::InvalidValue) {
        Some(ContextValue::String(value)) => value.clone(),
        _ => String::new(),
    };
    if err.kind() == ErrorKind::InvalidUtf8 {
        return "the value is not valid UTF-8".to_owned();
    }
    if let Some(ContextValue::Strings(allowed)) = err.get(ContextKind::ValidValue) {
        // clap's path parser refuses an empty value with no list at all.
        if allowed.is_empty() || value.is_empty() {
            return "must not be empty".to_owned();
        }
        return format!("expected one of {}", allowed.join(", "));
    }
    if value.is_empty() && err.kind() == ErrorKind::InvalidValue {
        return "must not be empty".to_owned();
    }
    let Some(source) = std::error::Error::source(err) else {
        return "the value cannot be used".to_owned();
    };
    let mut why = source.to_string();
    if value.is_empty() {
        return why;
    }
    // clap's ranged integers: "70000 is not in 1..=1000".
    if let Some(range) = why.strip_prefix(&format!("{value} is not in ")) {
        return format!("expected a number in {range}");
    }
    // Parsers that end with ", got \"<value>\"".
    for quoted in [
        format!(", got {value:?}"),
        format!(" got {value:?}"),
        format!("{value:?}"),
    ] {
        why = why.replace(&quoted, "");
    }
    if why.contains(value.as_str()) {
        "the value cannot be used".to_owned()
    } else {
        why
    }
}

/// Whether `arg` is a setting (not help, version, or the file itself).
fn is_setting(arg: &clap::Arg, config_arg: &str) -> bool {
    let id = arg.get_id().as_str();
    id != config_arg && id != "help" && id != "version" && arg.get_long().is_some()
}

/// Reads and parses the file. A TOML syntax error is reported by its line
/// and column only: the offending line may hold a secret.
fn read_table(path: &Path) -> Result<toml::Table, String> {
    let text = std::fs::read_to_string(path).map_err(|err| format!("cannot read it: {err}"))?;
    text.parse::<toml::Table>().map_err(|err| {
        let at = err.span().map(|span| {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!(" at line {line}, column {column}")
        });
        format!(
            "not valid TOML{}: {}",
            at.unwrap_or_default(),
            err.message()
        )
    })
}

/// A TOML value as the text a flag would carry; lists are comma-separated.
fn scalar(value: &toml::Value) -> Option<String> {
    match value {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        toml::Value::Array(items) => items
            .iter()
            .map(|item| match item {
                toml::Value::Array(_) => None,
                other => scalar(other),
            })
            .collect::<Option<Vec<_>>>()
            .map(|items| items.join(",")),
        _ => None,
    }
}

/// A raw setting as a TOML value: integers and booleans bare, the rest as
/// strings.
fn render_value(raw: &str) -> String {
    if raw.parse::<i64>().is_ok() || raw == "true" || raw == "false" {
        raw.to_owned()
    } else {
        toml::Value::String(raw.to_owned()).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction};

    fn command() -> Command {
        Command::new("t")
            .arg(
                Arg::new("config")
                    .long("config")
                    .value_parser(clap::value_parser!(PathBuf)),
            )
            .arg(
                Arg::new("port")
                    .long("port")
                    .env("T_CONFIG_TEST_PORT")
                    .default_value("1")
                    .value_parser(clap::value_parser!(u16)),
            )
            .arg(
                Arg::new("database_url")
                    .long("database-url")
                    .default_value("sqlite:x.db"),
            )
            .arg(
                Arg::new("flag")
                    .long("flag")
                    .default_value("false")
                    .action(ArgAction::Set)
                    .value_parser(clap::value_parser!(bool)),
            )
    }

    fn file(text: &str) -> (tempfile::NamedTempFile, Vec<OsString>) {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(file.path(), text).expect("write");
        let args = vec!["t".into(), "--config".into(), file.path().into()];
        (file, args)
    }

    #[test]
    fn the_file_overrides_defaults_and_flags_override_the_file() {
        let (_f, args) = file("port = 7\nflag = true\ndatabase_url = \"postgres://u:pw@h/d\"\n");
        let layered = parse(command(), args.clone(), "config").expect("parse");
        assert_eq!(layered.matches.get_one::<u16>("port"), Some(&7));
        assert_eq!(layered.matches.get_one::<bool>("flag"), Some(&true));
        let rendered = layered.render("config");
        assert!(rendered.contains("port = 7  # from the file"), "{rendered}");
        assert!(rendered.contains("postgres://u:***@h/d"), "{rendered}");
        // (Not just "pw": the temporary file's random name may hold it.)
        assert!(!rendered.contains(":pw@"), "{rendered}");

        let mut with_flag = args;
        with_flag.extend(["--port".into(), "9".into()]);
        let layered = parse(command(), with_flag, "config").expect("parse");
        assert_eq!(layered.matches.get_one::<u16>("port"), Some(&9));
        assert!(layered.render("config").contains("port = 9  # from --port"));
    }

    #[test]
    fn bad_files_are_refused_naming_the_setting_but_not_the_value() {
        let cases = [
            ("nosuch = 1", "unknown setting `nosuch`"),
            (
                "port = 70000",
                "setting `port`: expected a number in 0..=65535",
            ),
            ("port = 1.5", "setting `port` must be"),
            (
                "database_url = \"postgres://u:pw@h/d",
                "not valid TOML at line 1",
            ),
        ];
        for (text, expected) in cases {
            let (_f, args) = file(text);
            let err = parse(command(), args, "config")
                .expect_err(text)
                .to_string();
            assert!(err.contains(expected), "{text}: {err}");
            assert!(!err.contains("pw@"), "{text}: {err}");
        }
        let missing = vec![
            "t".into(),
            "--config".into(),
            "/nonexistent/identity.toml".into(),
        ];
        let err = parse(command(), missing, "config")
            .expect_err("missing")
            .to_string();
        assert!(err.contains("cannot read it"), "{err}");
    }
}
