//! The autoscaling controller: one pure function, [`step`], from the controller's own small
//! [`State`], one [`Observation`] of a pool and the time `now` (passed in, never read) to a
//! new state and a [`Decision`] — the pool size to steer to and why. No I/O, no clock, no
//! threads: the master builds the observation, calls `step` once per sample tick and acts on
//! the decision.
//!
//! Invariant: `decision.desired` always lies in `[min, decision.upper]`, where `upper` is the
//! machine bound in force (`max`, CPUs × factor, memory headroom) and `min` wins over it.
//!
//! How it decides, in order:
//!
//! 1. **Utilization** (the main signal): a velocity-form PI controller on the error
//!    `e = ln(u / setpoint)`, acting on `ln N`. Working in log space makes the loop
//!    scale-free: a 10 % error moves 2 workers and 200 workers by the same *fraction*, so one
//!    set of gains suits both. `u` is measured over ready workers, turned into a load
//!    (`u × ready` busy workers), averaged over a few ticks, and spread over the whole size
//!    (starting workers included), so a spawn already in flight counts as done and the loop
//!    does not keep spawning while new workers boot. The integrator is clamped to what the
//!    bounds let this tick apply, re-anchored to the pool inside the deadband, and after
//!    each move keeps nothing that points back the other way — so it never winds up, and
//!    noise cannot undo a move it just made.
//! 2. **Lag and backlog**: scale-up-only signals for what utilization cannot see (a
//!    saturated pool reads `u = 1` however far behind it is). Each proposes a size; the
//!    largest proposal of all signals wins.
//! 3. **Up fast**: a larger size is applied at once, limited to doubling per tick and to
//!    `cpus` spawns in flight.
//! 4. **Down slow**: a smaller size is applied only when the highest proposal of the last
//!    `down_window` is below the current size, then one worker at a time, at most one per
//!    `down_interval`; and never when the remaining workers would run above
//!    `setpoint × floor_margin` (the small-N floor).
//! 5. **Bounds**: never above `min(max, cpu_factor × cpus, N + headroom / RSS)`, no growth
//!    while the host CPU is saturated and `N ≥ cpus`, never below `min`.

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

pub mod sim;

/// Growth limit per tick: at most double. Spawning is cheap to undo only slowly (down is
/// one worker per `down_interval`), so an unbounded jump on one noisy sample would cost
/// minutes of idle workers; doubling still reaches 64× in six ticks.
pub const MAX_GROWTH: usize = 2;

/// Largest growth, relative to the ready workers, that lag or backlog propose. Neither
/// says how much capacity is missing, only that some is; 4× ready lets a pool whose first
/// doubling is still starting double again on the next tick (the growth limit of
/// [`MAX_GROWTH`] per tick applies on top), while a pool that lost one of four workers to
/// a restart asks for one more, not four.
const SIGNAL_MAX_FACTOR: f64 = 4.0;

/// Utilization below this is treated as this, so `ln u` stays finite on an idle pool.
const MIN_UTILIZATION: f64 = 1e-3;

/// Tuning of the controller. Plain data; `Params::default()` is what `processes` ships.
#[derive(Clone, Debug, PartialEq)]
pub struct Params {
    /// Target utilization of a ready worker (mean busy fraction of its event-loop thread).
    ///
    /// Default 0.6: an event loop that is 60 % busy still answers a timer or a new
    /// connection within a few of its own turns (M/M/1 wait ≈ 1.5 service times), and the
    /// 40 % headroom absorbs a load rise while new workers spend their spawn delay booting.
    pub setpoint: f64,
    /// Relative deadband around the setpoint: no utilization-driven change while
    /// `|ln(u / setpoint)| ≤ ln(1 + deadband)`, that is while
    /// `setpoint / (1 + deadband) ≤ u ≤ setpoint × (1 + deadband)`.
    ///
    /// Default 0.1, so with the default setpoint the band is `0.545 ≤ u ≤ 0.66`. Symmetric in
    /// log space, like the error. It is as wide as one worker out of ten: below ten workers a
    /// single step always leaves the band (the floor below keeps that from flapping); above,
    /// noise of a few percent never moves the pool.
    pub deadband: f64,
    /// Proportional gain on the change of the log error (velocity form: `Kp · Δe`).
    ///
    /// Default 0.1: small on purpose. The proportional term reacts to every change of a
    /// raw, noisy sample (there is no derivative term for the same reason); the integral
    /// term does the real work.
    pub kp: f64,
    /// Integral gain: each tick the log size moves by `Ki · e`.
    ///
    /// Default 0.4: closes 40 % of the remaining log error per tick, so a step in load is
    /// 90 % corrected within five ticks with no overshoot (the loop gain of this plant is 1
    /// because starting workers already count in the size; any integral gain below 1 is
    /// monotone, and 0.4 leaves room for the spawn delay and noise).
    pub ki: f64,
    /// Weight of the newest sample in the moving average of the load (`u × ready`, in
    /// busy-worker equivalents) that the PI acts on; 1.0 acts on raw samples.
    ///
    /// Default 0.3, a time constant of about three ticks. Per-second utilization is noisy
    /// (±10 % is common), as noisy as the deadband is wide: on raw samples a load that
    /// falls between two sizes (4 workers at 0.62, 5 at 0.50) crosses the band on a few
    /// noisy seconds in a row and the pool goes 4 → 5 → 4 every minute or two. Averaged,
    /// it stays put. A real change is 90 % in within six ticks, and sudden overload does
    /// not wait for it: lag and backlog are not smoothed. Smoothing the load rather than
    /// the error keeps a change of size visible at once (`e` uses the current size).
    pub load_smoothing: f64,
    /// Event-loop lag p99 above which the pool grows whatever its utilization.
    ///
    /// Default 50 ms: a loop that late is visibly slow to users and to health checks, and it
    /// is well above the lag of a loop at the setpoint (a few ms with ~1 ms turns).
    pub lag_p99_threshold: Duration,
    /// Accept backlog (queued connections) above which the pool grows at once.
    ///
    /// Default 32: a few connections per worker can queue between two accepts in normal
    /// operation; 32 means demand is outrunning the pool. uWSGI's busyness algorithm uses
    /// the same order (its backlog alert is 33).
    pub backlog_threshold: u64,
    /// A non-zero backlog that lasts this long also grows the pool.
    ///
    /// Default 5 s: a backlog that never drains, even when small, means the pool is
    /// saturated; five one-second ticks rule out a burst that the pool absorbs.
    pub backlog_persist: Duration,
    /// Scale-down looks at the highest proposal over this window.
    ///
    /// Default 30 s: longer than the usual burst and than the spawn delay of a worker, so a
    /// worker is not removed just to be spawned again; far shorter than Kubernetes' five
    /// minutes, because a worker process costs seconds to restart, not a node.
    ///
    /// A fresh [`State`] has no history, so nothing is removed during its first window:
    /// a master that just started (or took over a pool) first watches it for this long.
    pub down_window: Duration,
    /// At most one worker is removed per interval.
    ///
    /// Default 5 s: each removal moves the load of one worker onto the others; five ticks
    /// let the utilization settle and be measured before the next removal.
    pub down_interval: Duration,
    /// Small-N floor: a worker is never removed if the remaining ones would run above
    /// `setpoint × floor_margin`.
    ///
    /// Default 1.1, i.e. 0.66 with the default setpoint, the top of the deadband: at the
    /// load it measured, a removal can never push the pool above the band and so can never
    /// cause the next scale-up (each sample in the down window must clear it, so noise has
    /// to stay clear for the whole window too). Keep
    /// `floor_margin ≤ 1 + deadband` for that reason. This rule is what stops 2 ↔ 3 limit
    /// cycles, where one worker is a large fraction of the pool.
    pub floor_margin: f64,
    /// The pool never exceeds `ceil(cpu_factor × cpus)` workers.
    ///
    /// Default 1.0, for event-loop runtimes (Node): one event loop can use one core, so
    /// more loops than cores only queue on the CPU. Raise it for workers that block on I/O
    /// (a threadless Python worker waiting on a database), where several per core pay off.
    pub cpu_factor: f64,
    /// Host CPU busy fraction at or above which growth stops once `N ≥ cpus`.
    ///
    /// Default 0.9: the host has no core left for another worker; a new one would only
    /// share the same cores and add queueing. (uWSGI's busyness rule grows a CPU-bound app
    /// to 4 workers on 2 cores, as every worker looks busy while waiting for a CPU.)
    pub host_cpu_saturated: f64,
}

impl Default for Params {
    /// The shipped defaults; each field's doc says why.
    fn default() -> Self {
        Self {
            setpoint: 0.6,
            deadband: 0.1,
            kp: 0.1,
            ki: 0.4,
            load_smoothing: 0.3,
            lag_p99_threshold: Duration::from_millis(50),
            backlog_threshold: 32,
            backlog_persist: Duration::from_secs(5),
            down_window: Duration::from_secs(30),
            down_interval: Duration::from_secs(5),
            floor_margin: 1.1,
            cpu_factor: 1.0,
            host_cpu_saturated: 0.9,
        }
    }
}

/// What the master saw of one pool this tick. The caller resolves every figure: in
/// particular `cpus` and `mem_headroom_bytes` are the *effective* ones, where a cgroup
/// limit (`cpu.max`, `memory.max`) takes precedence over the host's figures. The controller
/// never looks further.
#[derive(Clone, Debug, PartialEq)]
pub struct Observation {
    /// Workers counted in the pool: starting plus ready, not draining.
    pub size: usize,
    /// Ready workers (the ones that carry load and are measured).
    pub ready: usize,
    /// Workers spawned but not ready yet (spawns in flight).
    pub starting: usize,
    /// Mean busy fraction over ready workers, `0.0..=1.0`; `None` when none is ready.
    pub utilization: Option<f64>,
    /// p99 event-loop lag over ready workers, when the runtime reports it.
    pub lag_p99: Option<Duration>,
    /// Accept backlog: queued connections not yet taken by a worker.
    pub backlog: u64,
    /// Configured minimum pool size. Wins over every machine bound.
    pub min: usize,
    /// Configured maximum pool size.
    pub max: usize,
    /// Effective CPUs: the cgroup quota (`cpu.max` quota / period) where set, else the host's.
    pub cpus: f64,
    /// Memory that can still be used: `memory.max − memory.current` of the cgroup where set,
    /// else the host's `MemAvailable`. `None` when unknown (no memory bound then).
    pub mem_headroom_bytes: Option<u64>,
    /// p95 RSS of this pool's workers: what one more worker will cost. Prefer a recent
    /// high-water mark (the highest p95 of the last minutes) to the figure of this tick: a
    /// warm or leaking worker is larger than a fresh one. `None` when unknown (no memory
    /// bound then).
    pub worker_rss_p95_bytes: Option<u64>,
    /// Host (or cgroup) CPU busy fraction `0.0..=1.0` over the last tick, when known.
    pub host_cpu_busy: Option<f64>,
}

/// The controller's memory between ticks. Start with [`State::new`]; only [`step`] changes
/// it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct State {
    /// The integrator: the log of the size the PI loop steers to (continuous, so that
    /// small corrections accumulate until they amount to a whole worker).
    target_ln: Option<f64>,
    /// Last deadbanded error, for the velocity-form proportional term.
    last_error: f64,
    /// Moving average of the load, in busy-worker equivalents (`u × ready`).
    load_avg: Option<f64>,
    /// Proposals of the last `down_window`, oldest first.
    window: VecDeque<(Instant, usize)>,
    /// First tick seen: no scale-down before a whole window of history exists.
    started: Option<Instant>,
    /// Time of the last scale-down.
    last_down: Option<Instant>,
    /// Since when the backlog has been non-zero.
    backlog_since: Option<Instant>,
}

impl State {
    /// A controller that has seen nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The size the PI integrator currently steers to (before rounding), if it has run.
    pub fn integrator_size(&self) -> Option<f64> {
        self.target_ln.map(f64::exp)
    }
}

/// Which bound limited the decision, if any.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Bound {
    /// Nothing limited the decision.
    None,
    /// The configured minimum raised it.
    Min,
    /// The configured maximum.
    Max,
    /// `cpu_factor × cpus`.
    Cpu,
    /// Memory headroom over the workers' p95 RSS.
    Memory,
    /// Host CPU saturated and `N ≥ cpus`: no growth.
    HostCpuSaturated,
    /// At most `cpus` spawns in flight.
    SpawnsInFlight,
    /// At most double per tick.
    Doubling,
}

impl Bound {
    /// Short stable snake_case name, for a metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Bound::None => "none",
            Bound::Min => "min",
            Bound::Max => "max",
            Bound::Cpu => "cpu",
            Bound::Memory => "memory",
            Bound::HostCpuSaturated => "host_cpu_saturated",
            Bound::SpawnsInFlight => "spawns_in_flight",
            Bound::Doubling => "doubling",
        }
    }
}

impl fmt::Display for Bound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label().replace('_', " "))
    }
}

/// Why the decision is what it is: the signal that set it and its values.
#[derive(Clone, Debug, PartialEq)]
pub enum Reason {
    /// The PI loop on utilization moved the size. `u` is the utilization it acted on:
    /// measured over ready workers, averaged (`load_smoothing`), spread over the whole
    /// size.
    Utilization { u: f64, target: f64 },
    /// Event-loop lag p99 above the threshold grew the pool.
    Lag { p99: Duration, threshold: Duration },
    /// Accept backlog grew the pool: above the threshold, or non-zero for `nonzero_for`.
    Backlog { len: u64, nonzero_for: Duration },
    /// The size was outside `[min, upper]` and was brought back; `Decision::bound` says
    /// which bound.
    Bound,
    /// Utilization inside the deadband: no change.
    Deadband { u: f64, target: f64 },
    /// A removal was wanted but the remaining workers would run at `after > limit`.
    Floor { after: f64, limit: f64 },
    /// A smaller size (`wanted`) was proposed, but the down window still holds a higher
    /// proposal, or the last removal was less than `down_interval` ago.
    Cooldown { wanted: usize },
    /// Nothing to do: the integrator has not yet moved a whole worker, or no worker is ready
    /// to measure (`u` is `None`).
    Hold { u: Option<f64> },
}

impl Reason {
    /// Short stable snake_case name, for a metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Reason::Utilization { .. } => "utilization",
            Reason::Lag { .. } => "lag",
            Reason::Backlog { .. } => "backlog",
            Reason::Bound => "bound",
            Reason::Deadband { .. } => "deadband",
            Reason::Floor { .. } => "floor",
            Reason::Cooldown { .. } => "cooldown",
            Reason::Hold { .. } => "hold",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Utilization { u, target } => {
                let op = if u > target { '>' } else { '<' };
                write!(f, "utilization {u:.2} {op} {target:.2}")
            }
            Reason::Lag { p99, threshold } => write!(
                f,
                "lag p99 {}ms > {}ms",
                p99.as_millis(),
                threshold.as_millis()
            ),
            Reason::Backlog { len, nonzero_for } => {
                write!(f, "backlog {len} for {}s", nonzero_for.as_secs())
            }
            Reason::Bound => f.write_str("bound"),
            Reason::Deadband { u, target } => {
                write!(f, "utilization {u:.2} ≈ {target:.2} (deadband)")
            }
            // With one worker left carrying load, "one fewer" is none: no figure to give.
            Reason::Floor { after, .. } if !after.is_finite() || *after >= f64::MAX / 2.0 => {
                f.write_str("floor: the one worker left carries load")
            }
            Reason::Floor { after, limit } => {
                write!(f, "floor: one fewer would run at {after:.2} > {limit:.2}")
            }
            Reason::Cooldown { wanted } => write!(f, "cooldown (wants {wanted})"),
            Reason::Hold { u: Some(u) } => write!(f, "hold at utilization {u:.2}"),
            Reason::Hold { u: None } => f.write_str("hold: no ready worker"),
        }
    }
}

/// What the pool should do.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// Size to steer to (starting + ready). Always within `[min, upper]`.
    pub desired: usize,
    /// The signal that set `desired`.
    pub reason: Reason,
    /// The bound that limited `desired`, or [`Bound::None`].
    pub bound: Bound,
    /// Upper bound in force: `min(max, ceil(cpu_factor × cpus), size + headroom / RSS)`,
    /// raised to `min` if below it.
    pub upper: usize,
}

impl fmt::Display for Decision {
    /// One short line, e.g. `utilization 0.82 > 0.60 → 3` or
    /// `lag p99 80ms > 50ms → 4 (cpu bound, upper 4)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} → {}", self.reason, self.desired)?;
        if self.bound != Bound::None {
            write!(f, " ({} bound, upper {})", self.bound, self.upper)?;
        }
        Ok(())
    }
}

/// One controller tick. Pure: the same inputs always give the same outputs.
///
/// `now` must not go backwards between calls with the same state (a backwards step is
/// treated as no time passing).
pub fn step(state: &State, obs: &Observation, now: Instant, params: &Params) -> (State, Decision) {
    let mut next = state.clone();
    let n = obs.size;
    let min = obs.min;
    let started = *next.started.get_or_insert(now);

    let (machine_upper, machine_bound) = machine_upper(obs, params);
    let upper = machine_upper.max(min);
    let (grow_limit, grow_bound) = growth_limit(obs, params);
    // What this tick can actually reach upwards; the integrator is clamped to it.
    let (reach, reach_bound) = if grow_limit < upper {
        (grow_limit, grow_bound)
    } else {
        (upper, machine_bound)
    };

    // --- Utilization: velocity-form PI on ln N ------------------------------------------
    let pi = utilization_proposal(&mut next, obs, params, reach.max(min));
    let pi_blocked = pi.wants_up && reach <= n;

    // --- Scale-up-only signals ------------------------------------------------------------
    next.backlog_since = if obs.backlog > 0 {
        Some(next.backlog_since.unwrap_or(now))
    } else {
        None
    };
    let lag = obs
        .lag_p99
        .filter(|p99| *p99 > params.lag_p99_threshold)
        .map(|p99| {
            let severity = p99.as_secs_f64() / params.lag_p99_threshold.as_secs_f64().max(1e-9);
            (
                grow_by(obs, severity),
                Reason::Lag {
                    p99,
                    threshold: params.lag_p99_threshold,
                },
            )
        });
    let nonzero_for = next
        .backlog_since
        .map_or(Duration::ZERO, |since| since_or_zero(now, since));
    let backlog = (obs.backlog > params.backlog_threshold
        || (obs.backlog > 0 && nonzero_for >= params.backlog_persist))
        .then(|| {
            let severity = obs.backlog as f64 / params.backlog_threshold.max(1) as f64;
            (
                grow_by(obs, severity),
                Reason::Backlog {
                    len: obs.backlog,
                    nonzero_for,
                },
            )
        });

    // The largest proposal wins; on a tie the first (utilization) names the reason.
    let (want, want_reason) = [Some((pi.size, pi.reason.clone())), lag, backlog]
        .into_iter()
        .flatten()
        .fold(None::<(usize, Reason)>, |best, cand| match best {
            Some(b) if b.0 >= cand.0 => Some(b),
            _ => Some(cand),
        })
        .unwrap_or((n, Reason::Hold { u: None }));

    // --- Down window ----------------------------------------------------------------------
    let proposal = want.clamp(min, upper);
    next.window.push_back((now, proposal));
    while next
        .window
        .front()
        .is_some_and(|(t, _)| since_or_zero(now, *t) >= params.down_window)
    {
        next.window.pop_front();
    }

    let (mut desired, mut reason, mut bound) = if want > n {
        // Up fast.
        if want > reach {
            (reach.max(n.min(upper)), want_reason, reach_bound)
        } else {
            (want, want_reason, Bound::None)
        }
    } else if want < n {
        // Down slow.
        let window_high = next
            .window
            .iter()
            .map(|(_, s)| *s)
            .max()
            .unwrap_or(proposal)
            .max(proposal);
        let history = since_or_zero(now, started) >= params.down_window;
        let interval_ok = next
            .last_down
            .is_none_or(|t| since_or_zero(now, t) >= params.down_interval);
        if history && window_high < n && interval_ok {
            next.last_down = Some(now);
            (n - 1, want_reason, Bound::None)
        } else {
            (n, Reason::Cooldown { wanted: want }, Bound::None)
        }
    } else if pi_blocked {
        (n, want_reason, reach_bound)
    } else {
        (n, want_reason, Bound::None)
    };

    // --- Hard bounds: upper, then min (min wins) ------------------------------------------
    if desired > upper {
        desired = upper;
        if n > upper {
            reason = Reason::Bound;
        }
        bound = machine_bound;
    }
    if desired < min {
        desired = min;
        reason = Reason::Bound;
        bound = Bound::Min;
    }

    // Tracking anti-windup: after a move the integrator holds nothing that points back
    // the other way. A removal of one worker while the integrator sat at 5.4 would leave it
    // 0.4 of a worker *above* the new size of 5, and one noisy sample would undo the
    // removal; likewise a whole worker rounded up leaves no pull back down. What it holds
    // in the direction of the move is kept: that is the evidence for the next step.
    if desired > 0 && desired != n {
        let applied = (desired as f64).ln();
        next.target_ln = next.target_ln.map(|x| {
            if desired < n {
                x.min(applied)
            } else {
                x.max(applied)
            }
        });
    }

    (
        next,
        Decision {
            desired,
            reason,
            bound,
            upper,
        },
    )
}

/// The pool target a decision leaves, given the workers alive it was made from (`live`)
/// and the target before. The controller sizes from the workers alive, and a slot whose
/// worker crashed and waits to restart is not among them: holding or growing from that
/// smaller count must not take the slot away (the crash is the supervisor's to mend).
/// Only a decision to go below the live count lowers the target; `upper` still caps it.
pub fn next_target(desired: usize, live: usize, before: usize, upper: usize) -> usize {
    if desired < live {
        desired
    } else {
        desired.max(before.min(upper.max(desired)))
    }
}

/// The PI loop's proposal for this tick.
struct Proposal {
    size: usize,
    reason: Reason,
    /// The measurement asks for growth (outside the deadband, above it).
    wants_up: bool,
}

/// Runs the PI loop: updates the integrator in `state` and proposes a size.
///
/// `reach` is the highest size this tick can apply (bounds and growth limits); the
/// integrator is clamped to `[lo, reach]` with `lo` the size that the floor or `min` holds
/// — the bounds actually in force — so it never winds up against a limit and a change of
/// load is answered from where the pool really is.
fn utilization_proposal(
    state: &mut State,
    obs: &Observation,
    params: &Params,
    reach: usize,
) -> Proposal {
    let n = obs.size;
    let Some(u) = obs
        .utilization
        .filter(|u| u.is_finite() && obs.ready > 0 && n > 0)
    else {
        return Proposal {
            size: n,
            reason: Reason::Hold { u: None },
            wants_up: false,
        };
    };
    let setpoint = params.setpoint;
    // Busy-worker equivalents now carried by the ready workers; spread over the whole size
    // so that workers still starting already count as capacity.
    let load = u.max(0.0) * obs.ready as f64;
    // The PI acts on a moving average of the load; the floor below, on the raw sample.
    let alpha = params.load_smoothing.clamp(f64::MIN_POSITIVE, 1.0);
    let smooth = state
        .load_avg
        .map_or(load, |avg| avg + alpha * (load - avg));
    state.load_avg = Some(smooth);
    let u_size = (smooth / n as f64).max(MIN_UTILIZATION);
    let ln_n = (n as f64).ln();
    let e = (u_size / setpoint).ln();
    let band = (1.0 + params.deadband.max(0.0)).ln();
    let e_db = if e.abs() <= band { 0.0 } else { e };

    // Inside the deadband the measurement agrees with the pool as it is, so the integrator
    // is re-anchored to it: the whole-worker quantization is a limit in force like any
    // other, and a fraction of a worker left over from the last move must not let one
    // noisy sample above the band tip the pool up (that is a 4 ↔ 5 limit cycle).
    let mut x = if e_db == 0.0 {
        ln_n
    } else {
        state.target_ln.unwrap_or(ln_n)
    };
    x += params.kp * (e_db - state.last_error) + params.ki * e_db;
    state.last_error = e_db;
    // Sign consistency: while the measurement says "grow", the integrator starts from the
    // pool as it is (a slow scale-down must not leave it wound below the pool); while it says
    // "shrink", it goes no lower than what this measurement alone asks for (`ln N + e`), so
    // the one-per-interval path down cannot wind it below the need.
    if e_db > 0.0 {
        x = x.max(ln_n);
    } else if e_db < 0.0 {
        x = x.min(ln_n).max(ln_n + e);
    }

    // Small-N floor: removing one worker moves its load onto the rest.
    let limit = setpoint * params.floor_margin;
    let after = if n > 1 {
        load / (n - 1) as f64
    } else if load > 0.0 {
        f64::INFINITY
    } else {
        0.0
    };
    let floor_blocks = after > limit;

    let lo = obs.min.max(if floor_blocks { n } else { 0 });
    let hi = reach.max(lo).max(1);
    // With `min = 0` an idle pool may go to zero: ln 0.4 rounds to no worker.
    let lo_ln = if lo == 0 {
        0.4f64.ln()
    } else {
        (lo as f64).ln()
    };
    x = x.clamp(lo_ln, (hi as f64).ln());
    state.target_ln = Some(x);

    let u_report = round2(u_size);
    let target = setpoint;
    if e_db == 0.0 {
        return Proposal {
            size: n,
            reason: Reason::Deadband {
                u: u_report,
                target,
            },
            wants_up: false,
        };
    }
    if e_db < 0.0 && floor_blocks {
        return Proposal {
            size: n,
            reason: Reason::Floor {
                after: round2(after.min(f64::MAX)),
                limit,
            },
            wants_up: false,
        };
    }
    let size = x.exp().round() as usize;
    let wants_up = e_db > 0.0;
    // Held at the current size by a bound counts as utilization (the decision names the
    // bound); otherwise the integrator has not yet moved a whole worker.
    let reason = if size == n && !(wants_up && hi <= n) {
        Reason::Hold { u: Some(u_report) }
    } else {
        Reason::Utilization {
            u: u_report,
            target,
        }
    };
    Proposal {
        size,
        reason,
        wants_up,
    }
}

/// `min(max, ceil(cpu_factor × cpus), size + headroom / rss)` and which term binds (ties go
/// to the first: max, cpu, memory). Does not apply `min`.
fn machine_upper(obs: &Observation, params: &Params) -> (usize, Bound) {
    let mut best = (obs.max, Bound::Max);
    let cpu = params.cpu_factor * obs.cpus;
    // A cgroup quota can be fractional (1.5 CPUs): two event loops use all of it, one
    // cannot. The epsilon keeps 2.0000001 from becoming 3.
    let cpu_cap = if cpu.is_finite() && cpu > 0.0 {
        ((cpu - 1e-9).ceil() as usize).max(1)
    } else {
        1
    };
    if cpu_cap < best.0 {
        best = (cpu_cap, Bound::Cpu);
    }
    // Workers still starting may not have reached their full RSS; the caller's headroom is
    // what is free now. The p95 RSS (not the mean) keeps a new worker from being the one
    // that does not fit.
    if let (Some(headroom), Some(rss)) = (obs.mem_headroom_bytes, obs.worker_rss_p95_bytes)
        && rss > 0
    {
        let fits = usize::try_from(headroom / rss).unwrap_or(usize::MAX);
        let mem_cap = obs.size.saturating_add(fits);
        if mem_cap < best.0 {
            best = (mem_cap, Bound::Memory);
        }
    }
    best
}

/// The highest size reachable this tick by growth rules alone (doubling, spawns in flight,
/// host CPU saturation), and which binds.
fn growth_limit(obs: &Observation, params: &Params) -> (usize, Bound) {
    let n = obs.size;
    let mut best = (
        n.saturating_mul(MAX_GROWTH).max(n.saturating_add(1)),
        Bound::Doubling,
    );
    let spawn_cap = if obs.cpus.is_finite() && obs.cpus > 0.0 {
        ((obs.cpus - 1e-9).ceil() as usize).max(1)
    } else {
        1
    };
    let spawns = n.saturating_add(spawn_cap.saturating_sub(obs.starting));
    if spawns <= best.0 {
        best = (spawns, Bound::SpawnsInFlight);
    }
    // Workers still starting will be as busy as the ready ones: count them now, so that a
    // burst of spawns cannot overshoot the cores before the host figure catches up.
    let per_worker = obs.utilization.unwrap_or(1.0).clamp(0.0, 1.0);
    let saturated = obs.host_cpu_busy.is_some_and(|busy| {
        let projected = busy + obs.starting as f64 * per_worker / obs.cpus.max(1e-9);
        projected >= params.host_cpu_saturated
    }) && n as f64 >= obs.cpus;
    if saturated {
        best = (n, Bound::HostCpuSaturated);
    }
    best
}

/// Size proposed by a scale-up-only signal `severity` times past its threshold: the ready
/// workers (the ones the signal was measured on) grown in proportion, by at least one and
/// at most [`SIGNAL_MAX_FACTOR`] times. Workers still starting are capacity already on its
/// way: the proposal is compared with the whole size, so a signal seen while a worker
/// restarts does not spawn extra workers for a shortfall that the restart will fill.
fn grow_by(obs: &Observation, severity: f64) -> usize {
    let r = obs.ready;
    let factor = severity.clamp(1.0, SIGNAL_MAX_FACTOR);
    ((r as f64 * factor).ceil() as usize)
        .max(r + 1)
        .max(obs.size)
}

fn since_or_zero(now: Instant, then: Instant) -> Duration {
    now.checked_duration_since(then).unwrap_or(Duration::ZERO)
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    fn obs(size: usize, u: f64) -> Observation {
        Observation {
            size,
            ready: size,
            starting: 0,
            utilization: Some(u),
            lag_p99: None,
            backlog: 0,
            min: 1,
            max: 64,
            cpus: 64.0,
            mem_headroom_bytes: None,
            worker_rss_p95_bytes: None,
            host_cpu_busy: None,
        }
    }

    /// Runs `ticks` one-second ticks, applying each decision to `o.size` (workers ready at
    /// once); returns the final state, the decisions, and the last time.
    fn run(
        mut state: State,
        o: &mut Observation,
        t0: Instant,
        ticks: u64,
        p: &Params,
    ) -> (State, Vec<Decision>, Instant) {
        let mut out = Vec::new();
        let mut now = t0;
        for i in 0..ticks {
            now = t0 + SEC * i as u32;
            let (s, d) = step(&state, o, now, p);
            state = s;
            o.size = d.desired;
            o.ready = d.desired;
            out.push(d);
        }
        (state, out, now)
    }

    #[test]
    fn lag_alone_scales_up() {
        let p = Params::default();
        let mut o = obs(4, 0.6);
        o.lag_p99 = Some(Duration::from_millis(80));
        let (_, d) = step(&State::new(), &o, Instant::now(), &p);
        assert_eq!(d.reason.label(), "lag");
        // 80 / 50 = 1.6 → ceil(4 × 1.6) = 7
        assert_eq!(d.desired, 7);
        assert_eq!(d.to_string(), "lag p99 80ms > 50ms → 7");
    }

    #[test]
    fn lag_at_threshold_does_nothing() {
        let mut o = obs(4, 0.6);
        o.lag_p99 = Some(Duration::from_millis(50));
        let (_, d) = step(&State::new(), &o, Instant::now(), &Params::default());
        assert_eq!(d.desired, 4);
        assert_eq!(d.reason.label(), "deadband");
    }

    #[test]
    fn small_backlog_must_persist_five_seconds() {
        let p = Params::default();
        let t0 = Instant::now();
        let mut o = obs(4, 0.6);
        o.backlog = 3;
        let mut s = State::new();
        for i in 0..5 {
            let (s2, d) = step(&s, &o, t0 + SEC * i, &p);
            s = s2;
            assert_eq!(d.desired, 4, "tick {i}: {d}");
        }
        let (_, d) = step(&s, &o, t0 + SEC * 5, &p);
        assert_eq!(d.desired, 5);
        assert_eq!(d.to_string(), "backlog 3 for 5s → 5");
    }

    #[test]
    fn backlog_reset_by_a_zero_sample() {
        let p = Params::default();
        let t0 = Instant::now();
        let mut o = obs(4, 0.6);
        let mut s = State::new();
        for i in 0..10 {
            o.backlog = if i == 4 { 0 } else { 3 };
            let (s2, d) = step(&s, &o, t0 + SEC * i, &p);
            s = s2;
            assert_eq!(d.desired, 4, "tick {i}: {d}");
        }
    }

    #[test]
    fn large_backlog_scales_up_at_once() {
        let mut o = obs(4, 0.6);
        o.backlog = 48;
        let (_, d) = step(&State::new(), &o, Instant::now(), &Params::default());
        assert_eq!(d.desired, 6); // 48 / 32 = 1.5 → 6
        assert_eq!(d.reason.label(), "backlog");
    }

    #[test]
    fn host_cpu_saturation_blocks_growth_once_n_reaches_cpus() {
        let p = Params {
            cpu_factor: 4.0,
            ..Params::default()
        };
        let mut o = obs(4, 1.0);
        o.cpus = 4.0;
        o.host_cpu_busy = Some(0.95);
        o.lag_p99 = Some(Duration::from_millis(200));
        let (_, d) = step(&State::new(), &o, Instant::now(), &p);
        assert_eq!(d.desired, 4);
        assert_eq!(d.bound, Bound::HostCpuSaturated);
        assert_eq!(d.upper, 16);

        // Below the CPU count a busy host does not stop growth: an idle core is left.
        o.size = 3;
        o.ready = 3;
        let (_, d) = step(&State::new(), &o, Instant::now(), &p);
        assert!(d.desired > 3, "{d}");

        // Nor does a host that is not saturated.
        o.size = 4;
        o.ready = 4;
        o.host_cpu_busy = Some(0.5);
        let (_, d) = step(&State::new(), &o, Instant::now(), &p);
        assert!(d.desired > 4, "{d}");
    }

    #[test]
    fn host_cpu_counts_starting_workers_as_busy() {
        // 4 ready, 4 starting on 8 CPUs: the host reads 50 % busy, but with the starting
        // workers as busy as the ready ones it will read 100 %: no growth.
        let p = Params {
            cpu_factor: 2.0,
            ..Params::default()
        };
        let mut o = obs(8, 1.0);
        o.ready = 4;
        o.starting = 4;
        o.cpus = 8.0;
        o.host_cpu_busy = Some(0.5);
        o.backlog = 1000;
        let (_, d) = step(&State::new(), &o, Instant::now(), &p);
        assert_eq!((d.desired, d.bound), (8, Bound::HostCpuSaturated));
    }

    #[test]
    fn cpu_bound_defaults_to_one_worker_per_core() {
        let mut o = obs(2, 1.0);
        o.cpus = 2.0;
        o.backlog = 100;
        let (_, d) = step(&State::new(), &o, Instant::now(), &Params::default());
        assert_eq!((d.desired, d.bound, d.upper), (2, Bound::Cpu, 2));
        // A fractional quota rounds up: 1.5 CPUs are used fully only by two loops.
        o.cpus = 1.5;
        o.size = 1;
        o.ready = 1;
        let (_, d) = step(&State::new(), &o, Instant::now(), &Params::default());
        assert_eq!(d.upper, 2);
    }

    #[test]
    fn memory_bound_and_min_wins_over_it() {
        let mut o = obs(4, 1.0);
        o.backlog = 100;
        o.mem_headroom_bytes = Some(250);
        o.worker_rss_p95_bytes = Some(100);
        let (_, d) = step(&State::new(), &o, Instant::now(), &Params::default());
        assert_eq!((d.desired, d.bound, d.upper), (6, Bound::Memory, 6));

        // No headroom at all, but min is 8: the pool still goes to min.
        o.backlog = 0;
        o.utilization = Some(0.6);
        o.mem_headroom_bytes = Some(0);
        o.min = 8;
        let (_, d) = step(&State::new(), &o, Instant::now(), &Params::default());
        assert_eq!((d.desired, d.bound, d.upper), (8, Bound::Min, 8));
        assert_eq!(d.reason, Reason::Bound);
    }

    #[test]
    fn above_max_comes_back_at_once() {
        let mut o = obs(10, 0.6);
        o.max = 6;
        let (_, d) = step(&State::new(), &o, Instant::now(), &Params::default());
        assert_eq!((d.desired, d.bound), (6, Bound::Max));
        assert_eq!(d.reason.label(), "bound");
    }

    #[test]
    fn spawns_in_flight_are_capped_at_cpus() {
        let mut o = obs(8, 1.0);
        o.cpus = 4.0;
        o.max = 64;
        let p = Params {
            cpu_factor: 8.0,
            ..Params::default()
        };
        o.lag_p99 = Some(Duration::from_secs(1));
        o.starting = 3;
        o.ready = 5;
        let (_, d) = step(&State::new(), &o, Instant::now(), &p);
        assert_eq!((d.desired, d.bound), (9, Bound::SpawnsInFlight));
    }

    #[test]
    fn growth_at_most_doubles() {
        let mut o = obs(3, 1.0);
        o.backlog = 10_000;
        let (_, d) = step(&State::new(), &o, Instant::now(), &Params::default());
        assert_eq!(d.desired, 6);
    }

    #[test]
    fn utilization_step_up_is_reported() {
        let p = Params::default();
        let t0 = Instant::now();
        let mut o = obs(2, 0.82);
        let (_, ds, _) = run(State::new(), &mut o, t0, 10, &p);
        let first = ds.iter().find(|d| d.desired != 2).expect("scaled up");
        assert_eq!(first.reason.label(), "utilization");
        assert_eq!(first.to_string(), "utilization 0.82 > 0.60 → 3");
    }

    #[test]
    fn no_change_in_the_deadband() {
        let p = Params::default();
        for u in [0.55, 0.6, 0.65] {
            let mut o = obs(5, u);
            let (_, ds, _) = run(State::new(), &mut o, Instant::now(), 120, &p);
            assert!(ds.iter().all(|d| d.desired == 5), "u={u}");
        }
    }

    #[test]
    fn floor_keeps_small_pools() {
        let p = Params::default();
        // Two workers at 0.4: one alone would run at 0.8 > 0.66.
        let mut o = obs(2, 0.4);
        let (_, ds, _) = run(State::new(), &mut o, Instant::now(), 120, &p);
        assert!(ds.iter().all(|d| d.desired == 2));
        assert_eq!(ds.last().unwrap().reason.label(), "floor");
        // Three at 0.3 (0.9 busy): two would run at 0.45, fine: goes to two after the
        // window, and stays.
        let mut o = obs(3, 0.3);
        o.min = 1;
        let mut s = State::new();
        let t0 = Instant::now();
        let mut sizes = Vec::new();
        for i in 0..120u32 {
            // Constant load of 0.9 busy-worker equivalents.
            o.utilization = Some(0.9 / o.size as f64);
            let (s2, d) = step(&s, &o, t0 + SEC * i, &p);
            s = s2;
            o.size = d.desired;
            o.ready = d.desired;
            sizes.push(d.desired);
        }
        assert_eq!(sizes[29], 3);
        assert_eq!(*sizes.last().unwrap(), 2);
    }

    #[test]
    fn one_worker_is_not_removed_while_it_has_work() {
        let mut o = obs(1, 0.05);
        o.min = 0;
        let (_, ds, _) = run(State::new(), &mut o, Instant::now(), 60, &Params::default());
        assert!(ds.iter().all(|d| d.desired == 1));
        // An idle pool can go to zero when min allows it, and a backlog brings it back.
        let mut o = obs(1, 0.0);
        o.min = 0;
        let (s, ds, t) = run(State::new(), &mut o, Instant::now(), 60, &Params::default());
        assert_eq!(ds.last().unwrap().desired, 0);
        let mut o = obs(0, 0.0);
        o.utilization = None;
        o.min = 0;
        o.backlog = 40;
        let (_, d) = step(&s, &o, t + SEC, &Params::default());
        assert_eq!(d.desired, 1);
    }

    #[test]
    fn down_waits_for_the_window_then_one_per_interval() {
        let p = Params::default();
        let t0 = Instant::now();
        let mut o = obs(10, 0.6);
        let (s, _, t) = run(State::new(), &mut o, t0, 60, &p);
        // Load drops to 2 busy-worker equivalents.
        let mut s = s;
        let mut downs = Vec::new();
        for i in 1..=120u32 {
            o.utilization = Some(2.0 / o.size as f64);
            let now = t + SEC * i;
            let (s2, d) = step(&s, &o, now, &p);
            s = s2;
            if d.desired < o.size {
                assert_eq!(d.desired, o.size - 1);
                downs.push(i);
            }
            o.size = d.desired;
            o.ready = d.desired;
        }
        // The high proposals from before the drop hold it for a whole window.
        assert!(downs[0] >= 30, "{downs:?}");
        assert!(downs[0] <= 31, "{downs:?}");
        assert!(downs.windows(2).all(|w| w[1] - w[0] >= 5), "{downs:?}");
        // 2 busy at 0.6 → 4 workers (0.5 each; three would run at 0.67 > 0.66).
        assert_eq!(o.size, 4);
    }

    #[test]
    fn no_scale_down_without_a_window_of_history() {
        let p = Params::default();
        let mut o = obs(8, 0.1);
        let (_, ds, _) = run(State::new(), &mut o, Instant::now(), 31, &p);
        assert!(ds[..30].iter().all(|d| d.desired == 8));
        assert_eq!(ds[29].reason.label(), "cooldown");
        assert_eq!(ds[30].desired, 7);
    }

    #[test]
    fn anti_windup_after_long_saturation_at_max() {
        let p = Params::default();
        let t0 = Instant::now();
        let mut o = obs(8, 1.0);
        o.max = 8;
        o.lag_p99 = Some(Duration::from_millis(400));
        o.backlog = 500;
        // Ten minutes pinned at max with every signal asking for more.
        let (s, ds, t) = run(State::new(), &mut o, t0, 600, &p);
        assert!(ds.iter().all(|d| d.desired == 8 && d.bound == Bound::Max));
        let x = s.integrator_size().unwrap();
        assert!(x <= 8.0 + 1e-9, "integrator wound up to {x}");
        // Load drops to 1.2 busy-worker equivalents.
        o.lag_p99 = None;
        o.backlog = 0;
        let mut s = s;
        let mut first_down = None;
        for i in 1..=200u32 {
            o.utilization = Some(1.2 / o.size as f64);
            let (s2, d) = step(&s, &o, t + SEC * i, &p);
            s = s2;
            if d.desired < o.size && first_down.is_none() {
                first_down = Some(i);
            }
            o.size = d.desired;
            o.ready = d.desired;
        }
        // Down starts as soon as the window has forgotten the saturation (30 s, plus the
        // two ticks the load average takes to fall below the band), not after an
        // integrator has unwound.
        let first_down = first_down.expect("scaled down");
        assert!((30..=33).contains(&first_down), "{first_down}");
        assert_eq!(o.size, 2);
    }

    #[test]
    fn starting_workers_count_in_size_not_in_utilization() {
        let p = Params::default();
        // 2 ready at 0.9 (1.8 busy) and 1 starting: over 3 workers that is 0.6, on target.
        let mut o = obs(3, 0.9);
        o.ready = 2;
        o.starting = 1;
        let (_, d) = step(&State::new(), &o, Instant::now(), &p);
        assert_eq!(d.desired, 3);
        assert_eq!(d.reason.label(), "deadband");
        // All starting: nothing to measure, hold.
        o.ready = 0;
        o.starting = 3;
        o.utilization = None;
        let (_, d) = step(&State::new(), &o, Instant::now(), &p);
        assert_eq!((d.desired, d.reason.label()), (3, "hold"));
    }

    #[test]
    fn below_min_goes_to_min() {
        let mut o = obs(0, 0.0);
        o.utilization = None;
        o.min = 2;
        let (_, d) = step(&State::new(), &o, Instant::now(), &Params::default());
        assert_eq!(
            (d.desired, d.bound, d.reason.label()),
            (2, Bound::Min, "bound")
        );
        assert_eq!(d.to_string(), "bound → 2 (min bound, upper 64)");
    }

    #[test]
    fn labels_are_stable() {
        let all = [
            Reason::Utilization {
                u: 0.7,
                target: 0.6,
            },
            Reason::Lag {
                p99: SEC,
                threshold: SEC,
            },
            Reason::Backlog {
                len: 1,
                nonzero_for: SEC,
            },
            Reason::Bound,
            Reason::Deadband {
                u: 0.6,
                target: 0.6,
            },
            Reason::Floor {
                after: 0.7,
                limit: 0.66,
            },
            Reason::Cooldown { wanted: 1 },
            Reason::Hold { u: None },
        ];
        let labels: Vec<_> = all.iter().map(Reason::label).collect();
        assert_eq!(
            labels,
            [
                "utilization",
                "lag",
                "backlog",
                "bound",
                "deadband",
                "floor",
                "cooldown",
                "hold"
            ]
        );
        assert_eq!(Bound::HostCpuSaturated.label(), "host_cpu_saturated");
    }
    #[test]
    fn the_floor_with_one_worker_names_no_infinite_figure() {
        for after in [f64::INFINITY, f64::MAX] {
            let text = Reason::Floor { after, limit: 0.66 }.to_string();
            assert_eq!(text, "floor: the one worker left carries load");
        }
        let text = Reason::Floor {
            after: 0.8,
            limit: 0.66,
        }
        .to_string();
        assert_eq!(text, "floor: one fewer would run at 0.80 > 0.66");
    }

    #[test]
    fn a_crashed_slot_is_not_taken_away_by_a_hold() {
        // Target 2, one worker crashed and waits to restart: the controller holds at the
        // one alive; the target stays 2.
        assert_eq!(next_target(1, 1, 2, 4), 2);
        // Growing from the live count keeps the larger target too.
        assert_eq!(next_target(3, 2, 4, 8), 4);
        // A real decision to shrink below the live workers is applied.
        assert_eq!(next_target(1, 2, 3, 4), 1);
        // Growth beyond the target is applied.
        assert_eq!(next_target(5, 3, 3, 8), 5);
        // The machine bound still caps what is kept.
        assert_eq!(next_target(2, 2, 4, 2), 2);
    }
}
