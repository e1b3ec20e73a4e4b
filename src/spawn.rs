//! Fork and exec one worker: its own process group, a parent-death signal, inherited fds
//! at fixed numbers, and an environment that includes its own pid.
//!
//! `std::process::Command` does the fork, the stdio pipes, `chdir` and `setpgid`; our
//! `pre_exec` hook then does what std cannot and finishes with its own `execve`, so that
//! `LISTEN_PID` can hold the child's pid (known only after the fork) and an exec failure
//! still travels back to the parent through std's error pipe. Between fork and exec only
//! async-signal-safe calls are made and nothing allocates: every buffer is built in the
//! parent before the fork.
//!
//! The parent-death signal is tied to the *thread* that forked, not the process: the
//! master forks only from its main thread (the one running the event loop), which lives as
//! long as the master does.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::errors::SpawnError;

/// Everything needed to start one worker, prepared in the parent.
#[derive(Debug)]
pub struct SpawnPlan {
    /// `argv`, `argv[0]` as the user wrote it.
    pub command: Vec<String>,
    pub cwd: Option<PathBuf>,
    /// The complete environment, except `LISTEN_PID`, which is added after the fork when
    /// `listen_pid` is set.
    pub env: Vec<(String, String)>,
    pub listen_pid: bool,
    /// Placed at fds 3, 4, … in this order, without close-on-exec.
    pub fds: Vec<RawFd>,
    /// Drop to this user and group before exec (the master must be root).
    pub user: Option<(u32, u32)>,
}

/// A started worker: its pid and the read ends of its stdout and stderr.
#[derive(Debug)]
pub struct Spawned {
    pub pid: i32,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// Finds the program the way `execvp` would, but in the parent: a name without `/` is
/// looked up in the worker's `PATH`; a relative path is relative to the worker's cwd.
pub fn resolve_program(program: &str, path_var: Option<&str>, cwd: Option<&Path>) -> PathBuf {
    if program.contains('/') {
        return PathBuf::from(program);
    }
    let path_var = path_var
        .map(|s| s.to_string())
        .or_else(|| std::env::var("PATH").ok())
        .unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".to_string());
    for dir in std::env::split_paths(OsStr::new(&path_var)) {
        let dir = match cwd {
            Some(c) if dir.is_relative() => c.join(dir),
            _ => dir,
        };
        let candidate = dir.join(program);
        if std::fs::metadata(&candidate).is_ok_and(|m| m.is_file()) {
            return candidate;
        }
    }
    PathBuf::from(program)
}

/// Pointers into buffers that the pre-exec closure owns; plain data after the fork.
struct ExecArgs {
    program: CString,
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    _env: Vec<CString>,
    envp: Vec<*const libc::c_char>,
    /// `LISTEN_PID=` followed by room for the digits and a NUL, filled in after the fork.
    listen_pid_buf: Option<Box<[u8; 32]>>,
    fds: Vec<RawFd>,
    parent: libc::pid_t,
    /// The open-files limit to start the worker with, if the master raised its own.
    nofile: Option<libc::rlimit>,
}

// SAFETY: the raw pointers point into buffers owned by the same struct; the struct is
// only used by the one thread that forks (and then by the child, which has one thread).
unsafe impl Send for ExecArgs {}
// SAFETY: as above; nothing is shared mutably across threads.
unsafe impl Sync for ExecArgs {}

fn cstring(s: impl AsRef<[u8]>, what: &str) -> Result<CString, SpawnError> {
    CString::new(s.as_ref()).map_err(|_| SpawnError::Exec {
        program: what.to_string(),
        source: io::Error::new(io::ErrorKind::InvalidInput, "contains a NUL byte"),
    })
}

pub fn spawn(plan: &SpawnPlan) -> Result<Spawned, SpawnError> {
    let program_name = plan.command.first().cloned().unwrap_or_default();
    let path_var = plan
        .env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str());
    let resolved = resolve_program(&program_name, path_var, plan.cwd.as_deref());

    let program = cstring(resolved.as_os_str().as_bytes(), &program_name)?;
    let argv: Vec<CString> = plan
        .command
        .iter()
        .map(|a| cstring(a, &program_name))
        .collect::<Result<_, _>>()?;
    let env: Vec<CString> = plan
        .env
        .iter()
        .filter(|(k, _)| k != "LISTEN_PID")
        .map(|(k, v)| cstring(format!("{k}={v}"), &program_name))
        .collect::<Result<_, _>>()?;
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut listen_pid_buf = plan.listen_pid.then(|| {
        let mut b = Box::new([0u8; 32]);
        b[..11].copy_from_slice(b"LISTEN_PID=");
        b
    });
    let mut envp: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
    if let Some(b) = listen_pid_buf.as_mut() {
        envp.push(b.as_ptr() as *const libc::c_char);
    }
    envp.push(std::ptr::null());

    let mut args = ExecArgs {
        program,
        _argv: argv,
        argv_ptrs,
        _env: env,
        envp,
        listen_pid_buf,
        fds: plan.fds.clone(),
        parent: std::process::id() as libc::pid_t,
        nofile: crate::unix::starting_nofile(),
    };

    let mut cmd = Command::new(&resolved);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    if let Some(cwd) = &plan.cwd {
        cmd.current_dir(cwd);
    }
    if let Some((uid, gid)) = plan.user {
        cmd.uid(uid).gid(gid);
    }
    // SAFETY: the closure runs in the child between fork and exec. It only calls
    // async-signal-safe functions (prctl, getppid, getpid, sched_setscheduler, setrlimit,
    // fcntl, dup2, execve) and writes
    // into buffers allocated before the fork; it never allocates or takes a lock.
    unsafe {
        cmd.pre_exec(move || exec_in_child(&mut args));
    }
    let mut child = cmd.spawn().map_err(|source| SpawnError::Exec {
        program: program_name.clone(),
        source,
    })?;
    let pid = child.id() as i32;
    let stdout: OwnedFd = child.stdout.take().expect("stdout was piped").into();
    let stderr: OwnedFd = child.stderr.take().expect("stderr was piped").into();
    // The master reaps with waitpid(-1) on SIGCHLD (see `unix::reap_exited`); dropping the
    // std handle neither waits nor kills.
    drop(child);
    Ok(Spawned {
        pid,
        stdout,
        stderr,
    })
}

/// Runs in the child after fork. Returns only on failure.
fn exec_in_child(a: &mut ExecArgs) -> io::Result<()> {
    // SAFETY: prctl with PR_SET_PDEATHSIG and an integer argument has no memory effects.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // The master may have died between fork and prctl; then the death signal was never
    // armed and we would run on as an orphan. Our parent is no longer the master then.
    // SAFETY: getppid cannot fail and touches no memory.
    if unsafe { libc::getppid() } != a.parent {
        return Err(io::Error::other("the master exited during the fork"));
    }

    // The master's loop runs under SCHED_BATCH (see `unix::batch_scheduling`); a worker
    // gets the ordinary policy, as if started by anyone else.
    let other = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler on ourselves with a valid sched_param; no memory effects.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_OTHER, &other) };

    // Move every inherited fd out of the way first, then into place: a source fd may
    // itself sit at one of the target numbers.
    let n = a.fds.len() as RawFd;
    for fd in a.fds.iter_mut() {
        // SAFETY: fcntl(F_DUPFD_CLOEXEC) on an fd the parent handed us; no memory effects.
        let moved = unsafe { libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 3 + n) };
        if moved < 0 {
            return Err(io::Error::last_os_error());
        }
        *fd = moved;
    }
    for (i, fd) in a.fds.iter().enumerate() {
        // SAFETY: dup2 onto a fixed small number; the result is not close-on-exec, which is
        // the point. The temporary copy is close-on-exec and vanishes at exec.
        if unsafe { libc::dup2(*fd, 3 + i as RawFd) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }

    if let Some(buf) = a.listen_pid_buf.as_mut() {
        // SAFETY: getpid cannot fail.
        let pid = unsafe { libc::getpid() };
        write_decimal(&mut buf[11..], pid as u32);
    }

    // The open-files limit the master was started with (it raised its own): last, for the
    // copies above may need numbers above it while the master holds many fds; the
    // close-on-exec ones above it are gone at exec.
    if let Some(lim) = a.nofile {
        // SAFETY: setrlimit with a valid rlimit built before the fork; lowering the soft
        // limit cannot fail for lack of privilege.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    }

    // SAFETY: program, argv and envp are NUL-terminated strings and NULL-terminated arrays
    // built before the fork and still owned by `a`.
    unsafe {
        libc::execve(a.program.as_ptr(), a.argv_ptrs.as_ptr(), a.envp.as_ptr());
    }
    Err(io::Error::last_os_error())
}

/// Writes `n` in decimal followed by a NUL, without allocating.
fn write_decimal(out: &mut [u8], mut n: u32) {
    let mut digits = [0u8; 10];
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        out[i] = digits[len - 1 - i];
    }
    out[len] = 0;
}

/// Sets or clears `O_NONBLOCK` on an fd.
pub fn set_nonblocking(fd: &impl AsRawFd, on: bool) -> io::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let raw = fd.as_raw_fd();
    let flags = OFlag::from_bits_truncate(fcntl(raw, FcntlArg::F_GETFL)?);
    let flags = if on {
        flags | OFlag::O_NONBLOCK
    } else {
        flags & !OFlag::O_NONBLOCK
    };
    fcntl(raw, FcntlArg::F_SETFL(flags))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_without_allocating() {
        let mut b = [0xffu8; 12];
        write_decimal(&mut b, 0);
        assert_eq!(&b[..2], b"0\0");
        write_decimal(&mut b, 4_194_304);
        assert_eq!(&b[..8], b"4194304\0");
        write_decimal(&mut b, u32::MAX);
        assert_eq!(&b[..11], b"4294967295\0");
    }

    #[test]
    fn programs_resolve_in_the_workers_path() {
        assert_eq!(resolve_program("./x", None, None), PathBuf::from("./x"));
        let sh = resolve_program("sh", Some("/nonexistent:/bin:/usr/bin"), None);
        assert!(sh.ends_with("sh") && sh.is_absolute(), "{sh:?}");
        assert_eq!(
            resolve_program("no-such-program-here", Some("/bin"), None),
            PathBuf::from("no-such-program-here")
        );
    }
}
