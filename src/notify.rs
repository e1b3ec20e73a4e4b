//! The sd_notify protocol, both ways.
//!
//! Towards workers the master plays systemd: it owns a datagram socket, passes its address
//! in `NOTIFY_SOCKET`, and tells senders apart by the pid the kernel attaches to each
//! datagram (`SO_PASSCRED`), so any sd_notify library works unchanged. Towards its own
//! supervisor (systemd, when the master runs as a unit) it is a client: [`notify_parent`]
//! sends `READY=1` and friends to the `NOTIFY_SOCKET` it was given.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::sys::socket::{
    AddressFamily, MsgFlags, SockFlag, SockType, UnixAddr, bind, setsockopt, socket, sockopt,
};
use tokio::io::unix::AsyncFd;
use tracing::warn;

/// What one datagram said.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Notice {
    pub ready: bool,
    pub stopping: bool,
    pub reloading: bool,
    pub status: Option<String>,
}

impl Notice {
    /// Parses `KEY=VALUE` lines; unknown keys are ignored as systemd does.
    pub fn parse(text: &str) -> Notice {
        let mut n = Notice::default();
        for line in text.lines() {
            match line.split_once('=') {
                Some(("READY", "1")) => n.ready = true,
                Some(("STOPPING", "1")) => n.stopping = true,
                Some(("RELOADING", "1")) => n.reloading = true,
                Some(("STATUS", s)) => n.status = Some(s.chars().take(200).collect()),
                _ => {}
            }
        }
        n
    }
}

/// The master's notify socket for its workers.
///
/// Anyone who can reach it may send anything. A datagram it cannot use (one carrying file
/// descriptors, control data that did not fit, no sender's credentials) is dropped, its fds
/// closed, and logged at the 1st, 2nd, 4th… time; the socket carries on. Only an error of
/// the socket itself ends [`NotifySocket::recv`].
pub struct NotifySocket {
    fd: AsyncFd<OwnedFd>,
    /// The value for workers' `NOTIFY_SOCKET` (`@name`: Linux abstract namespace).
    pub env_value: String,
    /// Datagrams dropped so far.
    dropped: AtomicU64,
}

impl NotifySocket {
    /// Binds an abstract-namespace datagram socket. Abstract, so that workers that dropped
    /// privileges can still reach it and nothing is left on disk if the master dies.
    pub fn bind() -> io::Result<NotifySocket> {
        let fd = socket(
            AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )?;
        setsockopt(&fd, sockopt::PassCred, &true)?;
        let nonce: u64 = {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            t.as_nanos() as u64 ^ (u64::from(std::process::id()) << 32)
        };
        let name = format!("processes/{}/{:x}/notify", std::process::id(), nonce);
        let addr = UnixAddr::new_abstract(name.as_bytes())?;
        bind(fd.as_raw_fd(), &addr)?;
        Ok(NotifySocket {
            fd: crate::unix::async_fd(fd, tokio::io::Interest::READABLE)?,
            env_value: format!("@{name}"),
            dropped: AtomicU64::new(0),
        })
    }

    /// Waits for the next datagram that says something; returns the sender's pid and
    /// what it said. Datagrams it cannot use are dropped on the way; an error is the
    /// socket's own, and no more will come.
    pub async fn recv(&self) -> io::Result<(i32, Notice)> {
        let mut buf = [0u8; 4096];
        loop {
            let mut guard = self.fd.readable().await?;
            let got = match guard
                .try_io(|fd| crate::channel::recv_with_fds(fd.get_ref().as_raw_fd(), &mut buf))
            {
                Ok(Ok(got)) => got,
                Ok(Err(e)) => {
                    warn!("notify socket: {e}; READY=1 and other notices are no longer received");
                    return Err(e);
                }
                Err(_would_block) => continue,
            };
            match judge(&got) {
                Ok(pid) => {
                    return Ok((
                        pid,
                        Notice::parse(&String::from_utf8_lossy(&buf[..got.bytes])),
                    ));
                }
                Err(why) => {
                    let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                    if n.is_power_of_two() {
                        let from = got
                            .pid
                            .map(|p| format!(" from pid {p}"))
                            .unwrap_or_default();
                        warn!(
                            "notify socket: dropped a datagram{from}: {why} ({n} dropped so far)"
                        );
                    }
                    // Whoever sent them chose them: their close may block (SO_LINGER).
                    got.fds.into_iter().for_each(crate::unix::close_later);
                }
            }
        }
    }
}

/// The sender's pid, if this datagram can be used; else why not.
fn judge(got: &crate::channel::Received) -> Result<i32, String> {
    if !got.fds.is_empty() {
        return Err(format!("it carried {} file descriptors", got.fds.len()));
    }
    if got.ctrunc {
        return Err("its control data did not fit (MSG_CTRUNC)".to_string());
    }
    got.pid
        .ok_or_else(|| "it came without the sender's credentials".to_string())
}

/// Sends a notification to our own supervisor, if `NOTIFY_SOCKET` was set for us.
/// Returns whether anything was sent.
pub fn notify_parent(state: &str) -> io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let path = path.to_string_lossy().into_owned();
    let addr = if let Some(abs) = path.strip_prefix('@') {
        UnixAddr::new_abstract(abs.as_bytes())?
    } else {
        UnixAddr::new(path.as_str())?
    };
    let fd = socket(
        AddressFamily::Unix,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    nix::sys::socket::sendto(fd.as_raw_fd(), state.as_bytes(), &addr, MsgFlags::empty())?;
    Ok(true)
}

/// Half of `WATCHDOG_USEC`, if systemd asked this process (per `WATCHDOG_PID`) for
/// watchdog pings.
pub fn watchdog_interval() -> Option<std::time::Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Some(pid) = std::env::var("WATCHDOG_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        && pid != std::process::id()
    {
        return None;
    }
    (usec > 0).then(|| std::time::Duration::from_micros(usec / 2))
}

/// `CLOCK_MONOTONIC` in microseconds, as `RELOADING=1` wants it beside.
pub fn monotonic_usec() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn datagram_socket() -> std::os::fd::OwnedFd {
        socket(
            AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap()
    }

    #[test]
    fn parses_the_usual_states() {
        let n = Notice::parse("READY=1\nSTATUS=serving on 8080\nMAINPID=12");
        assert!(n.ready);
        assert_eq!(n.status.as_deref(), Some("serving on 8080"));
        assert!(!Notice::parse("READY=0").ready);
        assert!(Notice::parse("STOPPING=1").stopping);
        assert_eq!(Notice::parse("garbage\0\n=="), Notice::default());
    }

    #[tokio::test]
    async fn a_datagram_arrives_with_the_senders_pid() {
        let sock = NotifySocket::bind().unwrap();
        let name = sock.env_value.strip_prefix('@').unwrap().to_string();
        let client = datagram_socket();
        let addr = UnixAddr::new_abstract(name.as_bytes()).unwrap();
        nix::sys::socket::sendto(client.as_raw_fd(), b"READY=1", &addr, MsgFlags::empty()).unwrap();
        let (pid, notice) = sock.recv().await.unwrap();
        assert_eq!(pid, std::process::id() as i32);
        assert!(notice.ready);
    }

    /// A datagram that carries an fd is dropped and its fd closed; the next one is heard.
    #[tokio::test]
    async fn a_datagram_with_an_fd_is_dropped_and_the_next_heard() {
        use nix::sys::socket::{ControlMessage, sendmsg};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = std::fs::File::create(&path).unwrap();
        let open_on = || {
            std::fs::read_dir("/proc/self/fd")
                .unwrap()
                .flatten()
                .filter(|e| std::fs::read_link(e.path()).is_ok_and(|t| t == path))
                .count()
        };
        let sock = NotifySocket::bind().unwrap();
        let name = sock.env_value.strip_prefix('@').unwrap().to_string();
        let addr = UnixAddr::new_abstract(name.as_bytes()).unwrap();
        let client = datagram_socket();
        for _ in 0..3 {
            let fds = [file.as_raw_fd(); 4];
            sendmsg(
                client.as_raw_fd(),
                &[io::IoSlice::new(b"READY=1")],
                &[ControlMessage::ScmRights(&fds)],
                MsgFlags::empty(),
                Some(&addr),
            )
            .unwrap();
        }
        nix::sys::socket::sendto(client.as_raw_fd(), b"STATUS=ok", &addr, MsgFlags::empty())
            .unwrap();
        let (pid, notice) = sock.recv().await.unwrap();
        assert_eq!(pid, std::process::id() as i32);
        assert!(!notice.ready, "a datagram with fds was heard: {notice:?}");
        assert_eq!(notice.status.as_deref(), Some("ok"));
        assert_eq!(sock.dropped.load(Ordering::Relaxed), 3);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while open_on() > 1 && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(open_on(), 1);
    }
}
