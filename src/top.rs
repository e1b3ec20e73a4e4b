//! `processes top`: a live terminal view of a running master, like `pm2 monit`. This module
//! owns that view and nothing else. A [`Model`] is folded from successive status replies:
//! the latest apps, workers and slots, and per app a five-minute history of size, desired
//! size, upper bound, utilization and lag for the sparklines. [`render`] draws a model into
//! a ratatui frame and [`handle_key`] maps a key to an [`Action`]; both are pure. [`run`] is
//! the thin effectful loop: it polls the control socket once a second and sends the scale and
//! reload requests from two background threads (so neither a master that hangs nor a reload
//! that takes minutes freezes the screen or the polls), draws, and reads keys. Every field of the status JSON is optional here: a missing or
//! mistyped one shows as `-`, never as a panic, and control characters in strings from the
//! master never reach the terminal.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ratatui::Frame;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{
    Block, Cell, List, ListItem, ListState, Paragraph, Row, Sparkline, Table, Wrap,
};
use serde_json::Value;

use crate::control::{self, Request};
use crate::master::error_chain;

/// How often the master is asked for its status; one history sample per answer.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// How far back the sparklines reach.
pub const HISTORY: Duration = Duration::from_secs(300);
/// Samples kept per app: [`HISTORY`] at [`POLL_INTERVAL`].
pub const HISTORY_SAMPLES: usize = 300;
/// A status request unanswered this long marks the master unreachable.
const STALL: Duration = Duration::from_secs(3);
/// The longest the loop sleeps waiting for a key, so answers are drawn promptly.
const TICK: Duration = Duration::from_millis(100);
/// Strings from the master are cut to this many characters.
const MAX_TEXT: usize = 200;

// ---- model --------------------------------------------------------------------------------

/// One worker process, as the last status reply described it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WorkerRow {
    pub slot: Option<u64>,
    pub pid: Option<u64>,
    /// `starting`, `ready` or `draining` (whatever the master said, cleaned).
    pub state: String,
    pub uptime_ms: Option<u64>,
    pub restarts: Option<u64>,
    /// Fraction of the last sampling interval the worker was busy.
    pub busy: Option<f64>,
    pub lag_ms: Option<f64>,
    pub rss_bytes: Option<u64>,
    /// Connections the master passed to it.
    pub passed: Option<u64>,
    /// Connections it has open.
    pub open: Option<u64>,
}

/// A slot whose worker is not running: `crash-looping`, `backing-off` or `stopped`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SlotRow {
    pub slot: Option<u64>,
    pub state: String,
    pub restarts: Option<u64>,
    pub consecutive_crashes: Option<u64>,
    pub restart_in_ms: Option<u64>,
}

/// The autoscaler's last decision.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Decision {
    pub desired: Option<u64>,
    pub reason: Option<String>,
    /// Human text, e.g. `utilization 0.82 > 0.60 → 4 (cpu bound, upper 4)`.
    pub text: Option<String>,
    /// The bound that limited it (`none`, `min`, `max`, `cpu`, `memory`, …).
    pub bound: Option<String>,
    pub upper: Option<u64>,
}

/// The autoscaler's last change of the pool size.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Change {
    pub from: Option<u64>,
    pub to: Option<u64>,
    pub text: Option<String>,
    pub ago_ms: Option<u64>,
}

/// An autoscaled app's controller state.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Autoscale {
    pub setpoint: Option<f64>,
    pub decision: Option<Decision>,
    pub last_change: Option<Change>,
}

/// One app, as the last status reply described it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AppView {
    pub name: String,
    pub size: Option<u64>,
    pub ready: Option<u64>,
    pub desired: Option<u64>,
    pub min: Option<u64>,
    pub max: Option<u64>,
    pub dispatch: Option<String>,
    pub reloading: bool,
    /// `address (mode)` per listener.
    pub listeners: Vec<String>,
    /// `None` for a fixed-size pool.
    pub autoscale: Option<Autoscale>,
    /// Sorted by slot, then pid.
    pub workers: Vec<WorkerRow>,
    /// Only the slots that are not running.
    pub slots: Vec<SlotRow>,
}

impl AppView {
    /// Mean `busy` of the ready workers that report one.
    pub fn utilization(&self) -> Option<f64> {
        let busy: Vec<f64> = self
            .workers
            .iter()
            .filter(|w| w.state == "ready")
            .filter_map(|w| w.busy)
            .collect();
        (!busy.is_empty()).then(|| busy.iter().sum::<f64>() / busy.len() as f64)
    }

    /// The highest event-loop lag among the ready workers.
    pub fn max_lag_ms(&self) -> Option<f64> {
        self.workers
            .iter()
            .filter(|w| w.state == "ready")
            .filter_map(|w| w.lag_ms)
            .reduce(f64::max)
    }

    /// The upper bound in force: the autoscaler's (`max` before its first decision); `None`
    /// for a fixed pool, whose only limits are the hand-scaling bounds.
    pub fn upper(&self) -> Option<u64> {
        let auto = self.autoscale.as_ref()?;
        auto.decision.as_ref().and_then(|d| d.upper).or(self.max)
    }

    /// Which bound holds the desired size, if any: the autoscaler's word when it has
    /// decided (`cpu (upper 4)`), else `min` or `max` when the desired size sits on one.
    pub fn binding(&self) -> Option<String> {
        if let Some(d) = self.autoscale.as_ref().and_then(|a| a.decision.as_ref()) {
            let bound = d
                .bound
                .as_deref()
                .filter(|b| !b.is_empty() && *b != "none")?;
            let bound = bound.replace('_', " ");
            return Some(match d.upper {
                Some(u) if bound != "min" => format!("{bound} (upper {u})"),
                _ => bound,
            });
        }
        let desired = self.desired?;
        if self.max.is_some_and(|m| desired >= m) {
            Some("max".into())
        } else if self.min.is_some_and(|m| desired <= m) {
            Some("min".into())
        } else {
            None
        }
    }
}

/// One point of an app's history. A point whose fields are all `None` is a gap: the master
/// did not answer that poll.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// The poll it came from; polls of all apps share the numbering.
    pub seq: u64,
    pub at: Instant,
    pub size: Option<u64>,
    pub desired: Option<u64>,
    pub upper: Option<u64>,
    /// Mean busy fraction of the ready workers.
    pub util: Option<f64>,
    /// Highest lag among the ready workers.
    pub lag_ms: Option<f64>,
}

/// How the samples that share a sparkline column are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Agg {
    Max,
    Mean,
}

/// An app's samples: at most [`HISTORY_SAMPLES`], none older than [`HISTORY`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct History {
    samples: VecDeque<Sample>,
}

impl History {
    pub fn samples(&self) -> impl DoubleEndedIterator<Item = &Sample> + ExactSizeIterator {
        self.samples.iter()
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    pub fn latest(&self) -> Option<&Sample> {
        self.samples.back()
    }

    fn push(&mut self, sample: Sample) {
        while self.samples.len() >= HISTORY_SAMPLES {
            self.samples.pop_front();
        }
        while self
            .samples
            .front()
            .is_some_and(|s| sample.at.saturating_duration_since(s.at) > HISTORY)
        {
            self.samples.pop_front();
        }
        self.samples.push_back(sample);
    }

    /// The series `pick` as `width` columns of `step` polls each, newest at the right,
    /// `None` where no sample has a value. Columns are aligned to the poll numbering, not to
    /// the newest sample, so a sample stays in its column as time passes.
    pub fn columns(
        &self,
        width: usize,
        step: u64,
        agg: Agg,
        pick: impl Fn(&Sample) -> Option<f64>,
    ) -> Vec<Option<f64>> {
        let step = step.max(1);
        let mut acc: Vec<(f64, u32)> = vec![(f64::NEG_INFINITY, 0); width];
        let Some(last) = self.latest() else {
            return vec![None; width];
        };
        let newest = last.seq / step;
        for s in &self.samples {
            let back = newest.saturating_sub(s.seq / step);
            let Some(col) = usize::try_from(back)
                .ok()
                .filter(|&b| b < width)
                .map(|b| width - 1 - b)
            else {
                continue;
            };
            let Some(v) = pick(s).filter(|v| v.is_finite()) else {
                continue;
            };
            let (a, n) = &mut acc[col];
            *a = match (agg, *n) {
                (_, 0) => v,
                (Agg::Max, _) => a.max(v),
                (Agg::Mean, _) => *a + v,
            };
            *n += 1;
        }
        acc.into_iter()
            .map(|(a, n)| match (agg, n) {
                (_, 0) => None,
                (Agg::Max, _) => Some(a),
                (Agg::Mean, n) => Some(a / f64::from(n)),
            })
            .collect()
    }
}

/// Whether the master answers.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Link {
    /// No answer yet.
    #[default]
    Connecting,
    Up,
    /// The last poll failed; the view shows the last data it had.
    Down {
        error: String,
        /// Since the last good answer, if there was one.
        last_ok_ago: Option<Duration>,
    },
}

/// The machine, as the master samples it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Host {
    pub cpus: Option<u64>,
    pub cpu_busy: Option<f64>,
    pub mem_headroom_bytes: Option<u64>,
}

/// What `top` knows: the latest status and each app's history.
#[derive(Debug, Clone, Default)]
pub struct Model {
    pub link: Link,
    pub pid: Option<u64>,
    pub host: Option<Host>,
    pub interval_ms: Option<u64>,
    pub last_tick_us: Option<u64>,
    pub max_tick_us: Option<u64>,
    apps: Vec<AppView>,
    histories: BTreeMap<String, History>,
    seq: u64,
    last_ok: Option<Instant>,
}

impl Model {
    pub fn new() -> Model {
        Model::default()
    }

    /// The apps of the last good status, in the master's order.
    pub fn apps(&self) -> &[AppView] {
        &self.apps
    }

    pub fn app(&self, name: &str) -> Option<&AppView> {
        self.apps.iter().find(|a| a.name == name)
    }

    pub fn history(&self, app: &str) -> Option<&History> {
        self.histories.get(app)
    }

    /// Folds in one status reply (the `data` of a `Status` request). Anything that is not
    /// the expected shape reads as absent.
    pub fn update(&mut self, status: &Value, now: Instant) {
        self.link = Link::Up;
        self.last_ok = Some(now);
        self.seq += 1;
        self.pid = count(&status["pid"]);
        self.host = status["host"].as_object().map(|_| {
            let h = &status["host"];
            Host {
                cpus: count(&h["cpus"]),
                cpu_busy: num(&h["cpu_busy"]),
                mem_headroom_bytes: count(&h["mem_headroom_bytes"]),
            }
        });
        let sample = &status["sample"];
        self.interval_ms = count(&sample["interval_ms"]);
        self.last_tick_us = count(&sample["last_tick_us"]);
        self.max_tick_us = count(&sample["max_tick_us"]);
        self.apps = items(&status["apps"]).filter_map(parse_app).collect();

        self.histories
            .retain(|name, _| self.apps.iter().any(|a| &a.name == name));
        for app in &self.apps {
            let sample = Sample {
                seq: self.seq,
                at: now,
                size: app.size,
                desired: app.desired,
                upper: app.upper(),
                util: app.utilization(),
                lag_ms: app.max_lag_ms(),
            };
            self.histories
                .entry(app.name.clone())
                .or_default()
                .push(sample);
        }
    }

    /// Records a failed poll: the view says so and keeps the last data; every history gets
    /// a gap.
    pub fn unreachable(&mut self, error: impl Into<String>, now: Instant) {
        self.link = Link::Down {
            error: clean(&error.into()),
            last_ok_ago: self.last_ok.map(|t| now.saturating_duration_since(t)),
        };
        self.seq += 1;
        for h in self.histories.values_mut() {
            h.push(Sample {
                seq: self.seq,
                at: now,
                size: None,
                desired: None,
                upper: None,
                util: None,
                lag_ms: None,
            });
        }
    }

    /// Records the answer to a scale request until the next status confirms it, so that
    /// `+` pressed again counts from the new size.
    pub fn scaled(&mut self, app: &str, to: u64) {
        if let Some(a) = self.apps.iter_mut().find(|a| a.name == app) {
            a.desired = Some(to);
        }
    }
}

fn parse_app(v: &Value) -> Option<AppView> {
    let name = text(&v["name"])?;
    let mut workers: Vec<WorkerRow> = items(&v["workers"])
        .filter(|w| w.is_object())
        .map(|w| WorkerRow {
            slot: count(&w["slot"]),
            pid: count(&w["pid"]),
            state: text(&w["state"]).unwrap_or_else(|| "?".into()),
            uptime_ms: count(&w["uptime_ms"]),
            restarts: count(&w["restarts"]),
            busy: num(&w["busy"]).filter(|b| *b >= 0.0),
            lag_ms: num(&w["lag_ms"]).filter(|l| *l >= 0.0),
            rss_bytes: count(&w["rss_bytes"]),
            passed: count(&w["passed"]),
            open: count(&w["open"]),
        })
        .collect();
    workers.sort_by_key(|w| (w.slot, w.pid));
    let slots = items(&v["slots"])
        .filter(|s| s.is_object())
        .map(|s| SlotRow {
            slot: count(&s["slot"]),
            state: text(&s["state"]).unwrap_or_else(|| "?".into()),
            restarts: count(&s["restarts"]),
            consecutive_crashes: count(&s["consecutive_crashes"]),
            restart_in_ms: count(&s["restart_in_ms"]),
        })
        // A slot whose worker has a row (a crash-looping slot's retry running) gets no
        // second one.
        .filter(|s| {
            s.state != "running" && !(s.slot.is_some() && workers.iter().any(|w| w.slot == s.slot))
        })
        .collect();
    let listeners = items(&v["listeners"])
        .filter_map(|l| {
            let addr = text(&l["address"])?;
            Some(match text(&l["mode"]) {
                Some(mode) => format!("{addr} ({mode})"),
                None => addr,
            })
        })
        .collect();
    let autoscale = v["autoscale"].as_object().map(|_| {
        let a = &v["autoscale"];
        let d = &a["decision"];
        let c = &a["last_change"];
        Autoscale {
            setpoint: num(&a["setpoint"]),
            decision: d.is_object().then(|| Decision {
                desired: count(&d["desired"]),
                reason: text(&d["reason"]),
                text: text(&d["text"]),
                bound: text(&d["bound"]),
                upper: count(&d["upper"]),
            }),
            last_change: c.is_object().then(|| Change {
                from: count(&c["from"]),
                to: count(&c["to"]),
                text: text(&c["text"]),
                ago_ms: count(&c["ago_ms"]),
            }),
        }
    });
    Some(AppView {
        name,
        size: count(&v["size"]),
        ready: count(&v["ready"]),
        desired: count(&v["desired"]),
        min: count(&v["min"]),
        max: count(&v["max"]),
        dispatch: text(&v["dispatch"]),
        reloading: v["reloading"].as_bool() == Some(true),
        listeners,
        autoscale,
        workers,
        slots,
    })
}

/// The elements of an array; nothing for anything else.
fn items(v: &Value) -> impl Iterator<Item = &Value> {
    v.as_array().into_iter().flatten()
}

/// A non-negative integer (a non-negative float is truncated).
fn count(v: &Value) -> Option<u64> {
    v.as_u64().or_else(|| {
        v.as_f64()
            .filter(|f| f.is_finite() && *f >= 0.0)
            .map(|f| f as u64)
    })
}

fn num(v: &Value) -> Option<f64> {
    v.as_f64().filter(|f| f.is_finite())
}

fn text(v: &Value) -> Option<String> {
    v.as_str().map(clean)
}

/// Cut to [`MAX_TEXT`] characters, control characters replaced: nothing from the master
/// can move the cursor or change the terminal's modes.
fn clean(s: &str) -> String {
    s.chars()
        .take(MAX_TEXT)
        .map(|c| if c.is_control() { '\u{fffd}' } else { c })
        .collect()
}

// ---- keys and actions ---------------------------------------------------------------------

/// What a key asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    None,
    Quit,
    /// Select the app at this index.
    Select(usize),
    Scale {
        app: String,
        n: usize,
    },
    /// `+`/`-` on an autoscaled app: a fixed size would turn its autoscaling off, so the
    /// footer asks first and the same key again sends the [`Action::Scale`].
    ConfirmScale {
        app: String,
        n: usize,
    },
    Reload {
        app: String,
    },
}

/// How the footer shows a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tone {
    Pending,
    Ok,
    Error,
}

/// The footer's message: the last action and how it went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub text: String,
    pub tone: Tone,
}

/// What the view remembers between frames that is not the master's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UiState {
    /// Index into [`Model::apps`]; clamped when the apps change.
    pub selected: usize,
    pub message: Option<Message>,
    /// The scale an autoscaled app's `+`/`-` asked to confirm: pressing that key again
    /// sends it, any other key forgets it.
    pub confirm: Option<Action>,
}

impl UiState {
    /// The selected app, if there is any app.
    pub fn selected_app<'m>(&self, model: &'m Model) -> Option<&'m AppView> {
        let apps = model.apps();
        apps.get(self.selected.min(apps.len().saturating_sub(1)))
    }
}

/// Maps a key to an action. `q`, Esc and Ctrl-C quit; `↑`/`↓` (or `k`/`j`) select an app;
/// `+` (or `=`) and `-` ask for one worker more or fewer than the selected app's desired
/// size — for an autoscaled app that fixes its size and turns autoscaling off, so the
/// first press only asks to confirm and a second one sends it; `r` starts a rolling
/// reload of it.
pub fn handle_key(key: KeyEvent, model: &Model, ui: &UiState) -> Action {
    if key.kind == KeyEventKind::Release {
        return Action::None;
    }
    let apps = model.apps().len();
    let selected = ui.selected.min(apps.saturating_sub(1));
    let app = ui.selected_app(model);
    let scale = |up: bool| {
        let Some(app) = app else {
            return Action::None;
        };
        let Some(desired) = app.desired else {
            return Action::None;
        };
        let n = if up {
            desired.saturating_add(1)
        } else {
            desired.saturating_sub(1)
        };
        let Ok(n) = usize::try_from(n) else {
            return Action::None;
        };
        if n as u64 == desired {
            return Action::None;
        }
        let scale = Action::Scale {
            app: app.name.clone(),
            n,
        };
        if app.autoscale.is_none() || ui.confirm.as_ref() == Some(&scale) {
            scale
        } else {
            Action::ConfirmScale {
                app: app.name.clone(),
                n,
            }
        }
    };
    match key.code {
        KeyCode::Char('c') if key.modifiers.contains(KeyModifiers::CONTROL) => Action::Quit,
        KeyCode::Char('q') | KeyCode::Esc => Action::Quit,
        KeyCode::Up | KeyCode::Char('k') if apps > 0 => Action::Select(selected.saturating_sub(1)),
        KeyCode::Down | KeyCode::Char('j') if apps > 0 => {
            Action::Select((selected + 1).min(apps - 1))
        }
        KeyCode::Char('+') | KeyCode::Char('=') => scale(true),
        KeyCode::Char('-') => scale(false),
        KeyCode::Char('r') => app.map_or(Action::None, |a| Action::Reload {
            app: a.name.clone(),
        }),
        _ => Action::None,
    }
}

/// The control request an action sends, if it sends one.
pub fn request_for(action: &Action) -> Option<Request> {
    match action {
        Action::Scale { app, n } => Some(Request::Scale {
            app: app.clone(),
            n: Some(*n),
            min: None,
            max: None,
        }),
        Action::Reload { app } => Some(Request::Reload {
            app: Some(app.clone()),
            batch: None,
        }),
        Action::None | Action::Quit | Action::Select(_) | Action::ConfirmScale { .. } => None,
    }
}

/// The footer's text while an action's request is on its way.
pub fn pending(action: &Action) -> Option<Message> {
    let text = match action {
        Action::Scale { app, n } => format!("{app}: scaling to {n}…"),
        Action::Reload { app } => format!("{app}: asking for a rolling reload…"),
        Action::None | Action::Quit | Action::Select(_) | Action::ConfirmScale { .. } => {
            return None;
        }
    };
    Some(Message {
        text,
        tone: Tone::Pending,
    })
}

/// The footer's question before `+`/`-` turns an autoscaled app into a fixed one.
pub fn confirm_message(action: &Action, model: &Model) -> Option<Message> {
    let Action::ConfirmScale { app, n } = action else {
        return None;
    };
    let bounds = model
        .app(app)
        .and_then(|a| Some(format!(" ({}..{})", a.min?, a.max?)))
        .unwrap_or_default();
    Some(Message {
        text: format!(
            "{app} is autoscaled{bounds}: press the key again to fix it at {} and turn autoscaling off",
            workers(*n as u64)
        ),
        tone: Tone::Pending,
    })
}

/// The footer's text for an action's answer (`Ok` is the reply's `data`).
pub fn describe(action: &Action, result: &Result<Value, String>, model: &Model) -> Message {
    let (what, app) = match action {
        Action::Scale { app, .. } => ("scale", app),
        Action::Reload { app } => ("reload", app),
        Action::None | Action::Quit | Action::Select(_) | Action::ConfirmScale { .. } => {
            return Message {
                text: String::new(),
                tone: Tone::Ok,
            };
        }
    };
    let data = match result {
        Err(e) => {
            return Message {
                text: format!("{what} failed: {}", clean(e)),
                tone: Tone::Error,
            };
        }
        Ok(d) => d,
    };
    let text = match action {
        Action::Scale { .. } => {
            let (from, to) = (count(&data["from"]), count(&data["to"]));
            let mut text = match (from, to) {
                (Some(f), Some(t)) if f == t => format!("{app}: stays at {}", workers(t)),
                (Some(f), Some(t)) => format!("{app}: {f} → {}", workers(t)),
                _ => format!("{app}: scaled"),
            };
            // A size by hand makes the pool fixed: the master says whether that stopped
            // its autoscaling (a master that does not say: the app as last seen).
            let stopped = data["autoscale_stopped"]
                .as_bool()
                .unwrap_or_else(|| model.app(app).is_some_and(|v| v.autoscale.is_some()));
            if stopped {
                text.push_str(&format!(
                    ", a fixed size now: autoscaling is off (`processes scale {app} min=A,max=B` turns it back on)"
                ));
            }
            text
        }
        _ => match count(&data["replaced"]) {
            Some(n) => format!("{app}: reload done, {} replaced", workers(n)),
            None => format!("{app}: reload done"),
        },
    };
    Message {
        text,
        tone: Tone::Ok,
    }
}

// ---- render -------------------------------------------------------------------------------

const SIZE_COLOR: Color = Color::Green;
const DESIRED_COLOR: Color = Color::Yellow;
const UPPER_COLOR: Color = Color::Red;
const UTIL_COLOR: Color = Color::Cyan;
const LAG_COLOR: Color = Color::Magenta;
/// Width of a sparkline's label (`desired 12`).
const LABEL_WIDTH: u16 = 13;

/// Draws the whole screen: a title line (master and host), the apps one line each with the
/// selected one highlighted, the selected app's sparklines, autoscale decision and worker
/// table, and a footer with the keys and the last action's outcome.
pub fn render(frame: &mut Frame, model: &Model, ui: &UiState) {
    let area = frame.area();
    let apps = model.apps();
    let list_rows = if apps.is_empty() {
        0
    } else {
        let room = (area.height / 4).max(1);
        u16::try_from(apps.len()).unwrap_or(u16::MAX).min(room) + 2
    };
    // The error of an unreachable master, in full: it says what to do.
    let alert_rows = match &model.link {
        Link::Down { error, .. } => {
            let width = usize::from(area.width.max(1));
            u16::try_from(error.chars().count().div_ceil(width).clamp(1, 3)).unwrap_or(3)
        }
        _ => 0,
    };
    let [title, alert, list, detail, footer] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(alert_rows),
        Constraint::Length(list_rows),
        Constraint::Min(0),
        Constraint::Length(1),
    ])
    .areas(area);

    frame.render_widget(Paragraph::new(title_line(model)), title);
    if let Link::Down { error, .. } = &model.link {
        frame.render_widget(
            Paragraph::new(error.clone())
                .style(Style::new().fg(Color::Red))
                .wrap(Wrap { trim: true }),
            alert,
        );
    }

    let selected = ui.selected.min(apps.len().saturating_sub(1));
    if !apps.is_empty() {
        let name_width = apps
            .iter()
            .map(|a| a.name.chars().count())
            .max()
            .unwrap_or(0)
            .min(24);
        let items: Vec<ListItem> = apps
            .iter()
            .map(|a| ListItem::new(app_line(a, name_width)))
            .collect();
        let list_widget = List::new(items)
            .block(Block::bordered().title(" apps "))
            .highlight_symbol("▶ ")
            .highlight_style(
                Style::new()
                    .add_modifier(Modifier::BOLD)
                    .bg(Color::DarkGray),
            );
        let mut state = ListState::default().with_selected(Some(selected));
        frame.render_stateful_widget(list_widget, list, &mut state);
    }

    match apps.get(selected) {
        Some(app) => render_app(frame, detail, app, model.history(&app.name)),
        None => {
            let text = match model.link {
                Link::Up => "the master runs no apps",
                _ => "waiting for the master…",
            };
            frame.render_widget(Paragraph::new(text).block(Block::bordered()), detail);
        }
    }

    if matches!(model.link, Link::Down { .. }) {
        // The last data the master gave: dimmed, it may be out of date.
        let stale = list.union(detail);
        frame
            .buffer_mut()
            .set_style(stale, Style::new().add_modifier(Modifier::DIM));
    }

    frame.render_widget(Paragraph::new(footer_line(ui)), footer);
}

fn title_line(model: &Model) -> Line<'static> {
    let mut spans = vec![Span::styled(
        "processes top",
        Style::new().add_modifier(Modifier::BOLD),
    )];
    match &model.link {
        Link::Connecting => spans.push(Span::raw("  connecting to the master…")),
        Link::Down { last_ok_ago, .. } => {
            let seen = last_ok_ago.map_or(String::new(), |d| {
                format!(" (last answer {} ago)", fmt_duration(d.as_millis() as u64))
            });
            spans.push(Span::styled(
                format!("  master unreachable, retrying every second{seen}"),
                Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
            ));
        }
        Link::Up => {
            spans.push(Span::raw(format!(
                "  master pid {}",
                opt(model.pid, |p| p.to_string())
            )));
            if let Some(h) = &model.host {
                spans.push(Span::raw(format!(
                    "  host {} cpus, cpu {}, mem headroom {}",
                    opt(h.cpus, |c| c.to_string()),
                    opt(h.cpu_busy, pct),
                    opt(h.mem_headroom_bytes, fmt_bytes)
                )));
            }
            if model.last_tick_us.is_some() {
                spans.push(Span::styled(
                    format!(
                        "  tick {} (max {})",
                        opt(model.last_tick_us, fmt_us),
                        opt(model.max_tick_us, fmt_us)
                    ),
                    Style::new().fg(Color::DarkGray),
                ));
            }
        }
    }
    Line::from(spans)
}

fn app_line(app: &AppView, name_width: usize) -> Line<'static> {
    let n = |v: Option<u64>| opt(v, |x| x.to_string());
    let mut spans = vec![
        Span::styled(
            format!("{:<name_width$}", app.name),
            Style::new().add_modifier(Modifier::BOLD),
        ),
        Span::styled(
            format!("  size {}", n(app.size)),
            Style::new().fg(SIZE_COLOR),
        ),
        Span::styled(
            format!("  desired {}", n(app.desired)),
            Style::new().fg(DESIRED_COLOR),
        ),
        Span::raw(format!("  ready {}", n(app.ready))),
        Span::raw(format!("  bounds {}..{}", n(app.min), n(app.max))),
    ];
    if let Some(b) = app.binding() {
        spans.push(Span::styled(
            format!("  bound: {b}"),
            Style::new().fg(UPPER_COLOR),
        ));
    }
    if app.reloading {
        spans.push(Span::styled(
            "  reloading",
            Style::new().fg(Color::Magenta).add_modifier(Modifier::BOLD),
        ));
    }
    let crashing = app
        .slots
        .iter()
        .filter(|s| s.state == "crash-looping")
        .count();
    if crashing > 0 {
        spans.push(Span::styled(
            format!("  {crashing} crash-looping"),
            Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
        ));
    }
    spans.push(Span::styled(
        format!("  {}", decision_text(app)),
        Style::new().fg(Color::Gray),
    ));
    Line::from(spans)
}

fn decision_text(app: &AppView) -> String {
    match &app.autoscale {
        None => "fixed size".into(),
        Some(a) => match a.decision.as_ref().and_then(|d| d.text.clone()) {
            Some(t) => t,
            None => "autoscaled, no decision yet".into(),
        },
    }
}

fn render_app(frame: &mut Frame, area: Rect, app: &AppView, history: Option<&History>) {
    let mut title = vec![Span::styled(
        format!(" {} ", app.name),
        Style::new().add_modifier(Modifier::BOLD),
    )];
    if let Some(d) = &app.dispatch {
        title.push(Span::raw(format!("· {d} ")));
    }
    if !app.listeners.is_empty() {
        title.push(Span::raw(format!("· {} ", app.listeners.join(", "))));
    }
    let block = Block::bordered().title(Line::from(title));
    let inner = block.inner(area);
    frame.render_widget(block, area);

    let decision_rows: u16 = if app.autoscale.is_some() { 2 } else { 1 };
    let [sparks, decision, table] = Layout::vertical([
        Constraint::Length(3),
        Constraint::Length(decision_rows),
        Constraint::Min(0),
    ])
    .areas(inner);
    render_sparklines(frame, sparks, app, history);
    frame.render_widget(Paragraph::new(decision_lines(app)), decision);
    render_workers(frame, table, app);
}

fn render_sparklines(frame: &mut Frame, area: Rect, app: &AppView, history: Option<&History>) {
    let [left, right] =
        Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(area);
    let spark_width = left
        .width
        .min(right.width)
        .saturating_sub(LABEL_WIDTH + 1)
        .max(1);
    let width = usize::from(spark_width);
    // Enough polls per column that the whole history fits.
    let step = HISTORY_SAMPLES.div_ceil(width).max(1) as u64;
    let empty = History::default();
    let h = history.unwrap_or(&empty);
    let latest = h.latest();
    let as_f = |v: Option<u64>| v.map(|x| x as f64);

    let size = h.columns(width, step, Agg::Max, |s| as_f(s.size));
    let desired = h.columns(width, step, Agg::Max, |s| as_f(s.desired));
    let upper = h.columns(width, step, Agg::Max, |s| as_f(s.upper));
    let util = h.columns(width, step, Agg::Mean, |s| s.util.map(|u| u * 100.0));
    let lag = h.columns(width, step, Agg::Max, |s| s.lag_ms);
    // Size, desired and upper share one scale, so they compare.
    let top = [&size, &desired, &upper]
        .iter()
        .flat_map(|c| c.iter().flatten())
        .fold(1.0f64, |a, &b| a.max(b));
    let lag_top = lag.iter().flatten().fold(1.0f64, |a, &b| a.max(b));

    let rows = |a: Rect| Layout::vertical([Constraint::Length(1); 3]).areas::<3>(a);
    let n = |v: Option<u64>| opt(v, |x| x.to_string());
    let left_rows = rows(left);
    let right_rows = rows(right);
    let latest_u = |f: fn(&Sample) -> Option<u64>| latest.and_then(f);
    spark_row(
        frame,
        left_rows[0],
        format!("size {}", n(latest_u(|s| s.size))),
        SIZE_COLOR,
        &size,
        top,
    );
    spark_row(
        frame,
        left_rows[1],
        format!("desired {}", n(latest_u(|s| s.desired))),
        DESIRED_COLOR,
        &desired,
        top,
    );
    if app.autoscale.is_some() {
        spark_row(
            frame,
            left_rows[2],
            format!("upper {}", n(latest_u(|s| s.upper))),
            UPPER_COLOR,
            &upper,
            top,
        );
    }
    spark_row(
        frame,
        right_rows[0],
        format!("util {}", opt(latest.and_then(|s| s.util), pct)),
        UTIL_COLOR,
        &util,
        100.0,
    );
    spark_row(
        frame,
        right_rows[1],
        format!("lag {}", opt(latest.and_then(|s| s.lag_ms), fmt_ms)),
        LAG_COLOR,
        &lag,
        lag_top,
    );
    let span = Duration::from_secs(step.saturating_mul(width as u64));
    let mut note = format!(
        "last {}, {}s per column",
        fmt_duration(span.min(HISTORY).as_millis() as u64),
        step
    );
    if let Some(sp) = app.autoscale.as_ref().and_then(|a| a.setpoint) {
        note = format!("setpoint {}  ·  {note}", pct(sp));
    }
    frame.render_widget(
        Paragraph::new(Span::styled(note, Style::new().fg(Color::DarkGray))),
        right_rows[2],
    );
}

fn spark_row(
    frame: &mut Frame,
    area: Rect,
    label: String,
    color: Color,
    data: &[Option<f64>],
    top: f64,
) {
    let [l, s] =
        Layout::horizontal([Constraint::Length(LABEL_WIDTH), Constraint::Min(0)]).areas(area);
    frame.render_widget(
        Paragraph::new(Span::styled(label, Style::new().fg(color))),
        l,
    );
    let bars: Vec<Option<u64>> = data.iter().map(|v| v.map(|x| x.round() as u64)).collect();
    frame.render_widget(
        Sparkline::default()
            .data(bars)
            .max(top.round().max(1.0) as u64)
            .style(Style::new().fg(color)),
        s,
    );
}

fn decision_lines(app: &AppView) -> Vec<Line<'static>> {
    let Some(a) = &app.autoscale else {
        return vec![Line::from(Span::styled(
            "fixed size: +/- scale it by hand",
            Style::new().fg(Color::Gray),
        ))];
    };
    let decision = a
        .decision
        .as_ref()
        .and_then(|d| d.text.clone())
        .unwrap_or_else(|| "no decision yet".into());
    let change = match &a.last_change {
        None => "none yet".to_string(),
        Some(c) => {
            let mut s = format!(
                "{} → {}",
                opt(c.from, |x| x.to_string()),
                opt(c.to, |x| x.to_string())
            );
            if let Some(ago) = c.ago_ms {
                s.push_str(&format!(" {} ago", fmt_duration(ago)));
            }
            if let Some(t) = &c.text {
                s.push_str(&format!(": {t}"));
            }
            s
        }
    };
    let label = Style::new().fg(Color::DarkGray);
    vec![
        Line::from(vec![
            Span::styled("decision     ", label),
            Span::styled(decision, Style::new().add_modifier(Modifier::BOLD)),
        ]),
        Line::from(vec![
            Span::styled("last change  ", label),
            Span::raw(change),
        ]),
    ]
}

fn state_style(state: &str) -> Style {
    match state {
        "ready" | "running" => Style::new().fg(Color::Green),
        "starting" => Style::new().fg(Color::Yellow),
        "draining" => Style::new().fg(Color::Blue),
        "crash-looping" => Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
        "backing-off" => Style::new().fg(Color::LightRed),
        _ => Style::new().fg(Color::DarkGray),
    }
}

fn render_workers(frame: &mut Frame, area: Rect, app: &AppView) {
    let header = Row::new([
        "slot", "pid", "state", "uptime", "restarts", "busy", "lag ms", "rss MiB", "passed", "open",
    ])
    .style(Style::new().add_modifier(Modifier::BOLD | Modifier::UNDERLINED));
    let n = |v: Option<u64>| opt(v, |x| x.to_string());
    // Workers and idle slots together, by slot.
    let mut rows: Vec<(Option<u64>, u8, Row)> = app
        .workers
        .iter()
        .map(|w| {
            let row = Row::new(vec![
                Cell::from(n(w.slot)),
                Cell::from(n(w.pid)),
                Cell::from(Span::styled(w.state.clone(), state_style(&w.state))),
                Cell::from(opt(w.uptime_ms, fmt_duration)),
                Cell::from(n(w.restarts)),
                Cell::from(opt(w.busy, pct)),
                Cell::from(opt(w.lag_ms, |l| format!("{l:.1}"))),
                Cell::from(opt(w.rss_bytes, |b| format!("{:.1}", b as f64 / MIB))),
                Cell::from(n(w.passed)),
                Cell::from(n(w.open)),
            ]);
            (w.slot, 0, row)
        })
        .chain(app.slots.iter().map(|s| {
            let mut note = String::new();
            if let Some(ms) = s.restart_in_ms {
                note = format!("retry {}", fmt_duration(ms));
            }
            let row = Row::new(vec![
                Cell::from(n(s.slot)),
                Cell::from("-"),
                Cell::from(Span::styled(s.state.clone(), state_style(&s.state))),
                Cell::from(note),
                Cell::from(n(s.restarts)),
                Cell::from(""),
                Cell::from(""),
                Cell::from(""),
                Cell::from(match s.consecutive_crashes {
                    Some(c) if c > 0 => format!("{c} crashes"),
                    _ => String::new(),
                }),
                Cell::from(""),
            ]);
            (s.slot, 1, row)
        }))
        .collect();
    rows.sort_by_key(|(slot, kind, _)| (*slot, *kind));
    let widths = [
        Constraint::Length(4),
        Constraint::Length(8),
        Constraint::Length(13),
        Constraint::Length(11),
        Constraint::Length(8),
        Constraint::Length(5),
        Constraint::Length(7),
        Constraint::Length(8),
        Constraint::Length(10),
        Constraint::Length(5),
    ];
    let table = Table::new(rows.into_iter().map(|(_, _, r)| r), widths)
        .header(header)
        .column_spacing(1);
    frame.render_widget(table, area);
}

fn footer_line(ui: &UiState) -> Line<'static> {
    let key = Style::new().fg(Color::Black).bg(Color::Gray);
    let mut spans = vec![
        Span::styled(" q ", key),
        Span::raw(" quit  "),
        Span::styled(" ↑/↓ ", key),
        Span::raw(" select app  "),
        Span::styled(" +/- ", key),
        Span::raw(" scale  "),
        Span::styled(" r ", key),
        Span::raw(" reload "),
    ];
    if let Some(m) = &ui.message {
        let style = match m.tone {
            Tone::Pending => Style::new().fg(Color::Yellow),
            Tone::Ok => Style::new().fg(Color::Green),
            Tone::Error => Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
        };
        spans.push(Span::raw(" │ "));
        spans.push(Span::styled(m.text.clone(), style));
    }
    Line::from(spans)
}

const MIB: f64 = 1024.0 * 1024.0;

fn opt<T>(v: Option<T>, f: impl FnOnce(T) -> String) -> String {
    v.map_or_else(|| "-".to_string(), f)
}

fn workers(n: u64) -> String {
    if n == 1 {
        "1 worker".into()
    } else {
        format!("{n} workers")
    }
}

fn pct(fraction: f64) -> String {
    format!("{:.0}%", fraction * 100.0)
}

fn fmt_ms(ms: f64) -> String {
    if ms < 10.0 {
        format!("{ms:.1}ms")
    } else {
        format!("{ms:.0}ms")
    }
}

fn fmt_us(us: u64) -> String {
    if us < 1000 {
        format!("{us}µs")
    } else {
        format!("{:.1}ms", us as f64 / 1000.0)
    }
}

fn fmt_bytes(b: u64) -> String {
    let b = b as f64;
    if b >= 1024.0 * MIB {
        format!("{:.1} GiB", b / (1024.0 * MIB))
    } else {
        format!("{:.0} MiB", b / MIB)
    }
}

/// `950ms`, `12.3s`, `4m12s`, `2h05m`, `3d04h`: whole milliseconds, one decimal of
/// seconds, so the column does not jump as the figure ticks.
fn fmt_duration(ms: u64) -> String {
    match ms {
        0..1000 => format!("{ms}ms"),
        1000..60_000 => format!("{:.1}s", ms as f64 / 1000.0),
        _ => crate::human::duration(std::time::Duration::from_millis(ms)),
    }
}

// ---- the loop -----------------------------------------------------------------------------

/// What a client thread is asked to do.
enum Job {
    Status,
    Act(Action),
}

/// What a client thread reports (`Ok` is the reply's `data`).
enum Done {
    Status(Result<Value, String>),
    /// A progress line of a long request (a reload).
    Progress(String),
    Acted(Action, Result<Value, String>),
}

/// A thread that sends its jobs' requests one at a time, so a master that does not answer
/// blocks it and not the screen. It ends when the loop drops its sender.
fn spawn_client(
    name: &str,
    path: PathBuf,
    done: mpsc::Sender<Done>,
) -> io::Result<mpsc::Sender<Job>> {
    let (jobs_tx, jobs_rx) = mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            for job in jobs_rx {
                let reply = match job {
                    Job::Status => {
                        let r = control::request(&path, &Request::Status { app: None });
                        Done::Status(r.map_err(|e| error_chain(&e)))
                    }
                    Job::Act(action) => {
                        let Some(req) = request_for(&action) else {
                            continue;
                        };
                        let r = control::request_with_progress(&path, &req, |line| {
                            let _ = done.send(Done::Progress(line.to_string()));
                        });
                        Done::Acted(action, r.map_err(|e| error_chain(&e)))
                    }
                };
                if done.send(reply).is_err() {
                    break;
                }
            }
        })?;
    Ok(jobs_tx)
}

/// Restores the terminal however the loop ends: an error return or an unwinding panic
/// (`ratatui::try_init`'s panic hook restores it too, before the panic message prints).
struct Restore;

impl Drop for Restore {
    fn drop(&mut self) {
        ratatui::restore();
    }
}

/// Runs `top` against the master whose control socket is `control` until the user quits.
/// A master that cannot be reached is shown as such and asked again every second.
pub fn run(control: &Path) -> io::Result<()> {
    let (done_tx, done) = mpsc::channel();
    // Polls on one thread, actions on another: a reload's request lasts until the reload
    // ends and must not hold up the status.
    let polls = spawn_client("top-status", control.to_path_buf(), done_tx.clone())?;
    let actions = spawn_client("top-actions", control.to_path_buf(), done_tx)?;
    let _restore = Restore;
    let mut terminal = ratatui::try_init()?;
    let mut model = Model::new();
    let mut ui = UiState::default();
    let mut next_poll = Instant::now();
    let mut in_flight: Option<Instant> = None;
    let lost = || io::Error::other("a control client thread stopped");
    loop {
        let now = Instant::now();
        while let Ok(d) = done.try_recv() {
            match d {
                Done::Status(result) => {
                    in_flight = None;
                    match result {
                        Ok(status) => model.update(&status, now),
                        Err(e) => model.unreachable(e, now),
                    }
                }
                Done::Progress(line) => {
                    ui.message = Some(Message {
                        text: clean(&line),
                        tone: Tone::Pending,
                    });
                }
                Done::Acted(action, result) => {
                    if let (Action::Scale { app, .. }, Ok(data)) = (&action, &result)
                        && let Some(to) = count(&data["to"])
                    {
                        model.scaled(app, to);
                    }
                    ui.message = Some(describe(&action, &result, &model));
                    // Show the effect now rather than at the next poll.
                    next_poll = now;
                }
            }
        }
        if now >= next_poll {
            match in_flight {
                None => {
                    polls.send(Job::Status).map_err(|_| lost())?;
                    in_flight = Some(now);
                }
                Some(since) if now.duration_since(since) >= STALL => model.unreachable(
                    format!(
                        "no answer for {}",
                        fmt_duration(now.duration_since(since).as_millis() as u64)
                    ),
                    now,
                ),
                Some(_) => {}
            }
            next_poll = now + POLL_INTERVAL;
        }

        terminal.draw(|f| render(f, &model, &ui))?;

        let wait = next_poll
            .saturating_duration_since(Instant::now())
            .min(TICK);
        if !event::poll(wait)? {
            continue;
        }
        let Event::Key(key) = event::read()? else {
            continue;
        };
        let action = handle_key(key, &model, &ui);
        // A question is answered by the next key, whichever it is; it leaves the footer.
        if key.kind != KeyEventKind::Release && ui.confirm.take().is_some() {
            ui.message = None;
        }
        match action {
            Action::None => {}
            Action::Quit => return Ok(()),
            Action::Select(i) => ui.selected = i,
            Action::ConfirmScale { ref app, n } => {
                ui.message = confirm_message(&action, &model);
                ui.confirm = Some(Action::Scale {
                    app: app.clone(),
                    n,
                });
            }
            action @ (Action::Scale { .. } | Action::Reload { .. }) => {
                ui.message = pending(&action);
                actions.send(Job::Act(action)).map_err(|_| lost())?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use ratatui::Terminal;
    use ratatui::backend::TestBackend;
    use serde_json::json;

    fn fixture() -> Value {
        json!({
            "pid": 4242,
            "host": {"cpus": 8, "cpu_busy": 0.35, "mem_headroom_bytes": 3_300_000_000u64},
            "sample": {"interval_ms": 1000, "ticks": 77, "last_tick_us": 850, "max_tick_us": 4100},
            "apps": [
                {
                    "name": "web", "size": 3, "ready": 2, "desired": 4, "min": 2, "max": 8,
                    "dispatch": "round-robin", "generation": 1, "reloading": false,
                    "workers": [
                        {"slot": 1, "pid": 1002, "state": "ready", "uptime_ms": 65_000,
                         "restarts": 0, "generation": 1, "passed": 120, "busy": 0.9, "cpu": 0.8,
                         "elu": 0.85, "lag_ms": 42.5, "rss_bytes": 52_428_800, "open": 7},
                        {"slot": 0, "pid": 1001, "state": "ready", "uptime_ms": 3_700_000,
                         "restarts": 2, "generation": 1, "passed": 340, "busy": 0.7, "cpu": 0.6,
                         "elu": null, "lag_ms": 3.25, "rss_bytes": 41_943_040, "open": 3},
                        {"slot": 3, "pid": 1004, "state": "starting", "uptime_ms": 400,
                         "restarts": 0, "generation": 1, "passed": 0, "busy": null, "cpu": null,
                         "elu": null, "lag_ms": null, "rss_bytes": 0, "open": 0}
                    ],
                    "slots": [
                        {"slot": 0, "state": "running", "restarts": 2, "consecutive_crashes": 0, "restart_in_ms": null},
                        {"slot": 1, "state": "running", "restarts": 0, "consecutive_crashes": 0, "restart_in_ms": null},
                        {"slot": 2, "state": "crash-looping", "restarts": 9, "consecutive_crashes": 6, "restart_in_ms": 12_000},
                        {"slot": 3, "state": "running", "restarts": 0, "consecutive_crashes": 0, "restart_in_ms": null}
                    ],
                    "listeners": [{"address": "0.0.0.0:3000", "mode": "pass", "queued": 0, "passed": 460, "backlog": 0}],
                    "autoscale": {
                        "setpoint": 0.6,
                        "decision": {"desired": 4, "reason": "utilization",
                                     "text": "utilization 0.80 > 0.60 → 4 (cpu bound, upper 4)",
                                     "bound": "cpu", "upper": 4},
                        "last_change": {"from": 3, "to": 4, "reason": "utilization",
                                        "text": "utilization 0.80 > 0.60 → 4 (cpu bound, upper 4)",
                                        "ago_ms": 12_000}
                    }
                },
                {
                    "name": "api", "size": 2, "ready": 2, "desired": 2, "min": 1, "max": 1024,
                    "dispatch": "shared", "reloading": true,
                    "workers": [
                        {"slot": 0, "pid": 2001, "state": "ready", "uptime_ms": 5000, "restarts": 0,
                         "passed": 0, "busy": 0.1, "lag_ms": 1.0, "rss_bytes": 10_485_760, "open": 1},
                        {"slot": 1, "pid": 2002, "state": "draining", "uptime_ms": 9000, "restarts": 1,
                         "passed": 0, "busy": 0.0, "lag_ms": 0.5, "rss_bytes": 10_485_760, "open": 0}
                    ],
                    "slots": [{"slot": 0, "state": "running", "restarts": 0}, {"slot": 1, "state": "running", "restarts": 1}],
                    "listeners": [],
                    "autoscale": null
                }
            ]
        })
    }

    fn screen(model: &Model, ui: &UiState, w: u16, h: u16) -> String {
        let mut terminal = Terminal::new(TestBackend::new(w, h)).unwrap();
        terminal.draw(|f| render(f, model, ui)).unwrap();
        let buf = terminal.backend().buffer();
        let mut out = String::new();
        for y in 0..buf.area.height {
            for x in 0..buf.area.width {
                out.push_str(buf[(x, y)].symbol());
            }
            out.push('\n');
        }
        out
    }

    fn key(code: KeyCode) -> KeyEvent {
        KeyEvent::new(code, KeyModifiers::NONE)
    }

    fn model_with(status: &Value) -> Model {
        let mut m = Model::new();
        m.update(status, Instant::now());
        m
    }

    #[test]
    fn renders_apps_workers_crash_loops_and_the_decision() {
        let model = model_with(&fixture());
        let ui = UiState::default();
        let s = screen(&model, &ui, 140, 30);
        for want in [
            "web",
            "api",
            "master pid 4242",
            "8 cpus",
            "1001",
            "1002",
            "1004",
            "ready",
            "starting",
            "crash-looping",
            "retry 12.0s",
            "6 crashes",
            "utilization 0.80 > 0.60 → 4 (cpu bound, upper 4)",
            "3 → 4 12.0s ago",
            "bound: cpu (upper 4)",
            "1h01m",
            "50.0",
            "42.5",
            "90%",
            "0.0.0.0:3000 (pass)",
            "setpoint 60%",
            "q ",
            " quit",
            "reload",
        ] {
            assert!(s.contains(want), "missing {want:?} in\n{s}");
        }
        // Workers by slot, the crash-looping slot between them.
        let table = &s[s.find("slot pid").unwrap()..];
        let p0 = table.find("1001").unwrap();
        let p1 = table.find("1002").unwrap();
        let p2 = table.find("crash-looping").unwrap();
        let p3 = table.find("1004").unwrap();
        assert!(p0 < p1 && p1 < p2 && p2 < p3, "{s}");
        // Only the selected app's workers are in the table.
        assert!(!s.contains("2001"), "{s}");

        let ui = UiState {
            selected: 1,
            message: Some(Message {
                text: "api: 2 → 3 workers".into(),
                tone: Tone::Ok,
            }),
            confirm: None,
        };
        let s = screen(&model, &ui, 140, 30);
        for want in [
            "2001",
            "2002",
            "draining",
            "fixed size",
            "reloading",
            "api: 2 → 3 workers",
        ] {
            assert!(s.contains(want), "missing {want:?} in\n{s}");
        }
        assert!(!s.contains("1001"), "{s}");
    }

    #[test]
    fn a_slot_whose_retry_runs_has_only_its_workers_row() {
        let mut v = fixture();
        // Slot 2 of `web` is crash-looping and its retry is up.
        v["apps"][0]["workers"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!(
                {"slot": 2, "pid": 1003, "state": "starting", "uptime_ms": 50, "restarts": 9}
            ));
        let app = parse_app(&v["apps"][0]).unwrap();
        assert!(
            app.workers.iter().any(|w| w.slot == Some(2)),
            "{:?}",
            app.workers
        );
        assert!(
            app.slots.iter().all(|s| s.slot != Some(2)),
            "{:?}",
            app.slots
        );
        // Without a worker, the slot has its row.
        let app = parse_app(&fixture()["apps"][0]).unwrap();
        assert!(
            app.slots.iter().any(|s| s.slot == Some(2)),
            "{:?}",
            app.slots
        );
    }

    #[test]
    fn unreachable_master_is_shown_and_keeps_the_last_data() {
        let mut model = Model::new();
        let t0 = Instant::now();
        let s = screen(&model, &UiState::default(), 100, 20);
        assert!(s.contains("connecting to the master"), "{s}");
        assert!(s.contains("waiting for the master"), "{s}");
        model.update(&fixture(), t0);
        model.unreachable(
            "cannot reach a running master at /x.sock\x1b[2J",
            t0 + Duration::from_secs(5),
        );
        let s = screen(&model, &UiState::default(), 140, 30);
        assert!(s.contains("master unreachable"), "{s}");
        assert!(s.contains("last answer 5.0s ago"), "{s}");
        assert!(s.contains("/x.sock\u{fffd}[2J"), "{s}");
        assert!(s.contains("1001"), "{s}");
        // The stale panels are dimmed, the title is not.
        let mut terminal = Terminal::new(TestBackend::new(140, 30)).unwrap();
        terminal
            .draw(|f| render(f, &model, &UiState::default()))
            .unwrap();
        let buf = terminal.backend().buffer();
        let row = s.lines().position(|l| l.contains("1001")).unwrap() as u16;
        assert!(buf[(2, row)].modifier.contains(Modifier::DIM));
        assert!(!buf[(0, 0)].modifier.contains(Modifier::DIM));
        let h = model.history("web").unwrap();
        assert_eq!(h.len(), 2);
        assert_eq!(h.latest().unwrap().size, None);
        model.update(&fixture(), t0 + Duration::from_secs(6));
        assert_eq!(model.link, Link::Up);
    }

    #[test]
    fn history_keeps_five_minutes_and_feeds_the_sparklines() {
        let mut model = Model::new();
        let t0 = Instant::now();
        let mut status = fixture();
        for i in 0..400u64 {
            status["apps"][0]["size"] = json!(2 + i % 3);
            status["apps"][0]["workers"][0]["busy"] = json!((i % 10) as f64 / 10.0);
            model.update(&status, t0 + Duration::from_secs(i));
        }
        let h = model.history("web").unwrap();
        assert_eq!(h.len(), HISTORY_SAMPLES);
        let first = h.samples().next().unwrap();
        let last = h.latest().unwrap();
        assert_eq!(last.seq, 400);
        assert_eq!(first.seq, 101);
        assert_eq!(last.size, Some(2)); // 2 + 399 % 3
        assert_eq!(last.desired, Some(4));
        assert_eq!(last.upper, Some(4));
        // Ready workers are slots 0 (busy 0.7) and 1 (busy 0.9 - 0.9 = the varying one).
        let u = last.util.unwrap();
        assert!((u - (0.7 + 0.9) / 2.0).abs() < 1e-9, "{u}");
        assert_eq!(last.lag_ms, Some(42.5));

        // One column per poll: the last three sizes (polls 398, 399 and 400).
        let cols = h.columns(3, 1, Agg::Max, |s| s.size.map(|x| x as f64));
        assert_eq!(cols, vec![Some(3.0), Some(4.0), Some(2.0)]);
        // Ten polls per column, aligned to the numbering: polls 390..=399, then 400 alone.
        let cols = h.columns(2, 10, Agg::Max, |s| s.size.map(|x| x as f64));
        assert_eq!(cols, vec![Some(4.0), Some(2.0)]);
        // Polls 101..=400 fill the columns of blocks 10..=40; blocks 1..=9 are gone.
        let cols = h.columns(40, 10, Agg::Max, |s| s.size.map(|x| x as f64));
        assert_eq!(cols.iter().take_while(|c| c.is_none()).count(), 9);
        assert!(cols[9..].iter().all(Option::is_some));
        // Mean: utilization of the last block of ten.
        let cols = h.columns(2, 10, Agg::Mean, |s| s.util);
        let want = (0..10).map(|i| (0.7 + i as f64 / 10.0) / 2.0).sum::<f64>() / 10.0;
        assert!((cols[0].unwrap() - want).abs() < 1e-9, "{cols:?}");

        // Samples older than five minutes go even if the ring has room.
        let mut m = Model::new();
        m.update(&status, t0);
        m.update(&status, t0 + Duration::from_secs(301));
        assert_eq!(m.history("web").unwrap().len(), 1);

        // An app that disappears takes its history with it; a fixed pool has no upper.
        let h = model.history("api").unwrap();
        assert_eq!(h.latest().unwrap().upper, None);
        status["apps"].as_array_mut().unwrap().remove(1);
        model.update(&status, t0 + Duration::from_secs(401));
        assert!(model.history("api").is_none());

        let s = screen(&model, &UiState::default(), 140, 30);
        assert!(s.contains("size "), "{s}");
        assert!(s.contains("util 80%"), "{s}");
        assert!(s.contains("lag 42ms"), "{s}");
        assert!(s.contains('█'), "sparkline bars expected:\n{s}");
    }

    #[test]
    fn keys_map_to_actions() {
        let model = model_with(&fixture());
        let ui = UiState::default();
        let at1 = UiState {
            selected: 1,
            ..UiState::default()
        };
        assert_eq!(
            handle_key(key(KeyCode::Char('q')), &model, &ui),
            Action::Quit
        );
        assert_eq!(handle_key(key(KeyCode::Esc), &model, &ui), Action::Quit);
        assert_eq!(
            handle_key(
                KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL),
                &model,
                &ui
            ),
            Action::Quit
        );
        assert_eq!(
            handle_key(key(KeyCode::Down), &model, &ui),
            Action::Select(1)
        );
        assert_eq!(
            handle_key(key(KeyCode::Down), &model, &at1),
            Action::Select(1)
        );
        assert_eq!(
            handle_key(key(KeyCode::Up), &model, &at1),
            Action::Select(0)
        );
        assert_eq!(handle_key(key(KeyCode::Up), &model, &ui), Action::Select(0));
        // web is autoscaled: a fixed size would turn that off, so `+` first asks…
        assert_eq!(
            handle_key(key(KeyCode::Char('+')), &model, &ui),
            Action::ConfirmScale {
                app: "web".into(),
                n: 5
            }
        );
        // …and the same key again, with that question open, sends it.
        let asked = UiState {
            confirm: Some(Action::Scale {
                app: "web".into(),
                n: 5,
            }),
            ..UiState::default()
        };
        assert_eq!(
            handle_key(key(KeyCode::Char('+')), &model, &asked),
            Action::Scale {
                app: "web".into(),
                n: 5
            }
        );
        // The other key asks about its own size.
        assert_eq!(
            handle_key(key(KeyCode::Char('-')), &model, &asked),
            Action::ConfirmScale {
                app: "web".into(),
                n: 3
            }
        );
        // api has a fixed size: `-` scales at once.
        assert_eq!(
            handle_key(key(KeyCode::Char('-')), &model, &at1),
            Action::Scale {
                app: "api".into(),
                n: 1
            }
        );
        assert_eq!(
            handle_key(key(KeyCode::Char('r')), &model, &at1),
            Action::Reload { app: "api".into() }
        );
        assert_eq!(
            handle_key(key(KeyCode::Char('x')), &model, &ui),
            Action::None
        );
        // A selection past the end (apps went away) counts as the last app.
        let far = UiState {
            selected: 9,
            ..UiState::default()
        };
        assert_eq!(
            handle_key(key(KeyCode::Char('r')), &model, &far),
            Action::Reload { app: "api".into() }
        );
        // No apps, or no desired size: nothing to scale or select.
        let empty = Model::new();
        assert_eq!(
            handle_key(key(KeyCode::Char('+')), &empty, &ui),
            Action::None
        );
        assert_eq!(handle_key(key(KeyCode::Down), &empty, &ui), Action::None);
        assert_eq!(
            handle_key(key(KeyCode::Char('r')), &empty, &ui),
            Action::None
        );
        let mut zero = fixture();
        zero["apps"][0]["desired"] = json!(0);
        let zero = model_with(&zero);
        assert_eq!(
            handle_key(key(KeyCode::Char('-')), &zero, &ui),
            Action::None
        );
        // After a scale answer `+` counts from the new size.
        let mut m = model_with(&fixture());
        m.scaled("api", 6);
        assert_eq!(
            handle_key(key(KeyCode::Char('+')), &m, &at1),
            Action::Scale {
                app: "api".into(),
                n: 7
            }
        );
    }

    #[test]
    fn actions_become_requests_and_answers_become_messages() {
        let model = model_with(&fixture());
        let scale = Action::Scale {
            app: "web".into(),
            n: 5,
        };
        assert_eq!(
            request_for(&scale),
            Some(Request::Scale {
                app: "web".into(),
                n: Some(5),
                min: None,
                max: None,
            })
        );
        assert_eq!(
            request_for(&Action::Reload { app: "api".into() }),
            Some(Request::Reload {
                app: Some("api".into()),
                batch: None
            })
        );
        assert_eq!(request_for(&Action::Quit), None);
        assert_eq!(pending(&scale).unwrap().tone, Tone::Pending);

        // Before an autoscaled app gets a fixed size, the footer says what that does.
        let ask = Action::ConfirmScale {
            app: "web".into(),
            n: 5,
        };
        assert_eq!(request_for(&ask), None, "a question sends nothing");
        assert_eq!(pending(&ask), None);
        let m = confirm_message(&ask, &model).unwrap();
        assert_eq!(
            m.text,
            "web is autoscaled (2..8): press the key again to fix it at 5 workers and turn autoscaling off"
        );
        assert_eq!(confirm_message(&scale, &model), None);

        let m = describe(
            &scale,
            &Ok(json!({"app": "web", "from": 4, "to": 5, "min": 1, "max": 1024})),
            &model,
        );
        assert_eq!(m.tone, Tone::Ok);
        assert_eq!(
            m.text,
            "web: 4 → 5 workers, a fixed size now: autoscaling is off (`processes scale web min=A,max=B` turns it back on)"
        );
        // The master's word wins over the model's (which a poll may already have updated).
        let m = describe(
            &scale,
            &Ok(json!({"from": 4, "to": 5, "autoscale_stopped": false})),
            &model,
        );
        assert_eq!(m.text, "web: 4 → 5 workers");
        let m = describe(
            &Action::Scale {
                app: "api".into(),
                n: 0,
            },
            &Ok(json!({"app": "api", "from": 1, "to": 1})),
            &model,
        );
        assert_eq!(m.text, "api: stays at 1 worker");
        let m = describe(&scale, &Err("no app named web".into()), &model);
        assert_eq!(m.tone, Tone::Error);
        assert_eq!(m.text, "scale failed: no app named web");
        let reload = Action::Reload { app: "api".into() };
        let m = describe(&reload, &Ok(json!({"replaced": 2})), &model);
        assert_eq!(m.text, "api: reload done, 2 workers replaced");
        let m = describe(&reload, &Ok(Value::Null), &model);
        assert_eq!(m.text, "api: reload done");
        let m = describe(
            &reload,
            &Err("api: a reload is already running; wait for it to finish".into()),
            &model,
        );
        assert_eq!(m.tone, Tone::Error);
        assert_eq!(
            m.text,
            "reload failed: api: a reload is already running; wait for it to finish"
        );
    }

    #[test]
    fn formats() {
        assert_eq!(fmt_duration(950), "950ms");
        assert_eq!(fmt_duration(12_345), "12.3s");
        assert_eq!(fmt_duration(252_000), "4m12s");
        assert_eq!(fmt_duration(7_500_000), "2h05m");
        assert_eq!(fmt_duration(3 * 86_400_000 + 4 * 3_600_000), "3d04h");
        assert_eq!(
            fmt_duration(u64::MAX),
            format!(
                "{}d{:02}h",
                u64::MAX / 1000 / 86400,
                u64::MAX / 1000 / 3600 % 24
            )
        );
        assert_eq!(fmt_bytes(3_300_000_000), "3.1 GiB");
        assert_eq!(fmt_bytes(512 * 1024 * 1024), "512 MiB");
        assert_eq!(fmt_us(850), "850µs");
        assert_eq!(fmt_us(4100), "4.1ms");
        assert_eq!(clean("a\nb\x1b"), "a\u{fffd}b\u{fffd}");
        assert_eq!(clean(&"x".repeat(1000)).len(), MAX_TEXT);
    }

    #[test]
    fn garbage_and_tiny_screens_do_not_panic() {
        let garbage = [
            Value::Null,
            json!(1),
            json!("apps"),
            json!([]),
            json!({"apps": null}),
            json!({"apps": {"name": "x"}}),
            json!({"apps": [null, 1, "x", [], {}]}),
            json!({"apps": [{"name": 5}, {"name": "a", "size": -1, "desired": 1.5e300,
                             "min": "2", "max": [], "workers": {"slot": 1},
                             "slots": [null, {"state": 3}], "autoscale": []}]}),
            json!({"apps": [{"name": "a", "desired": u64::MAX, "autoscale": {"decision": 1,
                             "last_change": {"from": "x", "ago_ms": -5}, "setpoint": "hi"},
                             "workers": [{"slot": -1, "pid": 1e300, "state": null,
                                          "busy": -0.5, "lag_ms": 1e308, "rss_bytes": 1.7e308}]}],
                    "host": [], "sample": "no", "pid": -3}),
        ];
        let mut model = Model::new();
        let t0 = Instant::now();
        for (i, g) in garbage.iter().enumerate() {
            model.update(g, t0 + Duration::from_secs(i as u64));
            for (w, h) in [(140, 30), (80, 24), (20, 5), (1, 1), (0, 0), (3, 40)] {
                screen(&model, &UiState::default(), w, h);
            }
            for code in [
                KeyCode::Char('+'),
                KeyCode::Char('-'),
                KeyCode::Char('r'),
                KeyCode::Up,
                KeyCode::Down,
            ] {
                handle_key(key(code), &model, &UiState::default());
            }
        }
        // `+` at u64::MAX does not overflow.
        assert_eq!(
            handle_key(key(KeyCode::Char('+')), &model, &UiState::default()),
            Action::None
        );
        let full = model_with(&fixture());
        for (w, h) in [(20, 5), (1, 1), (0, 0), (200, 3), (60, 60)] {
            screen(&full, &UiState::default(), w, h);
        }
    }

    /// Field names the status uses, so that generated objects hit the parser's paths.
    const KEYS: &[&str] = &[
        "pid",
        "host",
        "cpus",
        "cpu_busy",
        "mem_headroom_bytes",
        "sample",
        "interval_ms",
        "last_tick_us",
        "max_tick_us",
        "apps",
        "name",
        "size",
        "ready",
        "desired",
        "min",
        "max",
        "dispatch",
        "reloading",
        "workers",
        "slot",
        "state",
        "uptime_ms",
        "restarts",
        "busy",
        "lag_ms",
        "rss_bytes",
        "passed",
        "open",
        "slots",
        "restart_in_ms",
        "consecutive_crashes",
        "listeners",
        "address",
        "mode",
        "autoscale",
        "setpoint",
        "decision",
        "text",
        "bound",
        "upper",
        "last_change",
        "from",
        "to",
        "ago_ms",
        "other",
    ];

    fn leaf() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            (0u64..20).prop_map(Value::from),
            any::<f64>()
                .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
            prop::sample::select(
                &[
                    "ready",
                    "starting",
                    "draining",
                    "crash-looping",
                    "backing-off",
                    "running",
                    "none",
                    "cpu"
                ][..]
            )
            .prop_map(Value::from),
            ".{0,16}".prop_map(Value::from),
        ]
    }

    fn json_value() -> impl Strategy<Value = Value> {
        leaf().prop_recursive(5, 96, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::vec((prop::sample::select(KEYS), inner), 0..10).prop_map(|kv| {
                    Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
                }),
            ]
        })
    }

    /// Replaces the value at a path of keys and indices in `v` (as far as it exists).
    fn set_path(v: &mut Value, path: &[(usize, usize)], new: Value) {
        let mut cur = v;
        for &(k, i) in path {
            let len = match &*cur {
                Value::Object(m) => m.len(),
                Value::Array(a) => a.len(),
                _ => 0,
            };
            if len == 0 {
                break;
            }
            cur = match cur {
                Value::Object(m) => m.values_mut().nth(k % len).expect("in range"),
                Value::Array(a) => &mut a[i % len],
                _ => unreachable!("a container"),
            };
        }
        *cur = new;
    }

    proptest! {
        #[test]
        fn any_json_updates_renders_and_maps_keys_without_panicking(
            values in prop::collection::vec(json_value(), 1..4),
            w in 0u16..160,
            h in 0u16..50,
            selected in 0usize..4,
        ) {
            let mut model = Model::new();
            let t0 = Instant::now();
            let ui = UiState { selected, ..UiState::default() };
            for (i, v) in values.iter().enumerate() {
                model.update(v, t0 + Duration::from_millis(i as u64 * 1000));
                screen(&model, &ui, w, h);
                for code in [KeyCode::Char('+'), KeyCode::Char('-'), KeyCode::Char('r'), KeyCode::Down] {
                    handle_key(key(code), &model, &ui);
                }
            }
            model.unreachable("gone", t0 + Duration::from_secs(10));
            screen(&model, &ui, w, h);
        }

        #[test]
        fn a_status_with_one_field_replaced_still_renders(
            path in prop::collection::vec((0usize..16, 0usize..4), 0..6),
            new in json_value(),
        ) {
            let mut status = fixture();
            set_path(&mut status, &path, new);
            let mut model = Model::new();
            let t0 = Instant::now();
            model.update(&fixture(), t0);
            model.update(&status, t0 + Duration::from_secs(1));
            let s = screen(&model, &UiState::default(), 120, 30);
            prop_assert!(s.contains("processes top"));
            for a in model.apps() {
                prop_assert!(!a.name.chars().any(char::is_control));
            }
        }
    }
}
