//! A TOML config file under the command line, for both binaries.
//!
//! Every key is the long name of a flag of the command that holds the
//! `--config` option (`broker = "mqtt://hub:1883"`, `state-dir = "..."`),
//! so the file needs no schema of its own and a new flag is settable from
//! the file the day it is added. Precedence: flags, then environment
//! variables, then the file, then built-in defaults. The mechanism is one
//! pass over clap's matches: a file key applies only where clap reports the
//! value came from its default or nowhere, and is then handed back to clap
//! as `--key=value`, so it goes through the same parser and checks as a
//! flag. An unknown key is an error naming the key and the file.
//!
//! Secrets are not values here: a file names the file that holds one (the
//! agent's `enroll-token-file`), as the flags do.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, Command, Parser};

/// The id (and long name) of the option that names the config file.
pub const CONFIG_ARG: &str = "config";

#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    /// The command line itself is wrong (or asks for help); clap's error,
    /// to be shown and exited with as clap does.
    #[error(transparent)]
    Args(clap::Error),
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML")]
    Toml {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("unknown key `{key}` in config file {path}{hint}")]
    UnknownKey {
        key: String,
        path: PathBuf,
        hint: String,
    },
    #[error("key `{key}` in config file {path}: {reason}")]
    BadValue {
        key: String,
        path: PathBuf,
        reason: &'static str,
    },
    #[error("config file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// A config file's text with every commented `#key = value` example
/// uncommented: how the packaged files (`debian/*.toml`) are checked to
/// name only real keys.
pub fn uncomment_examples(text: &str) -> String {
    text.lines()
        .map(|l| {
            l.strip_prefix('#')
                .filter(|r| r.starts_with(|c: char| c.is_ascii_lowercase()) && r.contains(" = "))
                .unwrap_or(l)
        })
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Parses the process's arguments into `P` with the config file overlaid;
/// exits as clap does on a command-line error, `--help` or `--version`.
pub fn parse<P: Parser>() -> Result<P, ConfigFileError> {
    match try_parse_from(std::env::args_os()) {
        Err(ConfigFileError::Args(e)) => e.exit(),
        other => other,
    }
}

/// Parses `argv` into `P`. When the deepest subcommand given has a
/// `--config` option and it has a value (from the flag or its environment
/// variable), that TOML file's keys fill the flags set neither on the
/// command line nor in the environment.
pub fn try_parse_from<P, I, T>(argv: I) -> Result<P, ConfigFileError>
where
    P: Parser,
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    let mut argv: Vec<OsString> = argv.into_iter().map(Into::into).collect();
    let root = P::command();
    let matches = root
        .clone()
        .try_get_matches_from(argv.iter())
        .map_err(ConfigFileError::Args)?;
    let (cmd, m) = deepest(&root, &matches);
    let path = cmd
        .get_arguments()
        .any(|a| a.get_id() == CONFIG_ARG)
        .then(|| m.get_raw(CONFIG_ARG).and_then(|mut v| v.next()))
        .flatten()
        .map(PathBuf::from);
    let Some(path) = path else {
        return P::from_arg_matches(&matches).map_err(ConfigFileError::Args);
    };
    let table = read_table(&path)?;
    let extra = file_args(cmd, m, &table, &path)?;
    // Options before a `--`, where everything after is positional.
    let at = argv.iter().position(|a| a == "--").unwrap_or(argv.len());
    let rest = argv.split_off(at);
    argv.extend(extra);
    argv.extend(rest);
    let matches = root
        .try_get_matches_from(argv)
        .map_err(|e| ConfigFileError::Invalid {
            path: path.clone(),
            message: clap_message(&e),
        })?;
    P::from_arg_matches(&matches).map_err(|e| ConfigFileError::Invalid {
        path,
        message: clap_message(&e),
    })
}

/// The subcommand the user ran (the last one named) and its matches.
fn deepest<'a>(root: &'a Command, matches: &'a ArgMatches) -> (&'a Command, &'a ArgMatches) {
    let (mut cmd, mut m) = (root, matches);
    while let Some((name, sub)) = m.subcommand() {
        match cmd.find_subcommand(name) {
            Some(c) => (cmd, m) = (c, sub),
            None => break,
        }
    }
    (cmd, m)
}

fn read_table(path: &Path) -> Result<toml::Table, ConfigFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    text.parse::<toml::Table>()
        .map_err(|source| ConfigFileError::Toml {
            path: path.to_path_buf(),
            source,
        })
}

/// `--key=value` arguments for the file's keys that neither the command
/// line nor the environment set.
fn file_args(
    cmd: &Command,
    m: &ArgMatches,
    table: &toml::Table,
    path: &Path,
) -> Result<Vec<OsString>, ConfigFileError> {
    let bad = |key: &str, reason| ConfigFileError::BadValue {
        key: key.to_string(),
        path: path.to_path_buf(),
        reason,
    };
    let mut out = Vec::new();
    for (key, value) in table {
        let Some(arg) = settable(cmd, key) else {
            let dashed = key.replace('_', "-");
            let hint = if dashed != *key && settable(cmd, &dashed).is_some() {
                format!(" (keys are long flag names: `{dashed}`)")
            } else {
                String::new()
            };
            return Err(ConfigFileError::UnknownKey {
                key: key.clone(),
                path: path.to_path_buf(),
                hint,
            });
        };
        if matches!(
            m.value_source(arg.get_id().as_str()),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            continue;
        }
        let flag = format!("--{key}");
        match (arg.get_action(), value) {
            (ArgAction::SetTrue, toml::Value::Boolean(b))
            | (ArgAction::SetFalse, toml::Value::Boolean(b)) => {
                if *b == matches!(arg.get_action(), ArgAction::SetTrue) {
                    out.push(flag.into());
                }
            }
            (ArgAction::SetTrue | ArgAction::SetFalse, _) => {
                return Err(bad(key, "expected true or false"))
            }
            (ArgAction::Append, toml::Value::Array(items)) => {
                for item in items {
                    let v = scalar(item).ok_or_else(|| bad(key, "expected a list of values"))?;
                    out.push(format!("{flag}={v}").into());
                }
            }
            (ArgAction::Set | ArgAction::Append, v) => {
                let v =
                    scalar(v).ok_or_else(|| bad(key, "expected one value, not a list or table"))?;
                out.push(format!("{flag}={v}").into());
            }
            (ArgAction::Count, toml::Value::Integer(n)) if (0..=255).contains(n) => {
                out.extend(std::iter::repeat_n(OsString::from(&flag), *n as usize));
            }
            _ => return Err(bad(key, "this flag cannot be set from a file")),
        }
    }
    Ok(out)
}

/// The option `key` names: a long flag of `cmd` other than `--config`.
fn settable<'a>(cmd: &'a Command, key: &str) -> Option<&'a clap::Arg> {
    cmd.get_arguments()
        .find(|a| a.get_long() == Some(key) && a.get_id() != CONFIG_ARG && !a.is_positional())
}

fn scalar(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(n) => Some(n.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        toml::Value::Datetime(d) => Some(d.to_string()),
        toml::Value::Array(_) | toml::Value::Table(_) => None,
    }
}

/// clap's message on one line, without its `error: ` prefix and the usage
/// and tips after the first blank line.
fn clap_message(e: &clap::Error) -> String {
    let text = e.to_string();
    let lines: Vec<&str> = text
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect();
    let joined = lines.join(" ");
    joined
        .strip_prefix("error: ")
        .unwrap_or(&joined)
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Parser)]
    struct Args {
        #[arg(long, env = "DROVER_CONFIG_FILE_TEST_CONFIG")]
        config: Option<PathBuf>,
        #[arg(
            long,
            env = "DROVER_CONFIG_FILE_TEST_BROKER",
            default_value = "mqtt://default"
        )]
        broker: String,
        #[arg(long, env = "DROVER_CONFIG_FILE_TEST_STATE_DIR")]
        state_dir: Option<PathBuf>,
        #[arg(long, default_value_t = 10)]
        heartbeat_secs: u64,
        #[arg(long)]
        no_cleanup: bool,
        #[arg(long, default_value_t = true, action = ArgAction::Set)]
        mirror: bool,
        #[arg(long = "label")]
        labels: Vec<String>,
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
    }

    #[derive(Debug, Parser)]
    struct Tool {
        #[arg(long, default_value = "http://api")]
        api: String,
        #[command(subcommand)]
        cmd: Sub,
    }

    #[derive(Debug, clap::Subcommand)]
    enum Sub {
        Serve {
            #[arg(long)]
            config: Option<PathBuf>,
            #[arg(long, default_value = "data")]
            data_dir: PathBuf,
        },
        List,
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(f.path(), text).expect("write config");
        f
    }

    fn parse(argv: &[&str]) -> Result<Args, ConfigFileError> {
        try_parse_from(["t"].iter().chain(argv))
    }

    #[test]
    fn without_a_file_flags_and_defaults_as_ever() {
        let a = parse(&["--heartbeat-secs", "3"]).expect("parse");
        assert_eq!(a.heartbeat_secs, 3);
        assert_eq!(a.broker, "mqtt://default");
        assert!(a.mirror && !a.no_cleanup && a.labels.is_empty());
    }

    #[test]
    fn the_file_fills_what_flags_leave_at_their_default() {
        let f = file(
            r#"
            broker = "mqtt://hub:1883"
            state-dir = "/var/lib/x"
            heartbeat-secs = 7
            no-cleanup = true
            mirror = false
            label = ["site=a", "role=b"]
            tls-cert = "c.pem"
            tls-key = "k.pem"
            "#,
        );
        let p = f.path().to_str().expect("utf-8 path");
        let a = parse(&["--config", p]).expect("parse");
        assert_eq!(a.broker, "mqtt://hub:1883");
        assert_eq!(a.state_dir.as_deref(), Some(Path::new("/var/lib/x")));
        assert_eq!(a.heartbeat_secs, 7);
        assert!(a.no_cleanup);
        assert!(!a.mirror);
        assert_eq!(a.labels, ["site=a", "role=b"]);
        assert_eq!(a.tls_cert.as_deref(), Some(Path::new("c.pem")));
        assert_eq!(a.tls_key.as_deref(), Some(Path::new("k.pem")));
    }

    #[test]
    fn flags_win_over_the_file() {
        let f = file("heartbeat-secs = 7\nmirror = false\nlabel = [\"a=1\"]\n");
        let p = f.path().to_str().expect("utf-8 path");
        let a = parse(&[
            "--heartbeat-secs=2",
            "--config",
            p,
            "--mirror",
            "true",
            "--label",
            "b=2",
        ])
        .expect("parse");
        assert_eq!(a.heartbeat_secs, 2);
        assert!(a.mirror);
        assert_eq!(
            a.labels,
            ["b=2"],
            "a list flag given replaces the file's list"
        );
    }

    #[test]
    fn environment_wins_over_the_file_and_flags_over_the_environment() {
        let f = file("broker = \"mqtt://file\"\nstate-dir = \"/from/file\"\n");
        std::env::set_var("DROVER_CONFIG_FILE_TEST_CONFIG", f.path());
        std::env::set_var("DROVER_CONFIG_FILE_TEST_BROKER", "mqtt://env");
        std::env::set_var("DROVER_CONFIG_FILE_TEST_STATE_DIR", "/from/env");
        let a = parse(&["--state-dir", "/from/flag"]);
        std::env::remove_var("DROVER_CONFIG_FILE_TEST_CONFIG");
        std::env::remove_var("DROVER_CONFIG_FILE_TEST_BROKER");
        std::env::remove_var("DROVER_CONFIG_FILE_TEST_STATE_DIR");
        let a = a.expect("parse");
        assert_eq!(
            a.config.as_deref(),
            Some(f.path()),
            "the file named by the environment"
        );
        assert_eq!(a.broker, "mqtt://env");
        assert_eq!(a.state_dir.as_deref(), Some(Path::new("/from/flag")));
    }

    #[test]
    fn unknown_keys_are_errors_naming_key_and_file() {
        let f = file("broker = \"mqtt://x\"\nbrokr = \"mqtt://y\"\n");
        let p = f.path().to_str().expect("utf-8 path");
        let msg = parse(&["--config", p]).expect_err("typo").to_string();
        assert!(msg.contains("`brokr`") && msg.contains(p), "{msg}");

        let f = file("state_dir = \"/x\"\n");
        let p = f.path().to_str().expect("utf-8 path");
        let msg = parse(&["--config", p]).expect_err("snake case").to_string();
        assert!(
            msg.contains("`state_dir`") && msg.contains("`state-dir`"),
            "{msg}"
        );

        for key in ["config = \"other.toml\"", "help = true", "version = true"] {
            let f = file(key);
            let p = f.path().to_str().expect("utf-8 path");
            let e = parse(&["--config", p]).expect_err(key);
            assert!(
                matches!(e, ConfigFileError::UnknownKey { .. }),
                "{key}: {e}"
            );
        }
    }

    #[test]
    fn bad_values_name_the_key_and_the_file() {
        let cases = [
            ("no-cleanup = \"yes\"", "`no-cleanup`"),
            ("heartbeat-secs = [1, 2]", "`heartbeat-secs`"),
            ("label = [[\"a\"]]", "`label`"),
            ("heartbeat-secs = \"soon\"", "--heartbeat-secs"),
            ("tls-cert = \"c.pem\"", "--tls-key"),
            ("broker = ", "TOML"),
        ];
        for (text, needle) in cases {
            let f = file(text);
            let p = f.path().to_str().expect("utf-8 path");
            let msg = parse(&["--config", p]).expect_err(text).to_string();
            assert!(msg.contains(needle) && msg.contains(p), "{text}: {msg}");
        }
        let msg = parse(&["--config", "/nonexistent/drover.toml"])
            .expect_err("missing file")
            .to_string();
        assert!(msg.contains("/nonexistent/drover.toml"), "{msg}");
    }

    #[test]
    fn the_file_belongs_to_the_subcommand_that_names_it() {
        let f = file("data-dir = \"/var/lib/drover\"\n");
        let p = f.path().to_str().expect("utf-8 path");
        let t: Tool = try_parse_from(["t", "serve", "--config", p]).expect("parse");
        assert_eq!(t.api, "http://api");
        let Sub::Serve { data_dir, .. } = t.cmd else {
            panic!("serve")
        };
        assert_eq!(data_dir, Path::new("/var/lib/drover"));
        // Top-level options are not the subcommand's keys.
        let f = file("api = \"http://other\"\n");
        let p = f.path().to_str().expect("utf-8 path");
        let e = try_parse_from::<Tool, _, _>(["t", "serve", "--config", p]).expect_err("api");
        assert!(e.to_string().contains("`api`"), "{e}");
        assert!(try_parse_from::<Tool, _, _>(["t", "list"]).is_ok());
    }
}
