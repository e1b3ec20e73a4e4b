//! The worker side, for Rust programs run by `processes`: find the inherited listeners,
//! say ready, and receive connections the master passes over the channel.
//!
//! Blocking and dependency-free on purpose (std only), so any Rust server can use it from
//! a thread, or wrap the fds it returns in its own async runtime. The protocol it speaks is
//! documented in `PROTOCOL.md`; a worker in another language can do the same in a few
//! dozen lines.
//!
//! ```no_run
//! use std::io::Write;
//! let mut channel = processes::worker::Channel::from_env().expect("run me under processes");
//! processes::worker::ready().ok();
//! while let Ok(Some(conn)) = channel.next_connection() {
//!     let mut stream = conn.into_tcp_stream();
//!     let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nhi\n");
//! }
//! ```

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{MsgFlags, sendmsg};
use serde_json::Value;

use crate::channel::{Decoder, Read, read_some};

/// This worker's slot (`PROCESSES_WORKER_ID`), stable across its restarts.
pub fn slot() -> Option<u32> {
    std::env::var("PROCESSES_WORKER_ID").ok()?.parse().ok()
}

/// This worker's app name (`PROCESSES_APP`).
pub fn app() -> Option<String> {
    std::env::var("PROCESSES_APP").ok()
}

/// Takes the inherited listening sockets (fds 3, 4, … per `LISTEN_FDS`), if they are meant
/// for this process (`LISTEN_PID`). Call it once.
pub fn listen_fds() -> Vec<OwnedFd> {
    (0..crate::sockets::listen_fds_for_us())
        .map(|i| {
            // SAFETY: the master placed exactly LISTEN_FDS open sockets at 3.. for this pid,
            // and this function hands each out once.
            unsafe { OwnedFd::from_raw_fd(3 + i) }
        })
        .collect()
}

/// Tells the master this worker is ready (sd_notify `READY=1`). Without it, the master
/// counts a worker ready after `ready_after` of uptime.
pub fn ready() -> io::Result<()> {
    crate::notify::notify_parent("READY=1").map(|_| ())
}

/// One connection passed by the master.
#[derive(Debug)]
pub struct Connection {
    pub fd: OwnedFd,
    /// The message that carried it (`{"cmd":"PROCESSES_CONNECTION","listener":N,…}`).
    pub meta: Value,
}

impl Connection {
    /// The connection as a TCP stream (listeners on unix sockets give unix streams; use
    /// `fd` for those).
    pub fn into_tcp_stream(self) -> std::net::TcpStream {
        let stream = std::net::TcpStream::from(self.fd);
        // The master passes connections non-blocking; this API is blocking.
        let _ = stream.set_nonblocking(false);
        stream
    }
}

/// What arrived on the channel.
#[derive(Debug)]
pub enum Message {
    Connection(Connection),
    /// Anything else the master sent (a ping, a `disconnect`).
    Other(Value),
}

/// This worker's end of the channel to the master (`PROCESSES_CHANNEL_FD`).
pub struct Channel {
    fd: OwnedFd,
    decoder: Decoder,
    ready: std::collections::VecDeque<(Value, Option<OwnedFd>)>,
}

impl Channel {
    /// Opens the channel announced in the environment, once.
    pub fn from_env() -> Option<Channel> {
        let fd: RawFd = std::env::var("PROCESSES_CHANNEL_FD").ok()?.parse().ok()?;
        // SAFETY: the master put our end of the socketpair at this fd; we take ownership
        // once (callers are told to call this once).
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // The socketpair end is blocking for the worker; make sure of it.
        let _ = crate::spawn::set_nonblocking(&fd, false);
        Some(Channel {
            fd,
            decoder: Decoder::default(),
            ready: Default::default(),
        })
    }

    /// Makes `recv` give up after `timeout` with an `io::ErrorKind::WouldBlock` error
    /// (`None`: wait for ever, the default).
    pub fn set_read_timeout(&self, timeout: Option<std::time::Duration>) -> io::Result<()> {
        let tv = match timeout {
            Some(t) => nix::sys::time::TimeVal::new(t.as_secs() as _, t.subsec_micros() as _),
            None => nix::sys::time::TimeVal::new(0, 0),
        };
        nix::sys::socket::setsockopt(&self.fd, nix::sys::socket::sockopt::ReceiveTimeout, &tv)?;
        Ok(())
    }

    /// Sends one message.
    pub fn send(&self, v: &Value) -> io::Result<()> {
        let mut line = serde_json::to_vec(v)?;
        line.push(b'\n');
        let mut off = 0;
        while off < line.len() {
            let n = sendmsg::<()>(
                self.fd.as_raw_fd(),
                &[IoSlice::new(&line[off..])],
                &[],
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(io::Error::from)?;
            off += n;
        }
        Ok(())
    }

    /// Waits for the next message; `None` when the master closed the channel.
    pub fn recv(&mut self) -> io::Result<Option<Message>> {
        loop {
            if let Some((v, fd)) = self.ready.pop_front() {
                if v.get("cmd").and_then(Value::as_str) == Some("NODE_HANDLE") {
                    // Acknowledge at once, as Node does; without an fd, say so.
                    let Some(fd) = fd else {
                        self.send(&crate::node::handle_nack())?;
                        continue;
                    };
                    self.send(&crate::node::handle_ack())?;
                    let mut meta = v.get("msg").cloned().unwrap_or(Value::Null);
                    // Node's own sender wraps a retransmission once more (the master does
                    // not) and expects an ACK for each envelope, as a Node child sends.
                    while meta.get("cmd").and_then(Value::as_str) == Some("NODE_HANDLE") {
                        self.send(&crate::node::handle_ack())?;
                        meta = meta.get("msg").cloned().unwrap_or(Value::Null);
                    }
                    return Ok(Some(Message::Connection(Connection { fd, meta })));
                }
                return Ok(Some(Message::Other(v)));
            }
            let mut buf = [0u8; 16 * 1024];
            let (n, fds) = match read_some(self.fd.as_raw_fd(), &mut buf)? {
                Read::Data(n, fds) => (n, fds),
                Read::Eof => return Ok(None),
                // Fds the kernel could not all hand over: the channel is out of step. Those
                // that came are closed here, with the value.
                Read::Truncated(_) => {
                    return Err(io::Error::other(
                        "file descriptors from the master were dropped (MSG_CTRUNC)",
                    ));
                }
                // A read timeout ran out.
                Read::WouldBlock => return Err(io::Error::from_raw_os_error(libc::EAGAIN)),
            };
            self.decoder.push_fds(fds).map_err(io::Error::other)?;
            let got = self
                .decoder
                .push_bytes(&buf[..n])
                .map_err(io::Error::other)?;
            self.ready.extend(got);
        }
    }

    /// Waits for the next passed connection, skipping other messages.
    pub fn next_connection(&mut self) -> io::Result<Option<Connection>> {
        loop {
            match self.recv()? {
                None => return Ok(None),
                Some(Message::Connection(c)) => return Ok(Some(c)),
                Some(Message::Other(_)) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{
        AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, sendmsg, socketpair,
    };
    use std::io::{BufRead, BufReader};

    /// A handle inside two envelopes (how Node's own sender retransmits) is delivered once,
    /// with the innermost message, and acknowledged once per envelope, as a Node child does
    /// (`tests/it/node.rs`, `node_acks_each_envelope_of_a_handle`).
    #[test]
    fn a_handle_in_two_envelopes_is_delivered_once_and_acknowledged_twice() {
        let (master, worker) = socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let mut ch = Channel {
            fd: worker,
            decoder: Decoder::default(),
            ready: Default::default(),
        };
        ch.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let (passed, _keep) = socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let line = b"{\"cmd\":\"NODE_HANDLE\",\"type\":\"net.Native\",\"msg\":{\"cmd\":\"NODE_HANDLE\",\"type\":\"net.Native\",\"msg\":{\"n\":7}}}\n";
        sendmsg::<()>(
            master.as_raw_fd(),
            &[IoSlice::new(line)],
            &[ControlMessage::ScmRights(&[passed.as_raw_fd()])],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        let Some(Message::Connection(c)) = ch.recv().unwrap() else {
            panic!("expected a connection");
        };
        assert_eq!(c.meta, serde_json::json!({"n": 7}));
        drop(ch);
        let replies: Vec<String> = BufReader::new(std::fs::File::from(master))
            .lines()
            .map(Result::unwrap)
            .collect();
        assert_eq!(replies, vec![r#"{"cmd":"NODE_HANDLE_ACK"}"#; 2]);
    }
}
