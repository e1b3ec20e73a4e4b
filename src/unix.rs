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

/// Closes an fd a worker sent us on a thread of its own, never on the loop: the last
/// close of a socket with `SO_LINGER` set and unsent data blocks for the linger time, and
/// a worker chooses both. Such fds are rare (Node workers send none in normal use), so
/// one thread woken per fd costs nothing that matters.
pub fn close_later(fd: std::os::fd::OwnedFd) {
    use std::sync::{OnceLock, mpsc};
    static CLOSER: OnceLock<Option<mpsc::Sender<std::os::fd::OwnedFd>>> = OnceLock::new();
    let closer = CLOSER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<std::os::fd::OwnedFd>();
        std::thread::Builder::new()
            .name("processes-closer".into())
            .spawn(move || rx.into_iter().for_each(drop))
            .ok()
            .map(|_| tx)
    });
    let unsent = match closer {
        Some(tx) => tx.send(fd).err().map(|mpsc::SendError(fd)| fd),
        None => Some(fd),
    };
    // No thread to take it: make the close not wait, then close here.
    if let Some(fd) = unsent {
        disarm_linger(&fd);
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
