//! The sample tick: read every worker's load, build one observation per app, let the
//! controller size autoscaled pools, and replace workers past their memory limits.
//!
//! The figures per worker: main-thread busy fraction from `/proc` (any program), and for
//! Node workers with the preload, event-loop utilization, delay percentiles and open
//! connections, plus the round-trip of a ping answered from the event loop. A ping still
//! unanswered counts as lag for as long as it is out: a worker whose loop is stuck shows
//! growing lag instead of no figure at all.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;
use tracing::{info, warn};

use super::*;
use crate::controller::{self, Decision, Observation};
use crate::sampler::{BusyMeter, Host, HostSample, TaskStat, WindowMax};

/// What the master knows of one worker's load.
#[derive(Debug, Default)]
pub struct Load {
    stat: Option<TaskStat>,
    meter: BusyMeter,
    pub cpu_busy: Option<f64>,
    pub rss: u64,
    /// Event-loop utilization from the preload, and when it arrived.
    pub elu: Option<(f64, Instant)>,
    /// Event-loop delay p99 from the preload.
    pub lag_p99: Option<Duration>,
    /// Connections its servers hold open (preload).
    pub open: u32,
    /// The ping in flight: its id and when it left.
    ping: Option<(u64, Instant)>,
    pub ping_rtt: Option<Duration>,
}

impl Load {
    /// The busy fraction that counts: the event loop's own utilization when the preload
    /// reported recently, else the main thread's CPU.
    pub fn busy(&self, now: Instant, interval: Duration) -> Option<f64> {
        match self.elu {
            Some((elu, at)) if now.saturating_duration_since(at) <= interval * 3 => Some(elu),
            _ => self.cpu_busy,
        }
    }

    /// The worst lag we know of: reported delay, ping round-trip, or a ping still out.
    pub fn lag(&self, now: Instant) -> Option<Duration> {
        let outstanding = self
            .ping
            .map(|(_, sent)| now.saturating_duration_since(sent));
        [self.lag_p99, self.ping_rtt, outstanding]
            .into_iter()
            .flatten()
            .max()
    }
}

/// Per-app autoscaling state.
pub struct Auto {
    pub state: controller::State,
    pub params: controller::Params,
    pub last: Option<Decision>,
    /// The last decision that changed the size, and when.
    pub last_change: Option<(Decision, usize, Instant)>,
    rss_peak: WindowMax,
}

impl Auto {
    pub fn new(spec: &AppSpec) -> Option<Auto> {
        matches!(spec.sizing, crate::config::Sizing::Auto { .. }).then(|| Auto {
            state: controller::State::new(),
            params: controller::Params {
                setpoint: spec.tuning.setpoint,
                cpu_factor: spec.tuning.cpu_factor,
                down_window: spec.tuning.down_window,
                down_interval: spec.tuning.down_interval,
                ..controller::Params::default()
            },
            last: None,
            last_change: None,
            rss_peak: WindowMax::default(),
        })
    }
}

/// Tick-wide state: the interval, host readers and the tick's own cost.
pub struct Sampling {
    pub interval: Duration,
    host: Host,
    hz: u64,
    ping_seq: u64,
    pub last_host: Option<HostSample>,
    pub last_tick: Duration,
    pub max_tick: Duration,
    pub ticks: u64,
    /// Time spent in ticks so far, for the mean.
    pub total_tick: Duration,
    /// The master's own `/proc/self/stat`.
    me: Option<TaskStat>,
}

impl Sampling {
    pub fn new(interval: Duration) -> Sampling {
        Sampling {
            interval,
            host: Host::new(),
            hz: crate::sampler::clock_ticks_per_second(),
            ping_seq: 0,
            last_host: None,
            last_tick: Duration::ZERO,
            max_tick: Duration::ZERO,
            ticks: 0,
            total_tick: Duration::ZERO,
            me: TaskStat::process(std::process::id() as i32).ok(),
        }
    }
}

/// The preload script, written where every worker can read it; removed on drop.
pub struct PreloadFile {
    dir: PathBuf,
    pub path: PathBuf,
}

impl PreloadFile {
    pub fn write() -> std::io::Result<PreloadFile> {
        use std::os::unix::fs::PermissionsExt;
        let dir = shared_temp_dir().join(format!(
            "processes-{}-{:x}",
            std::process::id(),
            seed() & 0xffff_ffff
        ));
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
        let path = dir.join("preload.js");
        std::fs::write(&path, include_str!("../preload.js"))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
        Ok(PreloadFile { dir, path })
    }

    /// `NODE_OPTIONS` with the preload added to what the app already sets.
    pub fn node_options(&self, existing: Option<&str>) -> String {
        let req = format!("--require \"{}\"", self.path.display());
        match existing {
            Some(e) if !e.trim().is_empty() => format!("{e} {req}"),
            _ => req,
        }
    }
}

/// A temp directory every user can reach: workers may run as another user than the
/// master, and some machines make `/tmp` root-only.
fn shared_temp_dir() -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let candidates = [
        std::env::temp_dir(),
        PathBuf::from("/var/tmp"),
        PathBuf::from("/dev/shm"),
    ];
    candidates
        .iter()
        .find(|d| {
            std::fs::metadata(d).is_ok_and(|m| m.is_dir() && m.permissions().mode() & 0o001 != 0)
        })
        .cloned()
        .unwrap_or_else(std::env::temp_dir)
}

impl Drop for PreloadFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Master {
    /// One sample tick over every app.
    pub(super) fn on_tick(&mut self, now: Instant) {
        let started = Instant::now();
        self.check_config_file();
        let host = self.sampling.host.sample();
        for app in 0..self.pools.len() {
            self.sample_app(app, now, &host);
        }
        // Lags grow while pings go unanswered, with no event to say so: least-loaded's
        // choice can change on its own (every worker now stuck: one of them is used).
        for app in 0..self.pools.len() {
            self.dispatch_app(app);
        }
        crate::metrics::host_tick(host.cpus, host.cpu_busy, host.mem_headroom);
        if let Some(r) = &self.registry {
            crate::metrics::registry_tick(r.state().label() == "connected");
        }
        self.sampling.last_host = Some(host);
        let took = started.elapsed();
        self.sampling.last_tick = took;
        self.sampling.max_tick = self.sampling.max_tick.max(took);
        self.sampling.ticks += 1;
        self.sampling.total_tick += took;
        if let Some(handle) = &self.metrics {
            if let Some(me) = self.sampling.me.as_mut().and_then(|s| s.read().ok()) {
                crate::metrics::master_tick(
                    took,
                    me.cpu_ticks as f64 / self.sampling.hz as f64,
                    me.rss_bytes,
                    self.output.dropped_total(),
                );
            }
            handle.run_upkeep();
        }
    }

    fn sample_app(&mut self, app: usize, now: Instant, host: &HostSample) {
        let interval = self.sampling.interval;
        let hz = self.sampling.hz;
        let name = self.pools[app].spec.name.clone();
        let (max_memory, kill_memory) = (
            self.pools[app].spec.max_memory,
            self.pools[app].spec.kill_memory,
        );
        let mut ready_busy = Vec::new();
        let mut ready_lag: Option<Duration> = None;
        let mut rss_all = Vec::new();
        let mut over_soft = Vec::new();
        let mut over_hard = Vec::new();
        let ids: Vec<WorkerId> = self.pools[app].workers.keys().copied().collect();
        for id in ids {
            let Some(w) = self.pools[app].workers.get(&id) else {
                continue;
            };
            let (state, slot, pid) = (w.state, w.slot, w.pid);
            let Some(io) = self.io.get_mut(&id) else {
                continue;
            };
            let load = &mut io.load;
            if load.stat.is_none() {
                load.stat = TaskStat::open(pid).ok();
            }
            if let Some(sample) = load.stat.as_mut().and_then(|s| s.read().ok()) {
                load.cpu_busy = load.meter.update(now, sample.cpu_ticks, hz);
                load.rss = sample.rss_bytes;
            }
            let busy = load.busy(now, interval);
            let lag = load.lag(now);
            let rss = load.rss;
            let ping_due = io.online && io.channel.is_some() && load.ping.is_none();
            probes::sample(
                name.as_str(),
                slot,
                pid,
                (busy.unwrap_or(0.0) * 1000.0).round() as u32,
                lag.map_or(0, |l| l.as_micros() as u64),
                rss / 1024,
            );
            if ping_due {
                self.sampling.ping_seq += 1;
                let ping_id = self.sampling.ping_seq;
                if let Some(io) = self.io.get_mut(&id) {
                    io.load.ping = Some((ping_id, now));
                }
                self.send_raw(id, node::ping(ping_id), None);
            }
            if let Some(w) = self.pools[app].workers.get_mut(&id) {
                w.busy = busy;
            }
            if state == WorkerState::Draining {
                continue;
            }
            crate::metrics::worker_tick(name.as_str(), slot, busy, rss, lag);
            rss_all.push(rss);
            if state == WorkerState::Ready {
                ready_busy.push(busy.unwrap_or(0.0));
                ready_lag = ready_lag.max(lag);
            }
            if kill_memory.is_some_and(|limit| rss > limit) {
                over_hard.push((id, slot, pid, rss));
            } else if max_memory.is_some_and(|limit| rss > limit) {
                over_soft.push((id, slot, rss));
            }
        }

        for (id, slot, pid, rss) in &over_hard {
            warn!(
                "[{name}:{slot}] pid {pid} uses {} MiB, above kill_memory; killing it",
                rss >> 20
            );
            if let Some(io) = self.io.get_mut(id) {
                io.killed_over_memory = Some(rss >> 20);
            }
            let _ = unix::signal_group(*pid, Signal::SIGKILL);
        }
        for (id, slot, rss) in over_soft {
            if self.pools[app].replace_slot(id, StopReason::Memory) {
                info!(
                    "[{name}:{slot}] uses {} MiB, above max_memory; starting its replacement",
                    rss >> 20
                );
            }
        }

        let mut backlog = 0u64;
        let mut queued = 0usize;
        for (i, l) in self.listeners.iter().filter(|l| l.app == app).enumerate() {
            let kernel = sockets::accept_backlog(l.listener.fd.as_fd()).map_or(0, |b| b.0);
            crate::metrics::listener_tick(name.as_str(), i, kernel);
            backlog += l.queue.len() as u64 + u64::from(kernel);
            queued += l.queue.len();
        }
        let utilization = (!ready_busy.is_empty())
            .then(|| ready_busy.iter().sum::<f64>() / ready_busy.len() as f64);
        self.steer(app, now, host, utilization, ready_lag, backlog, rss_all);
        self.record_app_figures(app, host, utilization, queued);
    }

    #[allow(clippy::too_many_arguments)]
    fn steer(
        &mut self,
        app: usize,
        now: Instant,
        host: &HostSample,
        utilization: Option<f64>,
        ready_lag: Option<Duration>,
        backlog: u64,
        mut rss_all: Vec<u64>,
    ) {
        let name = self.pools[app].spec.name.clone();
        let Some(auto) = self.autos[app].as_mut() else {
            return;
        };
        let pool = &self.pools[app];
        let (min, max) = pool.spec.sizing.bounds();
        let rss_p95 = crate::sampler::percentile(&mut rss_all, 95.0)
            .map(|p| auto.rss_peak.push(now, p, Duration::from_secs(300)));
        let starting = pool
            .workers
            .values()
            .filter(|w| w.state == WorkerState::Starting)
            .count();
        let obs = Observation {
            size: pool.live_slots(),
            ready: pool.ready(),
            starting,
            utilization,
            lag_p99: ready_lag,
            backlog,
            min,
            max,
            cpus: host.cpus,
            mem_headroom_bytes: host.mem_headroom,
            worker_rss_p95_bytes: rss_p95,
            host_cpu_busy: host.cpu_busy,
        };
        let (state, decision) = controller::step(&auto.state, &obs, now, &auto.params);
        auto.state = state;
        let before = pool.target;
        let target = controller::next_target(decision.desired, obs.size, before, decision.upper);
        if target != before {
            let after = self.pools[app].set_target(target);
            if after != before {
                info!("{name}: {before} → {after} workers ({decision})");
                record::scale(name.as_str(), before, after, decision.reason.label());
                auto.last_change = Some((decision.clone(), before, now));
            }
        }
        auto.last = Some(decision);
    }

    /// Sets the app's gauges for this tick.
    fn record_app_figures(
        &self,
        app: usize,
        host: &HostSample,
        utilization: Option<f64>,
        queued: usize,
    ) {
        let pool = &self.pools[app];
        let count = |s: WorkerState| pool.workers.values().filter(|w| w.state == s).count();
        let (min, max) = pool.spec.sizing.bounds();
        let decision = self.autos[app].as_ref().and_then(|a| a.last.as_ref());
        let (upper, bound) = match decision {
            Some(d) => {
                let cgroup = match d.bound {
                    controller::Bound::Cpu => host.cpu_source == "cgroup",
                    controller::Bound::Memory => host.mem_source == "cgroup",
                    _ => false,
                };
                (d.upper, if cgroup { "cgroup" } else { d.bound.label() })
            }
            // A fixed pool is held at its size by configuration.
            None => (pool.target, "max"),
        };
        let at_bound = pool.size() >= upper;
        crate::metrics::app_tick(&crate::metrics::AppFigures {
            app: pool.spec.name.as_str(),
            starting: count(WorkerState::Starting),
            ready: count(WorkerState::Ready),
            draining: count(WorkerState::Draining),
            desired: pool.target,
            min,
            max,
            upper,
            bound,
            crash_looping: pool
                .slots
                .values()
                .filter(|s| s.backoff.crash_looping)
                .count(),
            utilization,
            saturation: crate::metrics::saturation(
                at_bound,
                utilization,
                pool.spec.tuning.setpoint,
            ),
            setpoint: pool.spec.tuning.setpoint,
            queue: queued,
        });
    }

    /// A message from our preload.
    pub(super) fn on_load_report(&mut self, id: WorkerId, report: &Value) {
        let Some(io) = self.io.get_mut(&id) else {
            return;
        };
        let now = Instant::now();
        if let Some(elu) = report.get("elu").and_then(Value::as_f64)
            && elu.is_finite()
        {
            io.load.elu = Some((elu.clamp(0.0, 1.0), now));
        }
        io.load.lag_p99 = report
            .get("lag_p99_ms")
            .and_then(Value::as_f64)
            .filter(|l| l.is_finite() && *l >= 0.0)
            .map(|ms| Duration::from_secs_f64(ms.min(3.6e6) / 1000.0));
        if let Some(open) = report.get("open").and_then(Value::as_u64) {
            io.load.open = open.min(u64::from(u32::MAX)) as u32;
        }
    }

    pub(super) fn on_pong(&mut self, id: WorkerId, ping_id: u64) {
        let Some(io) = self.io.get_mut(&id) else {
            return;
        };
        if let Some((sent_id, sent)) = io.load.ping
            && sent_id == ping_id
        {
            io.load.ping_rtt = Some(sent.elapsed());
            io.load.ping = None;
            // A loop least-loaded dispatch took for stuck may be back: connections that
            // waited for another worker can go to it now.
            let app = io.app;
            self.dispatch_app(app);
        }
    }
}
