//! A discrete-time queueing model of one pool, for replaying load traces against a scaling
//! policy in paused time: a plain loop over one-second ticks, no clock, no sleeping, no
//! threads. It owns nothing outside one [`run`]; the same config, trace, seed and policy
//! always give the same [`Run`].
//!
//! The model is a fluid queue, kept small on purpose:
//!
//! * **Work.** Offered load is in worker-seconds per second (requests/s × service time):
//!   `2.5` means two and a half workers' worth of CPU. Noise multiplies it by
//!   `1 ± noise`, from a seeded xorshift generator.
//! * **Capacity.** Each ready worker serves up to one core-second per second, but the
//!   machine has `cores` cores (minus `background_cores` used by others): capacity is
//!   `min(ready, cores)`. Work that is not served waits in a queue (the backlog).
//! * **Spawning.** A new worker counts in the size at once and serves load after
//!   `spawn_delay_ticks`. A removed worker leaves at once (starting ones first, then the
//!   oldest).
//! * **Utilization** is the wall-clock busy fraction of a worker's event loop (what Node's
//!   event-loop utilization and uWSGI's busyness see): served work over ready workers, and
//!   1.0 for every worker while work is queued — with more workers than cores they all
//!   look busy while they wait for a CPU, which is the trap the host-CPU rule avoids.
//! * **Latency proxy** (seconds): service time, stretched by CPU sharing when there are
//!   more busy workers than cores, plus a multi-server queueing wait
//!   (Sakasegawa's approximation of M/M/c), plus the time to drain the backlog.
//! * **Lag proxy** (p99 event-loop delay): each loop as an M/M/1 queue of short turns
//!   (`turn`, ~2 ms): p99 wait ≈ ln(100) × turn × ρ/(1 − ρ), plus the backlog drain time.
//! * **Memory.** Each worker's RSS is `rss_base` plus `leak × age`; headroom is what is left
//!   of `mem_total` after the others and the workers. The worker RSS reported to the
//!   policy is the peak of the per-tick p95 over the last five minutes.
//! * **Observation.** `cpus` is the machine's cores; the host CPU busy fraction counts
//!   `background_cores` too, and lag and backlog come from the proxies above.
//!
//! Policies: this crate's controller ([`ControllerPolicy`]), the Kubernetes HPA rule
//! ([`Hpa`]), uWSGI's busyness cheaper algorithm ([`UwsgiBusyness`]), a fixed pool
//! ([`StaticPool`]), or any closure `FnMut(&Observation, Instant) -> usize`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::{Decision, Observation, Params, State, step};

const MIB: u64 = 1024 * 1024;
/// Ticks of per-tick RSS p95 over which the reported worker RSS is the peak.
const RSS_WINDOW_TICKS: usize = 300;

/// The machine the pool runs on.
#[derive(Clone, Debug, PartialEq)]
pub struct Machine {
    /// Cores (effective: a cgroup quota where set).
    pub cores: f64,
    /// Cores kept busy by other processes.
    pub background_cores: f64,
    /// Memory the pool may use in total, others included.
    pub mem_total_bytes: u64,
    /// Memory used by others.
    pub mem_other_bytes: u64,
}

/// How the application behaves.
#[derive(Clone, Debug, PartialEq)]
pub struct Workload {
    /// CPU time of one request.
    pub service: Duration,
    /// Length of one event-loop turn (a synchronous chunk of work), for the lag proxy.
    pub turn: Duration,
    /// Ticks from spawn to ready.
    pub spawn_delay_ticks: u32,
    /// RSS of a fresh worker.
    pub rss_base_bytes: u64,
    /// RSS growth of every worker per second of its age (a slow leak).
    pub leak_bytes_per_sec: u64,
    /// Relative noise on the offered load per tick (0.05 = ±5 %).
    pub noise: f64,
    /// Seed of the noise generator.
    pub seed: u64,
}

/// One simulated pool.
#[derive(Clone, Debug, PartialEq)]
pub struct SimConfig {
    pub machine: Machine,
    pub workload: Workload,
    pub min: usize,
    pub max: usize,
    /// Ready workers at the start.
    pub initial: usize,
    /// Length of one tick.
    pub tick: Duration,
}

impl Default for SimConfig {
    /// An 8-core machine with 4 GiB for the pool and 1 GiB used by others; 20 ms requests in
    /// 2 ms turns, 3 s to spawn a worker, 100 MiB per worker, ±5 % noise; pool 1..=16.
    fn default() -> Self {
        Self {
            machine: Machine {
                cores: 8.0,
                background_cores: 0.0,
                mem_total_bytes: 4096 * MIB,
                mem_other_bytes: 1024 * MIB,
            },
            workload: Workload {
                service: Duration::from_millis(20),
                turn: Duration::from_millis(2),
                spawn_delay_ticks: 3,
                rss_base_bytes: 100 * MIB,
                leak_bytes_per_sec: 0,
                noise: 0.05,
                seed: 0x5eed_1234_abcd_0001,
            },
            min: 1,
            max: 16,
            initial: 2,
            tick: Duration::from_secs(1),
        }
    }
}

/// Offered load over time, in worker-seconds per second.
#[derive(Clone, Debug, PartialEq)]
pub enum Shape {
    Constant(f64),
    /// `before` until tick `up`, `after` until tick `down`, then `before` again.
    Step {
        before: f64,
        after: f64,
        up: u32,
        down: u32,
    },
    /// Linear from `from` to `to` over `[start, end)`, held at `to` until `back`, then
    /// linear back to `from` over `end - start` ticks.
    Ramp {
        from: f64,
        to: f64,
        start: u32,
        end: u32,
        back: u32,
    },
    /// `base`, with `peak` during `[at, at + len)`.
    Spike {
        base: f64,
        peak: f64,
        at: u32,
        len: u32,
    },
    /// `mean + amplitude × sin(2π t / period)`.
    Sine {
        mean: f64,
        amplitude: f64,
        period: u32,
    },
}

impl Shape {
    /// Offered load at tick `t`, before noise.
    pub fn load(&self, t: u32) -> f64 {
        match *self {
            Shape::Constant(l) => l,
            Shape::Step {
                before,
                after,
                up,
                down,
            } => {
                if (up..down).contains(&t) {
                    after
                } else {
                    before
                }
            }
            Shape::Ramp {
                from,
                to,
                start,
                end,
                back,
            } => {
                let len = end.saturating_sub(start).max(1) as f64;
                if t < start {
                    from
                } else if t < end {
                    from + (to - from) * (t - start) as f64 / len
                } else if t < back {
                    to
                } else {
                    let f = ((t - back) as f64 / len).min(1.0);
                    to + (from - to) * f
                }
            }
            Shape::Spike {
                base,
                peak,
                at,
                len,
            } => {
                if (at..at + len).contains(&t) {
                    peak
                } else {
                    base
                }
            }
            Shape::Sine {
                mean,
                amplitude,
                period,
            } => {
                let phase = std::f64::consts::TAU * t as f64 / period.max(1) as f64;
                mean + amplitude * phase.sin()
            }
        }
    }
}

/// A named trace on a given pool.
#[derive(Clone, Debug, PartialEq)]
pub struct Scenario {
    pub name: &'static str,
    pub shape: Shape,
    pub ticks: u32,
    pub config: SimConfig,
}

/// The standard traces, all on [`SimConfig::default`] (8 cores, pool 1..=16), 20 minutes
/// each so that the Kubernetes HPA's five-minute scale-down window plays out in full:
///
/// * `step`: 1.0 → 4.0 at 5 min, back to 1.0 at 15 min;
/// * `ramp`: 0.5 → 4.5 over 10 min, held 3 min, back down over 10 min;
/// * `spike`: 1.0 with one minute at 10.0 — more than the 8 cores can serve;
/// * `sine`: 2.5 ± 1.5 with a 5-minute period;
/// * `slow_leak`: load rising 1.0 → 4.0 over the whole trace while every worker leaks
///   256 KiB/s (a worker started at 0 ends at 400 MiB) and the pool has 2 GiB: memory, not
///   CPU, ends up bounding it.
pub fn scenarios() -> Vec<Scenario> {
    let base = SimConfig::default();
    let mut leak = base.clone();
    leak.workload.leak_bytes_per_sec = 256 * 1024;
    leak.machine.mem_total_bytes = 3072 * MIB;
    vec![
        Scenario {
            name: "step",
            shape: Shape::Step {
                before: 1.0,
                after: 4.0,
                up: 300,
                down: 900,
            },
            ticks: 1200,
            config: base.clone(),
        },
        Scenario {
            name: "ramp",
            shape: Shape::Ramp {
                from: 0.5,
                to: 4.5,
                start: 0,
                end: 600,
                back: 780,
            },
            ticks: 1200,
            config: base.clone(),
        },
        Scenario {
            name: "spike",
            shape: Shape::Spike {
                base: 1.0,
                peak: 10.0,
                at: 300,
                len: 60,
            },
            ticks: 1200,
            config: base.clone(),
        },
        Scenario {
            name: "sine",
            shape: Shape::Sine {
                mean: 2.5,
                amplitude: 1.5,
                period: 300,
            },
            ticks: 1200,
            config: base,
        },
        Scenario {
            name: "slow_leak",
            shape: Shape::Ramp {
                from: 1.0,
                to: 4.0,
                start: 0,
                end: 1200,
                back: u32::MAX,
            },
            ticks: 1200,
            config: leak,
        },
    ]
}

/// Anything that turns an observation into a desired pool size.
pub trait Policy {
    /// Short name for reports.
    fn name(&self) -> &str;
    /// Desired size (starting + ready) after this tick.
    fn decide(&mut self, obs: &Observation, now: Instant) -> usize;
}

impl<F: FnMut(&Observation, Instant) -> usize> Policy for F {
    fn name(&self) -> &str {
        "closure"
    }
    fn decide(&mut self, obs: &Observation, now: Instant) -> usize {
        self(obs, now)
    }
}

/// This crate's controller as a policy; keeps every decision for inspection.
#[derive(Clone, Debug, Default)]
pub struct ControllerPolicy {
    pub params: Params,
    pub state: State,
    pub decisions: Vec<Decision>,
}

impl ControllerPolicy {
    pub fn new(params: Params) -> Self {
        Self {
            params,
            state: State::new(),
            decisions: Vec::new(),
        }
    }
}

impl Policy for ControllerPolicy {
    fn name(&self) -> &str {
        "controller"
    }
    fn decide(&mut self, obs: &Observation, now: Instant) -> usize {
        let (state, decision) = step(&self.state, obs, now, &self.params);
        self.state = state;
        let desired = decision.desired;
        self.decisions.push(decision);
        desired
    }
}

/// A fixed pool of `.0` workers, clamped to `[min, max]` (PM2's `-i max` is one per core).
#[derive(Clone, Debug)]
pub struct StaticPool(pub usize);

impl Policy for StaticPool {
    fn name(&self) -> &str {
        "static"
    }
    fn decide(&mut self, obs: &Observation, _now: Instant) -> usize {
        self.0.clamp(obs.min, obs.max.max(obs.min))
    }
}

/// The Kubernetes Horizontal Pod Autoscaler's rule (autoscaling/v2 defaults), applied to
/// workers instead of pods:
///
/// * every `sync_period` (15 s): `desired = ceil(ready × u / target)`; no change while
///   `|u / target − 1| ≤ tolerance` (0.1). On scale-up, workers still starting are counted
///   at zero usage and the ratio recomputed (the HPA does this for unready pods), so it
///   does not scale again for load that new workers will take;
/// * scale-down stabilization: the highest recommendation of the last
///   `down_stabilization` (5 min);
/// * rate limits: up by at most `max(4, 100 %)` per period; down by at most 100 % per
///   period;
/// * no notion of cores, host CPU or memory: it trusts the cluster to have room.
#[derive(Clone, Debug)]
pub struct Hpa {
    pub target: f64,
    pub tolerance: f64,
    pub sync_period: Duration,
    pub down_stabilization: Duration,
    recommendations: VecDeque<(Instant, usize)>,
    last_sync: Option<Instant>,
    current: Option<usize>,
}

impl Hpa {
    pub fn new(target: f64) -> Self {
        Self {
            target,
            tolerance: 0.1,
            sync_period: Duration::from_secs(15),
            down_stabilization: Duration::from_secs(300),
            recommendations: VecDeque::new(),
            last_sync: None,
            current: None,
        }
    }
}

impl Policy for Hpa {
    fn name(&self) -> &str {
        "k8s-hpa"
    }
    fn decide(&mut self, obs: &Observation, now: Instant) -> usize {
        let size = obs.size;
        let due = self
            .last_sync
            .is_none_or(|t| now.saturating_duration_since(t) >= self.sync_period);
        if !due {
            return self.current.unwrap_or(size).max(obs.min);
        }
        self.last_sync = Some(now);
        let rec = match obs.utilization {
            Some(u) if obs.ready > 0 => {
                let usage = u * obs.ready as f64;
                let ratio = u / self.target;
                if (ratio - 1.0).abs() <= self.tolerance {
                    size
                } else if ratio > 1.0 {
                    // Unready workers count as zero usage on the way up.
                    let ratio_all = usage / (size as f64 * self.target);
                    if ratio_all > 1.0 + self.tolerance {
                        (usage / self.target - 1e-9).ceil() as usize
                    } else {
                        size
                    }
                } else {
                    (usage / self.target - 1e-9).ceil() as usize
                }
            }
            _ => size,
        }
        .clamp(obs.min, obs.max.max(obs.min));
        self.recommendations.push_back((now, rec));
        while self
            .recommendations
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) > self.down_stabilization)
        {
            self.recommendations.pop_front();
        }
        let desired = if rec < size {
            let stabilized = self
                .recommendations
                .iter()
                .map(|(_, r)| *r)
                .max()
                .unwrap_or(rec);
            stabilized.min(size)
        } else {
            rec.min((size * 2).max(size + 4))
        };
        let desired = desired.clamp(obs.min, obs.max.max(obs.min));
        self.current = Some(desired);
        desired
    }
}

/// uWSGI's `busyness` cheaper algorithm (`plugins/cheaper_busyness/cheaper_busyness.c`),
/// with its defaults:
///
/// * every `overload` seconds (`cheaper-overload`, 3) it averages the busyness of the
///   running workers over the period;
/// * above `busyness_max` (50 %): spawn `step` workers (`cheaper-step`, 1). If that comes
///   within `multiplier × overload` seconds of the last removal, the multiplier grows by
///   `penalty` (2), else it shrinks back towards its initial value;
/// * else if the listen queue is above `backlog_alert` (33): spawn `backlog_step` (1)
///   "emergency" worker — this check also runs on every tick between periods;
/// * below `busyness_min` (25 %), and above `min`: remove one worker once
///   `next_cheap` has passed; `next_cheap` is `overload × multiplier` (10) seconds after
///   the last action, or `overload × backlog_multiplier` (3) while emergency workers run;
/// * in between: the idle timer is pushed back by one period; after three such periods in
///   a row it is reset.
///
/// Like uWSGI it knows nothing of cores, host CPU or memory (its optional
/// `cheaper-rss-limit-*` is off by default), and busyness counts time spent waiting for a
/// CPU as busy.
#[derive(Clone, Debug)]
pub struct UwsgiBusyness {
    pub overload: f64,
    pub busyness_max: f64,
    pub busyness_min: f64,
    pub multiplier: u64,
    pub penalty: u64,
    pub step: usize,
    pub backlog_alert: u64,
    pub backlog_multiplier: u64,
    pub backlog_step: usize,
    start: Option<Instant>,
    tcheck: f64,
    busy_sum: f64,
    busy_samples: u32,
    cheap_multi: u64,
    next_cheap: f64,
    last_cheaped: f64,
    last_action_cheap: bool,
    tolerance_counter: u32,
    emergency_workers: usize,
}

impl Default for UwsgiBusyness {
    fn default() -> Self {
        Self {
            overload: 3.0,
            busyness_max: 0.5,
            busyness_min: 0.25,
            multiplier: 10,
            penalty: 2,
            step: 1,
            backlog_alert: 33,
            backlog_multiplier: 3,
            backlog_step: 1,
            start: None,
            tcheck: 0.0,
            busy_sum: 0.0,
            busy_samples: 0,
            cheap_multi: 10,
            next_cheap: 0.0,
            last_cheaped: f64::NEG_INFINITY,
            last_action_cheap: false,
            tolerance_counter: 0,
            emergency_workers: 0,
        }
    }
}

impl UwsgiBusyness {
    fn set_next_cheap(&mut self, now: f64) {
        let multi = if self.emergency_workers > 0 {
            self.backlog_multiplier
        } else {
            self.cheap_multi
        };
        self.next_cheap = now + self.overload * multi as f64;
    }

    fn decrease_multi(&mut self) {
        if self.cheap_multi > self.multiplier {
            self.cheap_multi -= 1;
        }
    }

    fn emergency(&mut self, now: f64, size: usize, max: usize) -> usize {
        self.cheap_multi = self.multiplier;
        self.last_action_cheap = false;
        let spawned = self.backlog_step.min(max.saturating_sub(size));
        self.emergency_workers += spawned;
        self.set_next_cheap(now);
        size + spawned
    }
}

impl Policy for UwsgiBusyness {
    fn name(&self) -> &str {
        "uwsgi-busyness"
    }
    fn decide(&mut self, obs: &Observation, now: Instant) -> usize {
        let first = self.start.is_none();
        let start = *self.start.get_or_insert(now);
        let now = now.saturating_duration_since(start).as_secs_f64();
        let size = obs.size.max(obs.min);
        if first {
            self.tcheck = now;
            self.cheap_multi = self.multiplier;
            self.set_next_cheap(now);
        }
        if let Some(u) = obs.utilization {
            self.busy_sum += u.clamp(0.0, 1.0);
            self.busy_samples += 1;
        }
        let backlog_alert = obs.backlog > self.backlog_alert && size < obs.max;
        if now - self.tcheck < self.overload {
            return if backlog_alert {
                self.emergency(now, size, obs.max)
            } else {
                size
            };
        }
        self.tcheck = now;
        let avg = if self.busy_samples > 0 {
            self.busy_sum / self.busy_samples as f64
        } else {
            0.0
        };
        self.busy_sum = 0.0;
        self.busy_samples = 0;

        if avg > self.busyness_max {
            self.tolerance_counter = 0;
            let spawned = self.step.min(obs.max.saturating_sub(size));
            if spawned > 0 {
                self.last_action_cheap = false;
                if (now - self.last_cheaped) / self.overload <= self.cheap_multi as f64 {
                    self.cheap_multi += self.penalty;
                } else {
                    self.decrease_multi();
                }
                self.set_next_cheap(now);
            }
            size + spawned
        } else if backlog_alert {
            self.emergency(now, size, obs.max)
        } else if avg < self.busyness_min {
            if size <= 1 {
                return size;
            }
            self.tolerance_counter = 0;
            if size > obs.min && now >= self.next_cheap {
                if self.last_action_cheap {
                    self.decrease_multi();
                }
                self.set_next_cheap(now);
                self.last_cheaped = now;
                self.last_action_cheap = true;
                self.emergency_workers = self.emergency_workers.saturating_sub(1);
                return size - 1;
            }
            size
        } else {
            if size <= 1 {
                return size;
            }
            self.emergency_workers = self.emergency_workers.saturating_sub(1);
            self.tolerance_counter += 1;
            if self.tolerance_counter >= 3 {
                self.set_next_cheap(now);
            } else {
                self.next_cheap += self.overload;
            }
            size
        }
    }
}

/// One tick of a run, as measured at its end.
#[derive(Clone, Debug, PartialEq)]
pub struct TickRecord {
    pub t: u32,
    /// Offered load after noise (worker-seconds per second).
    pub offered: f64,
    /// Workers during the tick (starting + ready).
    pub size: usize,
    pub ready: usize,
    /// Size the policy asked for at the end of the tick.
    pub desired: usize,
    pub utilization: Option<f64>,
    pub host_cpu: f64,
    /// Queued requests.
    pub backlog: u64,
    /// Latency proxy (s).
    pub latency: f64,
    /// Event-loop lag p99 proxy (s).
    pub lag: f64,
    pub mem_headroom_bytes: u64,
    /// Memory in use above the total (an OOM kill in real life).
    pub oom: bool,
}

/// What a run cost and how it served.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    /// Request-weighted p99 of the per-tick latency proxy.
    pub p99_latency: Duration,
    /// Ticks with a backlog or utilization above 0.95.
    pub saturated_secs: u32,
    /// Σ size × tick: what the pool cost.
    pub worker_seconds: f64,
    /// Ticks where the policy changed the size.
    pub changes: u32,
    pub max_size: usize,
    /// Ticks where memory in use exceeded the total.
    pub oom_ticks: u32,
    /// Workers spawned that did not fit the memory headroom at the time.
    pub memory_overcommits: u32,
}

/// A finished run.
#[derive(Clone, Debug, PartialEq)]
pub struct Run {
    pub ticks: Vec<TickRecord>,
    pub summary: Summary,
}

/// xorshift64*: tiny, deterministic, good enough for noise.
#[derive(Clone, Debug)]
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }
    /// Uniform in `[-1, 1)`.
    fn signed_unit(&mut self) -> f64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        let r = x.wrapping_mul(0x2545_f491_4f6c_dd1d);
        (r >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }
}

#[derive(Clone, Copy, Debug)]
struct Worker {
    born: u32,
    ready_at: u32,
}

/// Replays `scenario` against `policy`. `start` is the `Instant` of tick 0: the simulator
/// never reads the clock, it only adds `tick` to this.
pub fn run(scenario: &Scenario, policy: &mut dyn Policy, start: Instant) -> Run {
    let cfg = &scenario.config;
    let w = &cfg.workload;
    let m = &cfg.machine;
    let service = w.service.as_secs_f64().max(1e-6);
    let turn = w.turn.as_secs_f64();
    let dt = cfg.tick.as_secs_f64();
    let avail = (m.cores - m.background_cores).max(0.0);
    let mut rng = XorShift::new(w.seed);
    let mut workers: Vec<Worker> = (0..cfg.initial)
        .map(|_| Worker {
            born: 0,
            ready_at: 0,
        })
        .collect();
    let mut queue = 0.0f64; // worker-seconds waiting
    let mut ticks = Vec::with_capacity(scenario.ticks as usize);
    let mut changes = 0;
    let mut overcommits = 0;
    let mut rss_history: VecDeque<u64> = VecDeque::new();

    for t in 0..scenario.ticks {
        let now = start + cfg.tick * t;
        let size = workers.len();
        let ready = workers.iter().filter(|wk| wk.ready_at <= t).count();
        let noise = 1.0 + w.noise * rng.signed_unit();
        let offered = (scenario.shape.load(t) * noise).max(0.0);

        // Serve.
        let cap = (ready as f64).min(avail) * dt;
        let work = queue + offered * dt;
        let served = work.min(cap);
        queue = work - served;
        let queued = queue > 1e-9;
        let utilization = (ready > 0).then(|| {
            if queued {
                1.0
            } else {
                served / (ready as f64 * dt)
            }
        });
        let host_cpu = ((served / dt + m.background_cores) / m.cores.max(1e-9)).min(1.0);

        // Latency and lag proxies.
        let stretch = if queued && ready as f64 > avail && avail > 0.0 {
            ready as f64 / avail
        } else {
            1.0
        };
        let c = (ready as f64).min(avail);
        let drain = if queued { queue / (c.max(0.25)) } else { 0.0 };
        let wait = if c > 0.0 {
            let rho = (served / (c * dt)).min(0.99);
            service * stretch * rho.powf((2.0 * (c + 1.0)).sqrt() - 1.0) / (c * (1.0 - rho))
        } else {
            0.0
        };
        let latency = service * stretch + wait + drain;
        let rho_w = utilization.unwrap_or(0.0).min(0.99);
        let lag = 100f64.ln() * turn * stretch * rho_w / (1.0 - rho_w) + drain;
        let backlog = (queue / service).round() as u64;

        // Memory.
        let rss: Vec<u64> = workers.iter().map(|wk| rss_at(w, wk, t)).collect();
        let used = m.mem_other_bytes + rss.iter().sum::<u64>();
        let headroom = m.mem_total_bytes.saturating_sub(used);
        let oom = used > m.mem_total_bytes;
        // What the master should report: the highest per-tick p95 of the last five
        // minutes. A leaking worker's RSS now is not what it will be; its recent peak is a
        // better guess of what one more worker will cost.
        if let Some(now_p95) = p95(&rss) {
            rss_history.push_back(now_p95);
        }
        if rss_history.len() > RSS_WINDOW_TICKS {
            rss_history.pop_front();
        }
        let rss_p95 = rss_history.iter().copied().max();

        let obs = Observation {
            size,
            ready,
            starting: size - ready,
            utilization,
            lag_p99: Some(Duration::from_secs_f64(lag.min(3600.0))),
            backlog,
            min: cfg.min,
            max: cfg.max,
            cpus: m.cores,
            mem_headroom_bytes: Some(headroom),
            worker_rss_p95_bytes: rss_p95.or(Some(w.rss_base_bytes)),
            host_cpu_busy: Some(host_cpu),
        };
        let desired = policy.decide(&obs, now);

        // Act.
        if desired != size {
            changes += 1;
        }
        if desired > size {
            let spawned = desired - size;
            let fits = headroom / rss_p95.unwrap_or(w.rss_base_bytes).max(1);
            overcommits += (spawned as u64).saturating_sub(fits) as u32;
            workers.extend((0..spawned).map(|_| Worker {
                born: t + 1,
                ready_at: t + 1 + w.spawn_delay_ticks,
            }));
        } else if desired < size {
            // Starting workers go first, then the oldest (in the leak trace, the largest).
            workers.sort_by_key(|wk| (std::cmp::Reverse(wk.ready_at > t), wk.born));
            workers.drain(..size - desired);
        }

        ticks.push(TickRecord {
            t,
            offered,
            size,
            ready,
            desired,
            utilization,
            host_cpu,
            backlog,
            latency,
            lag,
            mem_headroom_bytes: headroom,
            oom,
        });
    }

    let summary = summarize(&ticks, changes, overcommits, dt);
    Run { ticks, summary }
}

fn rss_at(w: &Workload, wk: &Worker, t: u32) -> u64 {
    w.rss_base_bytes + w.leak_bytes_per_sec * u64::from(t.saturating_sub(wk.born))
}

fn p95(values: &[u64]) -> Option<u64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_unstable();
    let i = ((v.len() as f64 * 0.95).ceil() as usize).clamp(1, v.len()) - 1;
    Some(v[i])
}

fn summarize(ticks: &[TickRecord], changes: u32, overcommits: u32, dt: f64) -> Summary {
    let mut weighted: Vec<(f64, f64)> = ticks.iter().map(|r| (r.latency, r.offered)).collect();
    weighted.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total: f64 = weighted.iter().map(|(_, w)| w).sum();
    let mut acc = 0.0;
    let mut p99 = weighted.last().map_or(0.0, |(l, _)| *l);
    for (l, w) in &weighted {
        acc += w;
        if acc >= 0.99 * total {
            p99 = *l;
            break;
        }
    }
    Summary {
        p99_latency: Duration::from_secs_f64(p99.clamp(0.0, 3600.0)),
        saturated_secs: ticks
            .iter()
            .filter(|r| r.backlog > 0 || r.utilization.is_some_and(|u| u > 0.95))
            .count() as u32,
        worker_seconds: ticks.iter().map(|r| r.size as f64 * dt).sum(),
        changes,
        max_size: ticks.iter().map(|r| r.size).max().unwrap_or(0),
        oom_ticks: ticks.iter().filter(|r| r.oom).count() as u32,
        memory_overcommits: overcommits,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xorshift_is_deterministic_and_in_range() {
        let mut a = XorShift::new(7);
        let mut b = XorShift::new(7);
        for _ in 0..1000 {
            let x = a.signed_unit();
            assert_eq!(x, b.signed_unit());
            assert!((-1.0..1.0).contains(&x));
        }
    }

    #[test]
    fn a_static_pool_matching_the_load_never_queues() {
        let scenario = Scenario {
            name: "flat",
            shape: Shape::Constant(2.0),
            ticks: 100,
            config: SimConfig {
                initial: 4,
                ..SimConfig::default()
            },
        };
        let r = run(&scenario, &mut StaticPool(4), Instant::now());
        assert_eq!(r.summary.saturated_secs, 0);
        assert_eq!(r.summary.changes, 0);
        assert_eq!(r.summary.worker_seconds, 400.0);
        let u = r.ticks[50].utilization.unwrap();
        assert!((u - 0.5).abs() < 0.05, "{u}");
    }

    #[test]
    fn more_workers_than_cores_look_busy_and_do_not_help() {
        let mut cfg = SimConfig::default();
        cfg.machine.cores = 2.0;
        cfg.initial = 4;
        cfg.max = 4;
        let scenario = Scenario {
            name: "cpu-bound",
            shape: Shape::Constant(3.0),
            ticks: 60,
            config: cfg,
        };
        let r = run(&scenario, &mut StaticPool(4), Instant::now());
        let last = r.ticks.last().unwrap();
        assert_eq!(last.utilization, Some(1.0));
        assert!(last.host_cpu > 0.99);
        assert!(last.backlog > 0);
    }

    #[test]
    fn spawned_workers_serve_after_the_delay() {
        let scenario = Scenario {
            name: "flat",
            shape: Shape::Constant(0.5),
            ticks: 10,
            config: SimConfig {
                initial: 1,
                ..SimConfig::default()
            },
        };
        let mut policy = |_: &Observation, _: Instant| 3;
        let r = run(&scenario, &mut policy, Instant::now());
        assert_eq!((r.ticks[1].size, r.ticks[1].ready), (3, 1));
        assert_eq!((r.ticks[4].size, r.ticks[4].ready), (3, 3));
    }

    #[test]
    fn shapes() {
        let ramp = Shape::Ramp {
            from: 0.0,
            to: 10.0,
            start: 10,
            end: 20,
            back: 30,
        };
        assert_eq!(ramp.load(0), 0.0);
        assert_eq!(ramp.load(15), 5.0);
        assert_eq!(ramp.load(25), 10.0);
        assert_eq!(ramp.load(35), 5.0);
        assert_eq!(ramp.load(99), 0.0);
        let sine = Shape::Sine {
            mean: 2.0,
            amplitude: 1.0,
            period: 100,
        };
        assert!((sine.load(25) - 3.0).abs() < 1e-9);
    }
}
