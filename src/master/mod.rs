//! The master: one event loop that owns every pool, every listener and every worker's
//! channel, and is the only code that changes them.
//!
//! Everything that happens arrives here as an event — a child exited (`SIGCHLD`), a signal,
//! a channel message, a readiness notice, an accepted connection, a control request, a
//! timer. The loop hands each to a small handler, then asks every pool what is due
//! ([`Pool::plan`]) and carries that out. Decisions live in `pool`, `backoff` and
//! `dispatch`; this file is the thin layer of effects around them.
//!
//! The loop runs on the process's main thread (inside `block_on`), and only it forks:
//! the parent-death signal of every worker is tied to the thread that forked it.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::Value;
use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use crate::backoff::{ExitKind, Restart};
use crate::channel::{self, Incoming, Outgoing};
use crate::config::{AppSpec, Config, ListenAddr, Runtime};
use crate::control::{self, Reply, Request};
use crate::dispatch::{self, Candidate};
use crate::errors::StartError;
use crate::human;
use crate::node::{self, FromWorker};
use crate::notify::{Notice, NotifySocket};
use crate::output::{Sink, Stream};
use crate::pool::{
    Action, ExitOutcome, Pool, ReloadOutcome, StopReason, Stopping, WorkerId, WorkerState,
};
use crate::probes::{self, HandleKind};
use crate::sockets::{self, Listener};
use crate::spawn::{self, SpawnPlan};
use crate::unix;

mod protocol;
mod record;
mod sampling;
mod status;

/// How long accepting on a listener pauses after `accept4` fails for a reason other than
/// a connection gone before it was taken (out of fds, out of memory).
pub const ACCEPT_RETRY: Duration = Duration::from_millis(10);

/// Listeners the workers of one app may have the master bind on request (Node's
/// `listen()` on ports the config does not name).
pub const MAX_REQUESTED_LISTENERS: usize = 64;
/// Different keys (address, port, flags) by which an app's workers may ask for one
/// configured listener.
const MAX_KEYS_PER_LISTENER: usize = 16;
/// The longest `queryServer` key kept (a unix path is at most 108 bytes; an address 45).
const MAX_KEY_LEN: usize = 512;
/// A connection every worker keeps refusing (`accepted: false`) is closed after this many
/// refusals instead of going round for ever (as it would under Node's primary).
const MAX_CONN_REFUSALS: u32 = 8;
/// How many times a handle is resent after `NODE_HANDLE_NACK` (Node's own limit).
const MAX_HANDLE_RETRANSMISSIONS: u32 = 3;
/// The worker's end of its channel sits after the inherited listeners; this is announced
/// in `NODE_CHANNEL_FD` and `PROCESSES_CHANNEL_FD`.
const ENV_STRIPPED: &[&str] = &[
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "NODE_CHANNEL_FD",
    "NODE_CHANNEL_SERIALIZATION_MODE",
    "NODE_UNIQUE_ID",
    "PROCESSES_CHANNEL_FD",
    "PROCESSES_APP",
    "PROCESSES_WORKER_ID",
];

/// How the master was started.
pub struct Options {
    pub config: Config,
    /// The master's name: selects its control socket.
    pub name: String,
    /// Control socket path; `None` picks the default for `name`.
    pub control: Option<std::path::PathBuf>,
    /// Listening sockets from systemd socket activation, taken first thing in `main`
    /// ([`sockets::inherited_from_systemd`]).
    pub inherited: Vec<(OwnedFd, ListenAddr)>,
    /// Kills the workers' process groups if the master dies without stopping them.
    pub reaper: Option<crate::reaper::Reaper>,
}

/// Everything that can wake the loop, besides signals and timers.
pub enum Event {
    Channel(WorkerId, Incoming),
    Notify(i32, Notice),
    Control(Request, control::Responder),
}

/// The signals the master acts on.
#[derive(Debug, Clone, Copy)]
pub enum Sig {
    Chld,
    Term,
    Int,
    Hup,
    Ttin,
    Ttou,
}

struct Signals {
    chld: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    ttin: tokio::signal::unix::Signal,
    ttou: tokio::signal::unix::Signal,
}

impl Signals {
    /// Sends each signal to the loop as it comes, until the loop is gone.
    async fn forward(mut self, to_loop: mpsc::UnboundedSender<Sig>) {
        loop {
            let sig = tokio::select! {
                Some(()) = self.chld.recv() => Sig::Chld,
                Some(()) = self.term.recv() => Sig::Term,
                Some(()) = self.int.recv() => Sig::Int,
                Some(()) = self.hup.recv() => Sig::Hup,
                Some(()) = self.ttin.recv() => Sig::Ttin,
                Some(()) = self.ttou.recv() => Sig::Ttou,
                else => return,
            };
            if to_loop.send(sig).is_err() {
                return;
            }
        }
    }
}

/// A listening socket and what the master knows about it.
struct ListenerEntry {
    app: usize,
    listener: Listener,
    /// From the app's `listen` setting (inherited by shared-mode workers); otherwise bound
    /// on a Node worker's request.
    configured: bool,
    /// Node cluster keys that name this listener.
    keys: BTreeSet<String>,
    /// What the first Node worker sent as `data` for it (https session ticket keys).
    data: Value,
    udp: bool,
    /// The master accepts on it and passes connections.
    passing: bool,
    /// Connections taken and not yet passed: only ones a worker refused, or one whose
    /// worker went away before acknowledging it. New connections are accepted when a
    /// worker is free to take one, and wait in the kernel's backlog until then.
    queue: VecDeque<Queued>,
    /// Its fd as the loop polls it, once the master accepts on it.
    acceptor: Option<AsyncFd<OwnedFd>>,
    /// A worker was free and nothing was there to accept: the loop waits for the
    /// listener to become readable.
    want_accept: bool,
    /// `accept4` failed (`ACCEPT_RETRY`): accepting pauses until then.
    accept_retry_at: Option<Instant>,
    /// Times `accept4` failed so; the 1st, 2nd, 4th… are logged.
    accept_errors: u64,
    passed: u64,
    /// Connections closed because every worker refused them.
    closed_refused: u64,
}

impl ListenerEntry {
    fn new(app: usize, listener: Listener, configured: bool, udp: bool, passing: bool) -> Self {
        ListenerEntry {
            app,
            listener,
            configured,
            keys: BTreeSet::new(),
            data: Value::Null,
            udp,
            passing,
            queue: VecDeque::new(),
            acceptor: None,
            want_accept: false,
            accept_retry_at: None,
            accept_errors: 0,
            closed_refused: 0,
            passed: 0,
        }
    }
}

/// A listening socket an app's config names, ready for its dispatch mode: non-blocking
/// when the master accepts on it, or Node workers do (Node 18 hangs on a blocking one;
/// NODE-IPC.md §5).
fn configured_listener(
    app_idx: usize,
    app: &AppSpec,
    listener: Listener,
) -> Result<ListenerEntry, StartError> {
    let passing = app.dispatch().passes();
    if passing || app.runtime == Runtime::Node {
        spawn::set_nonblocking(&listener.fd, true).map_err(|source| StartError::Setup {
            what: "a listening socket",
            source,
        })?;
    }
    Ok(ListenerEntry::new(app_idx, listener, true, false, passing))
}

/// The name a config field has in errors about an app's `listen` address `i`.
fn listen_field(config_file: bool, app: &AppSpec, i: usize) -> String {
    match config_file {
        true if app.listen.len() > 1 => format!("apps.{}.listen[{i}]", app.name),
        true => format!("apps.{}.listen", app.name),
        false => "--listen".to_string(),
    }
}

/// What bringing the apps in line with the config file did (`sync_apps`).
#[derive(Default)]
pub(super) struct Synced {
    /// Each change, as logged.
    pub lines: Vec<String>,
    /// Apps it started (new, or back): they need no reload.
    pub started: Vec<usize>,
    /// What it could not do.
    pub failures: Vec<String>,
}

impl Synced {
    fn say(&mut self, line: String) {
        info!("{line}");
        self.lines.push(line);
    }

    fn fail(&mut self, line: String) {
        error!("{line}");
        self.lines.push(line.clone());
        self.failures.push(line);
    }
}

struct Queued {
    fd: crate::channel::SharedFd,
    /// Times a worker answered `accepted: false` for it.
    refused: u32,
}

/// A handle sent and not yet acknowledged.
struct HandleInFlight {
    /// The line as sent, for a retransmission.
    line: Vec<u8>,
    fd: crate::channel::SharedFd,
    retries: u32,
    /// The worker answered `accepted` for its connection before settling it: it has the
    /// handle, so a NACK settles it instead of sending it again.
    answered: bool,
}

/// A connection given to a worker and not yet taken.
struct ConnInFlight {
    listener: usize,
    /// For cluster `newconn`: the `seq` whose reply says accepted or not.
    seq: Option<u64>,
    fd: crate::channel::SharedFd,
    acked: bool,
    refused: u32,
}

/// One worker's channel and protocol state.
struct WorkerIo {
    app: usize,
    pid: i32,
    slot: u32,
    channel: Option<channel::Sender>,
    /// Said `online`: a cluster worker that will honour `disconnect`.
    online: bool,
    /// Our next `seq` towards this worker.
    seq: u64,
    /// Listeners it asked for with `queryServer`, each with the keys it asked with, in
    /// order: its `newconn`s carry the first (a Node worker refuses a key it has no server
    /// for), so a later, made-up key cannot divert its connections.
    keys: BTreeMap<usize, Vec<String>>,
    queried_any: bool,
    /// Said `ready` itself over the channel (not just up for `ready_after`).
    said_ready: bool,
    /// Node's rule: while a handle is unacknowledged, every later message waits.
    awaiting_ack: Option<HandleInFlight>,
    held: VecDeque<(Vec<u8>, Option<crate::channel::SharedFd>)>,
    conn: Option<ConnInFlight>,
    passed: u64,
    /// Connections given to it, counted from the level it joined at (see `dispatch`).
    served: u64,
    /// Listeners refused to it; only the 1st, 2nd, 4th, 8th… refusal is logged, so a
    /// worker that asks in a loop cannot flood the log.
    refusals: u64,
    load: sampling::Load,
    /// Killed by the master for its RSS (MiB) above `kill_memory`.
    killed_over_memory: Option<u64>,
    /// When it last refused a connection (`dispatch::REFUSAL_PAUSE`).
    refused_at: Option<Instant>,
}

struct Master {
    pools: Vec<Pool>,
    listeners: Vec<ListenerEntry>,
    io: HashMap<WorkerId, WorkerIo>,
    pids: HashMap<i32, (usize, WorkerId)>,
    next_id: u64,
    events: mpsc::Sender<Event>,
    notify_env: String,
    output: Sink,
    base_env: Vec<(String, String)>,
    rng: u64,
    shutdown: Option<Instant>,
    /// Exit code when the loop ends because every app stopped by itself.
    exit_code: i32,
    config_file: Option<std::path::PathBuf>,
    /// The config file's modification time when last read: a change reloads what changed.
    config_mtime: Option<std::time::SystemTime>,
    /// The file changed while a changed app was still reloading: read it again next tick
    /// (without repeating what was already said about it).
    config_retry: bool,
    control_path: std::path::PathBuf,
    sampling: sampling::Sampling,
    /// Per app: the autoscaling controller, for pools sized by load.
    autos: Vec<Option<sampling::Auto>>,
    /// The Node preload, written out at start.
    preload: Option<sampling::PreloadFile>,
    /// Whether systemd (or whoever set `NOTIFY_SOCKET`) has been told `READY=1`.
    notified_ready: bool,
    /// Something changed that the pools' plans must see; the loop plans again.
    dirty: bool,
    /// Knows every worker's process group, to kill them if the master dies.
    reaper: Option<crate::reaper::Reaper>,
    /// Clients waiting for reloads to finish.
    reload_waiters: Vec<status::ReloadWaiter>,
    /// Endpoint registration in etcd, when `--registry` is on.
    registry: Option<crate::registry::Registry>,
    /// What was last handed to the registry, per app: (ready, generation).
    registry_seen: Vec<(usize, u64)>,
    /// The address other machines reach this one at.
    advertise: String,
    /// The Prometheus recorder, when `--metrics` is on.
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// Reused by `dispatch` for its candidate list.
    candidates: Vec<crate::dispatch::Candidate>,
    /// Lines for workers, sent at the end of the loop's turn (`flush_outbox`).
    outbox: Vec<(WorkerId, Outgoing)>,
    /// The listener `dispatch_app` starts from next.
    dispatch_from: usize,
    /// Apps stopped because they went from the config file (they start again if they
    /// come back to it).
    removed: BTreeSet<usize>,
}

/// Starts the master and runs it until it stops. Returns the process exit code.
pub fn run(opts: Options) -> Result<i32, StartError> {
    // Bind every listener before anything starts, so a port in use is one clean error.
    // Under systemd socket activation the master's own listeners arrive as fds.
    let mut inherited = opts.inherited;
    let mut config = opts.config;
    if !inherited.is_empty() && config.apps.len() == 1 && config.apps[0].listen.is_empty() {
        // One app and no addresses of its own: the sockets systemd passed are its.
        config.apps[0].listen = inherited.iter().map(|(_, a)| a.clone()).collect();
    }
    let reaper = opts.reaper;
    let opts = Options {
        config,
        inherited: Vec::new(),
        reaper: None,
        ..opts
    };
    let mut listeners = Vec::new();
    for (app_idx, app) in opts.config.apps.iter().enumerate() {
        for (i, addr) in app.listen.iter().enumerate() {
            let listener = match sockets::take_inherited(&mut inherited, addr) {
                Some(l) => {
                    info!("{}: using {} from systemd (LISTEN_FDS)", app.name, l.local);
                    l
                }
                None => sockets::bind(addr, &listen_field(opts.config.file.is_some(), app, i))?,
            };
            listeners.push(configured_listener(app_idx, app, listener)?);
        }
    }

    for (_, addr) in &inherited {
        warn!("systemd passed a socket for {addr}, which no app listens on; closing it");
    }
    drop(inherited);

    let metrics_listener = match opts.config.metrics {
        Some(addr) => Some(
            crate::metrics::bind(addr).map_err(|source| StartError::Bind {
                field: if opts.config.file.is_some() {
                    "metrics".into()
                } else {
                    "--metrics".into()
                },
                addr: addr.to_string(),
                hint: sockets::bind_hint(source.kind()),
                source,
            })?,
        ),
        None => None,
    };

    // Everything the loop talks to — the listeners, worker channels, the control socket —
    // runs on the loop's own thread: a connection goes from accept to the worker's channel
    // without a single cross-thread wake-up. Worker output, which a flood can make heavy,
    // is read on a runtime of its own so that it never competes with the loop.
    // Before any thread starts, so that they all inherit it; workers are reset at spawn.
    match unix::raise_nofile() {
        Ok(n) => debug!("open files: up to {n}"),
        Err(e) => debug!("cannot raise the open-files limit ({e})"),
    }
    if let Err(e) = unix::batch_scheduling() {
        debug!("SCHED_BATCH not available ({e}); the loop keeps the ordinary policy");
    }
    let output_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_io()
        .thread_name("processes-output")
        .build()
        .map_err(|source| StartError::Setup {
            what: "the output runtime",
            source,
        })?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| StartError::Setup {
            what: "the async runtime",
            source,
        })?;
    let output_handle = output_runtime.handle().clone();
    let result = runtime.block_on(async move {
        let control_path = opts
            .control
            .clone()
            .unwrap_or_else(|| control::default_path(&opts.name));
        let control_listener = control::bind(&control_path)?;
        let notify = NotifySocket::bind().map_err(|source| StartError::Setup {
            what: "the readiness socket (NOTIFY_SOCKET)",
            source,
        })?;
        let (events_tx, events_rx) = mpsc::channel(4096);
        let base_env = std::env::vars()
            .filter(|(k, _)| !ENV_STRIPPED.contains(&k.as_str()))
            .collect();
        let mut master = Master {
            pools: opts.config.apps.iter().cloned().map(Pool::new).collect(),
            listeners,
            io: HashMap::new(),
            pids: HashMap::new(),
            next_id: 0,
            events: events_tx.clone(),
            notify_env: notify.env_value.clone(),
            output: Sink::start(output_handle),
            base_env,
            rng: seed(),
            shutdown: None,
            exit_code: 0,
            config_file: opts.config.file.clone(),
            config_mtime: opts
                .config
                .file
                .as_ref()
                .and_then(|f| std::fs::metadata(f).and_then(|m| m.modified()).ok()),
            config_retry: false,
            control_path: control_path.clone(),
            sampling: sampling::Sampling::new(opts.config.sample_interval),
            autos: opts.config.apps.iter().map(sampling::Auto::new).collect(),
            preload: None,
            reload_waiters: Vec::new(),
            reaper,
            dirty: true,
            registry: None,
            registry_seen: Vec::new(),
            advertise: String::new(),
            notified_ready: false,
            metrics: None,
            candidates: Vec::new(),
            outbox: Vec::new(),
            dispatch_from: 0,
            removed: BTreeSet::new(),
        };
        if let Some(listener) = metrics_listener {
            match crate::metrics::install(opts.config.sample_interval) {
                Ok(handle) => {
                    // The address as bound: with port 0 this is where the OS put it.
                    if let Ok(addr) = listener.local_addr() {
                        info!("metrics on http://{addr}/metrics");
                    }
                    crate::metrics::serve(listener, handle.clone());
                    master.metrics = Some(handle);
                }
                Err(e) => warn!("metrics: cannot install the recorder: {e}"),
            }
        }
        if opts
            .config
            .apps
            .iter()
            .any(|a| a.runtime == Runtime::Node && a.preload)
        {
            match sampling::PreloadFile::write() {
                Ok(p) => master.preload = Some(p),
                Err(e) => warn!(
                    "cannot write the Node preload ({e}); Node workers report no event-loop figures"
                ),
            }
        }
        let notify_tx = events_tx.clone();
        tokio::spawn(async move {
            while let Ok((pid, notice)) = notify.recv().await {
                if notify_tx.send(Event::Notify(pid, notice)).await.is_err() {
                    break;
                }
            }
        });
        control::serve(control_listener, events_tx.clone());
        if let Some(r) = &opts.config.registry {
            master.start_registry(r);
        }
        let code = master.run(events_rx).await;
        // `processes stop` waits for its answer: let it (and any other reply) go out.
        control::drain(Duration::from_secs(1)).await;
        if let Some(registry) = master.registry.take() {
            // Graceful stop: the keys go now, not when the lease runs out.
            registry.shutdown(Duration::from_secs(2)).await;
        }
        // The listeners go first (a unix socket's file with them): a client that saw the
        // control socket go, as `processes stop` waits to, may bind the same path at once.
        master.listeners.clear();
        let _ = std::fs::remove_file(&control_path);
        Ok(code)
    });
    drop(runtime);
    output_runtime.shutdown_background();
    result
}

fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (t.as_nanos() as u64) ^ (u64::from(std::process::id()) << 17) | 1
}

impl Master {
    async fn run(&mut self, mut events: mpsc::Receiver<Event>) -> i32 {
        // Registered before the first fork: an exit right after a fork leaves a pending
        // SIGCHLD that wakes us, so none is missed (see `unix::reap_exited`).
        let signals = Signals {
            chld: signal(SignalKind::child()).expect("SIGCHLD handler"),
            term: signal(SignalKind::terminate()).expect("SIGTERM handler"),
            int: signal(SignalKind::interrupt()).expect("SIGINT handler"),
            hup: signal(SignalKind::hangup()).expect("SIGHUP handler"),
            ttin: signal(SignalKind::from_raw(libc::SIGTTIN)).expect("SIGTTIN handler"),
            ttou: signal(SignalKind::from_raw(libc::SIGTTOU)).expect("SIGTTOU handler"),
        };
        // Signals come through a queue of their own: the loop's every turn (one or two
        // per connection) then polls one queue instead of six signal streams, and a worker
        // flooding the event queue cannot hold a SIGTERM or SIGCHLD back.
        let (sig_tx, mut signals_rx) = mpsc::unbounded_channel();
        tokio::spawn(signals.forward(sig_tx));

        probes::register_or_warn();
        let mut tick = tokio::time::interval(self.sampling.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for l in &self.listeners {
            info!(
                "{}: listening on {}",
                self.pools[l.app].spec.name, l.listener.local
            );
        }
        for app in 0..self.pools.len() {
            self.announce_app(app);
        }
        info!(
            "master pid {} ready; control socket {}",
            std::process::id(),
            self.control_path.display()
        );
        for i in 0..self.listeners.len() {
            self.start_accepting(i);
        }

        // systemd's watchdog: ping at half the interval it expects.
        let watchdog = crate::notify::watchdog_interval();
        let mut watchdog_tick =
            tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
        watchdog_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        let mut deadline: Option<Instant> = None;
        // One timer for the loop's life, moved when the deadline changes: a fresh `Sleep`
        // per turn registered and removed a timer entry for every connection.
        let far = || tokio::time::Instant::now() + Duration::from_secs(3600);
        let sleep = tokio::time::sleep_until(far());
        tokio::pin!(sleep);
        loop {
            let now = Instant::now();
            // Planning runs when something changed or a deadline came; the hot path —
            // a connection accepted, acknowledged, taken — changes no plan and skips it.
            if self.dirty || deadline.is_some_and(|d| d <= now) {
                self.dirty = false;
                self.step(now);
                self.notify_ready_once();
                self.update_registry();
                if let Some(code) = self.finished() {
                    self.flush_outbox();
                    return code;
                }
                deadline = self.next_deadline();
                sleep.as_mut().reset(
                    deadline
                        .map(tokio::time::Instant::from_std)
                        .unwrap_or_else(far),
                );
            }
            self.flush_outbox();
            tokio::select! {
                biased;
                // First: it is ready only while a worker waits for a connection, and a
                // worker flooding the event queue must not keep the others waiting.
                l = std::future::poll_fn(|cx| self.poll_acceptors(cx)) => {
                    self.listeners[l].want_accept = false;
                    self.dispatch(l);
                }
                Some(sig) = signals_rx.recv() => { self.dirty = true; self.on_signal(sig) }
                Some(ev) = events.recv() => {
                    self.on_event(ev);
                    // Drain what is already queued before planning again.
                    for _ in 0..256 {
                        match events.try_recv() {
                            Ok(ev) => self.on_event(ev),
                            Err(_) => break,
                        }
                    }
                }
                _ = tick.tick() => { self.dirty = true; self.on_tick(Instant::now()) }
                _ = watchdog_tick.tick(), if watchdog.is_some() => {
                    let _ = crate::notify::notify_parent("WATCHDOG=1");
                }
                _ = &mut sleep => self.dirty = true,
            }
        }
    }

    fn jitter(&mut self) -> f64 {
        // xorshift64*: good enough to spread restarts, no dependency.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        (self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }

    fn finished(&self) -> Option<i32> {
        if self.shutdown.is_some() {
            return self.pools.iter().all(|p| p.workers.is_empty()).then_some(0);
        }
        if self.pools.iter().all(|p| p.all_parked()) {
            info!("every app has stopped and its restart policy keeps it down; exiting");
            return Some(self.exit_code);
        }
        None
    }

    fn next_deadline(&self) -> Option<Instant> {
        let pools = self.pools.iter().filter_map(Pool::next_deadline);
        let accepts = self.listeners.iter().filter_map(|l| l.accept_retry_at);
        // A refusing worker's pause ending may be the only thing that lets a connection go.
        let pauses = self
            .io
            .values()
            .filter_map(|io| io.refused_at.map(|t| t + crate::dispatch::REFUSAL_PAUSE));
        pools.chain(accepts).chain(pauses).min()
    }

    /// Runs timers and every pool's plan.
    fn step(&mut self, now: Instant) {
        self.kill_overdue(now);
        for app in 0..self.pools.len() {
            self.pools[app].note_uptimes(now);
            // A plan's actions can enable more (a ready replacement starts the next
            // batch); a few rounds settle it.
            for _ in 0..4 {
                let actions = self.pools[app].plan(now);
                if actions.is_empty() {
                    break;
                }
                for a in actions {
                    self.act(app, a, now);
                }
            }
        }
        for l in 0..self.listeners.len() {
            if self.listeners[l].accept_retry_at.is_some_and(|t| t <= now) {
                self.listeners[l].accept_retry_at = None;
                self.dispatch(l);
            }
        }
        let mut paused_ended = Vec::new();
        for io in self.io.values_mut() {
            if io
                .refused_at
                .is_some_and(|t| now.saturating_duration_since(t) >= crate::dispatch::REFUSAL_PAUSE)
            {
                io.refused_at = None;
                paused_ended.push(io.app);
            }
        }
        for app in paused_ended {
            self.dispatch_app(app);
        }
    }

    fn act(&mut self, app: usize, action: Action, now: Instant) {
        match action {
            Action::Spawn { slot, incoming } => self.spawn_worker(app, slot, incoming, now),
            Action::Stop { worker, reason } => self.stop_worker(app, worker, reason, now),
            Action::MarkReady { worker } => self.mark_ready(app, worker, now, "up for ready_after"),
            Action::ReloadEnded(outcome) => self.end_reload(app, outcome),
        }
    }

    fn kill_overdue(&mut self, now: Instant) {
        for pool in &mut self.pools {
            for w in pool.workers.values_mut() {
                if let Some(st) = w.stopping.as_mut()
                    && !st.killed
                    && st.kill_at <= now
                {
                    warn!(
                        "[{}:{}] pid {} still running {} after it was asked to stop; sending SIGKILL",
                        pool.spec.name,
                        w.slot,
                        w.pid,
                        human::duration(now.saturating_duration_since(st.since))
                    );
                    let _ = unix::signal_group(w.pid, Signal::SIGKILL);
                    st.killed = true;
                    st.termed = true;
                }
            }
        }
    }

    // ---- spawning and stopping -------------------------------------------------------

    fn spawn_worker(&mut self, app: usize, slot: u32, incoming: bool, now: Instant) {
        self.next_id += 1;
        let id = WorkerId(self.next_id);
        let spec = self.pools[app].spec.clone();
        match self.fork(app, &spec, slot, id) {
            Ok((pid, master_end, stdout, stderr)) => {
                let prefix = format!("[{}:{}]", spec.name, slot);
                self.output.forward(prefix.clone(), Stream::Stdout, stdout);
                self.output.forward(prefix, Stream::Stderr, stderr);
                let channel = channel::start(master_end, self.events.clone(), move |inc| {
                    Event::Channel(id, inc)
                })
                .ok();
                // A new worker starts level with the least-served of its app, so that
                // round-robin does not send it everything until it has "caught up".
                let served = self.pools[app]
                    .workers
                    .keys()
                    .filter_map(|w| self.io.get(w).map(|io| io.served))
                    .min()
                    .unwrap_or(0);
                if incoming {
                    let reason = self.pools[app]
                        .slots
                        .get(&slot)
                        .and_then(|s| s.replace)
                        .unwrap_or(StopReason::Replaced);
                    record::replacement(spec.name.as_str(), reason);
                }
                self.pools[app].on_spawned(slot, incoming, id, pid, now);
                if let Some(r) = self.reaper.as_mut() {
                    r.watch(pid);
                }
                probes::worker_spawn_with(spec.name.as_str(), slot, pid, || spec.command.join(" "));
                self.pids.insert(pid, (app, id));
                self.io.insert(
                    id,
                    WorkerIo {
                        app,
                        pid,
                        slot,
                        channel,
                        online: false,
                        seq: 0,
                        keys: BTreeMap::new(),
                        queried_any: false,
                        said_ready: false,
                        awaiting_ack: None,
                        held: VecDeque::new(),
                        conn: None,
                        passed: 0,
                        served,
                        refusals: 0,
                        killed_over_memory: None,
                        refused_at: None,
                        load: sampling::Load::default(),
                    },
                );
                info!(
                    "[{}:{}] pid {} started{}",
                    spec.name,
                    slot,
                    pid,
                    if incoming {
                        " (reload replacement)"
                    } else {
                        ""
                    }
                );
            }
            Err(e) => {
                error!("[{}:{}] {}", spec.name, slot, error_chain(&e));
                let jitter = self.jitter();
                let pool = &mut self.pools[app];
                match pool.on_spawn_failed(slot, incoming, now, jitter) {
                    Restart::After { delay, .. } => {
                        info!(
                            "[{}:{}] retrying in {}",
                            spec.name,
                            slot,
                            human::duration(delay)
                        )
                    }
                    Restart::No if incoming => {
                        let replaced = pool.reload.as_ref().map_or(0, |r| r.replaced);
                        self.end_reload(
                            app,
                            ReloadOutcome::Failed {
                                replaced,
                                why: format!("cannot start the replacement: {}", error_chain(&e)),
                            },
                        );
                    }
                    Restart::No => {}
                }
            }
        }
    }

    fn fork(
        &mut self,
        app: usize,
        spec: &AppSpec,
        slot: u32,
        id: WorkerId,
    ) -> Result<(i32, OwnedFd, OwnedFd, OwnedFd), crate::errors::SpawnError> {
        let inherited: Vec<&ListenerEntry> = self
            .listeners
            .iter()
            .filter(|l| l.app == app && l.configured && !l.passing && spec.runtime != Runtime::Node)
            .collect();
        let mut fds: Vec<i32> = inherited
            .iter()
            .map(|l| l.listener.fd.as_raw_fd())
            .collect();
        let (master_end, worker_end) =
            channel::pair().map_err(crate::errors::SpawnError::Channel)?;
        let channel_fd = 3 + fds.len();
        fds.push(worker_end.as_raw_fd());

        let mut env: BTreeMap<String, String> = self
            .base_env
            .iter()
            .filter(|(k, _)| spec.inherit_env.allows(k))
            .cloned()
            .collect();
        if let Some(u) = &spec.user {
            env.insert("USER".into(), u.name.clone());
            env.insert("LOGNAME".into(), u.name.clone());
            env.insert("HOME".into(), u.home.display().to_string());
        }
        env.extend(spec.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        env.insert("PROCESSES_APP".into(), spec.name.to_string());
        env.insert("PROCESSES_WORKER_ID".into(), slot.to_string());
        env.insert("PROCESSES_CHANNEL_FD".into(), channel_fd.to_string());
        env.insert("NOTIFY_SOCKET".into(), self.notify_env.clone());
        if let Some(port) = self
            .listeners
            .iter()
            .filter(|l| l.app == app && l.configured)
            .find_map(|l| l.listener.port())
        {
            env.insert("PORT".into(), port.to_string());
        }
        if !inherited.is_empty() {
            env.insert("LISTEN_FDS".into(), inherited.len().to_string());
            let names: Vec<String> = inherited.iter().map(|l| l.listener.fd_name()).collect();
            env.insert("LISTEN_FDNAMES".into(), names.join(":"));
        }
        if spec.runtime == Runtime::Node {
            env.insert("NODE_CHANNEL_FD".into(), channel_fd.to_string());
            env.insert("NODE_CHANNEL_SERIALIZATION_MODE".into(), "json".into());
            env.insert("NODE_UNIQUE_ID".into(), id.0.to_string());
            if spec.preload
                && let Some(p) = &self.preload
            {
                let opts = p.node_options(env.get("NODE_OPTIONS").map(String::as_str));
                env.insert("NODE_OPTIONS".into(), opts);
                env.insert(
                    "PROCESSES_SAMPLE_MS".into(),
                    self.sampling.interval.as_millis().to_string(),
                );
            }
        }
        let plan = SpawnPlan {
            command: spec.command.clone(),
            cwd: spec.cwd.clone(),
            env: env.into_iter().collect(),
            listen_pid: !inherited.is_empty(),
            fds,
            user: spec.user.as_ref().map(|u| (u.uid, u.gid)),
        };
        let spawned = spawn::spawn(&plan)?;
        for l in &inherited {
            record::handle_pass(
                spec.name.as_str(),
                slot,
                spawned.pid,
                l.listener.fd.as_raw_fd(),
                HandleKind::Listener,
            );
        }
        // Our copy of the worker's end must go, or we would never see EOF when it exits.
        drop(worker_end);
        Ok((spawned.pid, master_end, spawned.stdout, spawned.stderr))
    }

    fn stop_worker(&mut self, app: usize, id: WorkerId, reason: StopReason, now: Instant) {
        let pool = &mut self.pools[app];
        let Some(w) = pool.workers.get(&id) else {
            return;
        };
        if w.stopping.is_some() {
            return;
        }
        let (pid, slot) = (w.pid, w.slot);
        let grace = pool.spec.grace;
        let name = pool.spec.name.clone();
        // A cluster worker leaves gracefully on `disconnect`: its servers close, requests
        // in flight finish, then it closes the channel (we SIGTERM it then) and exits.
        let graceful_node = self
            .io
            .get(&id)
            .is_some_and(|io| io.online && io.channel.is_some());
        if graceful_node {
            self.send_plain(id, node::disconnect);
        } else if let Err(e) = unix::signal_group(pid, Signal::SIGTERM) {
            warn!("[{name}:{slot}] cannot signal pid {pid}: {e}");
        }
        let jitter = self.jitter();
        // The grace counts from when the stop went out, not from when this turn of the
        // loop began (a turn delayed by a flood of work would shorten it).
        let sent = Instant::now().max(now);
        self.pools[app].on_stop_sent(
            id,
            Stopping {
                reason,
                since: sent,
                kill_at: sent + grace,
                termed: !graceful_node,
                killed: false,
            },
            jitter,
        );
        info!(
            "[{name}:{slot}] pid {pid} stopping ({}), {}",
            reason.as_str(),
            if graceful_node {
                "sent disconnect"
            } else {
                "sent SIGTERM"
            }
        );
        // Connections waiting for a worker may have been waiting for this one's slot.
        self.dispatch_app(app);
    }

    fn mark_ready(&mut self, app: usize, id: WorkerId, now: Instant, why: &str) {
        let pool = &mut self.pools[app];
        let Some(w) = pool.workers.get(&id) else {
            return;
        };
        if w.state != WorkerState::Starting {
            return;
        }
        let (slot, pid, started) = (w.slot, w.pid, w.started);
        let replaced = pool.on_ready(id, now);
        let startup = now.saturating_duration_since(started);
        probes::worker_ready(
            pool.spec.name.as_str(),
            slot,
            pid,
            startup.as_micros() as u64,
        );
        info!(
            "[{}:{}] pid {} ready after {} ({why})",
            pool.spec.name,
            slot,
            pid,
            human::duration(now.saturating_duration_since(started))
        );
        if let Some((old, reason)) = replaced {
            self.stop_worker(app, old, reason, now);
            if reason == StopReason::Replaced
                && let Some(r) = &self.pools[app].reload
            {
                let line = format!(
                    "{}: replaced {}/{}",
                    self.pools[app].spec.name, r.replaced, r.total
                );
                self.reload_progress(app, &line);
            }
        }
        self.dispatch_app(app);
    }

    fn end_reload(&mut self, app: usize, outcome: ReloadOutcome) {
        let ok = matches!(outcome, ReloadOutcome::Done { .. });
        let pool = &mut self.pools[app];
        let sizing_before = pool.spec.sizing;
        let Some(r) = pool.end_reload(ok) else { return };
        if self.pools[app].spec.sizing != sizing_before {
            // A failed reload brought the previous spec back, and with it its size.
            self.apply_sizing(app, "reload failed");
        }
        let pool = &mut self.pools[app];
        probes::reload_done(pool.spec.name.as_str(), r.replaced as u32, ok);
        let name = pool.spec.name.clone();
        let failure = match outcome {
            ReloadOutcome::Done { replaced } => {
                info!(
                    "{name}: reload done, {replaced}/{} workers replaced in {}",
                    r.total,
                    human::duration(r.started.elapsed())
                );
                None
            }
            ReloadOutcome::Failed { replaced, why } => {
                error!(
                    "{name}: reload failed after replacing {replaced}/{}: {why}; the remaining workers keep running the previous version",
                    r.total
                );
                Some(format!(
                    "{name}: reload failed after replacing {replaced}/{}: {why}; the remaining workers keep running the previous version",
                    r.total
                ))
            }
        };
        self.reload_ended(app, r.replaced, r.total, failure);
        if self.pools.iter().all(|p| p.reload.is_none()) {
            let _ = crate::notify::notify_parent("READY=1");
        }
    }

    fn begin_reload(&mut self, app: usize, new_spec: Option<AppSpec>, batch: usize) -> bool {
        let now = Instant::now();
        let pool = &mut self.pools[app];
        let name = pool.spec.name.clone();
        if pool.start_reload(new_spec, batch, Duration::from_secs(30), now) {
            let _ = crate::notify::notify_parent(&format!(
                "RELOADING=1\nMONOTONIC_USEC={}",
                crate::notify::monotonic_usec()
            ));
            let resized = pool
                .reload
                .as_ref()
                .and_then(|r| r.previous.as_ref())
                .is_some_and(|p| p.sizing != pool.spec.sizing);
            let total = pool.reload.as_ref().map_or(0, |r| r.total);
            probes::reload_start(name.as_str(), total as u32);
            info!("{name}: rolling reload started ({total} running)");
            // Slots that wait after crashes start now, with what was just reloaded: fixing
            // the code and reloading must not wait out a crash loop's backoff.
            let waiting = pool.restart_waiting_slots();
            if waiting > 0 {
                info!("{name}: {waiting} slot(s) that were waiting after crashes start now");
            }
            if resized {
                self.apply_sizing(app, "config reload");
            }
            true
        } else {
            warn!("{name}: a reload is already running; ignoring this one");
            false
        }
    }

    // ---- events -------------------------------------------------------------------------

    fn on_sigchld(&mut self) {
        let now = Instant::now();
        for (pid, exit) in unix::reap_exited() {
            let Some((app, id)) = self.pids.remove(&pid) else {
                debug!("reaped pid {pid}, not one of ours");
                continue;
            };
            self.on_worker_exit(app, id, pid, exit, now);
        }
    }

    fn on_worker_exit(&mut self, app: usize, id: WorkerId, pid: i32, exit: ExitKind, now: Instant) {
        // Whatever the worker forked dies with it.
        let _ = unix::signal_group(pid, Signal::SIGKILL);
        if let Some(r) = self.reaper.as_mut() {
            r.forget(pid);
        }
        let mut memory_kill = None;
        if let Some(io) = self.io.remove(&id) {
            memory_kill = io.killed_over_memory;
            self.requeue_in_flight(io);
        }
        let jitter = self.jitter();
        let pool = &mut self.pools[app];
        let name = pool.spec.name.clone();
        let (slot, uptime, stopping) = pool
            .workers
            .get(&id)
            .map(|w| (w.slot, w.uptime(now), w.stopping))
            .unwrap_or_default();
        let how = match exit {
            ExitKind::Code(c) => format!("exited with code {c}"),
            // Our own kill for memory: said as such, not as a crash of unknown cause.
            ExitKind::Signal(s) => match memory_kill {
                Some(mib) if s == libc::SIGKILL => {
                    format!("stopped by SIGKILL (it used {mib} MiB, above kill_memory)")
                }
                _ => format!("was killed by {}", unix::signal_name(s)),
            },
        };
        let outcome = pool.on_exit(id, exit, now, jitter);
        let uptime_ms = uptime.as_millis() as u64;
        match outcome {
            Some(ExitOutcome::Asked(reason)) => {
                record::worker_exit(name.as_str(), slot, pid, exit, uptime_ms, Some(reason))
            }
            Some(_) => record::worker_exit(name.as_str(), slot, pid, exit, uptime_ms, None),
            None => {}
        }
        if let Some(ExitOutcome::Crashed(Restart::After { delay, attempt, .. })) = outcome {
            record::restart_scheduled(name.as_str(), slot, attempt, delay.as_millis() as u64);
        }
        match outcome {
            None => {}
            Some(ExitOutcome::Asked(reason)) => {
                let why = reason.as_str();
                match (exit, stopping) {
                    // The signal the master sent to stop it: a stop, not a kill.
                    (ExitKind::Signal(s), Some(st)) if s == libc::SIGTERM && st.termed => info!(
                        "[{name}:{slot}] pid {pid} stopped by SIGTERM, up {} ({why})",
                        human::duration(uptime)
                    ),
                    (ExitKind::Signal(s), Some(st)) if s == libc::SIGKILL && st.killed => info!(
                        "[{name}:{slot}] pid {pid} stopped by SIGKILL, up {} ({why}, forced)",
                        human::duration(uptime)
                    ),
                    // A signal from someone else (or a fault) while it was stopping.
                    (ExitKind::Signal(_), _) => warn!(
                        "[{name}:{slot}] pid {pid} {how}, up {}, while stopping ({why})",
                        human::duration(uptime)
                    ),
                    (ExitKind::Code(_), _) => {
                        info!(
                            "[{name}:{slot}] pid {pid} {how}, up {} (stopped: {why})",
                            human::duration(uptime)
                        )
                    }
                }
            }
            Some(ExitOutcome::Crashed(Restart::After {
                delay,
                attempt,
                crash_looping,
            })) => {
                if crash_looping {
                    warn!(
                        "[{name}:{slot}] pid {pid} {how} after {}; crash-looping, restart {attempt} in {}",
                        human::duration(uptime),
                        human::duration(delay)
                    );
                } else {
                    warn!(
                        "[{name}:{slot}] pid {pid} {how} after {}; restart {attempt} in {}",
                        human::duration(uptime),
                        human::duration(delay)
                    );
                }
            }
            Some(ExitOutcome::Crashed(Restart::No)) => {
                if !exit.is_success() {
                    self.exit_code = 1;
                }
                info!(
                    "[{name}:{slot}] pid {pid} {how} after {}; not restarted (restart = {})",
                    human::duration(uptime),
                    pool.spec.restart.as_str()
                );
            }
            Some(ExitOutcome::ReplacementDied { slot }) => {
                warn!("[{name}:{slot}] reload replacement pid {pid} {how} before it was ready");
                let replaced = pool.reload.as_ref().map_or(0, |r| r.replaced);
                self.end_reload(
                    app,
                    ReloadOutcome::Failed {
                        replaced,
                        why: format!("the replacement for slot {slot} {how} before it was ready"),
                    },
                );
            }
        }
        self.dispatch_app(app);
    }

    fn on_stop_signal(&mut self, which: &str) {
        let now = Instant::now();
        if self.shutdown.is_some() {
            warn!("{which} again: killing every worker now");
            for pool in &mut self.pools {
                for w in pool.workers.values_mut() {
                    let _ = unix::signal_group(w.pid, Signal::SIGKILL);
                    if let Some(st) = w.stopping.as_mut() {
                        st.killed = true;
                    }
                }
            }
            return;
        }
        info!("{which}: stopping every worker (grace period per app)");
        self.begin_shutdown(now);
    }

    /// Ends `app`'s reload, if one runs, because the app is being stopped: the clients
    /// waiting for it are told (and exit non-zero) instead of waiting for good. The new
    /// settings stay: they are what the app runs when started again.
    fn cancel_reload(&mut self, app: usize, why: &str) {
        let Some(r) = self.pools[app].end_reload(true) else {
            return;
        };
        let name = self.pools[app].spec.name.clone();
        probes::reload_done(name.as_str(), r.replaced as u32, false);
        let msg = format!(
            "{name}: reload stopped after replacing {}/{}: {why}",
            r.replaced, r.total
        );
        warn!("{msg}");
        self.reload_ended(app, r.replaced, r.total, Some(msg));
        // systemd was told RELOADING=1 when it began (a stopping master says STOPPING=1).
        if self.shutdown.is_none() && self.pools.iter().all(|p| p.reload.is_none()) {
            let _ = crate::notify::notify_parent("READY=1");
        }
    }

    /// Stops one app for good: its workers drain, its slots are not refilled.
    fn stop_app(&mut self, app: usize, now: Instant) {
        let start = format!(
            "the app was stopped; `processes start {}` runs it with the new settings",
            self.pools[app].spec.name
        );
        self.stop_app_because(app, now, "processes stop", &start);
    }

    /// Stops an app for `why`; a reload of it that runs ends, its clients told `reload_note`.
    fn stop_app_because(&mut self, app: usize, now: Instant, why: &str, reload_note: &str) {
        info!("{}: stopping ({why})", self.pools[app].spec.name);
        self.cancel_reload(app, reload_note);
        let pool = &mut self.pools[app];
        pool.stopping = true;
        for s in pool.slots.values_mut() {
            s.restart_at = None;
        }
        let ids: Vec<WorkerId> = pool
            .workers
            .values()
            .filter(|w| w.stopping.is_none())
            .map(|w| w.id)
            .collect();
        for id in ids {
            self.stop_worker(app, id, StopReason::Shutdown, now);
        }
    }

    /// Starts an app the config file gained while the master runs: its listeners are
    /// bound first, so an address in use refuses the app and nothing of it starts.
    fn add_app(&mut self, spec: AppSpec) -> Result<usize, String> {
        let app = self.pools.len();
        let mut entries = Vec::new();
        for (i, addr) in spec.listen.iter().enumerate() {
            let listener = sockets::bind(addr, &listen_field(true, &spec, i))
                .and_then(|l| configured_listener(app, &spec, l))
                .map_err(|e| error_chain(&e))?;
            entries.push(listener);
        }
        if spec.runtime == Runtime::Node && spec.preload && self.preload.is_none() {
            match sampling::PreloadFile::write() {
                Ok(p) => self.preload = Some(p),
                Err(e) => warn!(
                    "cannot write the Node preload ({e}); Node workers report no event-loop figures"
                ),
            }
        }
        for e in &entries {
            info!("{}: listening on {}", spec.name, e.listener.local);
        }
        self.autos.push(sampling::Auto::new(&spec));
        self.pools.push(Pool::new(spec));
        let first = self.listeners.len();
        self.listeners.extend(entries);
        for l in first..self.listeners.len() {
            self.start_accepting(l);
        }
        self.dirty = true;
        Ok(app)
    }

    /// Brings the running apps in line with the config file, as `supervisorctl update`
    /// does: an app new in it starts; an app gone from it stops (it stays listed as
    /// stopped, and its listeners stay bound, until the master restarts); an app that
    /// comes back starts again with the file's settings.
    fn sync_apps(&mut self, fresh: &Config, now: Instant) -> Synced {
        let mut done = Synced::default();
        if self.shutdown.is_some() {
            // Nothing starts while the master stops.
            return done;
        }
        for app in 0..self.pools.len() {
            let name = self.pools[app].spec.name.clone();
            if self.removed.contains(&app) || fresh.apps.iter().any(|a| a.name == name) {
                continue;
            }
            self.stop_app_because(
                app,
                now,
                "gone from the config file",
                "the app is gone from the config file",
            );
            self.removed.insert(app);
            done.say(format!(
                "{name}: gone from the config file; stopped (its listeners stay bound until \
                 the master restarts)"
            ));
        }
        for spec in &fresh.apps {
            match self.find_app(spec.name.as_str()) {
                None => match self.add_app(spec.clone()) {
                    Ok(app) => {
                        let n = self.pools[app].target;
                        done.started.push(app);
                        done.say(format!(
                            "{}: new in the config file; starting {n} worker{}",
                            spec.name,
                            if n == 1 { "" } else { "s" }
                        ));
                        self.announce_app(app);
                    }
                    Err(e) => done.fail(format!(
                        "{}: new in the config file but not started: {e}",
                        spec.name
                    )),
                },
                Some(app) if self.removed.contains(&app) => {
                    if let Err(why) = self.take_settings_of_stopped(app, spec) {
                        done.fail(format!("{}: back in the config file, but {why}", spec.name));
                        continue;
                    }
                    self.removed.remove(&app);
                    self.pools[app].start_now();
                    self.dirty = true;
                    done.started.push(app);
                    done.say(format!(
                        "{}: back in the config file; starting it",
                        spec.name
                    ));
                }
                Some(_) => {}
            }
        }
        done
    }

    /// A stopped app takes `spec` as its settings, for `processes start` (or its return
    /// to the config file) to run; if they need a restart of the master (its listeners'
    /// addresses or mode), nothing changes and that is the error.
    fn take_settings_of_stopped(&mut self, app: usize, spec: &AppSpec) -> Result<(), String> {
        let pool = &mut self.pools[app];
        if let Some(why) = crate::config::needs_restart(&pool.spec, spec) {
            return Err(why);
        }
        if pool.spec != *spec {
            pool.spec = spec.clone();
            pool.generation += 1;
            self.apply_sizing(app, "");
        }
        Ok(())
    }

    /// `sync_apps` with the config file as it is now, if there is one and it reads.
    /// (A file that does not read is reported by the reload that follows.)
    pub(super) fn sync_apps_with_file(&mut self, now: Instant) -> Synced {
        let Some(path) = &self.config_file else {
            return Synced::default();
        };
        match crate::config::load_file(path) {
            Ok(fresh) => self.sync_apps(&fresh, now),
            Err(_) => Synced::default(),
        }
    }

    /// What the master says of an app when it starts: a hint when a package manager
    /// stands between it and Node, and the variables its workers do not get.
    fn announce_app(&self, app: usize) {
        let p = &self.pools[app];
        let listens = self.listeners.iter().any(|l| l.app == app);
        if let Some(hint) = crate::config::wrapper_hint(&p.spec, listens) {
            warn!("{}: {hint}", p.spec.name);
        }
        let names = self.base_env.iter().map(|(k, _)| k.as_str());
        let withheld = crate::config::withheld_env(&p.spec.inherit_env, names);
        if !withheld.is_empty() {
            let shown = withheld
                .iter()
                .take(6)
                .copied()
                .collect::<Vec<_>>()
                .join(", ");
            let more = withheld.len().saturating_sub(6);
            info!(
                "{}: its workers do not get {shown}{} from the master's environment; \
                 `--env K=V` or `inherit_env` passes them",
                p.spec.name,
                if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                }
            );
        }
    }

    fn start_registry(&mut self, settings: &crate::config::RegistrySettings) {
        let node = settings.advertise.clone().unwrap_or_else(|| {
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "localhost".into())
        });
        let cfg = crate::registry::RegistryConfig {
            endpoints: settings.endpoints.clone(),
            prefix: settings.prefix.clone(),
            ttl: settings.ttl,
            node: node.clone(),
        };
        if let Err(e) = cfg.validate() {
            warn!("registry: {e}; endpoints are not registered");
            return;
        }
        info!(
            "registry: registering endpoints in etcd at {} under {} as {node}",
            settings.endpoints.join(","),
            settings.prefix
        );
        self.advertise = node;
        self.registry = Some(crate::registry::Registry::start(cfg));
    }

    /// Hands the registry a new snapshot when something a load balancer cares about
    /// changed: an app's ready count (becoming ready, draining, losing every worker) or
    /// its version.
    fn update_registry(&mut self) {
        let Some(registry) = &self.registry else {
            return;
        };
        let seen: Vec<(usize, u64)> = self
            .pools
            .iter()
            .map(|p| (p.ready(), p.generation))
            .collect();
        if seen == self.registry_seen {
            return;
        }
        self.registry_seen = seen;
        let snapshot = self
            .pools
            .iter()
            .enumerate()
            .map(|(i, p)| crate::registry::AppEndpoints {
                app: p.spec.name.to_string(),
                endpoints: self
                    .listeners
                    .iter()
                    .filter(|l| l.app == i && !l.udp)
                    .filter_map(|l| match &l.listener.local {
                        ListenAddr::Tcp(a) => {
                            Some(crate::registry::advertised_endpoint(*a, &self.advertise))
                        }
                        ListenAddr::Unix(_) => None,
                    })
                    .collect(),
                ready: p.ready(),
                version: p.generation,
            })
            .collect();
        registry.update(snapshot);
    }

    /// `READY=1` to our own supervisor once every app has its minimum of ready workers.
    fn notify_ready_once(&mut self) {
        if self.notified_ready || self.shutdown.is_some() {
            return;
        }
        let all_up = self.pools.iter().all(|p| {
            let (min, _) = p.spec.sizing.bounds();
            p.ready() >= min.min(p.target) || p.stopping
        });
        if all_up {
            self.notified_ready = true;
            let ready: usize = self.pools.iter().map(Pool::ready).sum();
            let _ = crate::notify::notify_parent(&format!(
                "READY=1\nSTATUS={ready} workers ready in {} apps",
                self.pools.len()
            ));
        }
    }

    fn begin_shutdown(&mut self, now: Instant) {
        self.shutdown = Some(now);
        let _ = crate::notify::notify_parent("STOPPING=1");
        for app in 0..self.pools.len() {
            self.cancel_reload(app, "the master is stopping");
        }
        let mut to_stop = Vec::new();
        for (app, pool) in self.pools.iter_mut().enumerate() {
            pool.stopping = true;
            for s in pool.slots.values_mut() {
                s.restart_at = None;
            }
            to_stop.extend(
                pool.workers
                    .values()
                    .filter(|w| w.stopping.is_none())
                    .map(|w| (app, w.id)),
            );
        }
        for (app, id) in to_stop {
            self.stop_worker(app, id, StopReason::Shutdown, now);
        }
    }

    fn on_sighup(&mut self) {
        info!("SIGHUP: rolling reload of every app");
        let synced = self.sync_apps_with_file(Instant::now());
        let all: Vec<usize> = (0..self.pools.len())
            .filter(|&i| !self.pools[i].stopping && !synced.started.contains(&i))
            .collect();
        if let Err(e) = self.reload_apps(&all, 1) {
            error!("reload: {e}; keeping the running configuration");
        }
    }

    /// Starts a rolling reload of these apps, with their specs re-read from the config
    /// file when there is one. Returns the apps whose reload started; an error (nothing
    /// started) when the file no longer parses or changes what a reload cannot.
    /// A changed config file rolls out like `processes reload`, for the apps whose
    /// settings changed. Checked once per sample tick.
    pub(super) fn check_config_file(&mut self) {
        let Some(path) = self.config_file.clone() else {
            return;
        };
        let Ok(mtime) = std::fs::metadata(&path).and_then(|m| m.modified()) else {
            return;
        };
        let edited = self.config_mtime != Some(mtime);
        if !edited && !self.config_retry {
            return;
        }
        self.config_mtime = Some(mtime);
        self.config_retry = false;
        let fresh = match crate::config::load_file(&path) {
            Ok(c) => c,
            Err(e) => {
                error!(
                    "{} changed but {}; keeping the running configuration",
                    path.display(),
                    error_chain(&e)
                );
                return;
            }
        };
        let started = if edited {
            self.sync_apps(&fresh, Instant::now()).started
        } else {
            Vec::new()
        };
        // A stopped app takes its new settings as they are: `processes start` runs them.
        for i in 0..self.pools.len() {
            if !self.pools[i].stopping || self.shutdown.is_some() || self.removed.contains(&i) {
                continue;
            }
            let name = self.pools[i].spec.name.clone();
            let Some(a) = fresh.apps.iter().find(|a| a.name == name) else {
                continue;
            };
            if *a == self.pools[i].spec {
                continue;
            }
            match self.take_settings_of_stopped(i, a) {
                Ok(()) => info!(
                    "{name}: settings changed while it is stopped; `processes start {name}` runs them"
                ),
                Err(why) => warn!("{name} is stopped and keeps its settings: {why}"),
            }
        }
        let (changed, reloading): (Vec<usize>, Vec<usize>) = (0..self.pools.len())
            .filter(|&i| !self.pools[i].stopping && !started.contains(&i))
            .filter(|&i| {
                let current = &self.pools[i].spec;
                fresh
                    .apps
                    .iter()
                    .find(|a| a.name == current.name)
                    .is_some_and(|a| a != current)
            })
            .partition(|&i| self.pools[i].reload.is_none());
        // Changed again while a reload runs: look at the file again once it is done.
        self.config_retry = !reloading.is_empty();
        if changed.is_empty() {
            return;
        }
        let names: Vec<String> = changed
            .iter()
            .map(|&i| self.pools[i].spec.name.to_string())
            .collect();
        info!(
            "{} changed: rolling reload of {}",
            path.display(),
            names.join(", ")
        );
        if let Err(e) = self.reload_apps(&changed, 1) {
            error!("reload: {e}; keeping the running configuration");
        }
    }

    pub(super) fn reload_apps(
        &mut self,
        apps: &[usize],
        batch: usize,
    ) -> Result<Vec<usize>, String> {
        let fresh = match &self.config_file {
            Some(path) => Some(crate::config::load_file(path).map_err(|e| error_chain(&e))?),
            None => None,
        };
        let mut specs = Vec::new();
        for &app in apps {
            let current = &self.pools[app].spec;
            let new_spec = match &fresh {
                None => None,
                Some(c) => match c.apps.iter().find(|a| a.name == current.name) {
                    None => {
                        return Err(format!(
                            "apps.{} is gone from the config file; `processes reload` of every app (or SIGHUP) stops it",
                            current.name
                        ));
                    }
                    Some(a) => {
                        if let Some(why) = crate::config::needs_restart(current, a) {
                            return Err(why);
                        }
                        Some(a.clone())
                    }
                },
            };
            specs.push((app, new_spec));
        }
        Ok(specs
            .into_iter()
            .filter_map(|(app, spec)| self.begin_reload(app, spec, batch).then_some(app))
            .collect())
    }

    fn scale_by_hand(&mut self, delta: i64) {
        for pool in &mut self.pools {
            let before = pool.target;
            let want = (before as i64 + delta).max(0) as usize;
            let now = pool.set_target(want);
            if now == before {
                let (lo, hi) = pool.spec.sizing.bounds();
                info!(
                    "{}: stays at {before} workers (bounds {lo}..{hi})",
                    pool.spec.name
                );
            } else {
                record::scale(pool.spec.name.as_str(), before, now, "signal");
                let note = match pool.spec.sizing {
                    crate::config::Sizing::Auto { .. } => {
                        "; autoscaling sizes this app and may change it again \
                         (`processes scale APP N` fixes the size)"
                    }
                    crate::config::Sizing::Fixed(_) => "",
                };
                info!(
                    "{}: {before} → {now} workers (by hand){note}",
                    pool.spec.name
                );
            }
        }
    }

    fn on_event(&mut self, ev: Event) {
        match ev {
            // Messages that change state mark the loop dirty themselves (`on_message`).
            Event::Channel(id, Incoming::Message(value, fd)) => {
                self.on_message(id, node::classify(&value), fd)
            }
            Event::Channel(id, Incoming::Known(msg)) => self.on_message(id, msg, None),
            Event::Channel(id, Incoming::Closed(reason)) => {
                self.dirty = true;
                self.on_channel_closed(id, reason)
            }
            Event::Notify(pid, notice) => {
                self.dirty = true;
                self.on_notify(pid, notice)
            }
            Event::Control(req, responder) => {
                self.dirty = true;
                self.on_control(req, responder)
            }
        }
    }

    fn on_signal(&mut self, sig: Sig) {
        match sig {
            Sig::Chld => self.on_sigchld(),
            Sig::Term => self.on_stop_signal("SIGTERM"),
            Sig::Int => self.on_stop_signal("SIGINT"),
            Sig::Hup => self.on_sighup(),
            Sig::Ttin => self.scale_by_hand(1),
            Sig::Ttou => self.scale_by_hand(-1),
        }
    }

    fn on_notify(&mut self, pid: i32, notice: Notice) {
        // The sender may be the worker or anything in its process group.
        let leader = nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(pid)))
            .map(|p| p.as_raw())
            .unwrap_or(pid);
        let Some(&(app, id)) = self.pids.get(&pid).or_else(|| self.pids.get(&leader)) else {
            debug!("notify from pid {pid}, not a worker");
            return;
        };
        if notice.ready {
            self.mark_ready(app, id, Instant::now(), "READY=1");
        }
        if let Some(status) = notice.status {
            debug!("[{}] status: {status}", self.pools[app].spec.name);
        }
    }

    fn on_channel_closed(&mut self, id: WorkerId, reason: Option<channel::Violation>) {
        let Some(io) = self.io.get_mut(&id) else {
            return;
        };
        io.channel = None;
        let app = io.app;
        let (pid, slot) = (io.pid, io.slot);
        let name = self.pools[app].spec.name.clone();
        if let Some(v) = &reason {
            warn!("[{name}:{slot}] pid {pid} {v}; its channel is closed");
            crate::metrics::violation(name.as_str(), v.label());
        }
        // A connection it had not acknowledged goes to another worker.
        let conn = io.conn.take_if(|c| !c.acked);
        io.awaiting_ack = None;
        io.held.clear();
        if let Some(c) = conn {
            self.listeners[c.listener].queue.push_front(Queued {
                fd: c.fd,
                refused: c.refused,
            });
        }
        // A draining Node worker that closed its channel has closed its servers.
        let needs_channel =
            self.pools[app].spec.dispatch().passes() || self.pools[app].spec.is_node();
        if let Some(w) = self.pools[app].workers.get_mut(&id) {
            match w.stopping.as_mut() {
                Some(st) if !st.termed => {
                    let _ = unix::signal_group(w.pid, Signal::SIGTERM);
                    st.termed = true;
                }
                Some(_) => {}
                // A worker that needs its channel (connections come over it) and lost it
                // is useless: unless it exits by itself in a moment (it usually is
                // exiting), the plan replaces it.
                None if needs_channel => {
                    if reason.is_none() {
                        info!("[{name}:{slot}] pid {pid} closed its channel");
                    }
                    w.channel_lost = Some(Instant::now());
                }
                None => {}
            }
        }
        self.dispatch_app(app);
    }

    fn requeue_in_flight(&mut self, mut io: WorkerIo) {
        match io.conn.take() {
            Some(c) if !c.acked => self.listeners[c.listener].queue.push_front(Queued {
                fd: c.fd,
                refused: c.refused,
            }),
            Some(c) => protocol::close_conn(c),
            None => {}
        }
    }
}

/// An error and its causes on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
