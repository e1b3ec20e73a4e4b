//! The channel between the master and one worker: an `AF_UNIX` stream socketpair carrying
//! newline-framed JSON (Node's `json` IPC serialization), with file descriptors attached
//! by `SCM_RIGHTS`.
//!
//! One task per worker reads the master's end with `recvmsg` (room for as many fds as one
//! message can carry, so the kernel never has to drop some). A line
//! goes out with a `sendmsg` from the sender itself when nothing is queued ahead of it;
//! what the socket does not take is queued for the task, which writes it as the socket
//! drains. Either way the fd rides on the first `sendmsg` of its line, as libuv sends it.
//! Received fds are matched to messages the way Node matches them: the first fd waiting
//! goes to the first `NODE_HANDLE` message that finishes parsing after it arrived.
//!
//! The invariant: a worker can only hurt its own channel. A line over [`MAX_LINE`],
//! invalid JSON, fds piling up with no message to claim them, fds the kernel could not
//! all hand over (`MSG_CTRUNC`), fds sent while the master cannot close those it has
//! ([`crate::unix::closes_jammed`]), or more than
//! [`MAX_QUEUED_OUT`] of our lines waiting because it does not read, close the channel
//! and are reported once as a [`Violation`]; the master carries on.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};

use nix::sys::socket::{
    AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, sendmsg, socketpair,
};
use serde_json::Value;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

/// The longest line a worker may send.
pub const MAX_LINE: usize = 1 << 20;
/// Fds that may wait for their `NODE_HANDLE` message before the worker is cut off.
pub const MAX_PENDING_FDS: usize = 4;
/// Lines of ours that may wait for a worker to read (past what the kernel buffers) before
/// it is cut off: the master sends a worker a few lines a second unless the worker asks
/// for replies (a `NODE_HANDLE` without an fd is answered with a NACK) while not reading.
pub const MAX_QUEUED_OUT: usize = 4096;

/// Creates the pair: `(master_end, worker_end)`, both close-on-exec; the master's end is
/// non-blocking. The worker's end is placed at a fixed fd by `spawn`, which clears its
/// close-on-exec flag there; the master drops its copy after the fork so that a worker's
/// exit is seen as EOF.
pub fn pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let (a, b) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    crate::spawn::set_nonblocking(&a, true)?;
    Ok((a, b))
}

/// Why a channel was cut off.
#[derive(Debug, thiserror::Error)]
pub enum Violation {
    #[error("sent a line longer than {MAX_LINE} bytes")]
    LineTooLong,
    #[error("sent invalid JSON")]
    InvalidJson(#[source] serde_json::Error),
    #[error("sent file descriptors without a NODE_HANDLE message to carry them")]
    UnexpectedFds,
    #[error("sent file descriptors that the master could not all take (MSG_CTRUNC)")]
    TruncatedFds,
    #[error(
        "sent file descriptors while the master cannot close those it has (a close has \
         blocked for over a second and more than {} wait behind it)",
        crate::unix::MAX_CLOSES_WAITING
    )]
    ClosesBlocked,
    #[error("does not read its channel ({MAX_QUEUED_OUT} lines waiting for it)")]
    NotReading,
    #[error("channel read failed")]
    Io(#[source] io::Error),
}

impl Violation {
    /// A short stable label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Violation::LineTooLong => "line_too_long",
            Violation::InvalidJson(_) => "invalid_json",
            Violation::UnexpectedFds => "unexpected_fds",
            Violation::TruncatedFds => "truncated_fds",
            Violation::ClosesBlocked => "closes_blocked",
            Violation::NotReading => "not_reading",
            Violation::Io(_) => "io_error",
        }
    }
}

/// What the channel task reports.
#[derive(Debug)]
pub enum Incoming {
    /// One message, with the fd that Node's rules attach to it.
    Message(Value, Option<OwnedFd>),
    /// One of the replies every passed connection brings, recognised from its bytes
    /// ([`crate::node::recognise`]): no JSON value was built, and it carries no fd.
    Known(crate::node::FromWorker),
    /// The channel is closed: by the worker (`None`) or cut off by us.
    Closed(Option<Violation>),
}

/// An fd the master holds while it is also on its way to a worker: sharing it costs no
/// `dup`, and the master's copy stays usable for a retransmission or a re-dispatch.
pub type SharedFd = Arc<OwnedFd>;

/// A line to send, with at most one fd.
#[derive(Debug)]
pub struct Outgoing {
    pub line: Vec<u8>,
    pub fd: Option<SharedFd>,
}

impl Outgoing {
    /// Serialises `value` as one line. `serde_json` never emits a raw newline, so the
    /// framing cannot break.
    pub fn json(value: &Value, fd: Option<SharedFd>) -> Outgoing {
        let mut line = serde_json::to_vec(value).unwrap_or_else(|_| b"null".to_vec());
        line.push(b'\n');
        Outgoing { line, fd }
    }
}

/// The master's handle for sending on one channel. Sending never blocks; dropping every
/// clone closes the master's end after queued lines are written.
///
/// A line goes out with a `sendmsg` from the sender's own thread when nothing is queued
/// ahead of it (the usual case: a connection's `newconn` to an idle worker); only what the
/// socket does not take at once is handed to the channel's task, which waits for the
/// socket to drain. That saves the task a wake-up per line on the hot path.
#[derive(Debug, Clone)]
pub struct Sender {
    tx: mpsc::UnboundedSender<Outgoing>,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    fd: AsyncFd<OwnedFd>,
    state: Mutex<SendState>,
}

#[derive(Debug, Default)]
struct SendState {
    /// Lines handed to the task and not yet written whole. A sender writes directly only
    /// when this is 0, so lines go out in the order they were sent.
    queued: usize,
    /// The task has ended: nothing more goes out.
    closed: bool,
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, SendState> {
        // A panic while holding it cannot leave the counts half-changed: recover.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Sender {
    /// Sends a message, or queues it for the channel's task. Returns false (and drops any
    /// fd) if the channel is closed.
    pub fn send(&self, mut msg: Outgoing) -> bool {
        let mut st = self.shared.state();
        if st.closed {
            return false;
        }
        if st.queued == 0 {
            match write_line(self.shared.fd.get_ref().as_raw_fd(), &msg, 0) {
                Ok(n) if n == msg.line.len() => return true,
                Ok(0) => {}
                Ok(n) => {
                    // The fd went with the first part; the rest goes without it.
                    msg.line.drain(..n);
                    msg.fd = None;
                }
                // The task tries it again, meets the error and reports it (the channel is
                // cut off, and what the worker held goes elsewhere): a line is never
                // dropped unseen.
                Err(_) => {}
            }
        }
        if self.tx.send(msg).is_err() {
            return false;
        }
        st.queued += 1;
        true
    }
}

/// Splits bytes into JSON values and pairs received fds with `NODE_HANDLE` messages.
/// Pure: the fuzz and property tests drive it directly.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    fds: VecDeque<OwnedFd>,
}

impl Decoder {
    pub fn push_fds(&mut self, fds: impl IntoIterator<Item = OwnedFd>) -> Result<(), Violation> {
        // (Fds left here when the channel ends are closed off the loop: see `Drop`.)
        self.fds.extend(fds);
        if self.fds.len() > MAX_PENDING_FDS {
            return Err(Violation::UnexpectedFds);
        }
        Ok(())
    }

    /// Appends bytes and returns every complete message.
    pub fn push_bytes(&mut self, data: &[u8]) -> Result<Vec<(Value, Option<OwnedFd>)>, Violation> {
        self.push_lines(data, parse_line)
    }

    /// Appends bytes and gives every complete line (without its newline) to `each`, with
    /// the fds waiting to be claimed; returns what `each` made of them. Lines over
    /// [`MAX_LINE`] are refused.
    pub fn push_lines<T>(
        &mut self,
        data: &[u8],
        mut each: impl FnMut(&[u8], &mut VecDeque<OwnedFd>) -> Result<T, Violation>,
    ) -> Result<Vec<T>, Violation> {
        let Decoder { buf, fds } = self;
        let mut out = Vec::new();
        let mut rest = data;
        while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
            let line_bytes: &[u8] = if buf.is_empty() {
                &rest[..nl]
            } else {
                if buf.len() + nl > MAX_LINE {
                    return Err(Violation::LineTooLong);
                }
                buf.extend_from_slice(&rest[..nl]);
                buf
            };
            if line_bytes.len() > MAX_LINE {
                return Err(Violation::LineTooLong);
            }
            out.push(each(line_bytes, fds)?);
            buf.clear();
            rest = &rest[nl + 1..];
        }
        if buf.len() + rest.len() > MAX_LINE {
            return Err(Violation::LineTooLong);
        }
        buf.extend_from_slice(rest);
        Ok(out)
    }
}

/// One line as JSON, with the fd Node's rule gives it: the first waiting, if it is a
/// `NODE_HANDLE`.
pub fn parse_line(
    line: &[u8],
    fds: &mut VecDeque<OwnedFd>,
) -> Result<(Value, Option<OwnedFd>), Violation> {
    let value: Value = serde_json::from_slice(line).map_err(Violation::InvalidJson)?;
    let fd = if is_handle(&value) {
        fds.pop_front()
    } else {
        None
    };
    Ok((value, fd))
}

impl Drop for Decoder {
    fn drop(&mut self) {
        // A worker's fds that no message claimed: their close may block (SO_LINGER).
        for fd in self.fds.drain(..) {
            crate::unix::close_later(fd);
        }
    }
}

fn is_handle(v: &Value) -> bool {
    v.get("cmd").and_then(Value::as_str) == Some("NODE_HANDLE")
}

/// Starts the task that owns the master's end of a channel. Everything it reads goes to
/// `events`, wrapped by `wrap`; it ends after reporting `Closed`.
pub fn start<E: Send + 'static>(
    fd: OwnedFd,
    events: mpsc::Sender<E>,
    wrap: impl Fn(Incoming) -> E + Send + Sync + 'static,
) -> io::Result<Sender> {
    let fd = crate::unix::async_fd(fd, Interest::READABLE | Interest::WRITABLE)?;
    let shared = Arc::new(Shared {
        fd,
        state: Mutex::new(SendState::default()),
    });
    let (tx, rx) = mpsc::unbounded_channel();
    let task_shared = shared.clone();
    tokio::spawn(async move {
        let reason = run(&task_shared, rx, &events, &wrap).await;
        task_shared.state().closed = true;
        if reason.is_some() {
            // Cut off: the worker sees EOF now, not when the master drops its senders.
            // SAFETY: shutdown on an fd we own; it only changes the socket's state.
            unsafe { libc::shutdown(task_shared.fd.get_ref().as_raw_fd(), libc::SHUT_RDWR) };
        }
        drop(task_shared);
        let _ = events.send(wrap(Incoming::Closed(reason))).await;
    });
    Ok(Sender { tx, shared })
}

async fn run<E>(
    shared: &Shared,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    events: &mpsc::Sender<E>,
    wrap: &impl Fn(Incoming) -> E,
) -> Option<Violation> {
    let fd = &shared.fd;
    let mut decoder = Decoder::default();
    // One read buffer for the channel's life.
    let mut buf = vec![0u8; 64 * 1024];
    let mut queue: VecDeque<Outgoing> = VecDeque::new();
    // Bytes of the queue's front line already written.
    let mut written = 0usize;
    let mut senders_gone = false;
    loop {
        if senders_gone && queue.is_empty() {
            // The master dropped the channel: close our end so the worker sees EOF.
            return None;
        }
        tokio::select! {
            biased;
            got = rx.recv(), if !senders_gone => match got {
                Some(msg) => {
                    if queue.len() >= MAX_QUEUED_OUT {
                        return Some(Violation::NotReading);
                    }
                    queue.push_back(msg);
                    // Opportunistic write: most lines go out without waiting.
                    if let Err(e) = flush(shared, &mut queue, &mut written) {
                        return Some(Violation::Io(e));
                    }
                }
                None => senders_gone = true,
            },
            guard = fd.writable(), if !queue.is_empty() => {
                let Ok(mut guard) = guard else { return Some(Violation::Io(io::Error::other("poll failed"))) };
                match flush(shared, &mut queue, &mut written) {
                    Ok(()) => {
                        if !queue.is_empty() {
                            guard.clear_ready();
                        }
                    }
                    Err(e) => return Some(Violation::Io(e)),
                }
            }
            guard = fd.readable() => {
                let Ok(mut guard) = guard else { return Some(Violation::Io(io::Error::other("poll failed"))) };
                match read_some(fd.get_ref().as_raw_fd(), &mut buf) {
                    Ok(Read::WouldBlock) => guard.clear_ready(),
                    Ok(Read::Eof) => return None,
                    Ok(Read::Truncated(fds)) => {
                        // The kernel dropped the fds it had no room for; the ones that came
                        // are closed (off the loop) with the channel.
                        fds.into_iter().for_each(crate::unix::close_later);
                        return Some(Violation::TruncatedFds);
                    }
                    Ok(Read::Data(n, fds)) => {
                        // A short read without fds took everything there was; whatever
                        // comes later raises a new readiness edge. Saves one recvmsg that
                        // would only say EAGAIN. A read that carried fds may have stopped
                        // early (the kernel ends a read at each message with fds), so the
                        // socket is read again.
                        if n < buf.len() && fds.is_empty() {
                            guard.clear_ready();
                        }
                        // Fds are closed on a thread of their own; while a close there
                        // blocks, more from this worker would only pile up in the master.
                        if !fds.is_empty() && crate::unix::closes_jammed() {
                            fds.into_iter().for_each(crate::unix::close_later);
                            return Some(Violation::ClosesBlocked);
                        }
                        if let Err(v) = decoder.push_fds(fds) {
                            return Some(v);
                        }
                        let msgs = decoder.push_lines(&buf[..n], |line, fds| {
                            if let Some(known) = crate::node::recognise(line) {
                                return Ok(Incoming::Known(known));
                            }
                            match crate::node::user_line(line) {
                                Some(user) => user.map(Incoming::Known).map_err(Violation::InvalidJson),
                                None => parse_line(line, fds).map(|(v, fd)| Incoming::Message(v, fd)),
                            }
                        });
                        match msgs {
                            Ok(msgs) => {
                                for msg in msgs {
                                    if events.send(wrap(msg)).await.is_err() {
                                        return None;
                                    }
                                }
                            }
                            Err(v) => return Some(v),
                        }
                    }
                    Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => return None,
                    Err(e) => return Some(Violation::Io(e)),
                }
            }
        }
    }
}

/// What one [`read_some`] got.
#[derive(Debug)]
pub enum Read {
    /// This many bytes into the buffer, and the fds that came with them.
    Data(usize, Vec<OwnedFd>),
    /// The fds sent did not all reach us (`MSG_CTRUNC`: no room for their control
    /// message, or no free fd number): the kernel dropped the rest. These are the ones that
    /// came; which message each belonged to is lost, so the channel is out of step.
    Truncated(Vec<OwnedFd>),
    Eof,
    WouldBlock,
}

/// The most fds one message can carry: the kernel's `SCM_MAX_FD`.
pub const SCM_MAX_FD: usize = 253;

const WORD: usize = std::mem::size_of::<usize>();

/// `CMSG_ALIGN`.
const fn cmsg_align(n: usize) -> usize {
    (n + WORD - 1) & !(WORD - 1)
}

/// The kernel's `struct cmsghdr`: `size_t cmsg_len; int cmsg_level; int cmsg_type;`.
const CMSG_HDR: usize = cmsg_align(WORD + 8);

/// `CMSG_SPACE`: a control message with `data` bytes, padded for the next.
const fn cmsg_space(data: usize) -> usize {
    CMSG_HDR + cmsg_align(data)
}

/// Room for one control message of [`SCM_MAX_FD`] fds and one of credentials
/// (`SO_PASSCRED`, the notify socket's), the most one message can bring on the sockets we
/// read.
const CONTROL_LEN: usize =
    cmsg_space(SCM_MAX_FD * 4) + cmsg_space(std::mem::size_of::<libc::ucred>());

/// A control buffer aligned as `struct cmsghdr` must be.
#[repr(C, align(8))]
struct Control([u8; CONTROL_LEN]);

/// What one `recvmsg` brought.
#[derive(Debug)]
pub(crate) struct Received {
    /// Bytes into the buffer.
    pub bytes: usize,
    /// Every fd the kernel installed for us, owned here, so each is closed exactly once
    /// whatever the caller makes of the rest.
    pub fds: Vec<OwnedFd>,
    /// The sender's pid, if credentials came (`SO_PASSCRED`).
    pub pid: Option<i32>,
    /// `MSG_CTRUNC`: control data was dropped (fds among it are closed by the kernel).
    pub ctrunc: bool,
}

/// One `recvmsg` with room for every fd one message can carry and the sender's
/// credentials, the fds close-on-exec; retried on `EINTR`. `EAGAIN` is an error of kind
/// `WouldBlock`. The channels read through [`read_some`]; the notify socket uses this.
pub(crate) fn recv_with_fds(fd: RawFd, buf: &mut [u8]) -> io::Result<Received> {
    let mut control = Control([0; CONTROL_LEN]);
    recv_into(fd, buf, &mut control.0)
}

/// One `recvmsg` into `buf`, with `control` for the control messages, the fds
/// close-on-exec; retried on `EINTR`. `EAGAIN` is an error of kind `WouldBlock`.
fn recv_into(fd: RawFd, buf: &mut [u8], control: &mut [u8]) -> io::Result<Received> {
    loop {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: an all-zero msghdr is a valid empty one; its pointers are set below.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = control.len() as _;
        // SAFETY: recvmsg writes at most iov_len bytes into `buf` and msg_controllen bytes
        // into `control`, both live and that large for the call; it returns how much.
        let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let mut got = Received {
            bytes: n as usize,
            fds: Vec::new(),
            pid: None,
            ctrunc: msg.msg_flags & libc::MSG_CTRUNC != 0,
        };
        // The kernel set msg_controllen to what it wrote.
        let written = (msg.msg_controllen as usize).min(control.len());
        for_each_cmsg(&control[..written], |level, kind, data| {
            match (level, kind) {
                (libc::SOL_SOCKET, libc::SCM_RIGHTS) => {
                    for raw in data.chunks_exact(4) {
                        let raw = i32::from_ne_bytes([raw[0], raw[1], raw[2], raw[3]]);
                        // SAFETY: the kernel just installed this fd for us, and nothing else
                        // knows its number: it is owned here, once.
                        got.fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
                    }
                }
                // `struct ucred` starts with the pid.
                (libc::SOL_SOCKET, libc::SCM_CREDENTIALS) if data.len() >= 4 => {
                    got.pid = Some(i32::from_ne_bytes([data[0], data[1], data[2], data[3]]));
                }
                _ => {}
            }
        });
        return Ok(got);
    }
}

/// Calls `each(level, type, data)` for every control message the kernel wrote.
fn for_each_cmsg(mut control: &[u8], mut each: impl FnMut(i32, i32, &[u8])) {
    let int = |b: &[u8]| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
    while control.len() >= CMSG_HDR {
        let mut len = [0u8; WORD];
        len.copy_from_slice(&control[..WORD]);
        let len = usize::from_ne_bytes(len);
        if len < CMSG_HDR || len > control.len() {
            break;
        }
        each(
            int(&control[WORD..]),
            int(&control[WORD + 4..]),
            &control[CMSG_HDR..len],
        );
        control = &control[cmsg_align(len).min(control.len())..];
    }
}

/// One `recvmsg` on a channel, with room for as many fds as a message can carry
/// (close-on-exec), retried on `EINTR`. Every end uses it: the master's channel task,
/// [`crate::worker::Channel`] and the test fixture.
pub fn read_some(fd: RawFd, buf: &mut [u8]) -> io::Result<Read> {
    let mut control = Control([0; CONTROL_LEN]);
    read_with_room(fd, buf, &mut control.0)
}

fn read_with_room(fd: RawFd, buf: &mut [u8], control: &mut [u8]) -> io::Result<Read> {
    let got = match recv_into(fd, buf, control) {
        Ok(got) => got,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Read::WouldBlock),
        Err(e) => return Err(e),
    };
    if got.ctrunc {
        return Ok(Read::Truncated(got.fds));
    }
    if got.bytes == 0 && got.fds.is_empty() {
        return Ok(Read::Eof);
    }
    Ok(Read::Data(got.bytes, got.fds))
}

/// Writes as much of the queue as the socket takes, and tells the senders each line that
/// is out whole.
fn flush(shared: &Shared, queue: &mut VecDeque<Outgoing>, written: &mut usize) -> io::Result<()> {
    let raw = shared.fd.get_ref().as_raw_fd();
    while let Some(front) = queue.front() {
        let n = write_line(raw, front, *written)?;
        if n == 0 {
            return Ok(());
        }
        *written += n;
        if *written >= front.line.len() {
            // The kernel holds its own reference to a passed fd from here on, so our copy
            // can close now (NODE-IPC.md §5, pitfall 2).
            queue.pop_front();
            *written = 0;
            shared.state().queued -= 1;
        }
    }
    Ok(())
}

/// One `sendmsg` of `msg.line` from byte `from`: the fd rides on the first byte of its
/// line, as libuv sends it. Returns the bytes written, 0 when the socket is full.
fn write_line(raw: RawFd, msg: &Outgoing, from: usize) -> io::Result<usize> {
    let iov = [IoSlice::new(&msg.line[from..])];
    loop {
        let result = match msg.fd.as_ref() {
            Some(pass) if from == 0 => {
                let fds = [pass.as_raw_fd()];
                sendmsg::<()>(
                    raw,
                    &iov,
                    &[ControlMessage::ScmRights(&fds)],
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
            }
            _ => sendmsg::<()>(raw, &iov, &[], MsgFlags::MSG_NOSIGNAL, None),
        };
        match result {
            Ok(n) => return Ok(n),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(nix::errno::Errno::EAGAIN) => return Ok(0),
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn dummy_fd() -> OwnedFd {
        let (a, _b) = pair().unwrap();
        a
    }

    #[test]
    fn lines_split_across_reads() {
        let mut d = Decoder::default();
        assert!(d.push_bytes(b"{\"a\":").unwrap().is_empty());
        let got = d.push_bytes(b"1}\n42\n[").unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0, json!({"a": 1}));
        assert_eq!(got[1].0, json!(42));
        let got = d.push_bytes(b"]\n").unwrap();
        assert_eq!(got[0].0, json!([]));
    }

    #[test]
    fn an_fd_goes_to_the_first_handle_message_after_it() {
        let mut d = Decoder::default();
        d.push_fds([dummy_fd()]).unwrap();
        let got = d
            .push_bytes(b"{\"cmd\":\"NODE_HANDLE_ACK\"}\n{\"cmd\":\"NODE_HANDLE\",\"type\":\"net.Native\",\"msg\":1}\n")
            .unwrap();
        assert!(got[0].1.is_none());
        assert!(got[1].1.is_some());
    }

    #[test]
    fn bad_input_is_a_violation() {
        assert!(matches!(
            Decoder::default().push_bytes(b"{nope}\n"),
            Err(Violation::InvalidJson(_))
        ));
        assert!(matches!(
            Decoder::default().push_bytes(b"\n"),
            Err(Violation::InvalidJson(_))
        ));
        let big = vec![b' '; MAX_LINE + 1];
        assert!(matches!(
            Decoder::default().push_bytes(&big),
            Err(Violation::LineTooLong)
        ));
        let mut d = Decoder::default();
        assert!(
            d.push_fds((0..=MAX_PENDING_FDS).map(|_| dummy_fd()))
                .is_err()
        );
    }

    #[test]
    fn a_long_line_in_pieces_is_caught_before_it_is_kept() {
        let mut d = Decoder::default();
        let piece = vec![b'1'; 64 * 1024];
        let mut caught = false;
        for _ in 0..20 {
            if d.push_bytes(&piece).is_err() {
                caught = true;
                break;
            }
        }
        assert!(caught);
        assert!(d.buf.len() <= MAX_LINE);
    }

    /// A line the socket takes only in part has its rest queued; a line sent after it, once
    /// the socket has room again, must wait behind that rest rather than go out directly
    /// into the middle of it. Each fd arrives with its own line.
    #[tokio::test]
    async fn a_line_sent_after_a_partial_write_waits_behind_its_rest() {
        use std::os::fd::AsFd;
        let (master, worker) = pair().unwrap();
        let (events_tx, _events) = mpsc::channel(16);
        let sender = start(master, events_tx, |i| i).unwrap();
        let inode =
            |fd: std::os::fd::BorrowedFd<'_>| nix::sys::stat::fstat(fd.as_raw_fd()).unwrap().st_ino;
        let handle = |n: u64, pad: usize| {
            let (a, _b) = pair().unwrap();
            let ino = inode(a.as_fd());
            let v = json!({"cmd":"NODE_HANDLE","type":"net.Native","msg":{"n":n,"pad":"x".repeat(pad)}});
            (Outgoing::json(&v, Some(Arc::new(a))), ino)
        };
        // Far more than the socket buffers: written in part, the rest queued.
        let (big, big_ino) = handle(0, 900_000);
        assert!(sender.send(big));
        // Room again (no await: the channel's task has not run), then a small line.
        let mut buf = vec![0u8; 64 * 1024];
        let mut decoder = Decoder::default();
        let mut got = Vec::new();
        match read_some(worker.as_raw_fd(), &mut buf).unwrap() {
            Read::Data(n, fds) => {
                decoder.push_fds(fds).unwrap();
                got.extend(decoder.push_bytes(&buf[..n]).unwrap());
            }
            _ => panic!("nothing was written directly"),
        }
        let (small, small_ino) = handle(1, 10);
        assert!(sender.send(small));
        let got = tokio::task::spawn_blocking(move || {
            while got.len() < 2 {
                match read_some(worker.as_raw_fd(), &mut buf).unwrap() {
                    Read::Data(n, fds) => {
                        decoder.push_fds(fds).unwrap();
                        got.extend(decoder.push_bytes(&buf[..n]).unwrap());
                    }
                    Read::Eof => panic!("EOF after {} lines", got.len()),
                    Read::Truncated(_) => panic!("truncated"),
                    Read::WouldBlock => unreachable!("the worker's end blocks"),
                }
            }
            got
        })
        .await
        .unwrap();
        let inodes: Vec<_> = got
            .iter()
            .map(|(v, fd)| (v["msg"]["n"].clone(), fd.as_ref().map(|f| inode(f.as_fd()))))
            .collect();
        assert_eq!(
            inodes,
            [(json!(0), Some(big_ino)), (json!(1), Some(small_ino))]
        );
    }

    /// Sends `n` copies of `file` in one message of one byte.
    fn send_copies(sock: &OwnedFd, file: &std::fs::File, n: usize) {
        let fds = vec![file.as_raw_fd(); n];
        sendmsg::<()>(
            sock.as_raw_fd(),
            &[IoSlice::new(b" ")],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
    }

    /// How many of this process's fds are open on `path` (a file only this test opens).
    fn open_on(path: &std::path::Path) -> usize {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .flatten()
            .filter(|e| std::fs::read_link(e.path()).is_ok_and(|t| t == path))
            .count()
    }

    /// The kernel's most fds in one message all arrive, and all close with what holds them.
    #[test]
    fn as_many_fds_as_a_message_can_carry_arrive_and_close() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = std::fs::File::create(&path).unwrap();
        let (a, b) = pair().unwrap();
        for n in [16, SCM_MAX_FD] {
            send_copies(&b, &file, n);
            let mut buf = [0u8; 16];
            match read_some(a.as_raw_fd(), &mut buf).unwrap() {
                Read::Data(1, fds) => {
                    assert_eq!(fds.len(), n);
                    assert_eq!(open_on(&path), 1 + n);
                }
                other => panic!("{n} fds: {other:?}"),
            }
            assert_eq!(open_on(&path), 1);
        }
    }

    /// With room for fewer fds than came, the kernel drops the rest (`MSG_CTRUNC`): that is
    /// reported, and those that did come are still owned, and closed.
    #[test]
    fn fds_that_do_not_fit_are_reported_and_those_that_came_closed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = std::fs::File::create(&path).unwrap();
        let (a, b) = pair().unwrap();
        send_copies(&b, &file, 16);
        let mut control = Control([0; CONTROL_LEN]);
        let room = cmsg_space(8 * 4);
        let mut buf = [0u8; 16];
        match read_with_room(a.as_raw_fd(), &mut buf, &mut control.0[..room]).unwrap() {
            Read::Truncated(fds) => {
                assert_eq!(fds.len(), 8);
                assert_eq!(open_on(&path), 1 + 8);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(open_on(&path), 1);
        // The channel reads on (the master cuts it off; the fds are not left in between).
        send_copies(&b, &file, 1);
        match read_some(a.as_raw_fd(), &mut buf).unwrap() {
            Read::Data(1, fds) => assert_eq!(fds.len(), 1),
            other => panic!("{other:?}"),
        }
        assert_eq!(open_on(&path), 1);
    }

    /// More fds in one message than may wait for their `NODE_HANDLE` cut the channel off,
    /// and the master keeps none of them.
    #[tokio::test]
    async fn sixteen_fds_in_one_message_cut_the_channel_off() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = std::fs::File::create(&path).unwrap();
        let (master, worker) = pair().unwrap();
        let (events_tx, mut events) = mpsc::channel(16);
        let _sender = start(master, events_tx, |i| i).unwrap();
        send_copies(&worker, &file, 16);
        match events.recv().await.unwrap() {
            Incoming::Closed(Some(Violation::UnexpectedFds)) => {}
            other => panic!("{other:?}"),
        }
        // Closed off the loop, on the closer's thread.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while open_on(&path) > 1 && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(open_on(&path), 1);
    }

    /// While a close on the closer thread blocks with more than `MAX_CLOSES_WAITING` fds
    /// behind it, a worker that sends another fd is cut off instead of adding to them.
    /// (This jams the closer of the test's process for 2 s: nextest runs each test in a
    /// process of its own.)
    #[tokio::test]
    async fn an_fd_sent_while_closes_are_blocked_cuts_the_channel_off() {
        let (lingering, _peer) = crate::unix::tests::lingering_socket(2);
        crate::unix::close_later_as_is(lingering);
        for _ in 0..crate::unix::MAX_CLOSES_WAITING {
            crate::unix::close_later(std::fs::File::open("/dev/null").unwrap().into());
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while !crate::unix::closes_jammed() && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert!(crate::unix::closes_jammed());
        let (master, worker) = pair().unwrap();
        let (events_tx, mut events) = mpsc::channel(16);
        let _sender = start(master, events_tx, |i| i).unwrap();
        let null = std::fs::File::open("/dev/null").unwrap();
        send_copies(&worker, &null, 1);
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), events.recv()).await;
        match got.expect("the channel was not cut off").unwrap() {
            Incoming::Closed(Some(Violation::ClosesBlocked)) => {}
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn messages_and_fds_cross_a_real_socketpair() {
        let (master, worker) = pair().unwrap();
        let (events_tx, mut events) = mpsc::channel(16);
        let sender = start(master, events_tx, |i| i).unwrap();
        // The "worker" end speaks the same protocol through a second channel task.
        crate::spawn::set_nonblocking(&worker, true).unwrap();
        let (wtx, mut wevents) = mpsc::channel(16);
        let wsender = start(worker, wtx, |i| i).unwrap();
        let (x, _y) = pair().unwrap();
        assert!(sender.send(Outgoing::json(
            &json!({"cmd":"NODE_HANDLE","type":"net.Native","msg":{"n":1}}),
            Some(std::sync::Arc::new(x))
        )));
        match wevents.recv().await.unwrap() {
            Incoming::Message(v, fd) => {
                assert_eq!(v["msg"]["n"], 1);
                assert!(fd.is_some());
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(wsender.send(Outgoing::json(&json!({"cmd":"NODE_HANDLE_ACK"}), None)));
        // Recognised from its bytes, without a JSON value.
        match events.recv().await.unwrap() {
            Incoming::Known(crate::node::FromWorker::HandleAck) => {}
            other => panic!("unexpected {other:?}"),
        }
        // The same message written otherwise is parsed.
        assert!(wsender.send(Outgoing {
            line: b"{ \"cmd\": \"NODE_HANDLE_ACK\" }\n".to_vec(),
            fd: None
        }));
        match events.recv().await.unwrap() {
            Incoming::Message(v, fd) => {
                assert_eq!(v["cmd"], "NODE_HANDLE_ACK");
                assert!(fd.is_none());
            }
            other => panic!("unexpected {other:?}"),
        }
        drop(wsender);
        assert!(matches!(
            events.recv().await.unwrap(),
            Incoming::Closed(None)
        ));
    }
}
