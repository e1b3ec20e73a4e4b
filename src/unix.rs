//! The few process-control syscalls the master makes: signalling process groups and
//! reaping children.
//!
//! All `kill(-pgid)` and `waitpid` calls live here. Every worker leads its own process
//! group (its pgid is its pid), so signalling the group reaches whatever it forked.

use std::io;

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill, killpg};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use crate::backoff::ExitKind;

/// Sends `sig` to the whole process group led by `pgid`. A group that is already gone is
/// not an error.
pub fn signal_group(pgid: i32, sig: Signal) -> io::Result<()> {
    if pgid <= 1 {
        // killpg(0 or 1) would hit the master's own group or everything: never.
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    match killpg(Pid::from_raw(pgid), sig) {
        Ok(()) | Err(Errno::ESRCH) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Sends `sig` to one process. A process that is already gone is not an error.
pub fn signal_pid(pid: i32, sig: Signal) -> io::Result<()> {
    if pid <= 1 {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    match kill(Pid::from_raw(pid), sig) {
        Ok(()) | Err(Errno::ESRCH) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Reaps every child that has exited, without blocking.
///
/// Called on each `SIGCHLD`. Signals coalesce (two children dying together raise one
/// `SIGCHLD`), so this loops until `waitpid` has nothing more; and because the `SIGCHLD`
/// stream is registered before the first fork, an exit between a fork and the first call
/// here is never missed — it leaves a pending signal that wakes the loop again. Children
/// the master did not start itself (orphans re-parented to it when it runs as PID 1) are
/// reaped too and reported like any other; the caller ignores pids it does not know.
pub fn reap_exited() -> Vec<(i32, ExitKind)> {
    let mut out = Vec::new();
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => out.push((pid.as_raw(), ExitKind::Code(code))),
            Ok(WaitStatus::Signaled(pid, sig, _)) => {
                out.push((pid.as_raw(), ExitKind::Signal(sig as i32)))
            }
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
            // Stopped/continued children are not exits; keep looking for real ones.
            Ok(_) => continue,
            Err(Errno::EINTR) => continue,
            Err(_) => break,
        }
    }
    out
}

/// The name of a signal number, for logs and labels (`SIGKILL`), or its number.
pub fn signal_name(sig: i32) -> String {
    Signal::try_from(sig)
        .map(|s| s.as_str().to_string())
        .unwrap_or_else(|_| format!("signal {sig}"))
}

/// Registers an owned fd with the tokio reactor for the given readiness.
pub fn async_fd(
    fd: std::os::fd::OwnedFd,
    interest: tokio::io::Interest,
) -> io::Result<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>> {
    // SAFETY: `OwnedFd` owns an open descriptor and always returns that same number from
    // `as_raw_fd`; the `AsyncFd` takes ownership of it, so the fd stays open and refers to
    // the same file description until the `AsyncFd` is dropped.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, interest) }
        .map_err(io::Error::from)
}

/// Marks every fd above stderr close-on-exec, so that what the master's own parent left
/// open (a terminal's extra fds, a build tool's pipes) never reaches a worker: workers get
/// exactly the fds the master places for them. Called first thing in `main`, after the
/// systemd sockets were taken (those are made close-on-exec there too).
pub fn cloexec_inherited_fds() {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<i32> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
        .filter(|&fd| fd > 2)
        .collect();
    for fd in fds {
        // read_dir's own fd is closed by now; F_SETFD on it just fails with EBADF.
        let _ = nix::fcntl::fcntl(
            fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
    }
}

/// While a close on the closer thread has blocked this long…
pub const CLOSE_STUCK_AFTER: std::time::Duration = std::time::Duration::from_secs(1);
/// …and this many fds wait behind it, a worker that sends more is cut off (see
/// [`closes_jammed`]): the master's fd count stays bounded.
pub const MAX_CLOSES_WAITING: usize = 64;

/// Closes an fd a worker sent us, never on the loop, and without waiting for a lingering
/// socket: `SO_LINGER` is cleared first (a worker chooses both the linger time and the
/// unsent data), so a socket's close returns at once. The close itself happens on a thread
/// of its own all the same: a close can still block where the worker chose the file (a
/// FUSE or NFS file flushes on close, a tty drains), or where it set `SO_LINGER` again on
/// its own copy between our clear and our close. That thread closes fds one after another;
/// should one close block, [`closes_jammed`] tells the channels to cut off a worker that
/// sends more, so the fds waiting behind it cannot grow without bound.
pub fn close_later(fd: std::os::fd::OwnedFd) {
    close_via(closer(), fd);
}

fn close_via(closer: Option<&Closer>, fd: std::os::fd::OwnedFd) {
    disarm_linger(&fd);
    match closer {
        Some(closer) => closer.queue(fd),
        // No thread to take it: closed here, which does not wait for a socket any more.
        None => drop(fd),
    }
}

/// Whether a close on the closer thread has blocked for [`CLOSE_STUCK_AFTER`] with
/// [`MAX_CLOSES_WAITING`] more fds behind it. Workers send no fds in normal use (Node
/// workers none at all), so one that sends more then is cut off rather than let the
/// master's fds pile up.
pub fn closes_jammed() -> bool {
    closer().is_some_and(Closer::jammed)
}

fn closer() -> Option<&'static Closer> {
    static CLOSER: std::sync::OnceLock<Option<Closer>> = std::sync::OnceLock::new();
    CLOSER.get_or_init(Closer::start).as_ref()
}

/// A thread that closes the fds it is given, in order, and says how it is doing.
struct Closer {
    tx: std::sync::mpsc::Sender<std::os::fd::OwnedFd>,
    state: std::sync::Arc<CloserState>,
}

#[derive(Default)]
struct CloserState {
    /// Fds given and not closed yet, the one being closed included.
    waiting: std::sync::atomic::AtomicUsize,
    /// When the close under way began, in ms since `epoch` plus 1; 0 while idle.
    busy_since: std::sync::atomic::AtomicU64,
    epoch: std::sync::OnceLock<std::time::Instant>,
}

impl CloserState {
    fn now_ms(&self) -> u64 {
        let epoch = self.epoch.get_or_init(std::time::Instant::now);
        epoch.elapsed().as_millis() as u64 + 1
    }
}

impl Closer {
    fn start() -> Option<Closer> {
        use std::sync::atomic::Ordering;
        let (tx, rx) = std::sync::mpsc::channel::<std::os::fd::OwnedFd>();
        let state = std::sync::Arc::new(CloserState::default());
        state.now_ms();
        let thread_state = state.clone();
        std::thread::Builder::new()
            .name("processes-closer".into())
            .spawn(move || {
                for fd in rx {
                    let st = &thread_state;
                    st.busy_since.store(st.now_ms(), Ordering::SeqCst);
                    drop(fd);
                    st.busy_since.store(0, Ordering::SeqCst);
                    st.waiting.fetch_sub(1, Ordering::SeqCst);
                }
            })
            .ok()?;
        Some(Closer { tx, state })
    }

    fn queue(&self, fd: std::os::fd::OwnedFd) {
        use std::sync::atomic::Ordering;
        self.state.waiting.fetch_add(1, Ordering::SeqCst);
        if let Err(std::sync::mpsc::SendError(fd)) = self.tx.send(fd) {
            // The thread is gone (it cannot panic, but should it end): close here.
            self.state.waiting.fetch_sub(1, Ordering::SeqCst);
            drop(fd);
        }
    }

    fn waiting(&self) -> usize {
        self.state.waiting.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn jammed(&self) -> bool {
        let since = self
            .state
            .busy_since
            .load(std::sync::atomic::Ordering::SeqCst);
        since != 0
            && self.state.now_ms().saturating_sub(since) >= CLOSE_STUCK_AFTER.as_millis() as u64
            && self.waiting() > MAX_CLOSES_WAITING
    }
}

/// Makes the last close of this socket return at once (and the kernel finish sending in
/// the background), whatever `SO_LINGER` a worker set on its copy. Not a socket: nothing.
pub fn disarm_linger(fd: &impl std::os::fd::AsFd) {
    let _ = socket2::SockRef::from(fd).set_linger(None);
}

/// Puts the calling thread (and threads it starts afterwards) under `SCHED_BATCH`: the
/// same CPU share as before, but its wake-ups do not preempt whatever is running. The
/// master wakes once or twice per connection it passes; preempting a worker each time cost
/// both throughput and tail latency on a busy machine (BENCHMARKS.md, "The p99"), while on
/// an idle CPU a wake-up runs at once anyway. Workers are put back to the ordinary policy
/// before they exec. Fails only where the policy does not exist; the caller carries on.
pub fn batch_scheduling() -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler on the calling thread with a valid sched_param.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The soft `RLIMIT_NOFILE` the master was started with, when it raised its own: workers
/// get this one back before they exec (`spawn`), as if started by anyone else.
static STARTING_NOFILE: std::sync::OnceLock<libc::rlimit> = std::sync::OnceLock::new();

/// Raises the master's soft limit on open fds to its hard limit (at most 2^20), as
/// systemd advises for a process that holds many: the default soft limit of 1024 is soon
/// reached by a master with many workers and connections in flight. Returns the limit in
/// force.
pub fn raise_nofile() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `lim`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let want = lim.rlim_max.min(1 << 20);
    if lim.rlim_cur >= want {
        return Ok(lim.rlim_cur);
    }
    let raised = libc::rlimit {
        rlim_cur: want,
        rlim_max: lim.rlim_max,
    };
    // SAFETY: setrlimit with a valid rlimit, the soft limit within the hard one.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let _ = STARTING_NOFILE.set(lim);
    Ok(want)
}

/// The fd limit a worker should start with: the master's own before it raised it.
pub fn starting_nofile() -> Option<libc::rlimit> {
    STARTING_NOFILE.get().copied()
}

/// For tests elsewhere: hands `fd` to this process's closer as it is (a lingering socket
/// stays lingering), so that its close can block there.
#[cfg(test)]
pub(crate) fn close_later_as_is(fd: std::os::fd::OwnedFd) {
    closer().unwrap().queue(fd);
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// A TCP socket whose last close waits up to `secs` (a full send buffer, a peer that
    /// never reads), with the listener that keeps it so.
    pub(crate) fn lingering_socket(secs: u64) -> (std::os::fd::OwnedFd, std::net::TcpListener) {
        use std::io::Write;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut conn = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        conn.set_nonblocking(true).unwrap();
        let chunk = vec![b'x'; 64 * 1024];
        while conn.write(&chunk).is_ok() {}
        socket2::SockRef::from(&conn)
            .set_linger(Some(Duration::from_secs(secs)))
            .unwrap();
        (conn.into(), listener)
    }

    fn wait(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if f() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        f()
    }

    /// A lingering socket given to the closer as `close_later` gives it closes at once, and
    /// the fds after it do not wait.
    #[test]
    fn a_lingering_socket_closes_at_once() {
        let closer = Closer::start().unwrap();
        let (conn, _listener) = lingering_socket(30);
        let t = Instant::now();
        close_via(Some(&closer), conn);
        for _ in 0..10 {
            close_via(
                Some(&closer),
                std::fs::File::open("/dev/null").unwrap().into(),
            );
        }
        assert!(wait(Duration::from_secs(5), || closer.waiting() == 0));
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        assert!(!closer.jammed());
    }

    /// A close that blocks (here a lingering socket given as it is) is seen once it has
    /// blocked for a second with more than `MAX_CLOSES_WAITING` behind it, and the fds
    /// behind it are closed once it returns.
    #[test]
    fn a_close_that_blocks_is_seen_as_jammed_until_it_returns() {
        let closer = Closer::start().unwrap();
        let (conn, _listener) = lingering_socket(2);
        let t = Instant::now();
        closer.queue(conn);
        for _ in 0..MAX_CLOSES_WAITING {
            closer.queue(std::fs::File::open("/dev/null").unwrap().into());
        }
        assert!(!closer.jammed(), "jammed at once");
        assert!(wait(Duration::from_secs(2), || closer.jammed()));
        // The closer counts whole milliseconds: up to 2 ms early by this clock.
        assert!(
            t.elapsed() + Duration::from_millis(2) >= CLOSE_STUCK_AFTER,
            "{:?}",
            t.elapsed()
        );
        assert_eq!(closer.waiting(), MAX_CLOSES_WAITING + 1);
        assert!(wait(Duration::from_secs(10), || closer.waiting() == 0));
        assert!(!closer.jammed());
    }
}
