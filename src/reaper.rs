//! The reaper: a small process that outlives the master only to kill what the master
//! leaves behind if it dies without stopping its workers.
//!
//! Each worker gets `SIGKILL` when the master dies (its parent-death signal), but that
//! signal is not inherited: the children of a worker — `npm start` running `node`, a shell
//! wrapper, a worker's own helpers — would live on, and could hold the app's port. So at
//! start, while it is still single-threaded, the master forks this process, and tells it
//! the process group of every worker it starts and reaps, over a pipe. When the pipe
//! reads EOF, the master is gone: the reaper kills every group it still knows of and
//! exits. A master that stops normally has already stopped every group; the reaper then
//! finds nothing to kill.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::OwnedFd;

/// The master's end: tells the reaper which process groups to watch.
#[derive(Debug)]
pub struct Reaper {
    pipe: File,
}

impl Reaper {
    /// Forks the reaper. Must be called while the process has a single thread (first
    /// thing in `main`): the child runs ordinary Rust code after the fork.
    pub fn start() -> std::io::Result<Reaper> {
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        // SAFETY: the caller guarantees a single-threaded process, so the child may
        // allocate and take locks: no other thread held one at the fork.
        match unsafe { nix::unistd::fork() }? {
            nix::unistd::ForkResult::Child => {
                drop(write);
                run(read)
            }
            nix::unistd::ForkResult::Parent { .. } => {
                drop(read);
                Ok(Reaper {
                    pipe: File::from(write),
                })
            }
        }
    }

    /// Watch this worker's process group from now on.
    pub fn watch(&mut self, pgid: i32) {
        // The reaper gone (killed by someone) is not the master's problem.
        let _ = writeln!(self.pipe, "+{pgid}");
    }

    /// The group is gone; forget it (its number may be reused).
    pub fn forget(&mut self, pgid: i32) {
        let _ = writeln!(self.pipe, "-{pgid}");
    }
}

/// The reaper's whole life.
fn run(read: OwnedFd) -> ! {
    // SAFETY: prctl(PR_SET_NAME) with a NUL-terminated static string.
    unsafe { libc::prctl(libc::PR_SET_NAME, c"processes-reaper".as_ptr()) };
    // Terminal and service-manager signals are for the master; the reaper ends when the
    // master does (EOF), not before.
    for sig in [
        libc::SIGINT,
        libc::SIGTERM,
        libc::SIGHUP,
        libc::SIGTTIN,
        libc::SIGTTOU,
        libc::SIGQUIT,
    ] {
        // SAFETY: setting a disposition to SIG_IGN has no memory effects.
        unsafe { libc::signal(sig, libc::SIG_IGN) };
    }
    let keep = std::os::fd::AsRawFd::as_raw_fd(&read);
    close_everything_but(keep);
    let mut groups = BTreeSet::new();
    let reader = BufReader::new(File::from(read));
    for line in reader.lines() {
        let Ok(line) = line else { break };
        let (op, n) = line.split_at(line.len().min(1));
        let Ok(pgid) = n.parse::<i32>() else { continue };
        match op {
            "+" if pgid > 1 => {
                groups.insert(pgid);
            }
            "-" => {
                groups.remove(&pgid);
            }
            _ => {}
        }
    }
    for pgid in groups {
        let _ = crate::unix::signal_group(pgid, nix::sys::signal::Signal::SIGKILL);
    }
    std::process::exit(0)
}

/// Leaves the reaper holding nothing of the master's: no listening socket (which would
/// keep a port bound), no pipe to the master's own reader (which would never see EOF).
/// stdin, stdout and stderr point at `/dev/null`.
fn close_everything_but(keep: i32) {
    let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
                .collect()
        })
        .unwrap_or_default();
    if let Ok(null) = File::options().read(true).write(true).open("/dev/null") {
        let null: OwnedFd = null.into();
        for target in 0..3 {
            // SAFETY: dup2 onto the standard fds of this single-threaded process.
            unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), target) };
        }
    }
    for fd in fds {
        if fd > 2 && fd != keep {
            // SAFETY: close(2) on an fd number nothing in the reaper refers to; one that
            // is already closed (read_dir's own) just fails with EBADF.
            unsafe { libc::close(fd) };
        }
    }
}
