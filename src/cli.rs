//! Command-line parsing: `processes run` and the client subcommands.
//!
//! Flags go through the same parsers as the config file (`config`), so a bad value gives
//! the same message whichever way it came in; here the field is named by its flag
//! (`--autoscale: min (4) is above max (2)`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::config::{
    self, AppName, AppSpec, BackoffParams, Config, Dispatch, ListenAddr, RestartPolicy, Runtime,
    Sizing,
};
use crate::errors::ConfigError;

#[derive(Debug, Parser)]
#[command(
    name = "processes",
    version,
    about = "A cluster master: runs pools of workers, owns their sockets, restarts what crashes.",
    propagate_version = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a master: one app from the command line, or every app in a config file.
    Run(Box<RunArgs>),
    /// Show apps and workers of a running master.
    Status(StatusArgs),
    /// Set an app's number of workers, or its autoscaling bounds.
    Scale(ScaleArgs),
    /// Replace an app's workers one batch at a time, without dropping connections.
    Reload(ReloadArgs),
    /// Replace one worker: its replacement starts first, then it is drained.
    Restart(RestartArgs),
    /// Stop one app, or the whole master and all its workers.
    Stop(StopArgs),
    /// Start a stopped app again; slots waiting to restart after crashes start at once.
    Start(StartArgs),
    /// A live view of a running master: pools, workers, load, lag; keys to scale and reload.
    Top(Target),
}

/// Which running master a client command talks to.
#[derive(Debug, Args, Clone, Default)]
pub struct Target {
    /// The master's name (its `run --name`, else its app's name or its config file's stem).
    #[arg(long, global = true)]
    pub name: Option<String>,
    /// The master's control socket path.
    #[arg(long, global = true, value_name = "PATH")]
    pub control: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Only this app.
    pub app: Option<String>,
    /// Print JSON (the format is documented in README.md).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub target: Target,
}

#[derive(Debug, Args)]
pub struct ScaleArgs {
    pub app: String,
    /// A number of workers (a fixed pool), or min=A,max=B (autoscaling bounds).
    #[arg(value_name = "N|min=A,max=B")]
    pub size: String,
    #[command(flatten)]
    pub target: Target,
}

impl ScaleArgs {
    /// `(n, min, max)` for the request.
    pub fn parse_size(&self) -> Result<ScaleSize, ConfigError> {
        if let Ok(n) = self.size.trim().parse::<i64>() {
            if n == 0 {
                return Err(err(
                    "N",
                    format!(
                        "0 is not a size; `processes stop {}` stops the app",
                        self.app
                    ),
                ));
            }
            let n = config::check_instances(n).map_err(|m| err("N", m))?;
            return Ok((Some(n), None, None));
        }
        let (min, max) = config::parse_autoscale(&self.size).map_err(|(sub, m)| {
            if sub.is_empty() {
                err("N|min=A,max=B", format!("{m}, or a number of workers"))
            } else {
                err("N|min=A,max=B", format!("{sub} {m}"))
            }
        })?;
        Ok((None, Some(min), Some(max)))
    }
}

/// What `processes scale` asks for: a fixed size, or autoscaling bounds.
pub type ScaleSize = (Option<usize>, Option<usize>, Option<usize>);

#[derive(Debug, Args)]
pub struct RestartArgs {
    pub app: String,
    /// The worker's slot (`processes status` shows them); without it, every worker of the
    /// app, one at a time (a rolling reload, as `processes reload APP`).
    pub slot: Option<u32>,
    #[command(flatten)]
    pub target: Target,
}

#[derive(Debug, Args)]
pub struct StopArgs {
    /// Only this app (default: the whole master).
    pub app: Option<String>,
    /// Return once the master has the request, without waiting for the workers (or the
    /// master) to be gone.
    #[arg(long)]
    pub no_wait: bool,
    #[command(flatten)]
    pub target: Target,
}

#[derive(Debug, Args)]
pub struct StartArgs {
    /// The app to start.
    pub app: String,
    #[command(flatten)]
    pub target: Target,
}

#[derive(Debug, Args)]
pub struct ReloadArgs {
    /// Only this app (default: every app).
    pub app: Option<String>,
    /// Workers replaced at a time (at least 1).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch: Option<u32>,
    #[command(flatten)]
    pub target: Target,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// A fixed number of workers, or `max` for one per CPU this master may use.
    #[arg(short = 'i', long, value_name = "N|max")]
    pub instances: Option<String>,
    /// Size the pool between these bounds, e.g. min=2,max=16.
    #[arg(long, value_name = "min=A,max=B")]
    pub autoscale: Option<String>,
    /// The app's name (default: from the command); also names the master.
    #[arg(long)]
    pub name: Option<String>,
    /// Working directory for the workers.
    #[arg(long, value_name = "DIR")]
    pub cwd: Option<PathBuf>,
    /// An environment variable for the workers (repeatable).
    #[arg(long = "env", value_name = "K=V")]
    pub env: Vec<String>,
    /// An address to listen on (repeatable): HOST:PORT, :PORT, [::]:PORT or a socket path.
    #[arg(long, value_name = "ADDR")]
    pub listen: Vec<String>,
    /// Time between SIGTERM and SIGKILL when stopping a worker.
    #[arg(long, value_name = "DURATION")]
    pub grace: Option<String>,
    /// When to restart a worker that exited: always, on-failure or never.
    #[arg(long, value_name = "POLICY")]
    pub restart: Option<String>,
    /// A worker that does not notify readiness counts as ready after this much uptime.
    #[arg(long, value_name = "DURATION")]
    pub ready_after: Option<String>,
    /// How connections reach workers: round-robin, least-loaded or shared.
    #[arg(long, value_name = "MODE")]
    pub dispatch: Option<String>,
    /// node or generic (default: node when the command is node).
    #[arg(long, value_name = "RUNTIME")]
    pub runtime: Option<String>,
    /// How often every worker's load is sampled (and autoscaled pools steered).
    #[arg(long, value_name = "DURATION")]
    pub sample_interval: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    /// Register each app's live endpoints in etcd: etcd://HOST:PORT[,HOST:PORT…].
    #[arg(long, value_name = "URL")]
    pub registry: Option<String>,
    /// The address other machines reach this one at, for the registry (default: host name).
    #[arg(long, value_name = "HOST")]
    pub advertise: Option<String>,
    /// Replace a worker whose RSS passes this (e.g. 512MiB): the new one starts first.
    #[arg(long, value_name = "SIZE")]
    pub max_memory: Option<String>,
    /// Kill a worker at once when its RSS passes this.
    #[arg(long, value_name = "SIZE")]
    pub kill_memory: Option<String>,
    /// The master's environment variables workers see: all, none, or NAME,NAME,PREFIX_*
    /// (default: PATH, HOME, USER, LOGNAME, SHELL, LANG, LANGUAGE, LC_*, TZ, TERM, TMPDIR).
    #[arg(long, value_name = "LIST")]
    pub inherit_env: Option<String>,
    /// Run workers as this user (the master must be root; it binds ports first).
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
    /// Run every app in this file instead of a command.
    #[arg(short = 'c', long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Control socket path (default: under $XDG_RUNTIME_DIR/processes/).
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// The program and its arguments, after `--`.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

const ORIGIN: &str = "command line";

impl Cli {
    /// Parses the command line; a `run` whose command was given without `--` before it
    /// gets an error that says so and shows the line with the `--` in place.
    pub fn parse_args(args: Vec<std::ffi::OsString>) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(&args).map_err(|e| missing_separator_hint(e, &args))
    }
}

/// `processes run -i 2 node server.js`: clap's "unexpected argument 'node'" becomes a
/// tip to put `--` before the command, with the corrected line when inserting it there
/// parses. Everything after `--` is the command's, so its own `-flags` never reach us.
fn missing_separator_hint(mut e: clap::Error, args: &[std::ffi::OsString]) -> clap::Error {
    use clap::builder::StyledStr;
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if e.kind() != ErrorKind::UnknownArgument
        || args.get(1).is_none_or(|a| a != "run")
        || args.iter().any(|a| a == "--")
    {
        return e;
    }
    let Some(ContextValue::String(bad)) = e.get(ContextKind::InvalidArg) else {
        return e;
    };
    if bad.starts_with('-') {
        return e;
    }
    // Where the command starts: the first place `bad` appears at which a `--` makes the
    // whole line parse (the same word may also be an option's value earlier on).
    let fixed = (2..args.len())
        .filter(|&i| args[i] == bad.as_str())
        .find_map(|i| {
            let mut with = args.to_vec();
            with.insert(i, "--".into());
            Cli::try_parse_from(&with).ok().map(|_| (i, with))
        });
    let line = |with: &[std::ffi::OsString]| {
        std::iter::once("processes".to_string())
            .chain(with[1..].iter().map(|a| shell_quote(&a.to_string_lossy())))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let tip = match fixed {
        // `processes run node server.js -i 2` (PM2's order): flags of ours after the
        // command were most likely meant for us.
        Some((i, with)) => match flags_moved_before(args, i) {
            Some((moved, flags)) => format!(
                "put `--` before the command, and the flags meant for processes before it: {} \
                 (or, if {flags} {} the command's own: {})",
                line(&moved),
                if flags.contains(", ") { "are" } else { "is" },
                line(&with)
            ),
            None => format!("put `--` before the command: {}", line(&with)),
        },
        None => "put `--` before the command: processes run -i 2 -- node server.js".into(),
    };
    e.insert(
        ContextKind::Suggested,
        ContextValue::StyledStrs(vec![StyledStr::from(tip)]),
    );
    e
}

/// `args` with the command starting at `start`, when what follows some of the command's
/// words is nothing but `run`'s own flags (and their values): those flags moved before a
/// `--` in front of the command, if that line parses, and the flags' names.
fn flags_moved_before(
    args: &[std::ffi::OsString],
    start: usize,
) -> Option<(Vec<std::ffi::OsString>, String)> {
    use clap::CommandFactory;
    let cli = Cli::command();
    let run = cli.find_subcommand("run")?;
    // Each of `run`'s flags as typed (`-i`, `--instances`, …), and whether it takes a value.
    let ours: BTreeMap<String, bool> = run
        .get_arguments()
        .flat_map(|a| {
            let value = a.get_action().takes_values();
            let longs = a.get_long().into_iter().map(|l| format!("--{l}"));
            let shorts = a.get_short().into_iter().map(|c| format!("-{c}"));
            longs
                .chain(shorts)
                .map(move |n| (n, value))
                .collect::<Vec<_>>()
        })
        .collect();
    // `--listen=:80` and `-i4` carry their value.
    let flag = |a: &str| -> Option<(String, bool)> {
        let (name, inline) = match a.split_once('=') {
            Some((n, _)) if a.starts_with("--") => (n.to_string(), true),
            _ if !a.starts_with("--") && a.starts_with('-') && a.len() > 2 => {
                (a[..2].to_string(), true)
            }
            _ => (a.to_string(), false),
        };
        ours.get(&name).map(|&takes| (name, takes && !inline))
    };
    let tail: Vec<String> = args[start..]
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let first = tail.iter().position(|a| flag(a).is_some())?;
    let mut names = Vec::new();
    let mut j = first;
    while j < tail.len() {
        let (name, takes_value) = flag(&tail[j])?;
        names.push(name);
        j += if takes_value { 2 } else { 1 };
    }
    if j != tail.len() || first == 0 {
        return None;
    }
    let mut moved = args[..start].to_vec();
    moved.extend_from_slice(&args[start + first..]);
    moved.push("--".into());
    moved.extend_from_slice(&args[start..start + first]);
    Cli::try_parse_from(&moved).ok()?;
    Some((moved, names.join(", ")))
}

/// `arg` as a shell would need it typed: as is when that is safe, else single-quoted.
fn shell_quote(arg: &str) -> String {
    let plain = !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=@%+,".contains(c));
    if plain {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// `-i N`, or `-i max` (PM2's spelling) for as many workers as CPUs this process may run
/// on.
fn parse_instances(s: &str) -> Result<i64, String> {
    if s.trim() == "max" {
        return Ok(config::instances_max());
    }
    s.trim()
        .parse::<i64>()
        .map_err(|_| format!("`{s}` is not a number of workers; give N, or max for one per CPU"))
}

fn err(field: &str, msg: impl Into<String>) -> ConfigError {
    ConfigError::new(ORIGIN, field, msg)
}

impl RunArgs {
    /// The master's name: `--name`, else the config file's stem, else the app's name as
    /// the command gives it. From the flags alone, so a client reading a master's command
    /// line works out the same name.
    pub fn master_name(&self) -> String {
        if let Some(n) = &self.name {
            return n.clone();
        }
        match &self.config {
            Some(f) => f
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("processes")
                .to_string(),
            // The name `app_from_flags` gives the app.
            None => config::default_name(&self.command),
        }
    }

    /// Turns the flags (or the file they name) into a validated config.
    pub fn to_config(&self) -> Result<Config, crate::errors::StartError> {
        if let Some(file) = &self.config {
            let app_flags: [(&str, bool); 15] = [
                ("-i/--instances", self.instances.is_some()),
                ("--autoscale", self.autoscale.is_some()),
                ("--cwd", self.cwd.is_some()),
                ("--env", !self.env.is_empty()),
                ("--listen", !self.listen.is_empty()),
                ("--grace", self.grace.is_some()),
                ("--restart", self.restart.is_some()),
                ("--ready-after", self.ready_after.is_some()),
                ("--dispatch", self.dispatch.is_some()),
                ("--runtime", self.runtime.is_some()),
                ("--max-memory", self.max_memory.is_some()),
                ("--kill-memory", self.kill_memory.is_some()),
                ("--inherit-env", self.inherit_env.is_some()),
                ("--user", self.user.is_some()),
                ("COMMAND", !self.command.is_empty()),
            ];
            if let Some((flag, _)) = app_flags.iter().find(|(_, set)| *set) {
                return Err(err(
                    flag,
                    "cannot be combined with -c/--config; set it for the app in the file",
                )
                .into());
            }
            let mut config = config::load_file(file)?;
            self.apply_master_flags(&mut config)?;
            return Ok(config);
        }
        let mut config = self.app_from_flags()?;
        self.apply_master_flags(&mut config)?;
        Ok(config)
    }

    /// Master-wide flags, which also override a config file's values.
    fn apply_master_flags(&self, config: &mut Config) -> Result<(), ConfigError> {
        if let Some(s) = &self.sample_interval {
            config.sample_interval = config::parse_duration(s)
                .and_then(config::check_sample_interval)
                .map_err(|m| err("--sample-interval", m))?;
        }
        if let Some(s) = &self.metrics {
            config.metrics = Some(config::parse_metrics_addr(s).map_err(|m| err("--metrics", m))?);
        }
        if let Some(url) = &self.registry {
            let keep = config.registry.take();
            let mut r =
                config::RegistrySettings::from_url(url).map_err(|m| err("--registry", m))?;
            if let Some(old) = keep {
                r.prefix = old.prefix;
                r.ttl = old.ttl;
                r.advertise = old.advertise;
            }
            config.registry = Some(r);
        }
        if let Some(a) = &self.advertise {
            config::check_advertise(a).map_err(|m| err("--advertise", m))?;
            match config.registry.as_mut() {
                Some(r) => r.advertise = Some(a.clone()),
                None => return Err(err("--advertise", "only means something with --registry")),
            }
        }
        Ok(())
    }

    fn app_from_flags(&self) -> Result<Config, ConfigError> {
        if self.command.is_empty() {
            return Err(err(
                "COMMAND",
                "missing; give the program after `--` (e.g. `processes run -i 4 -- node server.js`) or a config file with -c",
            ));
        }
        let name = match &self.name {
            Some(n) => AppName::parse(n).map_err(|m| err("--name", m))?,
            None => AppName::parse(&config::default_name(&self.command))
                .map_err(|m| err("--name", m))?,
        };
        if let Some(cwd) = &self.cwd {
            config::check_cwd(cwd).map_err(|m| err("--cwd", m))?;
        }
        config::check_command(&self.command, self.cwd.as_deref()).map_err(|m| err("COMMAND", m))?;
        let sizing = match (self.instances.as_deref(), &self.autoscale) {
            (Some(_), Some(_)) => {
                return Err(err(
                    "--autoscale",
                    "cannot be combined with -i/--instances; keep one",
                ));
            }
            (Some(n), None) => {
                let n = parse_instances(n).map_err(|m| err("-i/--instances", m))?;
                Sizing::Fixed(config::check_instances(n).map_err(|m| err("-i/--instances", m))?)
            }
            (None, Some(s)) => {
                let (min, max) = config::parse_autoscale(s).map_err(|(sub, m)| {
                    if sub.is_empty() {
                        err("--autoscale", m)
                    } else {
                        err("--autoscale", format!("{sub} {m}"))
                    }
                })?;
                Sizing::Auto { min, max }
            }
            (None, None) => Sizing::Fixed(1),
        };
        let mut env = BTreeMap::new();
        for e in &self.env {
            let (k, v) = config::parse_env_pair(e).map_err(|m| err("--env", m))?;
            env.insert(k, v);
        }
        let mut listen = Vec::new();
        for l in &self.listen {
            let addr = ListenAddr::parse(l).map_err(|m| err("--listen", m))?;
            if listen.contains(&addr) {
                return Err(err("--listen", format!("`{l}` is given twice")));
            }
            listen.push(addr);
        }
        config::check_port_env(&env, &listen).map_err(|m| err("--env", m))?;
        let duration =
            |field: &str, v: &Option<String>, default: Duration| -> Result<Duration, ConfigError> {
                match v {
                    None => Ok(default),
                    Some(s) => config::parse_duration(s).map_err(|m| err(field, m)),
                }
            };
        let grace = duration("--grace", &self.grace, config::DEFAULT_GRACE)?;
        let ready_after = duration(
            "--ready-after",
            &self.ready_after,
            config::DEFAULT_READY_AFTER,
        )?;
        let restart = match &self.restart {
            None => RestartPolicy::Always,
            Some(s) => match s.as_str() {
                "always" => RestartPolicy::Always,
                "on-failure" => RestartPolicy::OnFailure,
                "never" => RestartPolicy::Never,
                _ => {
                    return Err(err(
                        "--restart",
                        format!("`{s}` is not a restart policy; use always, on-failure or never"),
                    ));
                }
            },
        };
        let dispatch = match &self.dispatch {
            None => None,
            Some(s) => Some(Dispatch::parse(s).map_err(|m| err("--dispatch", m))?),
        };
        let runtime = match self.runtime.as_deref() {
            None if config::looks_like_node(&self.command) => Runtime::Node,
            None => Runtime::Generic,
            Some("node") => Runtime::Node,
            Some("generic") => Runtime::Generic,
            Some(s) => {
                return Err(err(
                    "--runtime",
                    format!("`{s}` is not a runtime; use node or generic"),
                ));
            }
        };
        let size = |field: &str, v: &Option<String>| -> Result<Option<u64>, ConfigError> {
            v.as_deref()
                .map(|s| config::parse_size(s).map_err(|m| err(field, m)))
                .transpose()
        };
        let max_memory = size("--max-memory", &self.max_memory)?;
        let kill_memory = size("--kill-memory", &self.kill_memory)?;
        if let (Some(soft), Some(hard)) = (max_memory, kill_memory)
            && hard < soft
        {
            return Err(err(
                "--kill-memory",
                "is below --max-memory; the hard limit must be the higher one",
            ));
        }
        Ok(Config {
            sample_interval: config::DEFAULT_SAMPLE_INTERVAL,
            metrics: None,
            registry: None,
            apps: vec![AppSpec {
                name,
                command: self.command.clone(),
                cwd: self.cwd.clone(),
                env,
                sizing,
                listen,
                grace,
                restart,
                backoff: BackoffParams::default(),
                ready_after,
                dispatch,
                runtime,
                preload: true,
                tuning: config::Tuning::default(),
                max_memory,
                kill_memory,
                inherit_env: match &self.inherit_env {
                    None => config::InheritEnv::default(),
                    Some(s) => config::InheritEnv::parse(s).map_err(|m| err("--inherit-env", m))?,
                },
                user: match &self.user {
                    None => None,
                    Some(u) => Some(config::RunAs::resolve(u, None).map_err(|m| err("--user", m))?),
                },
            }],
            file: None,
        })
    }
}

impl Target {
    /// The control socket to talk to: `--control`, else `--name`'s default path, else the
    /// only master running for this user.
    pub fn resolve(&self) -> Result<PathBuf, crate::errors::ClientError> {
        if let Some(p) = &self.control {
            return Ok(p.clone());
        }
        let probe = crate::control::default_path("x");
        let dir = probe.parent().map(PathBuf::from).unwrap_or_default();
        let live_here = || {
            let mut live: Vec<PathBuf> = std::fs::read_dir(&dir)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "sock"))
                .filter(|p| answers(p))
                .collect();
            live.sort();
            live
        };
        if let Some(n) = &self.name {
            let path = crate::control::default_path(n);
            if answers(&path) {
                return Ok(path);
            }
            // Not at its default path: a master of that name started with its own
            // --control. The running masters' command lines say where theirs is.
            let mut named: Vec<PathBuf> = running_masters()
                .into_iter()
                .filter(|(name, _)| name == n)
                .map(|(_, control)| control)
                .collect();
            named.sort();
            named.dedup();
            return match named.len() {
                1 => Ok(named.remove(0)),
                0 => {
                    let live = live_here();
                    let here = live
                        .iter()
                        .filter_map(|p| p.file_stem().and_then(|s| s.to_str()))
                        .collect::<Vec<_>>();
                    Err(crate::errors::ClientError::Refused(format!(
                        "no master named {n} is running: nothing answers at {} (its control socket \
                         by default), and no running master of this user was started as {n} with \
                         its own --control. A master started with `--control PATH` is reached with \
                         `--control PATH`{}",
                        path.display(),
                        if here.is_empty() {
                            String::new()
                        } else {
                            format!(
                                "; masters running under {}: {}",
                                dir.display(),
                                here.join(", ")
                            )
                        }
                    )))
                }
                _ => Err(crate::errors::ClientError::Refused(format!(
                    "several masters named {n} run, with control sockets {}; choose one with --control",
                    named
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))),
            };
        }
        let mut live = live_here();
        match live.len() {
            1 => Ok(live.remove(0)),
            0 => Err(crate::errors::ClientError::Refused(format!(
                "no running master found in {}; start one with `processes run`, or pass --name or --control",
                dir.display()
            ))),
            _ => Err(crate::errors::ClientError::Refused(format!(
                "several masters run ({}); choose one with --name",
                live.iter()
                    .filter_map(|p| p.file_stem().and_then(|s| s.to_str()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }
}

/// Whether a master answers at this control socket.
fn answers(path: &std::path::Path) -> bool {
    std::os::unix::net::UnixStream::connect(path).is_ok()
}

/// `(name, control socket)` of every `processes run` of this user whose control socket
/// answers, read from their command lines in `/proc` (a master's name and control path
/// follow from its flags). Nothing where there is no `/proc`.
fn running_masters() -> Vec<(String, PathBuf)> {
    use std::os::unix::fs::MetadataExt;
    let me = nix::unistd::getuid().as_raw();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in procs.flatten() {
        let pid = entry.path();
        if !entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
            || entry.metadata().map(|m| m.uid()).ok() != Some(me)
        {
            continue;
        }
        let Ok(cmdline) = std::fs::read(pid.join("cmdline")) else {
            continue;
        };
        let argv: Vec<std::ffi::OsString> = cmdline
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| {
                <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(a).to_os_string()
            })
            .collect();
        let is_ours = argv
            .first()
            .and_then(|a| std::path::Path::new(a).file_name())
            .is_some_and(|f| f == "processes");
        if !is_ours || argv.get(1).is_none_or(|a| a != "run") {
            continue;
        }
        let Ok(Cli {
            command: Command::Run(args),
        }) = Cli::try_parse_from(&argv)
        else {
            continue;
        };
        let name = args.master_name();
        let control = match &args.control {
            Some(c) if c.is_relative() => match std::fs::read_link(pid.join("cwd")) {
                Ok(cwd) => cwd.join(c),
                Err(_) => continue,
            },
            Some(c) => c.clone(),
            None => crate::control::default_path(&name),
        };
        if answers(&control) {
            found.push((name, control));
        }
    }
    found
}
