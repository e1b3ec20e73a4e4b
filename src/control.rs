//! The control socket: how `processes status`, `scale`, `reload` and `stop` talk to a
//! running master.
//!
//! A unix stream socket in a 0700 directory, itself 0600, and every connection's peer
//! credentials checked: only the master's own uid (and root) are served. One request per
//! connection, one JSON line each way, versioned (`"v": 1`) and size-capped; a client
//! that is slow, oversize or speaks garbage gets an error reply or a closed connection,
//! never the master's attention for more than a bounded time.

use std::io::{self, BufRead};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use crate::errors::{ClientError, StartError};
use crate::master::Event;

pub const PROTOCOL_VERSION: u32 = 1;
/// The largest request accepted.
pub const MAX_REQUEST: usize = 64 * 1024;
/// A client has this long to send its request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// What a client may ask.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Status {
        #[serde(default)]
        app: Option<String>,
    },
    /// A fixed size (`n`), or new autoscaling bounds (`min`, `max`).
    Scale {
        app: String,
        #[serde(default)]
        n: Option<usize>,
        #[serde(default)]
        min: Option<usize>,
        #[serde(default)]
        max: Option<usize>,
    },
    /// A rolling reload; the reply comes when it is done, with progress lines before.
    Reload {
        #[serde(default)]
        app: Option<String>,
        #[serde(default)]
        batch: Option<usize>,
    },
    /// Replace one slot's worker: the new one first, then the old one drained.
    Restart { app: String, slot: u32 },
    /// Stop one app, or the whole master.
    Stop {
        #[serde(default)]
        app: Option<String>,
    },
    /// Start a stopped app again, and restart at once any of its slots that wait after
    /// crashes.
    Start { app: String },
}

/// Where the master answers one request: progress lines while it works, then the reply.
pub struct Responder {
    progress: mpsc::UnboundedSender<String>,
    done: oneshot::Sender<Reply>,
}

impl Responder {
    /// A responder and the ends a transport reads from.
    pub fn new() -> (
        Responder,
        mpsc::UnboundedReceiver<String>,
        oneshot::Receiver<Reply>,
    ) {
        let (ptx, prx) = mpsc::unbounded_channel();
        let (dtx, drx) = oneshot::channel();
        (
            Responder {
                progress: ptx,
                done: dtx,
            },
            prx,
            drx,
        )
    }

    /// Tells the client how it is going; a client that left is not an error.
    pub fn progress(&self, line: impl Into<String>) {
        let _ = self.progress.send(line.into());
    }

    pub fn reply(self, r: Reply) {
        let _ = self.done.send(r);
    }
}

/// The master's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub data: Value,
}

impl Reply {
    pub fn ok(data: Value) -> Reply {
        Reply {
            ok: true,
            error: None,
            data,
        }
    }
    pub fn error(msg: impl Into<String>) -> Reply {
        Reply {
            ok: false,
            error: Some(msg.into()),
            data: Value::Null,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    v: u32,
    #[serde(flatten)]
    req: Value,
}

/// `$XDG_RUNTIME_DIR/processes/NAME.sock`, else `~/.processes/NAME.sock`.
pub fn default_path(name: &str) -> PathBuf {
    let dir = std::env::var_os("XDG_RUNTIME_DIR")
        .map(|d| PathBuf::from(d).join("processes"))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".processes")))
        .unwrap_or_else(|| PathBuf::from("/tmp/processes"));
    dir.join(format!("{name}.sock"))
}

/// Binds the control socket. A live socket at the path means another master of that
/// name runs: an error. A dead one is replaced.
pub fn bind(path: &Path) -> Result<std::os::unix::net::UnixListener, StartError> {
    let setup = |source: io::Error| StartError::Setup {
        what: "the control socket",
        source,
    };
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
        && !dir.exists()
    {
        std::fs::create_dir_all(dir).map_err(setup)?;
        // A directory we made: only we may even look inside. One that existed (`--control
        // /tmp/x.sock`) keeps its permissions; the socket's own 0600 and the uid check
        // still hold.
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    }
    match crate::sockets::clear_stale_socket(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            return Err(StartError::Control(format!(
                "a master already runs with control socket {}; give this one another --name or --control",
                path.display()
            )));
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(StartError::Control(format!(
                "{}: {e}; remove it or give another --control",
                path.display()
            )));
        }
        Err(e) => return Err(setup(e)),
    }
    let listener = std::os::unix::net::UnixListener::bind(path).map_err(setup)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(setup)?;
    listener.set_nonblocking(true).map_err(setup)?;
    Ok(listener)
}

/// Serves control connections until the master exits.
pub fn serve(listener: std::os::unix::net::UnixListener, events: mpsc::Sender<Event>) {
    tokio::spawn(async move {
        let Ok(listener) = UnixListener::from_std(listener) else {
            return;
        };
        let me = nix::unistd::getuid().as_raw();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let uid = stream.peer_cred().map(|c| c.uid()).ok();
            if uid != Some(me) && uid != Some(0) {
                warn!(
                    "control: refused a client running as uid {}",
                    uid.map_or("?".to_string(), |u| u.to_string())
                );
                let mut stream = stream;
                let reply = Reply::error("permission denied: this master serves only its own user");
                let _ = write_reply(&mut stream, &reply).await;
                continue;
            }
            // Each client holds an fd until it is answered; a client of our own user that
            // opens them without end is told no rather than taking every fd.
            if IN_FLIGHT.load(std::sync::atomic::Ordering::SeqCst) >= MAX_CLIENTS {
                let mut stream = stream;
                let reply = Reply::error(format!(
                    "busy: {MAX_CLIENTS} control clients are being served; try again"
                ));
                let _ =
                    tokio::time::timeout(Duration::from_secs(1), write_reply(&mut stream, &reply))
                        .await;
                continue;
            }
            let events = events.clone();
            let guard = InFlight::enter();
            tokio::spawn(async move {
                let _ = handle(stream, events).await;
                drop(guard);
            });
        }
    });
}

/// Control clients served at once (a `reload` waits for its outcome, `top` stays).
pub const MAX_CLIENTS: usize = 64;

/// Control connections being served; the master waits for them (briefly) before it
/// exits, so that the client that asked it to stop hears its answer.
static IN_FLIGHT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
/// Woken when the last of them is done.
static ALL_DONE: tokio::sync::Notify = tokio::sync::Notify::const_new();

struct InFlight;

impl InFlight {
    fn enter() -> InFlight {
        IN_FLIGHT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        InFlight
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if IN_FLIGHT.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) == 1 {
            ALL_DONE.notify_waiters();
        }
    }
}

/// Lets replies already decided reach their clients: waits until no control connection
/// is being served, or `limit` has passed (a client that stops reading must not hold the
/// master up).
pub async fn drain(limit: Duration) {
    let _ = tokio::time::timeout(limit, async {
        loop {
            // Created before the count is read, so a wake-up in between is not missed.
            let done = ALL_DONE.notified();
            if IN_FLIGHT.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                return;
            }
            done.await;
        }
    })
    .await;
}

async fn write_reply(stream: &mut tokio::net::UnixStream, reply: &Reply) -> io::Result<()> {
    let mut line = serde_json::to_vec(reply)?;
    line.push(b'\n');
    stream.write_all(&line).await
}

async fn handle(stream: tokio::net::UnixStream, events: mpsc::Sender<Event>) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = tokio::io::BufReader::new(read).take(MAX_REQUEST as u64 + 1);
    let mut line = Vec::new();
    let read = tokio::time::timeout(REQUEST_TIMEOUT, reader.read_until(b'\n', &mut line)).await;
    let reply = match read {
        Err(_) => Reply::error("timed out waiting for a request"),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(_)) if line.len() > MAX_REQUEST => {
            Reply::error(format!("request larger than {MAX_REQUEST} bytes"))
        }
        Ok(Ok(_)) => match parse_request(&line) {
            Err(msg) => Reply::error(msg),
            Ok(req) => {
                let (responder, mut progress, mut done) = Responder::new();
                if events.send(Event::Control(req, responder)).await.is_err() {
                    Reply::error("the master is shutting down")
                } else {
                    loop {
                        tokio::select! {
                            Some(line) = progress.recv() => {
                                let mut out = serde_json::to_vec(&serde_json::json!({"progress": line}))?;
                                out.push(b'\n');
                                write.write_all(&out).await?;
                            }
                            r = &mut done => {
                                // Progress sent just before the reply still goes first.
                                while let Ok(line) = progress.try_recv() {
                                    let mut out = serde_json::to_vec(&serde_json::json!({"progress": line}))?;
                                    out.push(b'\n');
                                    write.write_all(&out).await?;
                                }
                                break r.unwrap_or_else(|_| Reply::error("the master is shutting down"));
                            }
                        }
                    }
                }
            }
        },
    };
    let mut out = serde_json::to_vec(&reply)?;
    out.push(b'\n');
    write.write_all(&out).await
}

/// Parses one request line; the error is what the client is told.
pub fn parse_request(line: &[u8]) -> Result<Request, String> {
    let env: Envelope = serde_json::from_slice(line).map_err(|e| format!("not a request: {e}"))?;
    if env.v != PROTOCOL_VERSION {
        return Err(format!(
            "protocol version {} is not supported (this master speaks {PROTOCOL_VERSION}); use a matching processes binary",
            env.v
        ));
    }
    serde_json::from_value(env.req).map_err(|e| format!("not a request: {e}"))
}

/// Sends one request and returns the reply's data, or the master's error.
pub fn request(path: &Path, req: &Request) -> Result<Value, ClientError> {
    request_with_progress(path, req, |_| {})
}

/// Like [`request`], calling `on_progress` with each progress line as it arrives.
pub fn request_with_progress(
    path: &Path,
    req: &Request,
    mut on_progress: impl FnMut(&str),
) -> Result<Value, ClientError> {
    let stream =
        std::os::unix::net::UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
    let mut v = serde_json::to_value(req).map_err(ClientError::Protocol)?;
    v["v"] = PROTOCOL_VERSION.into();
    let mut line = serde_json::to_vec(&v).map_err(ClientError::Protocol)?;
    line.push(b'\n');
    // A master that refuses us answers and closes without reading, so the write may fail
    // while its answer waits to be read: read first, report the write error only if no
    // answer came.
    // MSG_NOSIGNAL: a client dies of SIGPIPE only when its own reader goes (main.rs).
    let wrote = send_all(&stream, &line);
    let mut reader = io::BufReader::new(stream);
    let reply: Reply = loop {
        let mut answer = String::new();
        let n = reader.read_line(&mut answer);
        if !matches!(n, Ok(k) if k > 0) {
            return Err(ClientError::Io(match (wrote, n) {
                (Err(e), _) | (Ok(()), Err(e)) => e,
                (Ok(()), Ok(_)) => io::Error::from(io::ErrorKind::UnexpectedEof),
            }));
        }
        let v: Value = serde_json::from_str(&answer).map_err(ClientError::Protocol)?;
        if let Some(p) = v.get("progress").and_then(Value::as_str) {
            on_progress(p);
            continue;
        }
        break serde_json::from_value(v).map_err(ClientError::Protocol)?;
    };
    if reply.ok {
        Ok(reply.data)
    } else {
        Err(ClientError::Refused(
            reply.error.unwrap_or_else(|| "refused".into()),
        ))
    }
}

/// Writes all of `buf` without raising SIGPIPE if the peer has gone (`EPIPE` instead).
fn send_all(stream: &std::os::unix::net::UnixStream, mut buf: &[u8]) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    while !buf.is_empty() {
        match nix::sys::socket::send(
            stream.as_raw_fd(),
            buf,
            nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
        ) {
            Ok(n) => buf = &buf[n..],
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_bad_ones_say_why() {
        assert_eq!(
            parse_request(br#"{"v":1,"cmd":"status"}"#),
            Ok(Request::Status { app: None })
        );
        assert_eq!(
            parse_request(br#"{"v":1,"cmd":"scale","app":"web","n":3}"#),
            Ok(Request::Scale {
                app: "web".into(),
                n: Some(3),
                min: None,
                max: None,
            })
        );
        assert_eq!(
            parse_request(br#"{"v":1,"cmd":"stop"}"#),
            Ok(Request::Stop { app: None })
        );
        assert_eq!(
            parse_request(br#"{"v":1,"cmd":"start","app":"web"}"#),
            Ok(Request::Start { app: "web".into() })
        );
        assert!(
            parse_request(br#"{"v":2,"cmd":"status"}"#)
                .unwrap_err()
                .contains("version 2")
        );
        assert!(parse_request(b"garbage").is_err());
        assert!(parse_request(br#"{"v":1,"cmd":"explode"}"#).is_err());
        assert!(parse_request(br#"{"v":1,"cmd":"scale","app":"w","n":-1}"#).is_err());
    }
}
