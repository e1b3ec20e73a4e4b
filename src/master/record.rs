//! One function per thing that happens, each firing its USDT probe and counting its
//! metric together, so the two never drift apart (vector's `internal_events` idea).
//!
//! The functions that fire a probe are `#[inline(never)]`: a probe site is a note in the
//! binary pointing at an instruction, and when LLVM inlines such a function into its caller
//! but also leaves an out-of-line copy that the linker then drops as unused, the copy's
//! note is left pointing at nothing (bpftrace warns "invalid address" for it). One copy,
//! always called, keeps every note valid; a call per event costs nothing measurable.

use crate::backoff::ExitKind;
use crate::metrics;
use crate::pool::StopReason;
use crate::probes::{self, HandleKind};

/// A worker exited; `asked` is the master's reason when it had asked it to stop.
#[inline(never)]
pub fn worker_exit(
    app: &str,
    slot: u32,
    pid: i32,
    exit: ExitKind,
    uptime_ms: u64,
    asked: Option<StopReason>,
) {
    let (code, sig) = match exit {
        ExitKind::Code(c) => (c, 0),
        ExitKind::Signal(s) => (-1, s),
    };
    let signal = (sig != 0).then_some(sig);
    match asked {
        Some(reason) => {
            probes::worker_exit(app, slot, pid, code, sig, uptime_ms);
            metrics::worker_exit(app, reason.as_str(), signal);
        }
        None => {
            probes::worker_crash(app, slot, pid, code, sig, uptime_ms);
            metrics::worker_exit(app, if signal.is_some() { "crash" } else { "exit" }, signal);
        }
    }
}

/// A crashed slot will be started again after `delay_ms`.
#[inline(never)]
pub fn restart_scheduled(app: &str, slot: u32, attempt: u32, delay_ms: u64) {
    probes::restart_scheduled(app, slot, attempt, delay_ms);
    metrics::restart(app, "crash");
}

/// A replacement started for a worker (reload, memory limit, `processes restart`).
pub fn replacement(app: &str, reason: StopReason) {
    metrics::restart(app, reason.as_str());
}

/// An fd went to a worker.
#[inline(never)]
pub fn handle_pass(app: &str, slot: u32, pid: i32, fd: i32, kind: HandleKind) {
    probes::handle_pass(app, slot, pid, fd, kind);
    metrics::handle_passed(app, slot, kind.as_str());
}

/// The pool's size changed.
#[inline(never)]
pub fn scale(app: &str, from: usize, to: usize, reason: &'static str) {
    probes::scale(app, from as u32, to as u32, reason);
    metrics::scale_event(app, to > from, reason);
}
