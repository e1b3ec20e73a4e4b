//! Validated app specs, from `processes.toml` or from `run` flags.
//!
//! Everything a user can type goes through the parsers here, so a bad value gives the same
//! message whichever way it came in. The invariant: an [`AppSpec`] that exists is valid —
//! bounds ordered, durations parsed, command present and resolvable, cwd a directory — so
//! the master never has to second-guess one. Sockets are bound later (see `sockets`), and a
//! port in use is reported there, still before anything starts.
//!
//! The TOML is read as a plain `toml::Table` and walked by hand rather than through serde's
//! derive, because every error must name its full field path (`apps.web.autoscale.min`)
//! and unknown keys must be errors; serde's messages give neither in this form.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::errors::ConfigError;

/// An app's name: short, printable, safe in a file name, a metric label and a log prefix.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AppName(String);

impl AppName {
    pub fn parse(s: &str) -> Result<AppName, String> {
        let ok_first = s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
        let ok_rest = s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        if s.is_empty() || s.len() > 64 || !ok_first || !ok_rest {
            return Err(format!(
                "`{s}` is not a usable name; use 1-64 letters, digits, `_`, `-` or `.`, starting with a letter or digit"
            ));
        }
        Ok(AppName(s.to_string()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AppName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How many workers an app runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sizing {
    /// A fixed pool; `SIGTTIN`/`SIGTTOU` and `processes scale` still move it by hand.
    Fixed(usize),
    /// Sized by load between `min` and `max`; starts at `min`.
    Auto { min: usize, max: usize },
}

impl Sizing {
    pub fn initial(&self) -> usize {
        match *self {
            Sizing::Fixed(n) => n,
            Sizing::Auto { min, .. } => min,
        }
    }
    /// The bounds that hand scaling (TTIN/TTOU) stays inside.
    pub fn bounds(&self) -> (usize, usize) {
        match *self {
            Sizing::Fixed(_) => (1, MAX_WORKERS),
            Sizing::Auto { min, max } => (min, max),
        }
    }
}

/// No app runs more workers than this; it keeps a typo (`instances = 40000`) from
/// fork-bombing the machine.
pub const MAX_WORKERS: usize = 1024;

/// When a worker that exited is started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartPolicy {
    Always,
    OnFailure,
    Never,
}

impl RestartPolicy {
    fn parse(s: &str) -> Result<Self, String> {
        match s {
            "always" => Ok(RestartPolicy::Always),
            "on-failure" => Ok(RestartPolicy::OnFailure),
            "never" => Ok(RestartPolicy::Never),
            _ => Err(format!(
                "`{s}` is not a restart policy; use always, on-failure or never"
            )),
        }
    }

    /// As it is written in a config file.
    pub fn as_str(&self) -> &'static str {
        match self {
            RestartPolicy::Always => "always",
            RestartPolicy::OnFailure => "on-failure",
            RestartPolicy::Never => "never",
        }
    }
}

/// How connections reach workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dispatch {
    /// The master accepts and passes each connection to the next worker in turn.
    RoundRobin,
    /// The master accepts and passes each connection to the worker with the fewest in flight.
    LeastLoaded,
    /// Workers accept on the inherited listening socket themselves.
    Shared,
}

impl Dispatch {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "round-robin" | "rr" => Ok(Dispatch::RoundRobin),
            "least-loaded" => Ok(Dispatch::LeastLoaded),
            "shared" | "inherit" => Ok(Dispatch::Shared),
            _ => Err(format!(
                "`{s}` is not a dispatch mode; use round-robin, least-loaded or shared"
            )),
        }
    }
    pub fn passes(&self) -> bool {
        !matches!(self, Dispatch::Shared)
    }
    pub fn as_str(&self) -> &'static str {
        match self {
            Dispatch::RoundRobin => "round-robin",
            Dispatch::LeastLoaded => "least-loaded",
            Dispatch::Shared => "shared",
        }
    }
}

/// What kind of program the workers are; Node workers get the cluster protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    Node,
    Generic,
}

impl Runtime {
    /// As it is written in a config file.
    pub fn as_str(&self) -> &'static str {
        match self {
            Runtime::Node => "node",
            Runtime::Generic => "generic",
        }
    }
}

/// Where a listener binds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl ListenAddr {
    /// `HOST:PORT`, `:PORT` (all IPv4 interfaces), `[::]:PORT`, or a unix socket path
    /// (anything with a `/`, or `unix:PATH`).
    pub fn parse(s: &str) -> Result<ListenAddr, String> {
        let s = s.trim();
        if let Some(path) = s.strip_prefix("unix:") {
            return unix_path(path);
        }
        if s.starts_with('/') || s.starts_with("./") || s.starts_with("../") {
            return unix_path(s);
        }
        let bad = || {
            format!(
                "`{s}` is not an address; use HOST:PORT, :PORT, [::]:PORT or a unix socket path"
            )
        };
        if let Some(port) = s.strip_prefix(':') {
            let port: u16 = port.parse().map_err(|_| bad())?;
            return Ok(ListenAddr::Tcp(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                port,
            )));
        }
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(ListenAddr::Tcp(addr));
        }
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        if host.is_empty() || port.parse::<u16>().is_err() {
            return Err(bad());
        }
        match (host, port.parse::<u16>().unwrap_or(0)).to_socket_addrs() {
            Ok(mut addrs) => addrs
                .next()
                .map(ListenAddr::Tcp)
                .ok_or_else(|| format!("`{host}` resolves to no address")),
            Err(_) => Err(format!(
                "cannot resolve host `{host}`; use an IP address or a name this machine knows"
            )),
        }
    }
}

fn unix_path(p: &str) -> Result<ListenAddr, String> {
    if p.is_empty() {
        return Err("a unix socket path cannot be empty".into());
    }
    // sun_path is 108 bytes including the terminating NUL.
    if p.len() > 107 {
        return Err(format!(
            "unix socket path `{p}` is longer than 107 bytes; use a shorter path"
        ));
    }
    Ok(ListenAddr::Unix(PathBuf::from(p)))
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Restart backoff and crash-loop detection, per slot.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BackoffParams {
    /// Delay before the first restart.
    pub initial: Duration,
    /// The delay never grows past this; a crash-looping slot is retried at this pace.
    pub max: Duration,
    /// Each consecutive crash multiplies the delay by this.
    pub multiplier: f64,
    /// A worker that stayed up this long resets its slot's backoff.
    pub reset_after: Duration,
    /// This many crashes within `crash_loop_window` mark a slot crash-looping.
    pub crash_loop_restarts: usize,
    pub crash_loop_window: Duration,
}

impl Default for BackoffParams {
    fn default() -> Self {
        BackoffParams {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(30),
            multiplier: 2.0,
            reset_after: Duration::from_secs(30),
            crash_loop_restarts: 5,
            crash_loop_window: Duration::from_secs(60),
        }
    }
}

/// One app, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct AppSpec {
    pub name: AppName,
    /// Program and arguments; `command[0]` is found in `PATH` when it has no `/`.
    pub command: Vec<String>,
    pub cwd: Option<PathBuf>,
    /// Extra environment for the workers, on top of the master's own.
    pub env: BTreeMap<String, String>,
    pub sizing: Sizing,
    pub listen: Vec<ListenAddr>,
    /// How long a stopping worker gets between `SIGTERM` and `SIGKILL`.
    pub grace: Duration,
    pub restart: RestartPolicy,
    pub backoff: BackoffParams,
    /// A worker that does not notify readiness counts as ready after this much uptime.
    pub ready_after: Duration,
    /// `None`: chosen by runtime (round-robin for Node, shared otherwise).
    pub dispatch: Option<Dispatch>,
    pub runtime: Runtime,
    /// Inject the load-reporting preload into Node workers.
    pub preload: bool,
    /// Autoscaling tuning.
    pub tuning: Tuning,
    /// Past this RSS a worker is replaced (the new one first, then the old one drained).
    pub max_memory: Option<u64>,
    /// Past this RSS a worker is killed at once.
    pub kill_memory: Option<u64>,
    /// Which of the master's environment variables workers see (besides `env`).
    pub inherit_env: InheritEnv,
    /// Run workers as this user and group (the master must be root to switch).
    pub user: Option<RunAs>,
}

/// The master's environment reaching workers. Secrets the master was started with do
/// not leak into workers unless asked for: by default only a short list of harmless
/// variables passes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InheritEnv {
    /// Every variable.
    All,
    /// These names; a trailing `*` matches a prefix (`LC_*`).
    Only(Vec<String>),
}

/// What workers inherit by default: locating programs and the locale, nothing more.
pub const DEFAULT_INHERITED_ENV: &[&str] = &[
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "LC_*", "TZ", "TERM", "TMPDIR",
];

/// Variables every login shell or terminal sets, which no app reads as its config: not
/// worth telling the user that workers do not get them.
const SESSION_ENV: &[&str] = &[
    "_",
    "OLDPWD",
    "PWD",
    "SHLVL",
    "PS1",
    "PS2",
    "LS_COLORS",
    "LSCOLORS",
    "COLORTERM",
    "DISPLAY",
    "MAIL",
    "HIST*",
    "LESS*",
    "SSH_*",
    "XDG_*",
    "DBUS_*",
    "TERM_*",
    "WINDOWID",
    "EDITOR",
    "VISUAL",
    "PAGER",
    "MOTD_SHOWN",
    "HOSTNAME",
    "INVOCATION_ID",
    "JOURNAL_STREAM",
    "SUDO_*",
    "CARGO*",
    "RUSTUP*",
    "RUST_*",
    "PROCESSES_*",
    "NO_COLOR",
];

/// Which of the master's variables `inherit` keeps from an app's workers that look like
/// the app's own settings (not the shell's or terminal's), sorted: what a user coming from
/// PM2 or gunicorn, where workers get the whole environment, would miss.
pub fn withheld_env<'a>(
    inherit: &InheritEnv,
    env: impl IntoIterator<Item = &'a str>,
) -> Vec<&'a str> {
    let session = |k: &str| {
        SESSION_ENV.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => k.starts_with(prefix),
            None => k == *p,
        })
    };
    let mut out: Vec<&str> = env
        .into_iter()
        .filter(|k| !inherit.allows(k) && !session(k))
        .collect();
    out.sort_unstable();
    out
}

impl Default for InheritEnv {
    fn default() -> Self {
        InheritEnv::Only(
            DEFAULT_INHERITED_ENV
                .iter()
                .map(|s| s.to_string())
                .collect(),
        )
    }
}

impl InheritEnv {
    /// `all`, `none`, or a comma-separated list of names (`A,B,LC_*`).
    pub fn parse(s: &str) -> Result<InheritEnv, String> {
        match s.trim() {
            "all" => Ok(InheritEnv::All),
            "none" | "" => Ok(InheritEnv::Only(Vec::new())),
            list => {
                let names: Vec<String> = list.split(',').map(|n| n.trim().to_string()).collect();
                for n in &names {
                    check_env_pattern(n)?;
                }
                Ok(InheritEnv::Only(names))
            }
        }
    }

    pub fn allows(&self, name: &str) -> bool {
        match self {
            InheritEnv::All => true,
            InheritEnv::Only(list) => list.iter().any(|p| match p.strip_suffix('*') {
                Some(prefix) => name.starts_with(prefix),
                None => p == name,
            }),
        }
    }
}

fn check_env_pattern(n: &str) -> Result<(), String> {
    let bare = n.strip_suffix('*').unwrap_or(n);
    if bare.is_empty() && n != "*" || bare.contains(['=', '*', ' ', '\0']) {
        return Err(format!(
            "`{n}` is not a variable name (a trailing * matches a prefix, as in LC_*)"
        ));
    }
    Ok(())
}

/// A user (and group) to run workers as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

impl RunAs {
    /// Looks the user (and optional group) up; the master must be able to switch to it.
    pub fn resolve(user: &str, group: Option<&str>) -> Result<RunAs, String> {
        let u = match user.parse::<u32>() {
            Ok(uid) => nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)),
            Err(_) => nix::unistd::User::from_name(user),
        }
        .map_err(|e| format!("cannot look up user `{user}`: {e}"))?
        .ok_or_else(|| format!("no user named `{user}` on this machine"))?;
        let gid = match group {
            None => u.gid.as_raw(),
            Some(g) => match g.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) => nix::unistd::Group::from_name(g)
                    .map_err(|e| format!("cannot look up group `{g}`: {e}"))?
                    .ok_or_else(|| format!("no group named `{g}` on this machine"))?
                    .gid
                    .as_raw(),
            },
        };
        let me = nix::unistd::geteuid();
        if !me.is_root() && (u.uid != me || gid != nix::unistd::getegid().as_raw()) {
            return Err(format!(
                "running workers as `{user}` needs the master to run as root (it runs as uid {me})"
            ));
        }
        Ok(RunAs {
            name: u.name,
            uid: u.uid.as_raw(),
            gid,
            home: u.dir,
        })
    }
}

/// The autoscaling settings a user may change; the defaults and their reasons are
/// `controller::Params`'s.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tuning {
    /// The utilization to steer to.
    pub setpoint: f64,
    /// Workers per CPU at most.
    pub cpu_factor: f64,
    /// A smaller size is applied only when every recommendation of this window agrees.
    pub down_window: Duration,
    /// At most one worker removed per this interval.
    pub down_interval: Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        let p = crate::controller::Params::default();
        Tuning {
            setpoint: p.setpoint,
            cpu_factor: p.cpu_factor,
            down_window: p.down_window,
            down_interval: p.down_interval,
        }
    }
}

impl AppSpec {
    pub fn is_node(&self) -> bool {
        self.runtime == Runtime::Node
    }

    /// The dispatch mode actually in force.
    pub fn dispatch(&self) -> Dispatch {
        self.dispatch.unwrap_or(match self.runtime {
            Runtime::Node => Dispatch::RoundRobin,
            Runtime::Generic => Dispatch::Shared,
        })
    }
}

/// The whole configuration of one master.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub apps: Vec<AppSpec>,
    /// How often the master samples every worker's load (and steers autoscaled pools).
    pub sample_interval: Duration,
    /// Where to serve Prometheus metrics (`/metrics`); off when `None`.
    pub metrics: Option<SocketAddr>,
    /// Where to register each app's live endpoints (etcd); off when `None`.
    pub registry: Option<RegistrySettings>,
    /// Where the file came from, for `reload` to read it again.
    pub file: Option<PathBuf>,
}

pub const DEFAULT_GRACE: Duration = Duration::from_secs(10);
pub const DEFAULT_READY_AFTER: Duration = Duration::from_secs(1);
pub const DEFAULT_SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
/// Sampling faster than this costs more than it tells.
pub const MIN_SAMPLE_INTERVAL: Duration = Duration::from_millis(100);

/// Endpoint registration in etcd.
#[derive(Debug, Clone, PartialEq)]
pub struct RegistrySettings {
    /// etcd client endpoints, `host:port`.
    pub endpoints: Vec<String>,
    /// Key prefix, default `/processes/`.
    pub prefix: String,
    /// Lease time-to-live: how long keys outlive a dead master.
    pub ttl: Duration,
    /// The address other machines reach this one at (default: the host name).
    pub advertise: Option<String>,
}

impl RegistrySettings {
    /// From a `--registry` URL with the defaults.
    pub fn from_url(url: &str) -> Result<RegistrySettings, String> {
        Ok(RegistrySettings {
            endpoints: crate::registry::parse_url(url)?,
            prefix: crate::registry::DEFAULT_PREFIX.to_string(),
            ttl: crate::registry::DEFAULT_TTL,
            advertise: None,
        })
    }
}

/// `registry = "etcd://…"` or `[registry] url, prefix, ttl, advertise`.
fn parse_registry(top: &mut Fields) -> Result<Option<RegistrySettings>, ConfigError> {
    match top.table.remove("registry") {
        None => Ok(None),
        Some(toml::Value::String(url)) => RegistrySettings::from_url(&url)
            .map(Some)
            .map_err(|m| top.err("registry", m)),
        Some(toml::Value::Table(t)) => {
            let mut f = Fields::new(&top.origin, "registry".into(), t);
            let url = f.take_string("url")?;
            let prefix = f.take_string("prefix")?;
            let ttl = f.take_duration("ttl")?;
            let advertise = f.take_string("advertise")?;
            f.finish()?;
            let url = url.ok_or_else(|| f.err("url", "missing; set it to etcd://HOST:PORT"))?;
            let mut r = RegistrySettings::from_url(&url).map_err(|m| f.err("url", m))?;
            if let Some(p) = prefix {
                if !p.starts_with('/') {
                    return Err(f.err("prefix", format!("`{p}` must start with `/`")));
                }
                r.prefix = if p.ends_with('/') { p } else { format!("{p}/") };
            }
            if let Some(t) = ttl {
                if t < Duration::from_secs(1) {
                    return Err(f.err(
                        "ttl",
                        format!("{} is below the minimum of 1s", crate::human::duration(t)),
                    ));
                }
                r.ttl = t;
            }
            if let Some(a) = advertise {
                check_advertise(&a).map_err(|m| f.err("advertise", m))?;
                r.advertise = Some(a);
            }
            Ok(Some(r))
        }
        Some(v) => Err(top.type_err("registry", "a URL string or a [registry] table", &v)),
    }
}

/// An advertised address: a host name or IP, no port, no spaces or slashes.
pub fn check_advertise(a: &str) -> Result<(), String> {
    if a.is_empty() || a.chars().any(|c| c.is_whitespace() || c == '/') {
        return Err(format!("`{a}` is not a host name or address"));
    }
    Ok(())
}

/// A TCP address for the metrics endpoint (`HOST:PORT` or `:PORT`).
pub fn parse_metrics_addr(s: &str) -> Result<SocketAddr, String> {
    match ListenAddr::parse(s)? {
        ListenAddr::Tcp(a) => Ok(a),
        ListenAddr::Unix(_) => Err(format!(
            "`{s}` is a unix socket path; metrics need a TCP address like 127.0.0.1:9464"
        )),
    }
}

/// The longest `down_window` and `down_interval`: an hour of samples is plenty to decide
/// a scale-down, and the controller keeps one per tick.
pub const MAX_DOWN_WINDOW: Duration = Duration::from_secs(3600);

/// Checks a sample interval: at least 100 ms, at most a minute.
pub fn check_sample_interval(d: Duration) -> Result<Duration, String> {
    if d < MIN_SAMPLE_INTERVAL {
        return Err(format!(
            "{} is below the minimum of 100ms",
            crate::human::duration(d)
        ));
    }
    if d > Duration::from_secs(60) {
        return Err(format!(
            "{} is above the maximum of 60s",
            crate::human::duration(d)
        ));
    }
    Ok(d)
}

/// Parses `10s`, `250ms`, `1.5s`, `2m`, `1h`, `1m30s`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad =
        || format!("`{s}` is not a duration; use a number with a unit, like 10s, 250ms or 2m");
    let s = s.trim();
    if s.is_empty() {
        return Err(bad());
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        if num_end == 0 {
            return Err(bad());
        }
        let value: f64 = rest[..num_end].parse().map_err(|_| bad())?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "ms" => 0.001,
            "s" => 1.0,
            "m" | "min" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += value * scale;
        rest = &rest[unit_end..];
    }
    if !total.is_finite() || total > 365.0 * 86400.0 {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(total))
}

/// Parses `512MiB`, `1GiB`, `100MB`, `4096KiB`, `1048576` (bytes).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bad = || format!("`{s}` is not a size; use a number with a unit, like 512MiB or 2GiB");
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    if split == 0 {
        return Err(bad());
    }
    let value: f64 = s[..split].parse().map_err(|_| bad())?;
    let unit = match s[split..].trim() {
        "" | "B" => 1.0,
        "K" | "KiB" | "k" => 1024.0,
        "KB" | "kB" => 1000.0,
        "M" | "MiB" => 1024.0 * 1024.0,
        "MB" => 1e6,
        "G" | "GiB" => 1024.0 * 1024.0 * 1024.0,
        "GB" => 1e9,
        _ => return Err(bad()),
    };
    let bytes = value * unit;
    if !bytes.is_finite() || !(1.0..=1e15).contains(&bytes) {
        return Err(bad());
    }
    Ok(bytes as u64)
}

/// Parses `min=2,max=16` (either order, spaces allowed).
pub fn parse_autoscale(s: &str) -> Result<(usize, usize), (&'static str, String)> {
    let mut min = None;
    let mut max = None;
    for part in s.split(',') {
        let (k, v) = part
            .split_once('=')
            .ok_or(("", format!("`{s}` is not min=A,max=B")))?;
        let v: usize = v
            .trim()
            .parse()
            .map_err(|_| ("", format!("`{}` is not a whole number in `{s}`", v.trim())))?;
        match k.trim() {
            "min" => min = Some(v),
            "max" => max = Some(v),
            other => {
                return Err((
                    "",
                    format!("unknown key `{other}` in `{s}`; use min=A,max=B"),
                ));
            }
        }
    }
    let min = min.ok_or(("min", "missing; use min=A,max=B".to_string()))?;
    let max = max.ok_or(("max", "missing; use min=A,max=B".to_string()))?;
    check_bounds(min, max)?;
    Ok((min, max))
}

/// `1 ≤ min ≤ max ≤ MAX_WORKERS`; the error names the offending field.
pub fn check_bounds(min: usize, max: usize) -> Result<(), (&'static str, String)> {
    if min < 1 {
        return Err(("min", format!("{min} must be at least 1")));
    }
    if max > MAX_WORKERS {
        return Err(("max", format!("{max} is above the limit of {MAX_WORKERS}")));
    }
    if min > max {
        return Err(("min", format!("{min} is above max ({max})")));
    }
    Ok(())
}

pub fn check_instances(n: i64) -> Result<usize, String> {
    if n < 1 {
        return Err(format!("{n} must be at least 1"));
    }
    if n as u64 > MAX_WORKERS as u64 {
        return Err(format!("{n} is above the limit of {MAX_WORKERS}"));
    }
    Ok(n as usize)
}

/// `K=V`; the key must be a usable environment variable name.
pub fn parse_env_pair(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` is not K=V"))?;
    if k.is_empty() {
        return Err(format!("`{s}` has no name before `=`"));
    }
    check_env_key(k)?;
    Ok((k.to_string(), v.to_string()))
}

fn check_env_key(k: &str) -> Result<(), String> {
    if k.is_empty() || k.contains('=') || k.contains('\0') {
        return Err(format!("`{k}` is not an environment variable name"));
    }
    Ok(())
}

/// Is this command a Node program? `node`, `nodejs`, or a path ending in them.
pub fn looks_like_node(command: &[String]) -> bool {
    command.first().is_some_and(|c| {
        let base = Path::new(c)
            .file_name()
            .and_then(|b| b.to_str())
            .unwrap_or("");
        base == "node" || base == "nodejs"
    })
}

/// Why an app's new settings cannot be taken while the master runs, if they cannot: its
/// listeners are bound once, for the master's life, in the mode its dispatch and runtime
/// asked for then (accepted by the master, or inherited by workers; non-blocking for Node).
pub fn needs_restart(current: &AppSpec, new: &AppSpec) -> Option<String> {
    let name = &current.name;
    if new.listen != current.listen {
        return Some(format!(
            "apps.{name}.listen changed; listeners stay bound for the master's life, so \
             changing them needs a restart"
        ));
    }
    let mode = |a: &AppSpec| (a.dispatch().passes(), a.runtime == Runtime::Node);
    if !current.listen.is_empty() && mode(new) != mode(current) {
        return Some(format!(
            "apps.{name}: dispatch {} → {} (runtime {} → {}) changes how its listeners are \
             served, which is set when they are bound; that needs a restart",
            current.dispatch().as_str(),
            new.dispatch().as_str(),
            current.runtime.as_str(),
            new.runtime.as_str()
        ));
    }
    None
}

/// The master sets `PORT` to the first TCP listen address's port; a different `PORT` in
/// the app's env would send the app elsewhere without a word, so it is refused.
pub fn check_port_env(env: &BTreeMap<String, String>, listen: &[ListenAddr]) -> Result<(), String> {
    let first_tcp = listen.iter().find_map(|a| match a {
        ListenAddr::Tcp(a) => Some(a),
        ListenAddr::Unix(_) => None,
    });
    match (first_tcp, env.get("PORT")) {
        (Some(addr), Some(theirs))
            if theirs.parse::<u16>().ok() != Some(addr.port()).filter(|&p| p != 0) =>
        {
            Err(format!(
                "PORT={theirs} is not the port of the first TCP listen address ({addr}): the \
                 master sets PORT to that port; leave PORT out"
            ))
        }
        _ => Ok(()),
    }
}

/// What to tell the user when a generic app that listens is started through a package
/// manager (`npm start`, `yarn start`…): the Node server behind it is not recognised as Node,
/// so it binds the port itself and fails with `EADDRINUSE` against the master's socket.
pub fn wrapper_hint(spec: &AppSpec, listens: bool) -> Option<String> {
    let prog = spec.command.first().map(|c| {
        Path::new(c)
            .file_name()
            .and_then(|b| b.to_str())
            .unwrap_or("")
            .to_string()
    })?;
    let wrappers = ["npm", "npx", "yarn", "pnpm"];
    (listens && spec.runtime == Runtime::Generic && wrappers.contains(&prog.as_str())).then(|| {
        format!(
            "`{prog}` is not `node`, so this app's workers are generic: they inherit the \
             listening sockets (LISTEN_FDS) and must not bind the port themselves. A Node \
             server started through {prog} binds it and fails with EADDRINUSE; run it as \
             `-- node SCRIPT` instead, which runs it as a Node cluster"
        )
    })
}

/// A default app name from the command: the script's stem for interpreters
/// (`node server.js` → `server`), else the program's base name.
pub fn default_name(command: &[String]) -> String {
    let stem = |s: &str| {
        Path::new(s)
            .file_stem()
            .and_then(|b| b.to_str())
            .unwrap_or("app")
            .to_string()
    };
    let Some(first) = command.first() else {
        return "app".into();
    };
    let prog = stem(first);
    let interpreters = [
        "node", "nodejs", "python", "python3", "ruby", "bun", "deno", "php", "perl",
    ];
    let name = if interpreters.contains(&prog.as_str()) {
        command
            .iter()
            .skip(1)
            .find(|a| !a.starts_with('-'))
            .map(|s| stem(s))
            .unwrap_or(prog)
    } else {
        prog
    };
    let cleaned: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.') {
                c
            } else {
                '-'
            }
        })
        .collect();
    match AppName::parse(&cleaned) {
        Ok(n) => n.0,
        Err(_) => "app".into(),
    }
}

/// Checks that the program can be found, so a typo is an error now rather than a
/// crash-looping pool later.
pub fn check_command(command: &[String], cwd: Option<&Path>) -> Result<(), String> {
    let Some(program) = command.first() else {
        return Err(
            "missing; give the program and its arguments, e.g. [\"node\", \"server.js\"]".into(),
        );
    };
    if program.is_empty() {
        return Err("the program name is empty".into());
    }
    if program.contains('/') {
        let p = Path::new(program);
        let full = match cwd {
            Some(c) if p.is_relative() => c.join(p),
            _ => p.to_path_buf(),
        };
        return if is_executable(&full) {
            Ok(())
        } else {
            Err(format!("`{program}` is not an executable file"))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&path).any(|dir| is_executable(&dir.join(program))) {
        Ok(())
    } else {
        Err(format!(
            "`{program}` is not found in PATH; give its full path or install it"
        ))
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

pub fn check_cwd(cwd: &Path) -> Result<(), String> {
    match std::fs::metadata(cwd) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(format!("`{}` is not a directory", cwd.display())),
        Err(e) => Err(format!("`{}` cannot be used: {e}", cwd.display())),
    }
}

// ---------------------------------------------------------------------------------------
// The TOML file.

/// Reads and validates a `processes.toml`.
pub fn load_file(path: &Path) -> Result<Config, crate::errors::StartError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| crate::errors::StartError::ReadConfig {
            path: path.to_path_buf(),
            source,
        })?;
    let base = std::path::absolute(path)
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf));
    let mut config = parse_str(
        &text,
        &format!("config {}", path.display()),
        base.as_deref(),
    )?;
    config.file = Some(path.to_path_buf());
    Ok(config)
}

/// Parses config text. Relative `cwd`s are taken relative to `base` (the file's folder).
pub fn parse_str(text: &str, origin: &str, base: Option<&Path>) -> Result<Config, ConfigError> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        let at = e
            .span()
            .map(|sp| {
                let before = &text[..sp.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                format!(" at line {line}, column {col}")
            })
            .unwrap_or_default();
        let msg = e.message().trim().replace('\n', "; ");
        ConfigError::new(origin, "(file)", format!("not valid TOML{at}: {msg}"))
    })?;
    let mut top = Fields::new(origin, String::new(), table);
    let apps_table = top.take_table("apps")?;
    let metrics = match top.take_string("metrics")? {
        None => None,
        Some(s) => Some(parse_metrics_addr(&s).map_err(|m| top.err("metrics", m))?),
    };
    let registry = parse_registry(&mut top)?;
    let sample_interval = match top.take_duration("sample_interval")? {
        Some(d) => check_sample_interval(d).map_err(|m| top.err("sample_interval", m))?,
        None => DEFAULT_SAMPLE_INTERVAL,
    };
    top.finish()?;
    let Some(apps_table) = apps_table else {
        return Err(ConfigError::new(
            origin,
            "apps",
            "missing; add at least one [apps.NAME] table with a command",
        ));
    };
    if apps_table.is_empty() {
        return Err(ConfigError::new(
            origin,
            "apps",
            "is empty; add at least one [apps.NAME] table with a command",
        ));
    }
    let mut apps = Vec::new();
    for (name, value) in apps_table {
        let path = format!("apps.{name}");
        let name = AppName::parse(&name).map_err(|m| ConfigError::new(origin, &path, m))?;
        let toml::Value::Table(t) = value else {
            return Err(ConfigError::new(
                origin,
                &path,
                "must be a table ([apps.NAME] with a command)",
            ));
        };
        let app = parse_app(origin, &path, name, t, base)?;
        for (i, addr) in app.listen.iter().enumerate() {
            // Port 0 asks the OS for a free port: two of those never collide.
            if matches!(addr, ListenAddr::Tcp(a) if a.port() == 0) {
                continue;
            }
            if let Some(other) = apps.iter().find(|a: &&AppSpec| a.listen.contains(addr)) {
                let field = if app.listen.len() > 1 {
                    format!("{path}.listen[{i}]")
                } else {
                    format!("{path}.listen")
                };
                return Err(ConfigError::new(
                    origin,
                    field,
                    format!(
                        "{addr} is also used by apps.{}; give each app its own address",
                        other.name
                    ),
                ));
            }
        }
        apps.push(app);
    }
    Ok(Config {
        apps,
        sample_interval,
        metrics,
        registry,
        file: None,
    })
}

fn parse_app(
    origin: &str,
    path: &str,
    name: AppName,
    table: toml::Table,
    base: Option<&Path>,
) -> Result<AppSpec, ConfigError> {
    let mut f = Fields::new(origin, path.to_string(), table);
    let command = f.take_string_list("command", false)?;
    let cwd = f.take_string("cwd")?.map(|c| match base {
        Some(b) if Path::new(&c).is_relative() => b.join(c),
        _ => PathBuf::from(c),
    });
    let env = f.take_env("env")?;
    let instances = f.take_instances("instances")?;
    let (autoscale, tuning) = f.take_autoscale("autoscale")?;
    let listen = f.take_listen("listen")?;
    let grace = f.take_duration("grace")?.unwrap_or(DEFAULT_GRACE);
    let ready_after = f
        .take_duration("ready_after")?
        .unwrap_or(DEFAULT_READY_AFTER);
    let restart = f
        .take_parsed("restart", RestartPolicy::parse)?
        .unwrap_or(RestartPolicy::Always);
    let dispatch = f.take_parsed("dispatch", Dispatch::parse)?;
    let runtime = f.take_parsed("runtime", |s| match s {
        "node" => Ok(Runtime::Node),
        "generic" | "other" => Ok(Runtime::Generic),
        _ => Err(format!("`{s}` is not a runtime; use node or generic")),
    })?;
    let preload = f.take_bool("preload")?.unwrap_or(true);
    let max_memory = f.take_size("max_memory")?;
    let kill_memory = f.take_size("kill_memory")?;
    let inherit_env = match f.table.remove("inherit_env") {
        None => InheritEnv::default(),
        Some(toml::Value::Boolean(true)) => InheritEnv::All,
        Some(toml::Value::Boolean(false)) => InheritEnv::Only(Vec::new()),
        Some(toml::Value::Array(items)) => {
            let mut names = Vec::new();
            for (i, item) in items.into_iter().enumerate() {
                match item {
                    toml::Value::String(s) => {
                        check_env_pattern(&s)
                            .map_err(|m| f.err(&format!("inherit_env[{i}]"), m))?;
                        names.push(s);
                    }
                    v => {
                        return Err(f.type_err(
                            &format!("inherit_env[{i}]"),
                            "a variable name",
                            &v,
                        ));
                    }
                }
            }
            InheritEnv::Only(names)
        }
        Some(v) => {
            return Err(f.type_err(
                "inherit_env",
                "true, false or a list of variable names like [\"PATH\", \"LC_*\"]",
                &v,
            ));
        }
    };
    let user_name = f.take_string("user")?;
    let group_name = f.take_string("group")?;
    let backoff = match f.take_table("backoff")? {
        Some(t) => parse_backoff(origin, &format!("{path}.backoff"), t)?,
        None => BackoffParams::default(),
    };
    f.finish()?;

    let command = command.ok_or_else(|| {
        f.err(
            "command",
            "missing; give the program and its arguments, e.g. [\"node\", \"server.js\"]",
        )
    })?;
    if let Some(c) = &cwd {
        check_cwd(c).map_err(|m| f.err("cwd", m))?;
    }
    check_command(&command, cwd.as_deref()).map_err(|m| f.err("command", m))?;
    let sizing = match (instances, autoscale) {
        (Some(_), Some(_)) => {
            return Err(f.err(
                "autoscale",
                "cannot be set together with instances; keep one",
            ));
        }
        (Some(n), None) => Sizing::Fixed(check_instances(n).map_err(|m| f.err("instances", m))?),
        (None, Some((min, max))) => Sizing::Auto { min, max },
        (None, None) => Sizing::Fixed(1),
    };
    check_port_env(&env, &listen).map_err(|m| f.err("env", m))?;
    if let (Some(soft), Some(hard)) = (max_memory, kill_memory)
        && hard < soft
    {
        return Err(f.err(
            "kill_memory",
            format!("{hard} bytes is below max_memory ({soft} bytes); the hard limit must be the higher one"),
        ));
    }
    let user = match (&user_name, &group_name) {
        (Some(u), g) => Some(RunAs::resolve(u, g.as_deref()).map_err(|m| f.err("user", m))?),
        (None, Some(_)) => return Err(f.err("group", "only means something with user")),
        (None, None) => None,
    };
    let runtime = runtime.unwrap_or(if looks_like_node(&command) {
        Runtime::Node
    } else {
        Runtime::Generic
    });
    Ok(AppSpec {
        name,
        command,
        cwd,
        env,
        sizing,
        listen,
        grace,
        restart,
        backoff,
        ready_after,
        dispatch,
        runtime,
        preload,
        tuning,
        max_memory,
        kill_memory,
        inherit_env,
        user,
    })
}

fn parse_backoff(
    origin: &str,
    path: &str,
    table: toml::Table,
) -> Result<BackoffParams, ConfigError> {
    let mut f = Fields::new(origin, path.to_string(), table);
    let d = BackoffParams::default();
    let initial = f.take_duration("initial")?.unwrap_or(d.initial);
    let max = f.take_duration("max")?.unwrap_or(d.max);
    let multiplier = f.take_float("multiplier")?.unwrap_or(d.multiplier);
    let reset_after = f.take_duration("reset_after")?.unwrap_or(d.reset_after);
    let crash_loop_restarts = f.take_int("crash_loop_restarts")?;
    let crash_loop_window = f
        .take_duration("crash_loop_window")?
        .unwrap_or(d.crash_loop_window);
    f.finish()?;
    if initial.is_zero() {
        return Err(f.err("initial", "must be above zero"));
    }
    if max < initial {
        return Err(f.err(
            "max",
            format!(
                "{} is below initial ({})",
                crate::human::duration(max),
                crate::human::duration(initial)
            ),
        ));
    }
    if !(1.0..=100.0).contains(&multiplier) {
        return Err(f.err(
            "multiplier",
            format!("{multiplier} must be between 1 and 100"),
        ));
    }
    let crash_loop_restarts = match crash_loop_restarts {
        None => d.crash_loop_restarts,
        Some(n) if (1..=1000).contains(&n) => n as usize,
        Some(n) => {
            return Err(f.err(
                "crash_loop_restarts",
                format!("{n} must be between 1 and 1000"),
            ));
        }
    };
    Ok(BackoffParams {
        initial,
        max,
        multiplier,
        reset_after,
        crash_loop_restarts,
        crash_loop_window,
    })
}

/// A table being read field by field; whatever is left at `finish` is an unknown key.
struct Fields {
    origin: String,
    path: String,
    table: toml::Table,
}

impl Fields {
    fn new(origin: &str, path: String, table: toml::Table) -> Self {
        Fields {
            origin: origin.to_string(),
            path,
            table,
        }
    }

    fn field(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    fn err(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::new(&self.origin, self.field(key), message)
    }

    fn type_err(&self, key: &str, want: &str, got: &toml::Value) -> ConfigError {
        self.err(key, format!("expected {want}, found {}", got.type_str()))
    }

    fn finish(&mut self) -> Result<(), ConfigError> {
        if let Some(key) = self.table.keys().next().cloned() {
            return Err(self.err(
                &key,
                "unknown key; check the spelling against the config reference in README.md",
            ));
        }
        Ok(())
    }

    fn take_table(&mut self, key: &str) -> Result<Option<toml::Table>, ConfigError> {
        match self.table.remove(key) {
            None => Ok(None),
            Some(toml::Value::Table(t)) => Ok(Some(t)),
            Some(v) => Err(self.type_err(key, "a table", &v)),
        }
    }

    fn take_string(&mut self, key: &str) -> Result<Option<String>, ConfigError> {
        match self.table.remove(key) {
            None => Ok(None),
            Some(toml::Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.type_err(key, "a string", &v)),
        }
    }

    fn take_parsed<T>(
        &mut self,
        key: &str,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<Option<T>, ConfigError> {
        match self.take_string(key)? {
            None => Ok(None),
            Some(s) => parse(&s).map(Some).map_err(|m| self.err(key, m)),
        }
    }

    fn take_duration(&mut self, key: &str) -> Result<Option<Duration>, ConfigError> {
        match self.table.remove(key) {
            None => Ok(None),
            Some(toml::Value::String(s)) => {
                parse_duration(&s).map(Some).map_err(|m| self.err(key, m))
            }
            Some(v) => Err(self.err(
                key,
                format!(
                    "expected a duration string like \"10s\" or \"250ms\", found {}",
                    v.type_str()
                ),
            )),
        }
    }

    fn take_int(&mut self, key: &str) -> Result<Option<i64>, ConfigError> {
        match self.table.remove(key) {
            None => Ok(None),
            Some(toml::Value::Integer(i)) => Ok(Some(i)),
            Some(v) => Err(self.type_err(key, "a whole number", &v)),
        }
    }

    /// A whole number of instances, or `"max"` (one per CPU, as `-i max`).
    fn take_instances(&mut self, key: &str) -> Result<Option<i64>, ConfigError> {
        match self.table.remove(key) {
            None => Ok(None),
            Some(toml::Value::Integer(i)) => Ok(Some(i)),
            Some(toml::Value::String(s)) if s == "max" => Ok(Some(instances_max())),
            Some(v) => Err(self.type_err(key, "a whole number or \"max\"", &v)),
        }
    }

    fn take_float(&mut self, key: &str) -> Result<Option<f64>, ConfigError> {
        match self.table.remove(key) {
            None => Ok(None),
            Some(toml::Value::Float(x)) => Ok(Some(x)),
            Some(toml::Value::Integer(i)) => Ok(Some(i as f64)),
            Some(v) => Err(self.type_err(key, "a number", &v)),
        }
    }

    fn take_string_list(
        &mut self,
        key: &str,
        allow_single: bool,
    ) -> Result<Option<Vec<String>>, ConfigError> {
        match self.table.remove(key) {
            None => Ok(None),
            Some(toml::Value::String(s)) if allow_single => Ok(Some(vec![s])),
            Some(toml::Value::Array(items)) => {
                let mut out = Vec::with_capacity(items.len());
                for (i, item) in items.into_iter().enumerate() {
                    match item {
                        toml::Value::String(s) => out.push(s),
                        v => {
                            return Err(self.type_err(&format!("{key}[{i}]"), "a string", &v));
                        }
                    }
                }
                Ok(Some(out))
            }
            Some(v) => Err(self.type_err(
                key,
                if allow_single {
                    "a string or an array of strings"
                } else {
                    "an array of strings, like [\"node\", \"server.js\"]"
                },
                &v,
            )),
        }
    }

    fn take_listen(&mut self, key: &str) -> Result<Vec<ListenAddr>, ConfigError> {
        let list = self.take_string_list(key, true)?.unwrap_or_default();
        let mut out = Vec::new();
        for (i, s) in list.iter().enumerate() {
            let addr = ListenAddr::parse(s).map_err(|m| {
                let k = if list.len() == 1 {
                    key.to_string()
                } else {
                    format!("{key}[{i}]")
                };
                self.err(&k, m)
            })?;
            if out.contains(&addr) {
                return Err(self.err(key, format!("`{s}` is listed twice")));
            }
            out.push(addr);
        }
        Ok(out)
    }

    fn take_env(&mut self, key: &str) -> Result<BTreeMap<String, String>, ConfigError> {
        let Some(t) = self.take_table(key)? else {
            return Ok(BTreeMap::new());
        };
        let mut out = BTreeMap::new();
        for (k, v) in t {
            let field = format!("{key}.{k}");
            check_env_key(&k).map_err(|m| self.err(&field, m))?;
            let value = match v {
                toml::Value::String(s) => s,
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(x) => x.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                v => return Err(self.type_err(&field, "a string", &v)),
            };
            if value.contains('\0') {
                return Err(self.err(&field, "contains a NUL byte"));
            }
            out.insert(k, value);
        }
        Ok(out)
    }

    /// `autoscale`: `"min=A,max=B"` or `{ min, max, setpoint?, cpu_factor?, down_window?,
    /// down_interval? }`. Returns the bounds (if set) and the tuning.
    fn take_autoscale(
        &mut self,
        key: &str,
    ) -> Result<(Option<(usize, usize)>, Tuning), ConfigError> {
        let defaults = Tuning::default();
        match self.table.remove(key) {
            None => Ok((None, defaults)),
            Some(toml::Value::String(s)) => {
                let bounds = parse_autoscale(&s).map_err(|(sub, m)| {
                    if sub.is_empty() {
                        self.err(key, m)
                    } else {
                        self.err(&format!("{key}.{sub}"), m)
                    }
                })?;
                Ok((Some(bounds), defaults))
            }
            Some(toml::Value::Table(t)) => {
                let mut f = Fields::new(&self.origin, self.field(key), t);
                let min = f.take_int("min")?;
                let max = f.take_int("max")?;
                let setpoint = f.take_float("setpoint")?.unwrap_or(defaults.setpoint);
                let cpu_factor = f.take_float("cpu_factor")?.unwrap_or(defaults.cpu_factor);
                let down_window = f
                    .take_duration("down_window")?
                    .unwrap_or(defaults.down_window);
                let down_interval = f
                    .take_duration("down_interval")?
                    .unwrap_or(defaults.down_interval);
                f.finish()?;
                let min = min
                    .ok_or_else(|| f.err("min", "missing; set autoscale = { min = A, max = B }"))?;
                let max = max
                    .ok_or_else(|| f.err("max", "missing; set autoscale = { min = A, max = B }"))?;
                let to_usize = |k: &str, v: i64| -> Result<usize, ConfigError> {
                    usize::try_from(v).map_err(|_| f.err(k, format!("{v} must be at least 1")))
                };
                let (min, max) = (to_usize("min", min)?, to_usize("max", max)?);
                check_bounds(min, max).map_err(|(k, m)| f.err(k, m))?;
                if !(0.05..=0.95).contains(&setpoint) {
                    return Err(f.err(
                        "setpoint",
                        format!("{setpoint} must be between 0.05 and 0.95"),
                    ));
                }
                if !(0.1..=64.0).contains(&cpu_factor) {
                    return Err(f.err(
                        "cpu_factor",
                        format!("{cpu_factor} must be between 0.1 and 64"),
                    ));
                }
                // The controller keeps a sample per tick over `down_window`.
                for (key, d) in [
                    ("down_window", down_window),
                    ("down_interval", down_interval),
                ] {
                    if d > MAX_DOWN_WINDOW {
                        return Err(f.err(
                            key,
                            format!("{} is above the maximum of 1h", crate::human::duration(d)),
                        ));
                    }
                }
                Ok((
                    Some((min, max)),
                    Tuning {
                        setpoint,
                        cpu_factor,
                        down_window,
                        down_interval,
                    },
                ))
            }
            Some(v) => {
                Err(self.type_err(key, "a table { min = A, max = B } or \"min=A,max=B\"", &v))
            }
        }
    }

    fn take_bool(&mut self, key: &str) -> Result<Option<bool>, ConfigError> {
        match self.table.remove(key) {
            None => Ok(None),
            Some(toml::Value::Boolean(b)) => Ok(Some(b)),
            Some(v) => Err(self.type_err(key, "true or false", &v)),
        }
    }

    fn take_size(&mut self, key: &str) -> Result<Option<u64>, ConfigError> {
        match self.table.remove(key) {
            None => Ok(None),
            Some(toml::Value::String(s)) => parse_size(&s).map(Some).map_err(|m| self.err(key, m)),
            Some(toml::Value::Integer(i)) if i > 0 => Ok(Some(i as u64)),
            Some(v) => Err(self.err(
                key,
                format!(
                    "expected a size string like \"512MiB\", found {}",
                    v.type_str()
                ),
            )),
        }
    }
}

/// `max` as a number of instances (PM2's spelling): one per CPU this process may run on.
pub fn instances_max() -> i64 {
    std::thread::available_parallelism().map_or(1, |n| n.get()) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instances_may_be_max() {
        let c = parse_str(
            "[apps.w]\ncommand = [\"sh\"]\ninstances = \"max\"\n",
            "t",
            None,
        );
        let want = Sizing::Fixed(instances_max() as usize);
        assert_eq!(c.map(|c| c.apps[0].sizing), Ok(want));
        let e = parse_str(
            "[apps.w]\ncommand = [\"sh\"]\ninstances = \"many\"\n",
            "t",
            None,
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("instances: expected a whole number or \"max\""),
            "{e}"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        for bad in ["", "10", "s", "10 s", "ten", "-1s", "1y", "1e9h"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("100MB"), Ok(100_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        for bad in ["", "MiB", "12 parsecs", "0"] {
            assert!(parse_size(bad).is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn listen_addresses() {
        assert_eq!(
            ListenAddr::parse("127.0.0.1:8080"),
            Ok(ListenAddr::Tcp("127.0.0.1:8080".parse().unwrap()))
        );
        assert_eq!(
            ListenAddr::parse(":8080"),
            Ok(ListenAddr::Tcp("0.0.0.0:8080".parse().unwrap()))
        );
        assert_eq!(
            ListenAddr::parse("[::]:80"),
            Ok(ListenAddr::Tcp("[::]:80".parse().unwrap()))
        );
        assert_eq!(
            ListenAddr::parse("/run/app.sock"),
            Ok(ListenAddr::Unix("/run/app.sock".into()))
        );
        assert_eq!(
            ListenAddr::parse("unix:rel.sock"),
            Ok(ListenAddr::Unix("rel.sock".into()))
        );
        assert!(matches!(
            ListenAddr::parse("localhost:80"),
            Ok(ListenAddr::Tcp(_))
        ));
        for bad in ["8080", "host:", ":99999", "1.2.3.4:x", ""] {
            assert!(ListenAddr::parse(bad).is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn autoscale_bounds() {
        assert_eq!(parse_autoscale("min=2,max=16"), Ok((2, 16)));
        assert_eq!(parse_autoscale(" max=3 , min=1"), Ok((1, 3)));
        assert_eq!(parse_autoscale("min=4,max=2").unwrap_err().0, "min");
        assert_eq!(parse_autoscale("min=0,max=2").unwrap_err().0, "min");
        assert_eq!(parse_autoscale("min=1").unwrap_err().0, "max");
        assert!(parse_autoscale("min=1,max=2,mid=3").is_err());
    }

    #[test]
    fn default_names() {
        let cmd = |s: &str| s.split(' ').map(String::from).collect::<Vec<_>>();
        assert_eq!(default_name(&cmd("node server.js")), "server");
        assert_eq!(default_name(&cmd("node --inspect app/main.mjs")), "main");
        assert_eq!(default_name(&cmd("/usr/bin/python3 app.py")), "app");
        assert_eq!(
            default_name(&cmd("./my-rust-worker --port 3")),
            "my-rust-worker"
        );
    }

    #[test]
    fn node_detection() {
        let cmd = |s: &str| s.split(' ').map(String::from).collect::<Vec<_>>();
        assert!(looks_like_node(&cmd("node server.js")));
        assert!(looks_like_node(&cmd("/opt/node-22/bin/node server.js")));
        assert!(looks_like_node(&cmd("nodejs a.js")));
        assert!(!looks_like_node(&cmd("python3 app.py")));
        assert!(!looks_like_node(&cmd("nodemon a.js")));
    }

    #[test]
    fn a_listening_app_started_through_a_package_manager_gets_a_hint() {
        let spec = |cmd: &str, runtime: &str| {
            let text = format!("[apps.a]\ncommand = {cmd}\n{runtime}");
            parse_str(&text, "config t", None).unwrap().apps.remove(0)
        };
        let npm = spec(r#"["npm", "start"]"#, "");
        let hint = wrapper_hint(&npm, true).unwrap();
        assert!(hint.starts_with("`npm` is not `node`"), "{hint}");
        assert!(hint.contains("-- node SCRIPT"), "{hint}");
        assert!(wrapper_hint(&spec(r#"["npx", "serve"]"#, ""), true).is_some());
        // Nothing to say: it does not listen, it is Node, or it was said to be Node.
        assert_eq!(wrapper_hint(&npm, false), None);
        assert_eq!(wrapper_hint(&spec(r#"["node", "s.js"]"#, ""), true), None);
        assert_eq!(
            wrapper_hint(&spec(r#"["npm", "start"]"#, r#"runtime = "node""#), true),
            None
        );
        assert_eq!(
            wrapper_hint(&spec(r#"["python3", "a.py"]"#, ""), true),
            None
        );
    }

    #[test]
    fn withheld_env_names_what_an_app_would_miss_not_the_shells_noise() {
        let env = [
            "NODE_ENV",
            "PATH",
            "LS_COLORS",
            "DATABASE_URL",
            "SSH_TTY",
            "LC_ALL",
            "_",
        ];
        assert_eq!(
            withheld_env(&InheritEnv::default(), env),
            vec!["DATABASE_URL", "NODE_ENV"]
        );
        assert!(withheld_env(&InheritEnv::All, env).is_empty());
        let some = InheritEnv::parse("NODE_ENV").unwrap();
        assert_eq!(
            withheld_env(&some, env),
            vec!["DATABASE_URL", "LC_ALL", "PATH"]
        );
    }

    #[test]
    fn a_change_of_listen_or_of_how_listeners_are_served_needs_a_restart() {
        let app = |extra: &str| {
            let text = format!("[apps.a]\ncommand = [\"sh\"]\n{extra}");
            parse_str(&text, "config t", None).unwrap().apps.remove(0)
        };
        let shared = app("listen = \":0\"");
        let passed = app("listen = \":0\"\ndispatch = \"round-robin\"");
        let least = app("listen = \":0\"\ndispatch = \"least-loaded\"");
        let why = needs_restart(&shared, &passed).unwrap();
        assert!(why.contains("dispatch shared → round-robin"), "{why}");
        // Both pass connections: the listener is served the same way.
        assert_eq!(needs_restart(&passed, &least), None);
        assert!(needs_restart(&shared, &app("listen = \":1\"")).is_some());
        // No listener, nothing bound: anything goes.
        assert_eq!(
            needs_restart(&app(""), &app("dispatch = \"round-robin\"")),
            None
        );
        assert_eq!(
            needs_restart(&shared, &app("listen = \":0\"\ninstances = 3")),
            None
        );
    }

    #[test]
    fn a_full_app_parses() {
        let text = r#"
            [apps.web]
            command = ["sh", "-c", "exit 0"]
            env = { PORT_HINT = 8080, MODE = "prod" }
            autoscale = { min = 2, max = 16 }
            listen = ["127.0.0.1:0", "/tmp/x.sock"]
            grace = "5s"
            restart = "on-failure"
            dispatch = "least-loaded"
            [apps.web.backoff]
            initial = "50ms"
            max = "10s"
            crash_loop_restarts = 3
        "#;
        let c = parse_str(text, "config t", None).unwrap();
        let app = &c.apps[0];
        assert_eq!(app.name.as_str(), "web");
        assert_eq!(app.sizing, Sizing::Auto { min: 2, max: 16 });
        assert_eq!(app.env["PORT_HINT"], "8080");
        assert_eq!(app.listen.len(), 2);
        assert_eq!(app.grace, Duration::from_secs(5));
        assert_eq!(app.restart, RestartPolicy::OnFailure);
        assert_eq!(app.backoff.initial, Duration::from_millis(50));
        assert_eq!(app.backoff.crash_loop_restarts, 3);
        assert_eq!(app.dispatch(), Dispatch::LeastLoaded);
        assert_eq!(app.runtime, Runtime::Generic);
    }
}
