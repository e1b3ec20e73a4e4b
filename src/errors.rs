//! Every error the library returns, in one place.
//!
//! Messages are lowercase, name the thing that is wrong and, where it helps, what to do
//! about it. The underlying cause travels in `#[source]` and is never repeated in the text;
//! `main` prints the whole chain once.

use std::io;
use std::path::PathBuf;

/// A configuration problem: one field, one message. Nothing has started when this is
/// returned.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
#[error("{origin}: {path}: {message}")]
pub struct ConfigError {
    /// Where the setting came from: `config FILE` or `command line`.
    pub origin: String,
    /// The field path, e.g. `apps.web.autoscale.min` or `--listen`.
    pub path: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(origin: &str, path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            origin: one_line(origin),
            path: one_line(&path.into()),
            message: one_line(&message.into()),
        }
    }
}

/// Control characters from user input (a newline in a value, a terminal escape) are
/// shown escaped, so that an error stays one line and cannot drive the terminal.
fn one_line(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_string();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Failures while the master is starting up (after the configuration parsed).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot read config file {path}")]
    ReadConfig {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{field}: cannot listen on {addr}{hint}")]
    Bind {
        field: String,
        addr: String,
        hint: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot set up {what}")]
    Setup {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("control socket: {0}")]
    Control(String),
}

/// Failures of the fork/exec of one worker. The master logs these and treats them like a
/// crash of that slot (so they are retried with backoff), never as fatal.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("cannot start `{program}`")]
    Exec {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot create the channel for a worker")]
    Channel(#[source] io::Error),
}

/// Failures of a control-socket client (the `status`, `scale`, … subcommands).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach a running master at {path} (is `processes run` running with this --name or --control?)"
    )]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("lost the connection to the master")]
    Io(#[source] io::Error),
    #[error("the master sent a reply this client does not understand")]
    Protocol(#[source] serde_json::Error),
    #[error("{0}")]
    Refused(String),
}
