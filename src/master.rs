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
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::Value;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tracing::{debug, error, info, warn};

use crate::backoff::{ExitKind, Restart};
use crate::channel::{self, Incoming, Outgoing};
use crate::config::{AppSpec, Config, ListenAddr, Runtime};
use crate::control::{self, Reply, Request};
use crate::dispatch::{self, Candidate};
use crate::errors::StartError;
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

/// Connections a listener may hold accepted-but-not-yet-passed before the master stops
/// accepting and lets the kernel's backlog queue the rest.
pub const MAX_QUEUED_PER_LISTENER: usize = 256;
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
}

/// Everything that can wake the loop, besides signals and timers.
pub enum Event {
    Channel(WorkerId, Incoming),
    Notify(i32, Notice),
    Accepted(usize, OwnedFd, OwnedSemaphorePermit),
    Control(Request, oneshot::Sender<Reply>),
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
    queue: VecDeque<Queued>,
    last: Option<WorkerId>,
    accept_started: bool,
    passed: u64,
}

struct Queued {
    fd: OwnedFd,
    permit: OwnedSemaphorePermit,
}

/// A handle sent and not yet acknowledged.
struct HandleInFlight {
    value: Value,
    fd: OwnedFd,
    retries: u32,
}

/// A connection given to a worker and not yet taken.
struct ConnInFlight {
    listener: usize,
    /// For cluster `newconn`: the `seq` whose reply says accepted or not.
    seq: Option<u64>,
    fd: OwnedFd,
    permit: OwnedSemaphorePermit,
    acked: bool,
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
    /// Listeners it asked for with `queryServer`.
    keys: BTreeSet<usize>,
    queried_any: bool,
    /// Node's rule: while a handle is unacknowledged, every later message waits.
    awaiting_ack: Option<HandleInFlight>,
    held: VecDeque<(Value, Option<OwnedFd>)>,
    conn: Option<ConnInFlight>,
    passed: u64,
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
    control_path: std::path::PathBuf,
}

/// Starts the master and runs it until it stops. Returns the process exit code.
pub fn run(opts: Options) -> Result<i32, StartError> {
    // Bind every listener before anything starts, so a port in use is one clean error.
    let mut listeners = Vec::new();
    for (app_idx, app) in opts.config.apps.iter().enumerate() {
        for (i, addr) in app.listen.iter().enumerate() {
            let field = match &opts.config.file {
                Some(_) if app.listen.len() > 1 => format!("apps.{}.listen[{i}]", app.name),
                Some(_) => format!("apps.{}.listen", app.name),
                None => "--listen".to_string(),
            };
            let listener = sockets::bind(addr, &field)?;
            let passing = app.dispatch().passes();
            if passing || app.runtime == Runtime::Node {
                // The master accepts on it, or Node 18 workers do (they hang on a blocking
                // listener; NODE-IPC.md §5).
                spawn::set_nonblocking(&listener.fd, true).map_err(|source| StartError::Setup {
                    what: "a listening socket",
                    source,
                })?;
            }
            listeners.push(ListenerEntry {
                app: app_idx,
                listener,
                configured: true,
                keys: BTreeSet::new(),
                data: Value::Null,
                udp: false,
                passing,
                queue: VecDeque::new(),
                last: None,
                accept_started: false,
                passed: 0,
            });
        }
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("processes-io")
        .build()
        .map_err(|source| StartError::Setup {
            what: "the async runtime",
            source,
        })?;
    runtime.block_on(async move {
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
            output: Sink::start(),
            base_env,
            rng: seed(),
            shutdown: None,
            exit_code: 0,
            config_file: opts.config.file.clone(),
            control_path: control_path.clone(),
        };
        let notify_tx = events_tx.clone();
        tokio::spawn(async move {
            while let Ok((pid, notice)) = notify.recv().await {
                if notify_tx.send(Event::Notify(pid, notice)).await.is_err() {
                    break;
                }
            }
        });
        control::serve(control_listener, events_tx.clone());
        let code = master.run(events_rx).await;
        let _ = std::fs::remove_file(&control_path);
        Ok(code)
    })
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
        let mut sigchld = signal(SignalKind::child()).expect("SIGCHLD handler");
        let mut sigterm = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut sigint = signal(SignalKind::interrupt()).expect("SIGINT handler");
        let mut sighup = signal(SignalKind::hangup()).expect("SIGHUP handler");
        let mut sigttin = signal(SignalKind::from_raw(libc::SIGTTIN)).expect("SIGTTIN handler");
        let mut sigttou = signal(SignalKind::from_raw(libc::SIGTTOU)).expect("SIGTTOU handler");

        probes::register_or_warn();
        for l in &self.listeners {
            info!(
                "{}: listening on {}",
                self.pools[l.app].spec.name, l.listener.local
            );
        }
        info!(
            "master pid {} ready; control socket {}",
            std::process::id(),
            self.control_path.display()
        );
        for i in 0..self.listeners.len() {
            self.start_accepting(i);
        }

        loop {
            let now = Instant::now();
            self.step(now);
            if let Some(code) = self.finished() {
                return code;
            }
            let deadline = self.next_deadline();
            let sleep = tokio::time::sleep_until(
                deadline
                    .map(tokio::time::Instant::from_std)
                    .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600)),
            );
            tokio::select! {
                biased;
                _ = sigchld.recv() => self.on_sigchld(),
                _ = sigterm.recv() => self.on_stop_signal("SIGTERM"),
                _ = sigint.recv() => self.on_stop_signal("SIGINT"),
                _ = sighup.recv() => self.on_sighup(),
                _ = sigttin.recv() => self.scale_by_hand(1),
                _ = sigttou.recv() => self.scale_by_hand(-1),
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
                _ = sleep => {}
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
        self.pools.iter().filter_map(Pool::next_deadline).min()
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
                        "[{}:{}] pid {} still running {:?} after it was asked to stop; sending SIGKILL",
                        pool.spec.name,
                        w.slot,
                        w.pid,
                        now.saturating_duration_since(st.since)
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
                let channel = master_end.and_then(|fd| {
                    channel::start(fd, self.events.clone(), move |inc| Event::Channel(id, inc)).ok()
                });
                self.pools[app].on_spawned(slot, incoming, id, pid, now);
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
                        keys: BTreeSet::new(),
                        queried_any: false,
                        awaiting_ack: None,
                        held: VecDeque::new(),
                        conn: None,
                        passed: 0,
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
                        info!("[{}:{}] retrying in {:?}", spec.name, slot, delay)
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

    #[allow(clippy::type_complexity)]
    fn fork(
        &mut self,
        app: usize,
        spec: &AppSpec,
        slot: u32,
        id: WorkerId,
    ) -> Result<(i32, Option<OwnedFd>, OwnedFd, OwnedFd), crate::errors::SpawnError> {
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

        let mut env: BTreeMap<String, String> = self.base_env.iter().cloned().collect();
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
        }
        let plan = SpawnPlan {
            command: spec.command.clone(),
            cwd: spec.cwd.clone(),
            env: env.into_iter().collect(),
            listen_pid: !inherited.is_empty(),
            fds,
            user: None,
        };
        let spawned = spawn::spawn(&plan)?;
        for l in &inherited {
            probes::handle_pass(
                spec.name.as_str(),
                slot,
                spawned.pid,
                l.listener.fd.as_raw_fd(),
                HandleKind::Listener,
            );
        }
        // Our copy of the worker's end must go, or we would never see EOF when it exits.
        drop(worker_end);
        Ok((
            spawned.pid,
            Some(master_end),
            spawned.stdout,
            spawned.stderr,
        ))
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
        self.pools[app].on_stop_sent(
            id,
            Stopping {
                reason,
                since: now,
                kill_at: now + grace,
                termed: !graceful_node,
                killed: false,
            },
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
            "[{}:{}] pid {} ready after {:?} ({why})",
            pool.spec.name,
            slot,
            pid,
            now.saturating_duration_since(started)
        );
        if let Some(old) = replaced {
            self.stop_worker(app, old, StopReason::Replaced, now);
        }
        self.dispatch_app(app);
    }

    fn end_reload(&mut self, app: usize, outcome: ReloadOutcome) {
        let ok = matches!(outcome, ReloadOutcome::Done { .. });
        let pool = &mut self.pools[app];
        let Some(r) = pool.end_reload(ok) else { return };
        probes::reload_done(pool.spec.name.as_str(), r.replaced as u32, ok);
        match outcome {
            ReloadOutcome::Done { replaced } => info!(
                "{}: reload done, {replaced}/{} workers replaced in {:?}",
                pool.spec.name,
                r.total,
                r.started.elapsed()
            ),
            ReloadOutcome::Failed { replaced, why } => error!(
                "{}: reload failed after replacing {replaced}/{}: {why}; the remaining workers keep running the previous version",
                pool.spec.name, r.total
            ),
        }
    }

    fn begin_reload(&mut self, app: usize, new_spec: Option<AppSpec>, batch: usize) -> bool {
        let now = Instant::now();
        let pool = &mut self.pools[app];
        let name = pool.spec.name.clone();
        if pool.start_reload(new_spec, batch, Duration::from_secs(30), now) {
            let total = pool.reload.as_ref().map_or(0, |r| r.total);
            probes::reload_start(name.as_str(), total as u32);
            info!(
                "{name}: rolling reload started ({} workers)",
                pool.reload.as_ref().map_or(0, |r| r.total)
            );
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
        if let Some(io) = self.io.remove(&id) {
            self.requeue_in_flight(io);
        }
        let jitter = self.jitter();
        let pool = &mut self.pools[app];
        let name = pool.spec.name.clone();
        let (slot, uptime) = pool
            .workers
            .get(&id)
            .map(|w| (w.slot, w.uptime(now)))
            .unwrap_or_default();
        let how = match exit {
            ExitKind::Code(c) => format!("exited with code {c}"),
            ExitKind::Signal(s) => format!("was killed by {}", unix::signal_name(s)),
        };
        let (code, sig) = match exit {
            ExitKind::Code(c) => (c, 0),
            ExitKind::Signal(s) => (-1, s),
        };
        let outcome = pool.on_exit(id, exit, now, jitter);
        let uptime_ms = uptime.as_millis() as u64;
        match outcome {
            Some(ExitOutcome::Asked(_)) => {
                probes::worker_exit(name.as_str(), slot, pid, code, sig, uptime_ms)
            }
            Some(_) => probes::worker_crash(name.as_str(), slot, pid, code, sig, uptime_ms),
            None => {}
        }
        if let Some(ExitOutcome::Crashed(Restart::After { delay, attempt, .. })) = outcome {
            probes::restart_scheduled(name.as_str(), slot, attempt, delay.as_millis() as u64);
        }
        match outcome {
            None => {}
            Some(ExitOutcome::Asked(reason)) => {
                info!(
                    "[{name}:{slot}] pid {pid} {how} after {uptime:?} (stopped: {})",
                    reason.as_str()
                )
            }
            Some(ExitOutcome::Crashed(Restart::After {
                delay,
                attempt,
                crash_looping,
            })) => {
                if crash_looping {
                    warn!(
                        "[{name}:{slot}] pid {pid} {how} after {uptime:?}; crash-looping, restart {attempt} in {delay:?}"
                    );
                } else {
                    warn!(
                        "[{name}:{slot}] pid {pid} {how} after {uptime:?}; restart {attempt} in {delay:?}"
                    );
                }
            }
            Some(ExitOutcome::Crashed(Restart::No)) => {
                if !exit.is_success() {
                    self.exit_code = 1;
                }
                info!(
                    "[{name}:{slot}] pid {pid} {how} after {uptime:?}; not restarted (restart = {:?})",
                    pool.spec.restart
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

    fn begin_shutdown(&mut self, now: Instant) {
        self.shutdown = Some(now);
        let _ = crate::notify::notify_parent("STOPPING=1");
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
        let fresh = match &self.config_file {
            Some(path) => match crate::config::load_file(path) {
                Ok(c) => Some(c),
                Err(e) => {
                    error!(
                        "reload: {}; keeping the running configuration",
                        error_chain(&e)
                    );
                    return;
                }
            },
            None => None,
        };
        for app in 0..self.pools.len() {
            let new_spec = fresh.as_ref().and_then(|c| {
                c.apps
                    .iter()
                    .find(|a| a.name == self.pools[app].spec.name)
                    .cloned()
            });
            self.begin_reload(app, new_spec, 1);
        }
    }

    fn scale_by_hand(&mut self, delta: i64) {
        for pool in &mut self.pools {
            let before = pool.target;
            let want = (before as i64 + delta).max(0) as usize;
            let now = pool.set_target(want);
            if now == before {
                info!(
                    "{}: stays at {before} workers (bounds {:?})",
                    pool.spec.name,
                    pool.spec.sizing.bounds()
                );
            } else {
                probes::scale(pool.spec.name.as_str(), before as u32, now as u32, "signal");
                info!("{}: {before} → {now} workers (by hand)", pool.spec.name);
            }
        }
    }

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Channel(id, Incoming::Message(value, fd)) => self.on_message(id, value, fd),
            Event::Channel(id, Incoming::Closed(reason)) => self.on_channel_closed(id, reason),
            Event::Notify(pid, notice) => self.on_notify(pid, notice),
            Event::Accepted(l, fd, permit) => {
                self.listeners[l].queue.push_back(Queued { fd, permit });
                self.dispatch(l);
            }
            Event::Control(req, reply) => {
                let r = self.on_control(req);
                let _ = reply.send(r);
            }
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
        }
        // A connection it had not acknowledged goes to another worker.
        let conn = io.conn.take_if(|c| !c.acked);
        io.awaiting_ack = None;
        io.held.clear();
        if let Some(c) = conn {
            self.listeners[c.listener].queue.push_front(Queued {
                fd: c.fd,
                permit: c.permit,
            });
        }
        // A draining Node worker that closed its channel has closed its servers.
        if let Some(w) = self.pools[app].workers.get_mut(&id)
            && let Some(st) = w.stopping.as_mut()
            && !st.termed
        {
            let _ = unix::signal_group(w.pid, Signal::SIGTERM);
            st.termed = true;
        }
        self.dispatch_app(app);
    }

    fn requeue_in_flight(&mut self, mut io: WorkerIo) {
        if let Some(c) = io.conn.take()
            && !c.acked
        {
            self.listeners[c.listener].queue.push_front(Queued {
                fd: c.fd,
                permit: c.permit,
            });
        }
    }

    // ---- the channel protocol -----------------------------------------------------------

    fn on_message(&mut self, id: WorkerId, value: Value, fd: Option<OwnedFd>) {
        let Some(io) = self.io.get(&id) else { return };
        let app = io.app;
        let msg = node::classify(&value);
        match msg {
            FromWorker::HandleAck => self.on_handle_ack(id),
            FromWorker::HandleNack => self.on_handle_nack(id),
            FromWorker::Handle { .. } => {
                // We have no use for handles a worker sends, but it waits for our ACK.
                drop(fd);
                self.send_raw(id, node::handle_ack(), None);
            }
            FromWorker::Online { .. } => {
                if let Some(io) = self.io.get_mut(&id) {
                    io.online = true;
                }
            }
            FromWorker::QueryServer(q) => self.on_query_server(id, q),
            FromWorker::Listening { .. } => self.mark_ready(app, id, Instant::now(), "listening"),
            FromWorker::Ready => self.mark_ready(app, id, Instant::now(), "said ready"),
            FromWorker::Close { key, .. } => {
                if let Some(l) = self.listeners.iter().position(|l| l.keys.contains(&key))
                    && let Some(io) = self.io.get_mut(&id)
                {
                    io.keys.remove(&l);
                }
            }
            FromWorker::ExitedAfterDisconnect { seq } => {
                self.send_plain(id, |s| node::ack(seq, s));
            }
            FromWorker::Reply { ack, accepted } => self.on_reply(id, ack, accepted),
            FromWorker::Metrics(_) | FromWorker::Pong { .. } => {}
            FromWorker::OtherCluster { act, .. } => debug!("cluster message {act:?} ignored"),
            FromWorker::OtherInternal(cmd) => debug!("internal message {cmd} ignored"),
            FromWorker::User(v) => debug!("[{}] message: {v}", self.pools[app].spec.name),
        }
    }

    /// Sends a message built with our next `seq`, behind any unacknowledged handle.
    fn send_plain(&mut self, id: WorkerId, build: impl FnOnce(u64) -> Value) {
        let Some(io) = self.io.get_mut(&id) else {
            return;
        };
        let seq = io.seq;
        io.seq += 1;
        let v = build(seq);
        self.send_raw(id, v, None);
    }

    /// Sends a message (with a handle if `fd`), keeping Node's rule that nothing overtakes
    /// an unacknowledged handle. ACKs are exempt: they are never held.
    fn send_raw(&mut self, id: WorkerId, value: Value, fd: Option<OwnedFd>) {
        let Some(io) = self.io.get_mut(&id) else {
            return;
        };
        let Some(ch) = io.channel.clone() else { return };
        let is_ack = value.get("cmd").and_then(Value::as_str) == Some("NODE_HANDLE_ACK");
        if io.awaiting_ack.is_some() && !is_ack {
            io.held.push_back((value, fd));
            return;
        }
        match fd {
            Some(fd) => {
                let Ok(copy) = fd.try_clone() else { return };
                ch.send(Outgoing::json(&value, Some(copy)));
                io.awaiting_ack = Some(HandleInFlight {
                    value,
                    fd,
                    retries: 0,
                });
            }
            None => {
                ch.send(Outgoing::json(&value, None));
            }
        }
    }

    fn on_handle_ack(&mut self, id: WorkerId) {
        let Some(io) = self.io.get_mut(&id) else {
            return;
        };
        io.awaiting_ack = None;
        if let Some(c) = io.conn.as_mut() {
            c.acked = true;
            if c.seq.is_none() {
                // A plain connection is done once the worker has it.
                io.conn = None;
            }
        }
        // Release what waited behind the handle, up to the next handle.
        while self.io.get(&id).is_some_and(|io| io.awaiting_ack.is_none()) {
            let Some((v, fd)) = self.io.get_mut(&id).and_then(|io| io.held.pop_front()) else {
                break;
            };
            self.send_raw(id, v, fd);
        }
        let app = self.io.get(&id).map(|io| io.app);
        if let Some(app) = app {
            self.dispatch_app(app);
        }
    }

    fn on_handle_nack(&mut self, id: WorkerId) {
        let Some(io) = self.io.get_mut(&id) else {
            return;
        };
        let Some(h) = io.awaiting_ack.as_mut() else {
            return;
        };
        h.retries += 1;
        if h.retries > MAX_HANDLE_RETRANSMISSIONS {
            warn!(
                "worker pid {} refused a handle {} times; giving up on it",
                io.pid, h.retries
            );
            io.awaiting_ack = None;
            if let Some(c) = io.conn.take() {
                self.listeners[c.listener].queue.push_back(Queued {
                    fd: c.fd,
                    permit: c.permit,
                });
            }
            return;
        }
        // Node wraps a retransmission in a second envelope; workers unwrap it.
        let again = serde_json::json!({"cmd": "NODE_HANDLE", "type": "net.Native", "msg": h.value});
        if let (Ok(copy), Some(ch)) = (h.fd.try_clone(), io.channel.as_ref()) {
            ch.send(Outgoing::json(&again, Some(copy)));
        }
    }

    fn on_reply(&mut self, id: WorkerId, ack: u64, accepted: Option<bool>) {
        let Some(io) = self.io.get_mut(&id) else {
            return;
        };
        let Some(c) = io.conn.take_if(|c| c.seq == Some(ack)) else {
            return;
        };
        let app = io.app;
        if accepted == Some(true) {
            drop(c);
        } else {
            // The worker would not take it (its server is closing, or it is at
            // maxConnections): someone else gets it.
            self.listeners[c.listener].queue.push_front(Queued {
                fd: c.fd,
                permit: c.permit,
            });
        }
        self.dispatch_app(app);
    }

    fn on_query_server(&mut self, id: WorkerId, q: node::QueryServer) {
        let Some(io) = self.io.get(&id) else { return };
        let app = io.app;
        let key = q.key();
        let l = match self.listener_for(app, &q, &key) {
            Ok(l) => l,
            Err(errno) => {
                warn!(
                    "{}: cannot listen for a worker on port {}: {}",
                    self.pools[app].spec.name,
                    q.port,
                    std::io::Error::from_raw_os_error(errno)
                );
                self.send_plain(id, |seq| node::reply_error(q.seq, seq, &key, errno));
                return;
            }
        };
        if self.listeners[l].data.is_null() && !q.data.is_null() {
            self.listeners[l].data = q.data.clone();
        }
        let data = self.listeners[l].data.clone();
        if let Some(io) = self.io.get_mut(&id) {
            io.keys.insert(l);
            io.queried_any = true;
        }
        if let Some(w) = self.pools[app].workers.get_mut(&id)
            && w.state == WorkerState::Starting
        {
            w.listen_pending = true;
        }
        let entry = &self.listeners[l];
        if entry.passing && !entry.udp {
            let sockname = match entry.listener.local {
                ListenAddr::Tcp(a) => Some(node::sockname(&std::net::SocketAddr::new(
                    a.ip(),
                    if q.port > 0 { q.port as u16 } else { a.port() },
                ))),
                ListenAddr::Unix(_) => None,
            };
            self.send_plain(id, |seq| {
                node::reply_round_robin(q.seq, seq, &key, &data, sockname)
            });
            self.start_accepting(l);
            self.dispatch(l);
        } else {
            let udp = entry.udp;
            let Ok(fd) = entry.listener.fd.try_clone() else {
                return;
            };
            let Some(io) = self.io.get_mut(&id) else {
                return;
            };
            let seq = io.seq;
            io.seq += 1;
            probes::handle_pass(
                self.pools[app].spec.name.as_str(),
                io.slot,
                io.pid,
                fd.as_raw_fd(),
                HandleKind::Listener,
            );
            self.send_raw(
                id,
                node::reply_shared(q.seq, seq, &key, &data, udp),
                Some(fd),
            );
        }
    }

    /// Finds or binds the listener a `queryServer` asks for. Errors are errno values.
    fn listener_for(&mut self, app: usize, q: &node::QueryServer, key: &str) -> Result<usize, i32> {
        if let Some(i) = self
            .listeners
            .iter()
            .position(|l| l.app == app && l.keys.contains(key))
        {
            return Ok(i);
        }
        // A port the app configured with `listen` is that listener.
        if q.port > 0
            && !q.address_type.is_udp()
            && let Some(i) = self.listeners.iter().position(|l| {
                l.app == app && l.configured && l.listener.port() == Some(q.port as u16)
            })
        {
            self.listeners[i].keys.insert(key.to_string());
            return Ok(i);
        }
        let (fd, local, udp) =
            bind_for_node(q).map_err(|e| e.raw_os_error().unwrap_or(libc::EINVAL))?;
        let passing = self.pools[app].spec.dispatch().passes();
        let mut keys = BTreeSet::new();
        keys.insert(key.to_string());
        info!(
            "{}: listening on {local} (asked by a worker)",
            self.pools[app].spec.name
        );
        self.listeners.push(ListenerEntry {
            app,
            listener: Listener {
                requested: local.clone(),
                local,
                fd,
            },
            configured: false,
            keys,
            data: Value::Null,
            udp,
            passing: passing && !udp,
            queue: VecDeque::new(),
            last: None,
            accept_started: false,
            passed: 0,
        });
        Ok(self.listeners.len() - 1)
    }

    // ---- passing connections ------------------------------------------------------------

    fn start_accepting(&mut self, l: usize) {
        let entry = &mut self.listeners[l];
        if !entry.passing || entry.accept_started || entry.udp {
            return;
        }
        let Ok(fd) = entry.listener.fd.try_clone() else {
            return;
        };
        entry.accept_started = true;
        let events = self.events.clone();
        tokio::spawn(accept_loop(l, fd, events));
    }

    fn dispatch_app(&mut self, app: usize) {
        for l in 0..self.listeners.len() {
            if self.listeners[l].app == app && !self.listeners[l].queue.is_empty() {
                self.dispatch(l);
            }
        }
    }

    /// Hands queued connections of listener `l` to workers while any can take one.
    fn dispatch(&mut self, l: usize) {
        while !self.listeners[l].queue.is_empty() {
            let app = self.listeners[l].app;
            let mode = self.pools[app].spec.dispatch();
            let candidates: Vec<Candidate> = self.pools[app]
                .workers
                .values()
                .filter(|w| w.state != WorkerState::Draining)
                .filter_map(|w| {
                    let io = self.io.get(&w.id)?;
                    io.channel.as_ref()?;
                    let eligible = if io.keys.contains(&l) {
                        true
                    } else {
                        // A worker that is no cluster server takes plain connections from
                        // a configured listener once it is ready.
                        self.listeners[l].configured
                            && !io.queried_any
                            && w.state == WorkerState::Ready
                    };
                    eligible.then_some(Candidate {
                        worker: w.id,
                        in_flight: u32::from(io.conn.is_some() || io.awaiting_ack.is_some()),
                        open: 0,
                        busy: w.busy.unwrap_or(0.0),
                    })
                })
                .collect();
            let Some(target) = dispatch::choose(mode, &candidates, self.listeners[l].last) else {
                return;
            };
            let Some(q) = self.listeners[l].queue.pop_front() else {
                return;
            };
            self.listeners[l].last = Some(target);
            self.listeners[l].passed += 1;
            self.pass_connection(l, target, q);
        }
    }

    fn pass_connection(&mut self, l: usize, id: WorkerId, q: Queued) {
        let Some(io) = self.io.get_mut(&id) else {
            return;
        };
        let cluster = io.keys.contains(&l);
        io.passed += 1;
        let (value, seq) = if cluster {
            let key = self.listeners[l]
                .keys
                .iter()
                .next()
                .cloned()
                .unwrap_or_default();
            let seq = io.seq;
            io.seq += 1;
            (node::newconn(seq, &key), Some(seq))
        } else {
            (
                node::connection(l, &self.listeners[l].listener.local.to_string()),
                None,
            )
        };
        let Ok(copy) = q.fd.try_clone() else { return };
        io.conn = Some(ConnInFlight {
            listener: l,
            seq,
            fd: q.fd,
            permit: q.permit,
            acked: false,
        });
        probes::handle_pass(
            self.pools[self.listeners[l].app].spec.name.as_str(),
            io.slot,
            io.pid,
            copy.as_raw_fd(),
            HandleKind::Connection,
        );
        self.send_raw(id, value, Some(copy));
    }

    // ---- control ------------------------------------------------------------------------

    fn on_control(&mut self, req: Request) -> Reply {
        let now = Instant::now();
        match req {
            Request::Status { app } => {
                let apps: Vec<_> = self
                    .pools
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| app.as_deref().is_none_or(|a| p.spec.name.as_str() == a))
                    .map(|(i, p)| self.app_status(i, p, now))
                    .collect();
                if apps.is_empty() {
                    return Reply::error(format!("no app named {}", app.unwrap_or_default()));
                }
                Reply::ok(serde_json::json!({"pid": std::process::id(), "apps": apps}))
            }
            Request::Scale { app, n } => {
                let Some(i) = self.find_app(&app) else {
                    return Reply::error(format!("no app named {app}"));
                };
                let before = self.pools[i].target;
                let after = self.pools[i].set_target(n);
                if after != before {
                    probes::scale(app.as_str(), before as u32, after as u32, "control");
                    info!("{app}: {before} → {after} workers (processes scale)");
                }
                Reply::ok(serde_json::json!({"app": app, "from": before, "to": after}))
            }
            Request::Reload { app, batch } => {
                let targets: Vec<usize> = match &app {
                    Some(a) => match self.find_app(a) {
                        Some(i) => vec![i],
                        None => return Reply::error(format!("no app named {a}")),
                    },
                    None => (0..self.pools.len()).collect(),
                };
                let started: Vec<bool> = targets
                    .iter()
                    .map(|&i| self.begin_reload(i, None, batch.unwrap_or(1)))
                    .collect();
                Reply::ok(serde_json::json!({"started": started}))
            }
            Request::Stop => {
                self.begin_shutdown(now);
                Reply::ok(serde_json::json!({"stopping": true}))
            }
        }
    }

    fn find_app(&self, name: &str) -> Option<usize> {
        self.pools.iter().position(|p| p.spec.name.as_str() == name)
    }

    fn app_status(&self, i: usize, p: &Pool, now: Instant) -> Value {
        let workers: Vec<Value> = p
            .workers
            .values()
            .map(|w| {
                let io = self.io.get(&w.id);
                let slot = p.slots.get(&w.slot);
                serde_json::json!({
                    "slot": w.slot,
                    "pid": w.pid,
                    "state": w.state.as_str(),
                    "uptime_ms": w.uptime(now).as_millis() as u64,
                    "restarts": slot.map_or(0, |s| s.restarts),
                    "generation": w.generation,
                    "passed": io.map_or(0, |io| io.passed),
                })
            })
            .collect();
        let slots: Vec<Value> = p
            .slots
            .iter()
            .map(|(n, s)| {
                let state = if s.parked.is_some() {
                    "stopped"
                } else if s.backoff.crash_looping {
                    "crash-looping"
                } else if s.current.is_none() {
                    "backing-off"
                } else {
                    "running"
                };
                serde_json::json!({
                    "slot": n,
                    "state": state,
                    "restarts": s.restarts,
                    "consecutive_crashes": s.backoff.consecutive,
                    "restart_in_ms": s.restart_at.map(|t| t.saturating_duration_since(now).as_millis() as u64),
                })
            })
            .collect();
        let (lo, hi) = p.spec.sizing.bounds();
        let listeners: Vec<Value> = self
            .listeners
            .iter()
            .filter(|l| l.app == i)
            .map(|l| {
                serde_json::json!({
                    "address": l.listener.local.to_string(),
                    "mode": if l.passing { "pass" } else { "shared" },
                    "queued": l.queue.len(),
                    "passed": l.passed,
                    "backlog": sockets::accept_backlog(l.listener.fd.as_fd()).map(|b| b.0),
                })
            })
            .collect();
        serde_json::json!({
            "name": p.spec.name.as_str(),
            "size": p.size(),
            "ready": p.ready(),
            "desired": p.target,
            "min": lo,
            "max": hi,
            "dispatch": p.spec.dispatch().as_str(),
            "generation": p.generation,
            "reloading": p.reload.is_some(),
            "workers": workers,
            "slots": slots,
            "listeners": listeners,
        })
    }
}

/// Binds what a Node worker asked for: `null` means every address (`::`, dual-stack, as
/// Node's own primary does).
fn bind_for_node(q: &node::QueryServer) -> std::io::Result<(OwnedFd, ListenAddr, bool)> {
    use node::AddressType;
    let port = u16::try_from(q.port.max(0)).unwrap_or(0);
    let fd_and_addr = match q.address_type {
        AddressType::Pipe => {
            let path = std::path::PathBuf::from(q.address.clone().unwrap_or_default());
            let fd = sockets::bind_unix(&path)?;
            (fd, ListenAddr::Unix(path), false)
        }
        AddressType::Udp4 | AddressType::Udp6 => {
            let ip: std::net::IpAddr = match q.address.as_deref() {
                Some(a) => a
                    .parse()
                    .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?,
                None if q.address_type == AddressType::Udp6 => {
                    std::net::Ipv6Addr::UNSPECIFIED.into()
                }
                None => std::net::Ipv4Addr::UNSPECIFIED.into(),
            };
            let addr = std::net::SocketAddr::new(ip, port);
            let s = socket2::Socket::new(
                socket2::Domain::for_address(addr),
                socket2::Type::DGRAM.cloexec(),
                None,
            )?;
            s.set_reuse_address(true)?;
            s.bind(&addr.into())?;
            s.set_nonblocking(true)?;
            let local = s.local_addr()?.as_socket().unwrap_or(addr);
            (s.into(), ListenAddr::Tcp(local), true)
        }
        AddressType::Tcp4 | AddressType::Tcp6 => {
            let ip: std::net::IpAddr = match q.address.as_deref() {
                Some(a) => a
                    .parse()
                    .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?,
                None => std::net::Ipv6Addr::UNSPECIFIED.into(),
            };
            let fd = match sockets::bind_tcp(std::net::SocketAddr::new(ip, port)) {
                // No IPv6 on this machine: fall back to every IPv4 address.
                Err(e) if q.address.is_none() && e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
                    sockets::bind_tcp(std::net::SocketAddr::new(
                        std::net::Ipv4Addr::UNSPECIFIED.into(),
                        port,
                    ))?
                }
                other => other?,
            };
            let local = sockets::local_tcp_addr(&fd)?;
            (fd, ListenAddr::Tcp(local), false)
        }
    };
    spawn::set_nonblocking(&fd_and_addr.0, true)?;
    Ok(fd_and_addr)
}

/// Accepts connections on a passing listener and sends them to the loop. A semaphore caps
/// how many wait in the master: past that, the kernel's backlog queues them.
async fn accept_loop(l: usize, fd: OwnedFd, events: mpsc::Sender<Event>) {
    let Ok(afd) = unix::async_fd(fd, tokio::io::Interest::READABLE) else {
        return;
    };
    let permits = Arc::new(Semaphore::new(MAX_QUEUED_PER_LISTENER));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let conn = loop {
            let Ok(mut guard) = afd.readable().await else {
                return;
            };
            match guard.try_io(|inner| accept_nonblocking(inner.get_ref().as_raw_fd())) {
                Ok(Ok(fd)) => break fd,
                Ok(Err(e)) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    if !matches!(
                        e.raw_os_error(),
                        Some(libc::ECONNABORTED) | Some(libc::EINTR)
                    ) {
                        warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
                Err(_would_block) => continue,
            }
        };
        if events.send(Event::Accepted(l, conn, permit)).await.is_err() {
            return;
        }
    }
}

/// `accept4` with the connection non-blocking (Node needs that) and close-on-exec.
fn accept_nonblocking(fd: i32) -> std::io::Result<OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: accept4 with null address pointers only returns a new fd or -1.
    let r = unsafe {
        libc::accept4(
            fd,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: r is a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(r) })
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
