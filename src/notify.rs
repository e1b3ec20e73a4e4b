//! The sd_notify protocol, both ways.
//!
//! Towards workers the master plays systemd: it owns a datagram socket, passes its address
//! in `NOTIFY_SOCKET`, and tells senders apart by the pid the kernel attaches to each
//! datagram (`SO_PASSCRED`), so any sd_notify library works unchanged. Towards its own
//! supervisor (systemd, when the master runs as a unit) it is a client: [`notify_parent`]
//! sends `READY=1` and friends to the `NOTIFY_SOCKET` it was given.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{
    AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr, bind, recvmsg,
    setsockopt, socket, sockopt,
};
use tokio::io::unix::AsyncFd;

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
pub struct NotifySocket {
    fd: AsyncFd<OwnedFd>,
    /// The value for workers' `NOTIFY_SOCKET` (`@name`: Linux abstract namespace).
    pub env_value: String,
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
        })
    }

    /// Waits for the next datagram; returns the sender's pid and what it said.
    pub async fn recv(&self) -> io::Result<(i32, Notice)> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| recv_one(fd.get_ref().as_raw_fd())) {
                Ok(Ok(Some(got))) => return Ok(got),
                Ok(Ok(None)) => continue,
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }
}

fn recv_one(fd: i32) -> io::Result<Option<(i32, Notice)>> {
    let mut buf = [0u8; 4096];
    let mut iov = [io::IoSliceMut::new(&mut buf)];
    let mut cmsg = nix::cmsg_space!(nix::sys::socket::UnixCredentials);
    let msg = recvmsg::<()>(fd, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)
        .map_err(io::Error::from)?;
    let mut pid = None;
    for c in msg.cmsgs().map_err(io::Error::from)? {
        match c {
            ControlMessageOwned::ScmCredentials(cred) => pid = Some(cred.pid()),
            // Nobody should send us fds here; close them (OwnedFd drop) rather than leak.
            ControlMessageOwned::ScmRights(fds) => {
                for fd in fds {
                    // SAFETY: the kernel just gave us this fd; we own it and close it once.
                    drop(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
                }
            }
            _ => {}
        }
    }
    let n = msg.bytes;
    let Some(pid) = pid else { return Ok(None) };
    let text = String::from_utf8_lossy(&buf[..n]);
    Ok(Some((pid, Notice::parse(&text))))
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
        let client = socket(
            AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        let addr = UnixAddr::new_abstract(name.as_bytes()).unwrap();
        nix::sys::socket::sendto(client.as_raw_fd(), b"READY=1", &addr, MsgFlags::empty()).unwrap();
        let (pid, notice) = sock.recv().await.unwrap();
        assert_eq!(pid, std::process::id() as i32);
        assert!(notice.ready);
    }
}
