//! Control requests: status, scale, reload, stop.

use std::time::Instant;

use serde_json::Value;
use tracing::info;

use super::*;

impl Master {
    // ---- control ------------------------------------------------------------------------

    pub(super) fn on_control(&mut self, req: Request) -> Reply {
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
                    "sample": {
                        "interval_ms": self.sampling.interval.as_millis() as u64,
                        "ticks": self.sampling.ticks,
                        "last_tick_us": self.sampling.last_tick.as_micros() as u64,
                        "max_tick_us": self.sampling.max_tick.as_micros() as u64,
                    },
                }))
            }
            Request::Scale { app, n } => {
                let Some(i) = self.find_app(&app) else {
                    return Reply::error(format!("no app named {app}"));
                };
                let before = self.pools[i].target;
                let after = self.pools[i].set_target(n);
                if after != before {
                    record::scale(app.as_str(), before, after, "control");
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
            "desired": p.target,
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
