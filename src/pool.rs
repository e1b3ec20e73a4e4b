//! One app's workers: logical slots, the processes filling them, and the decisions about
//! them — which slot to start, which worker to stop when shrinking, how a rolling reload
//! advances.
//!
//! A *slot* is a small stable number (`PROCESSES_WORKER_ID`) that outlives its workers:
//! when a worker crashes its slot remembers the backoff and is refilled. A *worker* is one
//! process. A slot has at most one `current` worker and, during a reload, one `incoming`
//! replacement; a draining worker belongs to no slot any more.
//!
//! Decisions are pure: [`Pool::plan`] reads the pool and a `now` and returns [`Action`]s;
//! the master carries them out (fork, signal) and records the results with the `on_*`
//! methods. The invariant `plan` keeps: the number of slots equals `target`, every slot is
//! filled or has a restart scheduled or is parked by its restart policy, and nothing is
//! ever spawned while the master is stopping.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use crate::backoff::{Backoff, ExitKind, Restart};
use crate::config::AppSpec;

/// A process the master started, unique for the master's life (pids get reused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkerId(pub u64);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    /// Started, not yet ready: counts in the pool's size, receives no connections unless
    /// it asked for them (a Node worker that has listened).
    Starting,
    Ready,
    /// Asked to stop: receives nothing new, finishing what it has.
    Draining,
}

impl WorkerState {
    pub fn as_str(&self) -> &'static str {
        match self {
            WorkerState::Starting => "starting",
            WorkerState::Ready => "ready",
            WorkerState::Draining => "draining",
        }
    }
}

/// Why the master stopped a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Shutdown,
    ScaleDown,
    /// Replaced by a newer worker in a rolling reload.
    Replaced,
    /// A reload replacement that did not become ready in time.
    ReloadFailed,
    /// `processes restart APP SLOT`.
    Restart,
    /// Its RSS passed the app's memory limit.
    Memory,
    /// Its channel to the master is gone while it still runs: it can take no more
    /// connections. It is replaced with backoff, like a crash.
    ChannelLost,
}

/// How long a worker whose channel closed may take to exit by itself (it usually is
/// exiting) before it counts as broken and is stopped.
pub const CHANNEL_LOST_GRACE: Duration = Duration::from_millis(500);

impl StopReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            StopReason::Shutdown => "shutdown",
            StopReason::ScaleDown => "scale_down",
            StopReason::Replaced => "reload",
            StopReason::ReloadFailed => "reload_failed",
            StopReason::Restart => "restart",
            StopReason::Memory => "memory",
            StopReason::ChannelLost => "channel_lost",
        }
    }
}

/// A worker the master asked to stop.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stopping {
    pub reason: StopReason,
    pub since: Instant,
    /// When the group gets `SIGKILL` if it is still there.
    pub kill_at: Instant,
    /// Whether `SIGTERM` has been sent (Node workers get `disconnect` first).
    pub termed: bool,
    /// Whether `SIGKILL` has been sent.
    pub killed: bool,
}

/// One process, as the pool sees it. Effects (its channel) live in the master.
#[derive(Debug, Clone, PartialEq)]
pub struct Worker {
    pub id: WorkerId,
    pub slot: u32,
    pub pid: i32,
    pub state: WorkerState,
    pub started: Instant,
    pub ready_at: Option<Instant>,
    pub stopping: Option<Stopping>,
    /// Which reload generation of the app's spec it runs.
    pub generation: u64,
    /// The latest busy fraction sampled for it, if any; used to pick whom to stop.
    pub busy: Option<f64>,
    /// A Node worker that has asked for a listening handle but not yet said `listening`:
    /// the `ready_after` timer must not declare it ready early.
    pub listen_pending: bool,
    /// When its channel closed while it still needed it (pass mode, Node).
    pub channel_lost: Option<Instant>,
}

impl Worker {
    pub fn uptime(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.started)
    }
}

/// A logical worker position.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Slot {
    pub current: Option<WorkerId>,
    /// A reload replacement starting for this slot.
    pub incoming: Option<WorkerId>,
    pub backoff: Backoff,
    /// When the slot is started again after a crash.
    pub restart_at: Option<Instant>,
    /// The restart policy keeps this slot down (`never`, or `on-failure` after a clean
    /// exit). It still counts in the pool's size.
    pub parked: Option<ExitKind>,
    /// Times a new worker took this slot over from an earlier one (PM2's `↺`): after a
    /// crash or exit, a `processes restart`, a memory limit, or a reload that replaced
    /// it. A reload replacement that never became ready does not count: the old worker
    /// kept running.
    pub restarts: u32,
    /// A worker has run in this slot (the next one to take it is a restart).
    pub filled: bool,
    /// Start a replacement for the current worker, and stop the old one for this reason
    /// once the new one is ready (memory limit).
    pub replace: Option<StopReason>,
    /// A Node worker in this slot said `listening`: the slot serves, so the next worker in
    /// it is ready once it listens, not when `ready_after` has passed (a replacement still
    /// starting up must not take over from one that serves). A slot whose worker never
    /// listened (a worker with a job of its own) keeps `ready_after`.
    pub listened: bool,
}

impl Slot {
    /// A worker takes this slot as its running one: a restart, unless it is the first.
    fn taken_over(&mut self) {
        if self.filled {
            self.restarts += 1;
        }
        self.filled = true;
    }
}

/// A rolling reload in progress.
#[derive(Debug, Clone, PartialEq)]
pub struct Reload {
    /// Slots still to replace, in order.
    pub pending: VecDeque<u32>,
    /// Slots whose replacement is starting now.
    pub active: BTreeSet<u32>,
    pub batch: usize,
    pub timeout: Duration,
    pub started: Instant,
    /// When the current batch began (its replacements time out from here).
    pub batch_started: Instant,
    pub replaced: usize,
    pub total: usize,
    /// The spec to go back to if the reload fails.
    pub previous: Option<Box<AppSpec>>,
}

/// How a reload ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    Done { replaced: usize },
    Failed { replaced: usize, why: String },
}

/// What an exit meant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ExitOutcome {
    /// The master had asked it to stop.
    Asked(StopReason),
    /// It exited unasked; the slot's restart decision.
    Crashed(Restart),
    /// A reload replacement died before it was ready: the reload has failed.
    ReplacementDied { slot: u32 },
}

/// What the master should do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Start a worker in this slot (as the slot's replacement when `incoming`).
    Spawn { slot: u32, incoming: bool },
    /// Ask this worker to stop.
    Stop {
        worker: WorkerId,
        reason: StopReason,
    },
    /// Mark this worker ready (its `ready_after` passed).
    MarkReady { worker: WorkerId },
    /// The reload finished or failed.
    ReloadEnded(ReloadOutcome),
}

/// One app's pool.
#[derive(Debug, Clone)]
pub struct Pool {
    pub spec: AppSpec,
    /// Incremented by each reload; new workers run this generation.
    pub generation: u64,
    /// How many slots the pool should have.
    pub target: usize,
    pub slots: BTreeMap<u32, Slot>,
    pub workers: BTreeMap<WorkerId, Worker>,
    pub reload: Option<Reload>,
    /// No new workers: the master is stopping.
    pub stopping: bool,
}

impl Pool {
    pub fn new(spec: AppSpec) -> Pool {
        let target = spec.sizing.initial();
        Pool {
            spec,
            generation: 0,
            target,
            slots: BTreeMap::new(),
            workers: BTreeMap::new(),
            reload: None,
            stopping: false,
        }
    }

    /// Workers that count in the pool's size: starting or ready, not draining.
    pub fn size(&self) -> usize {
        self.workers
            .values()
            .filter(|w| w.state != WorkerState::Draining)
            .count()
    }

    /// Slots with a worker alive (starting or ready). A slot whose worker is being
    /// replaced (a reload, a memory limit) has two for a while and counts once: the
    /// controller sizes the pool in slots, and a reload is not load.
    pub fn live_slots(&self) -> usize {
        self.slots
            .values()
            .filter(|s| s.current.is_some() || s.incoming.is_some())
            .count()
    }

    pub fn ready(&self) -> usize {
        self.workers
            .values()
            .filter(|w| w.state == WorkerState::Ready)
            .count()
    }

    /// Slots that will never run again by themselves: parked by the restart policy.
    pub fn all_parked(&self) -> bool {
        !self.slots.is_empty()
            && self.slots.values().all(|s| s.parked.is_some())
            && self.workers.is_empty()
    }

    /// Sets the target inside the hand-scaling bounds; returns the value in force.
    pub fn set_target(&mut self, n: usize) -> usize {
        let (lo, hi) = self.spec.sizing.bounds();
        self.target = n.clamp(lo, hi);
        self.target
    }

    /// The decisions due at `now`. Pure: reads `self`, changes nothing.
    pub fn plan(&self, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        if self.stopping {
            return actions;
        }

        // Workers whose ready_after has passed without a better signal.
        for w in self.workers.values() {
            if w.state == WorkerState::Starting
                && !self.waits_for_listening(w)
                && w.uptime(now) >= self.spec.ready_after
            {
                actions.push(Action::MarkReady { worker: w.id });
            }
        }

        // Workers that lost their channel and did not exit by themselves.
        for w in self.workers.values() {
            if w.stopping.is_none()
                && w.channel_lost
                    .is_some_and(|t| now >= t + CHANNEL_LOST_GRACE)
            {
                actions.push(Action::Stop {
                    worker: w.id,
                    reason: StopReason::ChannelLost,
                });
            }
        }

        // Shrink: remove surplus slots, cheapest first.
        if self.slots.len() > self.target {
            let surplus = self.slots.len() - self.target;
            for slot in self.shrink_order().into_iter().take(surplus) {
                let s = &self.slots[&slot];
                for id in s.current.iter().chain(s.incoming.iter()) {
                    actions.push(Action::Stop {
                        worker: *id,
                        reason: StopReason::ScaleDown,
                    });
                }
            }
            // The slots themselves are removed by `on_stop_sent`/`remove_empty_slots`.
        }

        // Grow: new slots at the lowest free numbers.
        let mut free = (0u32..).filter(|n| !self.slots.contains_key(n));
        for _ in self.slots.len()..self.target {
            let slot = free.next().expect("u32 slots never run out");
            actions.push(Action::Spawn {
                slot,
                incoming: false,
            });
        }

        // Replacements asked for outside a reload (a worker past its memory limit).
        for (&n, s) in &self.slots {
            if s.replace.is_some() && s.current.is_some() && s.incoming.is_none() {
                actions.push(Action::Spawn {
                    slot: n,
                    incoming: true,
                });
            }
        }

        // Fill empty slots whose restart is due (or that never started).
        for (&n, s) in &self.slots {
            if s.current.is_none() && s.incoming.is_none() && s.parked.is_none() {
                let due = s.restart_at.is_none_or(|t| t <= now);
                if due && n < u32::MAX && !self.is_surplus(n) {
                    actions.push(Action::Spawn {
                        slot: n,
                        incoming: false,
                    });
                }
            }
        }

        self.plan_reload(now, &mut actions);
        actions
    }

    fn is_surplus(&self, slot: u32) -> bool {
        if self.slots.len() <= self.target {
            return false;
        }
        let surplus = self.slots.len() - self.target;
        self.shrink_order()
            .into_iter()
            .take(surplus)
            .any(|s| s == slot)
    }

    /// Slots in the order they should go when the pool shrinks. A fixed-size pool (`-i N`,
    /// `processes scale APP N`) loses its highest slot numbers, so its slots stay `0…N−1`
    /// for apps that give slot 0 a job of its own. An autoscaled pool loses what costs
    /// least: empty slots first (nothing to stop), then slots whose worker is still
    /// starting, then ready workers from the most idle; ties go to the highest slot number.
    pub fn shrink_order(&self) -> Vec<u32> {
        if matches!(self.spec.sizing, crate::config::Sizing::Fixed(_)) {
            return self.slots.keys().rev().copied().collect();
        }
        let mut order: Vec<(u8, i64, std::cmp::Reverse<u32>)> = self
            .slots
            .iter()
            .map(|(&n, s)| {
                let w = s.current.and_then(|id| self.workers.get(&id));
                let (class, busy) = match w {
                    None => (0, 0),
                    Some(w) if w.state == WorkerState::Starting => (1, 0),
                    Some(w) => (2, (w.busy.unwrap_or(0.0) * 1e6) as i64),
                };
                (class, busy, std::cmp::Reverse(n))
            })
            .collect();
        order.sort();
        order
            .into_iter()
            .map(|(_, _, std::cmp::Reverse(n))| n)
            .collect()
    }

    fn plan_reload(&self, now: Instant, actions: &mut Vec<Action>) {
        let Some(r) = &self.reload else { return };
        // A batch in flight: promote replacements that are ready, fail on timeout.
        for &slot in &r.active {
            let Some(s) = self.slots.get(&slot) else {
                continue;
            };
            let Some(inc) = s.incoming.and_then(|id| self.workers.get(&id)) else {
                continue;
            };
            if inc.state == WorkerState::Starting
                && now.saturating_duration_since(r.batch_started) >= r.timeout
            {
                actions.push(Action::Stop {
                    worker: inc.id,
                    reason: StopReason::ReloadFailed,
                });
                actions.push(Action::ReloadEnded(ReloadOutcome::Failed {
                    replaced: r.replaced,
                    why: format!(
                        "the replacement for slot {slot} was not ready within {}",
                        crate::human::duration(r.timeout)
                    ),
                }));
                return;
            }
        }
        if !r.active.is_empty() {
            return;
        }
        // Start the next batch: only slots that have a running worker need a replacement
        // (an empty slot picks up the new spec when it restarts).
        let mut started = 0;
        for &slot in &r.pending {
            if started == r.batch {
                break;
            }
            if let Some(s) = self.slots.get(&slot)
                && s.current.is_some()
                && s.incoming.is_none()
            {
                actions.push(Action::Spawn {
                    slot,
                    incoming: true,
                });
                started += 1;
            }
        }
        if started == 0 {
            actions.push(Action::ReloadEnded(ReloadOutcome::Done {
                replaced: r.replaced,
            }));
        }
    }

    /// Begins a rolling reload of every slot. Returns false if one is already running.
    /// `processes start`: a stopped app runs again, and slots that wait — backing off after
    /// crashes, or kept down by the restart policy — start now with their crash history
    /// cleared (the user has presumably fixed what made them crash). Returns how many
    /// slots start now.
    pub fn start_now(&mut self) -> usize {
        self.stopping = false;
        self.restart_waiting_slots()
    }

    /// Slots with no worker (backing off, crash-looping, or parked by the restart policy)
    /// start at the next plan, with a clean crash history. Returns how many.
    pub fn restart_waiting_slots(&mut self) -> usize {
        let mut n = 0;
        for s in self.slots.values_mut() {
            if s.current.is_none() && s.incoming.is_none() {
                s.restart_at = None;
                s.parked = None;
                s.backoff = crate::backoff::Backoff::default();
                n += 1;
            }
        }
        n
    }

    pub fn start_reload(
        &mut self,
        new_spec: Option<AppSpec>,
        batch: usize,
        timeout: Duration,
        now: Instant,
    ) -> bool {
        if self.reload.is_some() || self.stopping {
            return false;
        }
        let previous = new_spec.map(|spec| Box::new(std::mem::replace(&mut self.spec, spec)));
        self.generation += 1;
        let pending: VecDeque<u32> = self.slots.keys().copied().collect();
        let total = pending
            .iter()
            .filter(|n| self.slots[n].current.is_some())
            .count();
        self.reload = Some(Reload {
            pending,
            active: BTreeSet::new(),
            batch: batch.max(1),
            timeout,
            started: now,
            batch_started: now,
            replaced: 0,
            total,
            previous,
        });
        true
    }

    /// Records a spawned worker in its slot.
    pub fn on_spawned(&mut self, slot: u32, incoming: bool, id: WorkerId, pid: i32, now: Instant) {
        let generation = self.generation;
        let s = self.slots.entry(slot).or_default();
        s.restart_at = None;
        if incoming {
            s.incoming = Some(id);
            if let Some(r) = self.reload.as_mut() {
                r.pending.retain(|&p| p != slot);
                if r.active.is_empty() {
                    r.batch_started = now;
                }
                r.active.insert(slot);
            }
        } else {
            // A replacement counts once it takes over (`on_ready`); this one takes an
            // empty slot now.
            s.taken_over();
            s.current = Some(id);
        }
        self.workers.insert(
            id,
            Worker {
                id,
                slot,
                pid,
                state: WorkerState::Starting,
                started: now,
                ready_at: None,
                stopping: None,
                generation,
                busy: None,
                listen_pending: false,
                channel_lost: None,
            },
        );
    }

    /// A spawn failed: the slot backs off as if the worker had crashed at once.
    pub fn on_spawn_failed(
        &mut self,
        slot: u32,
        incoming: bool,
        now: Instant,
        jitter: f64,
    ) -> Restart {
        if incoming {
            return Restart::No;
        }
        let (params, policy) = (self.spec.backoff, self.spec.restart);
        let s = self.slots.entry(slot).or_default();
        let r = s.backoff.on_unasked_exit(
            &params,
            policy,
            ExitKind::Code(127),
            Duration::ZERO,
            now,
            jitter,
        );
        apply_restart(s, r, ExitKind::Code(127), now);
        r
    }

    /// A starting worker that `ready_after` does not make ready: it asked for a listener
    /// and has not said `listening` yet, or it is a Node reload replacement in a slot whose
    /// earlier worker listened. (A reload gives up on a replacement after its timeout; a
    /// crash restart or a `restart`/`max_memory` replacement has none, so `ready_after`
    /// still applies to them.)
    fn waits_for_listening(&self, w: &Worker) -> bool {
        w.listen_pending
            || (self.spec.runtime == crate::config::Runtime::Node
                && self.reload.is_some()
                && self
                    .slots
                    .get(&w.slot)
                    .is_some_and(|s| s.listened && s.incoming == Some(w.id)))
    }

    /// Marks a worker ready. Returns the worker it replaces and why, if it was a
    /// replacement (the caller stops that one).
    pub fn on_ready(&mut self, id: WorkerId, now: Instant) -> Option<(WorkerId, StopReason)> {
        let w = self.workers.get_mut(&id)?;
        if w.state != WorkerState::Starting {
            return None;
        }
        w.state = WorkerState::Ready;
        w.ready_at = Some(now);
        w.listen_pending = false;
        let slot = w.slot;
        let s = self.slots.get_mut(&slot)?;
        if s.incoming != Some(id) {
            return None;
        }
        let old = s.current.replace(id);
        s.incoming = None;
        s.taken_over();
        let reason = s.replace.take().unwrap_or(StopReason::Replaced);
        if reason == StopReason::Replaced
            && let Some(r) = self.reload.as_mut()
        {
            r.active.remove(&slot);
            r.replaced += 1;
        }
        old.map(|o| (o, reason))
    }

    /// Asks for a replacement of a worker (memory limit, `processes restart`): the new one
    /// starts first, the old one drains when it is ready. Returns false if the slot is
    /// already being replaced (or the worker is not its slot's current one).
    pub fn replace_slot(&mut self, id: WorkerId, reason: StopReason) -> bool {
        let Some(slot) = self.workers.get(&id).map(|w| w.slot) else {
            return false;
        };
        let reloading = self
            .reload
            .as_ref()
            .is_some_and(|r| r.active.contains(&slot));
        match self.slots.get_mut(&slot) {
            Some(s)
                if s.current == Some(id)
                    && s.incoming.is_none()
                    && s.replace.is_none()
                    && !reloading =>
            {
                s.replace = Some(reason);
                true
            }
            _ => false,
        }
    }

    /// Marks a worker as asked to stop and detaches it from its slot. Slots beyond the
    /// target that are left empty are removed. `jitter` (a uniform draw in `[0, 1)`)
    /// spreads the restart of a slot that backs off because of this stop.
    pub fn on_stop_sent(&mut self, id: WorkerId, stopping: Stopping, jitter: f64) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        w.state = WorkerState::Draining;
        w.stopping = Some(stopping);
        let (slot, started) = (w.slot, w.started);
        if let Some(s) = self.slots.get_mut(&slot) {
            if s.current == Some(id) {
                s.current = None;
            }
            if s.incoming == Some(id) {
                s.incoming = None;
                if let Some(r) = self.reload.as_mut() {
                    r.active.remove(&slot);
                }
            }
            if stopping.reason == StopReason::ScaleDown {
                self.slots.remove(&slot);
            } else if matches!(stopping.reason, StopReason::Restart | StopReason::Memory) {
                // Refilled at once by the next plan, without backoff.
                s.restart_at = None;
            } else if stopping.reason == StopReason::ChannelLost {
                // A broken worker: its slot backs off as after a crash, so a worker that
                // drops its channel at every start does not spin.
                let (params, policy) = (self.spec.backoff, self.spec.restart);
                let uptime = stopping.since.saturating_duration_since(started);
                let r = s.backoff.on_unasked_exit(
                    &params,
                    policy,
                    ExitKind::Code(-1),
                    uptime,
                    stopping.since,
                    jitter,
                );
                apply_restart(s, r, ExitKind::Code(-1), stopping.since);
            }
        }
        self.remove_surplus_empty_slots();
    }

    fn remove_surplus_empty_slots(&mut self) {
        while self.slots.len() > self.target {
            // Only slots chosen to go: an empty slot that stays (a crash's restart pending)
            // is not removed in place of one that is still draining.
            let surplus = self.slots.len() - self.target;
            let Some(victim) = self.shrink_order().into_iter().take(surplus).find(|n| {
                let s = &self.slots[n];
                s.current.is_none() && s.incoming.is_none()
            }) else {
                break;
            };
            self.slots.remove(&victim);
        }
    }

    /// Records an exit and says what it meant. `None` for a worker the pool does not know.
    pub fn on_exit(
        &mut self,
        id: WorkerId,
        exit: ExitKind,
        now: Instant,
        jitter: f64,
    ) -> Option<ExitOutcome> {
        let w = self.workers.remove(&id)?;
        if let Some(st) = w.stopping {
            return Some(ExitOutcome::Asked(st.reason));
        }
        let (params, policy) = (self.spec.backoff, self.spec.restart);
        let Some(s) = self.slots.get_mut(&w.slot) else {
            return Some(ExitOutcome::Crashed(Restart::No));
        };
        if s.incoming == Some(id) {
            // A replacement died before it was ready: the old worker stays (and a reload
            // fails). No backoff for the slot, whose worker is fine.
            s.incoming = None;
            if s.replace.take().is_some() {
                return Some(ExitOutcome::Crashed(Restart::No));
            }
            if let Some(r) = self.reload.as_mut() {
                r.active.remove(&w.slot);
            }
            return Some(ExitOutcome::ReplacementDied { slot: w.slot });
        }
        if s.current == Some(id) {
            s.current = None;
        }
        let r = s
            .backoff
            .on_unasked_exit(&params, policy, exit, w.uptime(now), now, jitter);
        apply_restart(s, r, exit, now);
        Some(ExitOutcome::Crashed(r))
    }

    /// Ends the reload; on failure the previous spec is restored.
    pub fn end_reload(&mut self, ok: bool) -> Option<Reload> {
        let mut r = self.reload.take()?;
        if !ok && let Some(prev) = r.previous.take() {
            self.spec = *prev;
        }
        Some(r)
    }

    /// Lets healthy workers clear their slot's crash history.
    pub fn note_uptimes(&mut self, now: Instant) {
        let params = self.spec.backoff;
        for s in self.slots.values_mut() {
            if let Some(w) = s.current.and_then(|id| self.workers.get(&id)) {
                s.backoff.on_uptime(&params, w.uptime(now));
            }
        }
    }

    /// The earliest instant at which `plan` may have something new to say.
    pub fn next_deadline(&self) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        for s in self.slots.values() {
            if let Some(t) = s.restart_at {
                consider(t);
            }
        }
        for w in self.workers.values() {
            if w.state == WorkerState::Starting && !self.waits_for_listening(w) {
                consider(w.started + self.spec.ready_after);
            }
            if w.stopping.is_none()
                && let Some(t) = w.channel_lost
            {
                consider(t + CHANNEL_LOST_GRACE);
            }
            if let Some(st) = w.stopping
                && !st.killed
            {
                consider(st.kill_at);
            }
            if w.state != WorkerState::Draining {
                // Crash history clears after a healthy run.
                let reset = w.started + self.spec.backoff.reset_after;
                if self
                    .slots
                    .get(&w.slot)
                    .is_some_and(|s| s.backoff.consecutive > 0)
                {
                    consider(reset);
                }
            }
        }
        if let Some(r) = &self.reload
            && !r.active.is_empty()
        {
            consider(r.batch_started + r.timeout);
        }
        next
    }
}

fn apply_restart(s: &mut Slot, r: Restart, exit: ExitKind, now: Instant) {
    match r {
        Restart::After { delay, .. } => {
            s.restart_at = Some(now + delay);
            s.parked = None;
        }
        Restart::No => {
            s.restart_at = None;
            s.parked = Some(exit);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BackoffParams, Dispatch, RestartPolicy, Runtime, Sizing};

    fn spec(sizing: Sizing) -> AppSpec {
        AppSpec {
            name: crate::config::AppName::parse("t").unwrap(),
            command: vec!["true".into()],
            cwd: None,
            env: Default::default(),
            sizing,
            listen: vec![],
            grace: Duration::from_secs(10),
            restart: RestartPolicy::Always,
            backoff: BackoffParams::default(),
            ready_after: Duration::from_secs(1),
            dispatch: Some(Dispatch::Shared),
            runtime: Runtime::Generic,
            preload: false,
            tuning: Default::default(),
            max_memory: None,
            kill_memory: None,
            inherit_env: Default::default(),
            user: None,
        }
    }

    /// Carries out a plan the way the master would, with fake pids.
    fn apply(pool: &mut Pool, now: Instant, next_id: &mut u64) -> Vec<Action> {
        let actions = pool.plan(now);
        for a in &actions {
            match *a {
                Action::Spawn { slot, incoming } => {
                    *next_id += 1;
                    pool.on_spawned(
                        slot,
                        incoming,
                        WorkerId(*next_id),
                        1000 + *next_id as i32,
                        now,
                    );
                }
                Action::Stop { worker, reason } => pool.on_stop_sent(
                    worker,
                    Stopping {
                        reason,
                        since: now,
                        kill_at: now + Duration::from_secs(10),
                        termed: true,
                        killed: false,
                    },
                    0.5,
                ),
                Action::MarkReady { worker } => {
                    if let Some((old, _)) = pool.on_ready(worker, now) {
                        pool.on_stop_sent(
                            old,
                            Stopping {
                                reason: StopReason::Replaced,
                                since: now,
                                kill_at: now + Duration::from_secs(10),
                                termed: true,
                                killed: false,
                            },
                            0.5,
                        );
                    }
                }
                Action::ReloadEnded(ref o) => {
                    pool.end_reload(matches!(o, ReloadOutcome::Done { .. }));
                }
            }
        }
        actions
    }

    fn spawns(actions: &[Action]) -> Vec<u32> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Spawn { slot, .. } => Some(*slot),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn starts_the_initial_size_in_slots_from_zero() {
        let mut p = Pool::new(spec(Sizing::Fixed(3)));
        let t0 = Instant::now();
        let mut id = 0;
        assert_eq!(spawns(&apply(&mut p, t0, &mut id)), vec![0, 1, 2]);
        assert!(
            apply(&mut p, t0, &mut id).is_empty(),
            "a settled pool plans nothing"
        );
        assert_eq!(p.size(), 3);
    }

    #[test]
    fn a_crashed_slot_restarts_after_its_backoff_not_before() {
        let mut p = Pool::new(spec(Sizing::Fixed(2)));
        let t0 = Instant::now();
        let mut id = 0;
        apply(&mut p, t0, &mut id);
        let victim = p.slots[&1].current.unwrap();
        let r = p.on_exit(victim, ExitKind::Signal(9), t0, 0.0).unwrap();
        assert!(matches!(
            r,
            ExitOutcome::Crashed(Restart::After { attempt: 1, .. })
        ));
        assert!(spawns(&apply(&mut p, t0 + Duration::from_millis(10), &mut id)).is_empty());
        assert_eq!(
            spawns(&apply(&mut p, t0 + Duration::from_millis(50), &mut id)),
            vec![1]
        );
        assert_eq!(p.slots[&1].restarts, 1);
    }

    #[test]
    fn never_policy_parks_the_slot_and_the_pool_reports_it() {
        let mut s = spec(Sizing::Fixed(1));
        s.restart = RestartPolicy::Never;
        let mut p = Pool::new(s);
        let t0 = Instant::now();
        let mut id = 0;
        apply(&mut p, t0, &mut id);
        let w = p.slots[&0].current.unwrap();
        assert_eq!(
            p.on_exit(w, ExitKind::Code(0), t0, 0.5),
            Some(ExitOutcome::Crashed(Restart::No))
        );
        assert!(spawns(&apply(&mut p, t0 + Duration::from_secs(60), &mut id)).is_empty());
        assert!(p.all_parked());
    }

    #[test]
    fn shrinking_stops_starting_workers_before_ready_ones_and_the_most_idle_first() {
        let mut p = Pool::new(spec(Sizing::Auto { min: 1, max: 8 }));
        p.set_target(4);
        let t0 = Instant::now();
        let mut id = 0;
        apply(&mut p, t0, &mut id);
        // Slots 0..3 become ready with different loads; slot 3 restarts and is starting.
        ready_with_loads(&mut p, t0, &[(0, 0.9), (1, 0.1), (2, 0.5)]);
        assert_eq!(p.shrink_order(), vec![3, 1, 2, 0]);
        p.set_target(2);
        let stopped = stopped_slots(&mut p, t0, &mut id);
        assert_eq!(stopped, vec![3, 1]);
        assert_eq!(p.slots.len(), 2);
        assert_eq!(p.size(), 2);
        assert!(apply(&mut p, t0, &mut id).is_empty());
    }

    #[test]
    fn a_fixed_size_pool_shrinks_from_its_highest_slots_whatever_their_load() {
        let mut p = Pool::new(spec(Sizing::Fixed(4)));
        let t0 = Instant::now();
        let mut id = 0;
        apply(&mut p, t0, &mut id);
        // Slot 0 is the least busy and slot 1 waits out a crash: under autoscaling they
        // would go first. A fixed size keeps its slots 0…N−1 (PROCESSES_WORKER_ID).
        ready_with_loads(&mut p, t0, &[(0, 0.0), (2, 0.5), (3, 0.9)]);
        let w1 = p.slots[&1].current.unwrap();
        p.on_exit(w1, ExitKind::Code(1), t0, 0.5);
        assert_eq!(p.shrink_order(), vec![3, 2, 1, 0]);
        p.set_target(2);
        let stopped = stopped_slots(&mut p, t0, &mut id);
        assert_eq!(stopped, vec![3, 2]);
        assert_eq!(p.slots.keys().copied().collect::<Vec<_>>(), vec![0, 1]);
    }

    #[test]
    fn growing_fills_the_lowest_free_slot_numbers() {
        let mut p = Pool::new(spec(Sizing::Fixed(3)));
        let t0 = Instant::now();
        let mut id = 0;
        apply(&mut p, t0, &mut id);
        p.set_target(2);
        apply(&mut p, t0, &mut id);
        let left: Vec<u32> = p.slots.keys().copied().collect();
        p.set_target(3);
        let added = spawns(&apply(&mut p, t0, &mut id));
        assert_eq!(added.len(), 1);
        assert!(!left.contains(&added[0]));
        assert_eq!(p.slots.len(), 3);
    }

    #[test]
    fn hand_scaling_stays_inside_autoscale_bounds() {
        let mut p = Pool::new(spec(Sizing::Auto { min: 2, max: 3 }));
        assert_eq!(p.target, 2);
        assert_eq!(p.set_target(1), 2);
        assert_eq!(p.set_target(9), 3);
    }

    #[test]
    fn a_reload_replacement_in_a_slot_that_listened_waits_for_listening() {
        let mut node = spec(Sizing::Fixed(1));
        node.runtime = crate::config::Runtime::Node;
        let (mut p, t0, _, _) = reloading_one(node);
        assert!(p.slots[&0].incoming.is_some());
        let later = t0 + p.spec.ready_after;
        // The old worker never listened (a worker with a job of its own): ready_after.
        assert!(marks_ready(&p.plan(later)));
        p.slots.get_mut(&0).unwrap().listened = true;
        assert!(!marks_ready(&p.plan(later)));
        // A generic app's workers have no `listening` to wait for.
        p.spec.runtime = crate::config::Runtime::Generic;
        assert!(marks_ready(&p.plan(later)));
        // Outside a reload (a crash restart, a `restart`), ready_after still applies.
        p.spec.runtime = crate::config::Runtime::Node;
        p.reload = None;
        assert!(marks_ready(&p.plan(later)));
    }

    /// A pool of one ready worker whose reload has started its replacement: the pool,
    /// the time it all happened, the next worker id and the old worker.
    fn reloading_one(s: AppSpec) -> (Pool, Instant, u64, WorkerId) {
        let mut p = Pool::new(s);
        let t0 = Instant::now();
        let mut id = 0;
        apply(&mut p, t0, &mut id);
        let old = p.slots[&0].current.unwrap();
        p.on_ready(old, t0);
        p.start_reload(None, 1, Duration::from_secs(30), t0);
        apply(&mut p, t0, &mut id);
        (p, t0, id, old)
    }

    /// The workers in these slots become ready, each with its busy fraction.
    fn ready_with_loads(p: &mut Pool, t0: Instant, loads: &[(u32, f64)]) {
        for &(slot, busy) in loads {
            let w = p.slots[&slot].current.unwrap();
            p.on_ready(w, t0);
            p.workers.get_mut(&w).unwrap().busy = Some(busy);
        }
    }

    /// Applies a plan; the slots of the workers it stopped.
    fn stopped_slots(p: &mut Pool, t0: Instant, id: &mut u64) -> Vec<u32> {
        apply(p, t0, id)
            .into_iter()
            .filter_map(|a| match a {
                Action::Stop { worker, .. } => Some(p.workers[&worker].slot),
                _ => None,
            })
            .collect()
    }

    fn marks_ready(actions: &[Action]) -> bool {
        actions
            .iter()
            .any(|a| matches!(a, Action::MarkReady { .. }))
    }

    #[test]
    fn ready_after_marks_workers_ready_unless_a_listen_is_pending() {
        let mut p = Pool::new(spec(Sizing::Fixed(2)));
        let t0 = Instant::now();
        let mut id = 0;
        apply(&mut p, t0, &mut id);
        let pending = p.slots[&1].current.unwrap();
        p.workers.get_mut(&pending).unwrap().listen_pending = true;
        apply(&mut p, t0 + Duration::from_secs(1), &mut id);
        assert_eq!(p.ready(), 1);
        assert_eq!(p.workers[&pending].state, WorkerState::Starting);
    }

    #[test]
    fn a_rolling_reload_replaces_one_batch_at_a_time_and_stops_old_only_when_new_is_ready() {
        let mut p = Pool::new(spec(Sizing::Fixed(3)));
        let t0 = Instant::now();
        let mut id = 0;
        apply(&mut p, t0, &mut id);
        apply(&mut p, t0 + Duration::from_secs(1), &mut id); // all ready
        let old: Vec<WorkerId> = p.slots.values().map(|s| s.current.unwrap()).collect();
        assert!(p.start_reload(
            None,
            1,
            Duration::from_secs(30),
            t0 + Duration::from_secs(2)
        ));
        let t = t0 + Duration::from_secs(2);
        let a = apply(&mut p, t, &mut id);
        assert_eq!(
            a,
            vec![Action::Spawn {
                slot: 0,
                incoming: true
            }]
        );
        assert_eq!(p.size(), 4, "the replacement runs beside the old worker");
        // Nothing more until the replacement is ready.
        assert!(apply(&mut p, t + Duration::from_millis(500), &mut id).is_empty());
        // Ready: old slot-0 worker drains, then (the master plans again at once) slot 1's
        // replacement starts.
        let mut a = apply(&mut p, t + Duration::from_secs(1), &mut id);
        a.extend(apply(&mut p, t + Duration::from_secs(1), &mut id));
        assert!(
            a.contains(&Action::Spawn {
                slot: 1,
                incoming: true
            }),
            "{a:?}"
        );
        assert_eq!(p.workers[&old[0]].state, WorkerState::Draining);
        let mut t = t + Duration::from_secs(1);
        for _ in 0..4 {
            t += Duration::from_secs(1);
            apply(&mut p, t, &mut id);
        }
        assert!(p.reload.is_none(), "reload finished");
        assert!(
            old.iter()
                .all(|o| p.workers[o].state == WorkerState::Draining)
        );
        assert_eq!(p.size(), 3);
        assert!(
            p.slots
                .values()
                .all(|s| s.current.is_some() && s.incoming.is_none())
        );
        assert!(
            p.workers
                .values()
                .filter(|w| w.state != WorkerState::Draining)
                .all(|w| w.generation == 1)
        );
        // Each slot's process was replaced once: one restart each, as PM2 counts a reload.
        assert!(p.slots.values().all(|s| s.restarts == 1), "{:?}", p.slots);
    }

    #[test]
    fn a_reload_whose_replacement_dies_keeps_the_old_workers() {
        let mut p = Pool::new(spec(Sizing::Fixed(2)));
        let t0 = Instant::now();
        let mut id = 0;
        apply(&mut p, t0, &mut id);
        apply(&mut p, t0 + Duration::from_secs(1), &mut id);
        let old = p.slots[&0].current.unwrap();
        let mut new_spec = spec(Sizing::Fixed(2));
        new_spec.command = vec!["false".into()];
        p.start_reload(Some(new_spec), 1, Duration::from_secs(30), t0);
        apply(&mut p, t0 + Duration::from_secs(2), &mut id);
        let inc = p.slots[&0].incoming.unwrap();
        assert_eq!(
            p.on_exit(inc, ExitKind::Code(1), t0 + Duration::from_secs(2), 0.5),
            Some(ExitOutcome::ReplacementDied { slot: 0 })
        );
        p.end_reload(false);
        assert_eq!(p.slots[&0].current, Some(old));
        assert_eq!(
            p.spec.command,
            vec!["true".to_string()],
            "old spec restored"
        );
        assert_eq!(p.workers[&old].state, WorkerState::Ready);
        // The slot's worker was never replaced: a failed reload is not a restart.
        assert_eq!(p.slots[&0].restarts, 0);
    }

    #[test]
    fn a_reload_times_out_when_the_replacement_never_gets_ready() {
        let mut s = spec(Sizing::Fixed(1));
        s.ready_after = Duration::from_secs(3600);
        let (mut p, t0, mut id, old) = reloading_one(s);
        let a = apply(&mut p, t0 + Duration::from_secs(31), &mut id);
        assert!(
            a.iter()
                .any(|a| matches!(a, Action::ReloadEnded(ReloadOutcome::Failed { .. }))),
            "{a:?}"
        );
        assert_eq!(p.slots[&0].current, Some(old));
        assert!(p.reload.is_none());
        assert_eq!(p.slots[&0].restarts, 0, "a failed reload is not a restart");
    }

    #[test]
    fn nothing_spawns_while_stopping() {
        let mut p = Pool::new(spec(Sizing::Fixed(2)));
        p.stopping = true;
        assert!(p.plan(Instant::now()).is_empty());
    }
}
