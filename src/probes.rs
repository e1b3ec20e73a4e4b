//! USDT probes of the `processes` master (provider `processes`, see probes/processes.d).
//!
//! Each fire function is `#[inline(always)]` and takes plain values. With the
//! `usdt-probes` feature on, it expands to the usdt probe macro: on Linux that
//! is a 2-byte semaphore load + branch; only when a tracer has the probe
//! enabled (semaphore != 0) is the argument closure evaluated (for `char *`
//! arguments that means one small heap copy to NUL-terminate the `&str`),
//! the registers loaded and the `nop` (patched to int3 by uprobes) executed.
//! With the feature off every function body is empty.
//!
//! Probe names as tracers see them use dashes: `worker_spawn()` fires
//! `processes:::worker-spawn`.

#[cfg(feature = "usdt-probes")]
include!(concat!(env!("OUT_DIR"), "/processes.rs"));

/// Error from [`register`]. Only possible on DTrace platforms (illumos,
/// FreeBSD, macOS); on Linux registration is a no-op and always succeeds.
#[derive(Debug)]
pub struct RegisterError(String);

impl std::fmt::Display for RegisterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "USDT probe registration failed: {}", self.0)
    }
}

impl std::error::Error for RegisterError {}

/// Register the probes with the DTrace kernel module (needed on illumos /
/// FreeBSD / macOS before `dtrace -l` sees them; a no-op on Linux, where the
/// probes are ELF notes read by the tracer from the binary). Idempotent and
/// thread-safe. Never panics.
pub fn register() -> Result<(), RegisterError> {
    #[cfg(feature = "usdt-probes")]
    {
        usdt::register_probes().map_err(|e| RegisterError(e.to_string()))
    }
    #[cfg(not(feature = "usdt-probes"))]
    {
        Ok(())
    }
}

/// [`register`], turning a failure into one warning. Tracing is optional: a failure
/// must never stop the master.
pub fn register_or_warn() {
    if let Err(e) = register() {
        tracing::warn!("{e}; processes:::* probes unavailable");
    }
}

macro_rules! fire {
    ($probe:ident, $($arg:expr),+) => {
        #[cfg(feature = "usdt-probes")]
        self::processes::$probe!(|| ($($arg),+));
        #[cfg(not(feature = "usdt-probes"))]
        // never called: keeps the arguments "used" without evaluating them
        { let _ = || { $( let _ = $arg; )+ }; }
    };
}

/// `worker-spawn`: a worker process was spawned.
#[inline(always)]
pub fn worker_spawn(app: &str, slot: u32, pid: i32, command: &str) {
    fire!(worker__spawn, app, slot, pid, command);
}

/// `worker-spawn` with a lazily built command line: `command` runs only while
/// a tracer has the probe enabled (use when the caller would have to join argv).
#[inline(always)]
pub fn worker_spawn_with<S: AsRef<str>>(
    app: &str,
    slot: u32,
    pid: i32,
    command: impl FnOnce() -> S,
) {
    fire!(worker__spawn, app, slot, pid, command());
}

/// `worker-ready`: a worker became ready `startup_us` after its spawn.
#[inline(always)]
pub fn worker_ready(app: &str, slot: u32, pid: i32, startup_us: u64) {
    fire!(worker__ready, app, slot, pid, startup_us);
}

/// `worker-exit`: a worker exited because the master asked it to.
/// `exit_code` is -1 when killed by a signal; `signal` is 0 on a normal exit.
#[inline(always)]
pub fn worker_exit(app: &str, slot: u32, pid: i32, exit_code: i32, signal: i32, uptime_ms: u64) {
    fire!(worker__exit, app, slot, pid, exit_code, signal, uptime_ms);
}

/// `worker-crash`: a worker exited without the master asking. Args as `worker_exit`.
#[inline(always)]
pub fn worker_crash(app: &str, slot: u32, pid: i32, exit_code: i32, signal: i32, uptime_ms: u64) {
    fire!(worker__crash, app, slot, pid, exit_code, signal, uptime_ms);
}

/// `restart-scheduled`: slot will be respawned after `delay_ms` (attempt is 1-based).
#[inline(always)]
pub fn restart_scheduled(app: &str, slot: u32, attempt: u32, delay_ms: u64) {
    fire!(restart__scheduled, app, slot, attempt, delay_ms);
}

/// Kind of fd passed to a worker, as the `kind` string of `handle-pass`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandleKind {
    Listener,
    Connection,
}

impl HandleKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            HandleKind::Listener => "listener",
            HandleKind::Connection => "connection",
        }
    }
}

/// `handle-pass`: fd `fd` was sent to the worker; kind "listener" / "connection".
#[inline(always)]
pub fn handle_pass(app: &str, slot: u32, pid: i32, fd: i32, kind: HandleKind) {
    fire!(handle__pass, app, slot, pid, fd, kind.as_str());
}

/// `sample`: periodic load sample of one worker.
#[inline(always)]
pub fn sample(app: &str, slot: u32, pid: i32, busy_permille: u32, lag_us: u64, rss_kb: u64) {
    fire!(sample, app, slot, pid, busy_permille, lag_us, rss_kb);
}

/// `scale`: the worker count of `app` changed from `from` to `to`.
#[inline(always)]
pub fn scale(app: &str, from: u32, to: u32, reason: &str) {
    fire!(scale, app, from, to, reason);
}

/// `reload-start`: a rolling reload of `workers` workers started.
#[inline(always)]
pub fn reload_start(app: &str, workers: u32) {
    fire!(reload__start, app, workers);
}

/// `reload-done`: a rolling reload finished; `ok` is true when it succeeded.
#[inline(always)]
pub fn reload_done(app: &str, replaced: u32, ok: bool) {
    fire!(reload__done, app, replaced, ok as i32);
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    /// Untraced (semaphore 0), the argument closure must not run.
    /// (The closure must not diverge: a probe whose only call site can never
    /// reach its asm! loses the semaphore definition -> link error
    /// `undefined symbol: __usdt_sema_processes_worker__spawn`.)
    #[test]
    fn args_not_evaluated_when_untraced() {
        static CALLED: AtomicBool = AtomicBool::new(false);
        super::worker_spawn_with("a", 0, 0, || {
            CALLED.store(true, Ordering::Relaxed);
            String::from("cmd")
        });
        assert!(!CALLED.load(Ordering::Relaxed));
    }
}
