//! The configuration file layer. Settings come, from lowest to highest
//! precedence, from their defaults, an optional TOML file (`--config` /
//! `IDENTITY_CONFIG`), `IDENTITY_*` environment variables (and
//! `DATABASE_URL`), and flags.
//!
//! Every setting is one clap argument, so a file value is checked by the
//! same parser, with the same bounds and the same messages, as the flag: a
//! file key is an argument's id (the flag's name with `_` for `-`, as in
//! `listen_addr = "0.0.0.0:50051"`), and the file's values are handed to
//! clap as flags placed before the real command line, but only for
//! settings that neither the environment nor a flag gave. A new setting
//! therefore needs nothing here.

use std::{
    collections::BTreeSet,
    ffi::OsString,
    fmt::Write as _,
    path::{Path, PathBuf},
};

use clap::{ArgMatches, Command, parser::ValueSource};

/// Settings whose values are secret or may embed one: `config check` shows
/// them redacted.
const SECRET_SETTINGS: &[&str] = &["database_url"];

/// Why the settings could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// The command line or environment is invalid, or help or the version
    /// was asked for: clap prints it and chooses the exit code.
    #[error(transparent)]
    Clap(#[from] clap::Error),
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
    /// The ids of the settings the file supplied.
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
    let matches = command.clone().try_get_matches_from(&args)?;
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

    let mut flags = Vec::new();
    let mut from_file = BTreeSet::new();
    for (key, value) in &table {
        let Some(arg) = command
            .get_arguments()
            .find(|arg| arg.get_id() == key.as_str() && is_setting(arg, config_arg))
        else {
            return Err(file_error(format!(
                "unknown setting `{key}` (keys are the flags' names with `_` for `-`, \
                 e.g. listen_addr)"
            )));
        };
        let value = scalar(value).ok_or_else(|| {
            file_error(format!(
                "setting `{key}` must be a string, an integer, a boolean or a list of them"
            ))
        })?;
        match matches.value_source(key) {
            Some(ValueSource::EnvVariable | ValueSource::CommandLine) => {}
            _ => {
                let long = arg.get_long().unwrap_or(key.as_str());
                flags.push(OsString::from(format!("--{long}={value}")));
                from_file.insert(key.clone());
            }
        }
    }

    let mut merged = Vec::with_capacity(args.len() + flags.len());
    let mut rest = args.into_iter();
    merged.extend(rest.next());
    merged.extend(flags);
    merged.extend(rest);
    // The command line and environment parsed alone, so a failure now is
    // the file's. clap's message names the flag; it may quote the value,
    // but values of secret settings are never parsed by clap.
    let matches = command
        .clone()
        .try_get_matches_from(merged)
        .map_err(|err| {
            let rendered = err.to_string();
            let first = rendered.lines().next().unwrap_or_default();
            file_error(first.trim_start_matches("error: ").to_owned())
        })?;
    Ok(Layered {
        matches,
        file: Some(path),
        from_file,
        command,
    })
}

impl Layered {
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
        for arg in self.command.get_arguments() {
            if !is_setting(arg, config_arg) {
                continue;
            }
            let id = arg.get_id().as_str();
            let origin = if self.from_file.contains(id) {
                "from the file".to_owned()
            } else {
                match self.matches.value_source(id) {
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
            let values: Vec<String> = self
                .matches
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
            ("port = 70000", "--port"),
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
