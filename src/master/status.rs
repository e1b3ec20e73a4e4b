//! Control requests: status, scale, reload, restart, stop — and the status JSON.

use std::time::Instant;

use serde_json::Value;
use tracing::info;

use super::*;

/// A client waiting for reloads to end.
pub struct ReloadWaiter {
    pending: std::collections::BTreeSet<usize>,
    failures: Vec<String>,
    replaced: usize,
    responder: control::Responder,
}

impl Master {
    // ---- control ------------------------------------------------------------------------

    pub(super) fn on_control(&mut self, req: Request, responder: control::Responder) {
        let now = Instant::now();
        let reply = match req {
            Request::Status { app } => self.status(app.as_deref(), now),
            Request::Scale { app, n, min, max } => self.scale_request(&app, n, min, max),
            Request::Reload { app, batch } => {
                let mut sync_failures = Vec::new();
                let targets: Vec<usize> = match &app {
                    Some(a) => match self.find_app(a) {
                        Some(i) => vec![i],
                        None => return responder.reply(Reply::error(format!("no app named {a}"))),
                    },
                    None => {
                        // The whole config: apps new in the file start, apps gone stop;
                        // those just started need no reload.
                        let synced = self.sync_apps_with_file(now);
                        for line in &synced.lines {
                            responder.progress(line.clone());
                        }
                        sync_failures = synced.failures;
                        (0..self.pools.len())
                            .filter(|i| !synced.started.contains(i))
                            .collect()
                    }
                };
                // A stopped app is not reloaded: `processes start` runs it again.
                if let [i] = targets[..]
                    && self.pools[i].stopping
                {
                    return responder.reply(Reply::error(self.why_stopped(i)));
                }
                let targets: Vec<usize> = targets
                    .into_iter()
                    .filter(|&i| !self.pools[i].stopping)
                    .collect();
                // An app already reloading (a config file change, another client) is not
                // reloaded twice: this client waits for that reload's outcome instead.
                let (running, idle): (Vec<usize>, Vec<usize>) = targets
                    .into_iter()
                    .partition(|&i| self.pools[i].reload.is_some());
                for &i in &running {
                    responder.progress(format!(
                        "{}: a reload is already running; waiting for it",
                        self.pools[i].spec.name
                    ));
                }
                let started = if idle.is_empty() {
                    Ok(Vec::new())
                } else {
                    self.reload_apps(&idle, batch.unwrap_or(1).max(1))
                };
                match started.map(|s| (s, running)) {
                    Err(e) => Reply::error(e),
                    Ok((started, running)) if started.is_empty() && running.is_empty() => {
                        if sync_failures.is_empty() {
                            Reply::ok(serde_json::json!({"replaced": 0}))
                        } else {
                            Reply::error(sync_failures.join("; "))
                        }
                    }
                    Ok((mut started, running)) => {
                        for &i in &started {
                            let total = self.pools[i].reload.as_ref().map_or(0, |r| r.total);
                            responder.progress(format!(
                                "{}: replacing {total} worker{}, {} at a time",
                                self.pools[i].spec.name,
                                if total == 1 { "" } else { "s" },
                                batch.unwrap_or(1).max(1)
                            ));
                        }
                        started.extend(running);
                        self.reload_waiters.push(ReloadWaiter {
                            pending: started.into_iter().collect(),
                            failures: sync_failures,
                            replaced: 0,
                            responder,
                        });
                        return;
                    }
                }
            }
            Request::Restart { app, slot } => {
                let Some(i) = self.find_app(&app) else {
                    return responder.reply(Reply::error(format!("no app named {app}")));
                };
                let why_stopped = self.why_stopped(i);
                let pool = &mut self.pools[i];
                match pool.slots.get(&slot).and_then(|s| s.current) {
                    Some(id) if pool.replace_slot(id, StopReason::Restart) => {
                        info!("[{app}:{slot}] restarting: its replacement starts first");
                        Reply::ok(serde_json::json!({"app": app, "slot": slot}))
                    }
                    Some(_) => Reply::error(format!(
                        "{app} slot {slot} is already being replaced; wait for it to finish"
                    )),
                    None if pool.stopping => Reply::error(why_stopped),
                    None if pool.slots.contains_key(&slot) => Reply::error(format!(
                        "{app} slot {slot} has no running worker (it is waiting to restart after \
                         crashes); `processes start {app}` restarts it now"
                    )),
                    None => Reply::error(format!(
                        "{app} has no slot {slot}; `processes status {app}` lists its slots"
                    )),
                }
            }
            Request::Stop { app: None } => {
                self.begin_shutdown(now);
                Reply::ok(serde_json::json!({"stopping": "all"}))
            }
            Request::Stop { app: Some(app) } => match self.find_app(&app) {
                None => Reply::error(format!("no app named {app}")),
                Some(i) => {
                    self.stop_app(i, now);
                    Reply::ok(serde_json::json!({"stopping": app}))
                }
            },
            Request::Start { app } => match self.find_app(&app) {
                None => Reply::error(format!("no app named {app}")),
                Some(_) if self.shutdown.is_some() => {
                    Reply::error("the master is shutting down; start it again instead")
                }
                Some(i) if self.removed.contains(&i) => Reply::error(self.why_stopped(i)),
                Some(i) => {
                    let was_stopped = self.pools[i].stopping;
                    let started = self.pools[i].start_now();
                    info!(
                        "{app}: {} (processes start): {started} slot(s) start now",
                        if was_stopped {
                            "started again"
                        } else {
                            "restarting waiting slots"
                        }
                    );
                    self.dirty = true;
                    Reply::ok(serde_json::json!({
                        "app": app, "was_stopped": was_stopped, "started": started,
                    }))
                }
            },
        };
        responder.reply(reply);
    }

    fn status(&self, app: Option<&str>, now: Instant) -> Reply {
        let apps: Vec<_> = self
            .pools
            .iter()
            .enumerate()
            .filter(|(_, p)| app.is_none_or(|a| p.spec.name.as_str() == a))
            .map(|(i, p)| self.app_status(i, p, now))
            .collect();
        if apps.is_empty() {
            return Reply::error(format!("no app named {}", app.unwrap_or_default()));
        }
        let host = self.sampling.last_host.as_ref().map(|h| {
            serde_json::json!({
                "cpus": h.cpus,
                "cpu_busy": h.cpu_busy,
                "mem_headroom_bytes": h.mem_headroom,
                "cpu_source": h.cpu_source,
                "mem_source": h.mem_source,
            })
        });
        Reply::ok(serde_json::json!({
            "pid": std::process::id(),
            "apps": apps,
            "host": host,
            "registry": self.registry.as_ref().map(|r| r.state().to_json()),
            "sample": {
                "interval_ms": self.sampling.interval.as_millis() as u64,
                "ticks": self.sampling.ticks,
                "last_tick_us": self.sampling.last_tick.as_micros() as u64,
                "max_tick_us": self.sampling.max_tick.as_micros() as u64,
                "mean_tick_us": (self.sampling.total_tick.as_micros() as u64)
                    .checked_div(self.sampling.ticks)
                    .unwrap_or(0),
            },
        }))
    }

    fn scale_request(
        &mut self,
        app: &str,
        n: Option<usize>,
        min: Option<usize>,
        max: Option<usize>,
    ) -> Reply {
        let Some(i) = self.find_app(app) else {
            return Reply::error(format!("no app named {app}"));
        };
        if self.pools[i].stopping {
            return Reply::error(self.why_stopped(i));
        }
        let before = self.pools[i].target;
        let mut autoscale_stopped = false;
        let after = match (n, min, max) {
            (Some(n), None, None) => {
                if let Err(m) = crate::config::check_instances(n as i64) {
                    return Reply::error(format!("{app}: {m}"));
                }
                // A fixed size: autoscaling, if any, stops for this app.
                self.pools[i].spec.sizing = crate::config::Sizing::Fixed(n);
                autoscale_stopped = self.autos[i].is_some();
                if autoscale_stopped {
                    info!("{app}: autoscaling off (a fixed size was set)");
                }
                self.apply_sizing(i, "")
            }
            (None, Some(min), Some(max)) => {
                if let Err((field, m)) = crate::config::check_bounds(min, max) {
                    return Reply::error(format!("{app}: {field} {m}"));
                }
                self.pools[i].spec.sizing = crate::config::Sizing::Auto { min, max };
                self.apply_sizing(i, "")
            }
            _ => return Reply::error("give either N, or both min=A and max=B"),
        };
        if after != before {
            record::scale(app, before, after, "control");
        }
        info!("{app}: {before} → {after} workers (processes scale)");
        let (lo, hi) = self.pools[i].spec.sizing.bounds();
        Reply::ok(serde_json::json!({
            "app": app, "from": before, "to": after, "min": lo, "max": hi,
            "autoscale_stopped": autoscale_stopped,
        }))
    }

    /// Makes the pool's size follow its spec's sizing: a fixed size is set (autoscaling
    /// off); bounds start autoscaling if it was off and clamp the current size. `why`, if
    /// not empty, is logged with a change. Returns the new target.
    pub(super) fn apply_sizing(&mut self, app: usize, why: &str) -> usize {
        let before = self.pools[app].target;
        let after = match self.pools[app].spec.sizing {
            crate::config::Sizing::Fixed(n) => {
                self.autos[app] = None;
                self.pools[app].set_target(n)
            }
            crate::config::Sizing::Auto { .. } => {
                if self.autos[app].is_none() {
                    self.autos[app] = sampling::Auto::new(&self.pools[app].spec);
                }
                self.pools[app].set_target(before)
            }
        };
        if !why.is_empty() && after != before {
            let name = self.pools[app].spec.name.clone();
            record::scale(name.as_str(), before, after, "config");
            info!("{name}: {before} → {after} workers ({why})");
        }
        after
    }

    /// Tells reload waiters of `app` how far it got.
    pub(super) fn reload_progress(&mut self, app: usize, line: &str) {
        for w in &self.reload_waiters {
            if w.pending.contains(&app) {
                w.responder.progress(line);
            }
        }
    }

    /// A reload ended: answer every client that waited for it (once all its apps ended).
    pub(super) fn reload_ended(
        &mut self,
        app: usize,
        replaced: usize,
        total: usize,
        failure: Option<String>,
    ) {
        let name = self.pools[app].spec.name.to_string();
        let mut still = Vec::new();
        for mut w in std::mem::take(&mut self.reload_waiters) {
            if w.pending.remove(&app) {
                w.replaced += replaced;
                match &failure {
                    Some(f) => w.failures.push(f.clone()),
                    None => w
                        .responder
                        .progress(format!("{name}: done, {replaced}/{total} replaced")),
                }
            }
            if w.pending.is_empty() {
                let reply = if w.failures.is_empty() {
                    Reply::ok(serde_json::json!({"replaced": w.replaced}))
                } else {
                    Reply::error(w.failures.join("; "))
                };
                w.responder.reply(reply);
            } else {
                still.push(w);
            }
        }
        self.reload_waiters = still;
    }

    /// Why a stopped app does not do what was asked, and how to run it again.
    fn why_stopped(&self, i: usize) -> String {
        let name = &self.pools[i].spec.name;
        if self.removed.contains(&i) {
            format!(
                "{name} is gone from the config file and stopped; put it back and run \
                 `processes reload` to start it"
            )
        } else {
            format!("{name} is stopped; `processes start {name}` runs it again")
        }
    }

    pub(super) fn find_app(&self, name: &str) -> Option<usize> {
        self.pools.iter().position(|p| p.spec.name.as_str() == name)
    }

    pub(super) fn app_status(&self, i: usize, p: &Pool, now: Instant) -> Value {
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
                    "busy": io.and_then(|io| io.load.busy(now, self.sampling.interval)),
                    "cpu": io.and_then(|io| io.load.cpu_busy),
                    "elu": io.and_then(|io| io.load.elu.map(|e| e.0)),
                    "lag_ms": io.and_then(|io| io.load.lag(now)).map(|l| l.as_secs_f64() * 1000.0),
                    "rss_bytes": io.map_or(0, |io| io.load.rss),
                    "open": io.map_or(0, |io| io.load.open),
                })
            })
            .collect();
        let slots: Vec<Value> = p
            .slots
            .iter()
            .map(|(n, s)| {
                let state = if s.parked.is_some() || p.stopping {
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
        let autoscale = self.autos[i].as_ref().map(|a| {
            serde_json::json!({
                "setpoint": a.params.setpoint,
                "decision": a.last.as_ref().map(|d| serde_json::json!({
                    "desired": d.desired,
                    "reason": d.reason.label(),
                    "text": d.to_string(),
                    "bound": d.bound.label(),
                    "upper": d.upper,
                })),
                "last_change": a.last_change.as_ref().map(|(d, from, at)| serde_json::json!({
                    "from": from,
                    "to": d.desired,
                    "reason": d.reason.label(),
                    "text": d.to_string(),
                    "ago_ms": now.saturating_duration_since(*at).as_millis() as u64,
                })),
            })
        });
        serde_json::json!({
            "name": p.spec.name.as_str(),
            "size": p.size(),
            "ready": p.ready(),
            // An app stopped with `processes stop APP` wants no workers until it is
            // started again (then `target` workers).
            "desired": if p.stopping { 0 } else { p.target },
            "stopped": p.stopping,
            "removed": self.removed.contains(&i),
            "min": lo,
            "max": hi,
            "dispatch": p.spec.dispatch().as_str(),
            "generation": p.generation,
            "reloading": p.reload.is_some(),
            "workers": workers,
            "slots": slots,
            "listeners": listeners,
            "autoscale": autoscale,
        })
    }
}
