//! Listening sockets: bound once by the master, kept for its whole life, and handed to
//! workers either by inheritance (fds 3, 4, … with `LISTEN_FDS`) or by passing each
//! accepted connection over a worker's channel.
//!
//! The invariant: a listener outlives every worker. Restarts and reloads never close one,
//! so clients queue in the kernel's backlog while workers come and go instead of being
//! refused.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use socket2::{Domain, SockAddr, Socket, Type};

use crate::config::ListenAddr;
use crate::errors::StartError;

/// The accept queue length asked of the kernel (it caps this at `net.core.somaxconn`).
pub const BACKLOG: i32 = 1024;

/// One bound, listening socket.
#[derive(Debug)]
pub struct Listener {
    /// The address as configured.
    pub requested: ListenAddr,
    /// The address actually bound (a requested port 0 becomes the port the OS picked).
    pub local: ListenAddr,
    pub fd: OwnedFd,
    /// A unix socket's path that the master bound, removed when the listener goes (at the
    /// master's exit): a socket file left behind only makes the next bind check it. Not
    /// set for a socket systemd passed, whose file is systemd's.
    pub unlink: Option<std::path::PathBuf>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some(path) = &self.unlink {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Listener {
    /// The TCP port, if this is a TCP listener.
    pub fn port(&self) -> Option<u16> {
        match self.local {
            ListenAddr::Tcp(a) => Some(a.port()),
            ListenAddr::Unix(_) => None,
        }
    }

    /// A name for `LISTEN_FDNAMES`: `tcp-PORT` or `unix`.
    pub fn fd_name(&self) -> String {
        match &self.local {
            ListenAddr::Tcp(a) => format!("tcp-{}", a.port()),
            ListenAddr::Unix(_) => "unix".to_string(),
        }
    }
}

/// What to tell a user whose bind failed this way (appended to "cannot listen on ADDR").
pub fn bind_hint(kind: io::ErrorKind) -> &'static str {
    match kind {
        io::ErrorKind::AddrInUse => {
            "; something else is listening there: stop it or pick another address"
        }
        io::ErrorKind::PermissionDenied => "; ports below 1024 need root or CAP_NET_BIND_SERVICE",
        io::ErrorKind::AddrNotAvailable => "; this machine has no such address",
        io::ErrorKind::AlreadyExists => "; remove that file or pick another path",
        _ => "",
    }
}

/// Binds and listens. `field` names the setting for the error message.
pub fn bind(addr: &ListenAddr, field: &str) -> Result<Listener, StartError> {
    let bind_err = |source: io::Error| StartError::Bind {
        field: field.to_string(),
        addr: addr.to_string(),
        hint: bind_hint(source.kind()),
        source,
    };
    match addr {
        ListenAddr::Tcp(sa) => {
            let fd = bind_tcp(*sa).map_err(bind_err)?;
            let local = local_tcp_addr(&fd).map_err(bind_err)?;
            Ok(Listener {
                requested: addr.clone(),
                local: ListenAddr::Tcp(local),
                fd,
                unlink: None,
            })
        }
        ListenAddr::Unix(path) => {
            let fd = bind_unix(path).map_err(bind_err)?;
            Ok(Listener {
                requested: addr.clone(),
                local: addr.clone(),
                fd,
                unlink: Some(path.clone()),
            })
        }
    }
}

/// A TCP listening socket, close-on-exec, blocking. `[::]` accepts IPv4 too.
pub fn bind_tcp(addr: SocketAddr) -> io::Result<OwnedFd> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM.cloexec(), None)?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// Makes room to bind a unix socket at `path`: a socket nobody answers on is removed; a
/// live one is `EADDRINUSE`; anything that is not a socket is left alone and is
/// `AlreadyExists` (never delete a user's file because a flag named it).
///
/// Whether a socket is live is asked with a non-blocking connect: a worker names the path,
/// and a blocking connect to a listener whose accept queue is full waits until someone
/// accepts, which could be never, on the master's only loop.
pub fn clear_stale_socket(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "a file that is not a socket is in the way",
        ));
    }
    match probe_unix(path)? {
        Probe::Live => Err(io::Error::from_raw_os_error(libc::EADDRINUSE)),
        Probe::Stale => match std::fs::remove_file(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        },
        Probe::Gone => Ok(()),
    }
}

/// What a connect to a unix socket path found.
#[derive(Debug, PartialEq, Eq)]
enum Probe {
    /// Something listens there (it accepted, or its queue is full, or it is a socket of
    /// another type that is bound).
    Live,
    /// A socket file with nothing behind it.
    Stale,
    /// Nothing is there any more.
    Gone,
}

/// Connects to `path` without blocking and without waiting for an answer.
fn probe_unix(path: &Path) -> io::Result<Probe> {
    let socket = Socket::new(Domain::UNIX, Type::STREAM.nonblocking().cloexec(), None)?;
    let err = match socket.connect(&SockAddr::unix(path)?) {
        Ok(()) => return Ok(Probe::Live),
        Err(e) => e,
    };
    match err.raw_os_error() {
        // The accept queue is full (a unix socket says EAGAIN; EINPROGRESS for good
        // measure): a listener is there.
        Some(libc::EAGAIN | libc::EINPROGRESS) => Ok(Probe::Live),
        // A bound socket of another type (datagram, seqpacket) is live too.
        Some(libc::EPROTOTYPE) => Ok(Probe::Live),
        Some(libc::ECONNREFUSED) => Ok(Probe::Stale),
        Some(libc::ENOENT) => Ok(Probe::Gone),
        // Anything else (EACCES…): we cannot tell, so the file stays and the caller hears
        // why.
        _ => Err(err),
    }
}

/// A unix-domain listening socket. A stale socket file that nobody listens on is removed
/// first; a live one is an `AddrInUse` error, like TCP.
pub fn bind_unix(path: &Path) -> io::Result<OwnedFd> {
    clear_stale_socket(path)?;
    let socket = Socket::new(Domain::UNIX, Type::STREAM.cloexec(), None)?;
    socket.bind(&SockAddr::unix(path)?)?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

pub fn local_tcp_addr(fd: &impl AsFd) -> io::Result<SocketAddr> {
    let sock = socket2::SockRef::from(fd);
    sock.local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("not an inet socket"))
}

/// Accept-queue figures of a listening TCP socket from `TCP_INFO`: for a listener the
/// kernel reports the current queue length in `tcpi_unacked` and its limit in
/// `tcpi_sacked`. `None` for non-TCP sockets.
pub fn accept_backlog(fd: BorrowedFd<'_>) -> Option<(u32, u32)> {
    // SAFETY: tcp_info is plain old data; zeroed is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info`, which is that large.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            &mut info as *mut _ as *mut libc::c_void,
            &mut len,
        )
    };
    (rc == 0).then_some((info.tcpi_unacked, info.tcpi_sacked))
}

/// How many sockets systemd's socket-activation protocol passed to this process: the
/// `LISTEN_FDS` count when `LISTEN_PID` is our pid, else 0. (Shared by the master, which
/// takes its own listeners this way, and `worker::listen_fds`, which workers call.)
pub fn listen_fds_for_us() -> i32 {
    let for_us = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|p| p == std::process::id());
    let n: i32 = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    if for_us && (1..=256).contains(&n) {
        n
    } else {
        0
    }
}

/// Listening sockets handed to the master by its own supervisor (systemd socket
/// activation: `LISTEN_FDS` fds from 3, for this pid per `LISTEN_PID`), with their
/// addresses. They are made close-on-exec so that they reach workers only the way the
/// master decides.
pub fn inherited_from_systemd() -> Vec<(OwnedFd, ListenAddr)> {
    use std::os::fd::FromRawFd;
    let n = listen_fds_for_us();
    let mut out = Vec::new();
    for raw in 3..3 + n {
        // Only an open socket is taken: an fd that is not open, or not a socket, was never
        // systemd's to give, and closing it could close something of ours.
        if nix::fcntl::fcntl(raw, nix::fcntl::FcntlArg::F_GETFD).is_err() {
            continue;
        }
        // SAFETY: getsockopt on an fd number only reads its type; no ownership is taken.
        let is_socket = unsafe {
            let mut ty: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            libc::getsockopt(
                raw,
                libc::SOL_SOCKET,
                libc::SO_TYPE,
                &mut ty as *mut _ as *mut libc::c_void,
                &mut len,
            ) == 0
        };
        if !is_socket {
            continue;
        }
        // SAFETY: systemd's protocol gives this process the fds 3..3+LISTEN_FDS, and this
        // runs first thing in `main`, before anything else opens an fd; each is taken once.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let _ = nix::fcntl::fcntl(
            raw,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
        let sock = socket2::SockRef::from(&fd);
        let addr = match sock.local_addr() {
            Ok(a) => match (a.as_socket(), a.as_pathname()) {
                (Some(inet), _) => ListenAddr::Tcp(inet),
                (None, Some(p)) => ListenAddr::Unix(p.to_path_buf()),
                _ => continue,
            },
            Err(_) => continue,
        };
        out.push((fd, addr));
    }
    out
}

/// Takes the inherited socket that serves `wanted`, if there is one: the same address,
/// or the same port when `wanted` is every address (`:8080`).
pub fn take_inherited(
    inherited: &mut Vec<(OwnedFd, ListenAddr)>,
    wanted: &ListenAddr,
) -> Option<Listener> {
    let pos = inherited
        .iter()
        .position(|(_, have)| match (wanted, have) {
            (ListenAddr::Tcp(w), ListenAddr::Tcp(h)) => {
                w == h || (w.ip().is_unspecified() && w.port() == h.port() && w.port() != 0)
            }
            (ListenAddr::Unix(w), ListenAddr::Unix(h)) => w == h,
            _ => false,
        })?;
    let (fd, local) = inherited.remove(pos);
    Some(Listener {
        requested: wanted.clone(),
        local,
        fd,
        unlink: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_zero_becomes_a_real_port() {
        let l = bind(&ListenAddr::parse("127.0.0.1:0").unwrap(), "--listen").unwrap();
        assert!(l.port().unwrap() > 0);
        assert_eq!(l.fd_name(), format!("tcp-{}", l.port().unwrap()));
    }

    #[test]
    fn a_port_in_use_names_the_field() {
        let a = bind(&ListenAddr::parse("127.0.0.1:0").unwrap(), "--listen").unwrap();
        let addr = ListenAddr::parse(&format!("127.0.0.1:{}", a.port().unwrap())).unwrap();
        let err = bind(&addr, "apps.web.listen").unwrap_err().to_string();
        assert!(
            err.starts_with("apps.web.listen: cannot listen on 127.0.0.1:"),
            "{err}"
        );
        assert!(err.contains("something else is listening"), "{err}");
    }

    #[test]
    fn stale_unix_sockets_are_replaced_live_ones_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let first = bind_unix(&path).unwrap();
        assert_eq!(
            bind_unix(&path).unwrap_err().kind(),
            io::ErrorKind::AddrInUse
        );
        drop(first);
        bind_unix(&path).unwrap();
    }

    /// A live socket whose accept queue is full: a blocking connect would wait for ever.
    /// The answer is `EADDRINUSE` (the errno a Node worker is told), and at once.
    #[test]
    fn a_live_socket_with_a_full_queue_is_in_use_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("full.sock");
        let listener = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
        listener.bind(&SockAddr::unix(&path).unwrap()).unwrap();
        listener.listen(0).unwrap();
        let mut queued = Vec::new();
        loop {
            let c = Socket::new(Domain::UNIX, Type::STREAM.nonblocking(), None).unwrap();
            match c.connect(&SockAddr::unix(&path).unwrap()) {
                Ok(()) => queued.push(c),
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(libc::EAGAIN), "{e}");
                    break;
                }
            }
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let probed = path.clone();
        std::thread::spawn(move || {
            let _ = tx.send(clear_stale_socket(&probed));
        });
        let err = rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("the probe blocked")
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EADDRINUSE), "{err}");
        assert!(path.exists());
        drop(queued);
    }

    #[test]
    fn a_bound_datagram_socket_is_in_use_and_a_file_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dgram.sock");
        let _dgram = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        assert_eq!(
            clear_stale_socket(&path).unwrap_err().kind(),
            io::ErrorKind::AddrInUse
        );
        let file = dir.path().join("file");
        std::fs::write(&file, "x").unwrap();
        assert_eq!(
            bind_unix(&file).unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
        assert!(file.exists());
        clear_stale_socket(&dir.path().join("nothing")).unwrap();
    }

    #[test]
    fn backlog_is_read_from_tcp_info() {
        let l = bind(&ListenAddr::parse("127.0.0.1:0").unwrap(), "--listen").unwrap();
        let addr = match l.local {
            ListenAddr::Tcp(a) => a,
            _ => unreachable!(),
        };
        let _c1 = std::net::TcpStream::connect(addr).unwrap();
        let _c2 = std::net::TcpStream::connect(addr).unwrap();
        let (queued, limit) = accept_backlog(l.fd.as_fd()).unwrap();
        assert_eq!(queued, 2);
        assert!(limit >= 128, "{limit}");
    }
}
