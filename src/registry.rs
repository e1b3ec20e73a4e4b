//! Registration of each app's live endpoints in etcd, so that a load balancer's table
//! follows crashes, drains and scaling within a second (DESIGN.md, "Beyond one machine").
//!
//! Owns one etcd lease, the keys attached to it and the one tokio task that writes them.
//! The master hands [`Registry::update`] a snapshot of its apps whenever something a load
//! balancer cares about changes; the task turns the newest snapshot into puts and deletes.
//!
//! * Key: `{prefix}{app}/{node}`, e.g. `/processes/web/host-a` ([`RegistryConfig::key`]).
//! * Value: JSON `{"app", "node", "endpoints", "ready", "version", "updated_unix_ms"}`
//!   ([`record_value`]): `endpoints` are the `host:port` of each TCP listener as a client
//!   elsewhere reaches it ([`advertised_endpoint`]), `ready` the app's ready workers,
//!   `version` its reload generation.
//! * An app with no ready worker has **no key**: the key is deleted the moment `ready`
//!   drops to 0, so a load balancer drops the node at once instead of parsing a count.
//!
//! The invariant: while etcd is reachable, etcd holds a key for an app on this node exactly
//! when the newest snapshot says the app has a ready worker, with that snapshot's values,
//! within a second of [`Registry::update`]; every such key is attached to the master's
//! lease, so if the master dies the keys vanish within the lease TTL. [`Registry::shutdown`]
//! revokes the lease (deleting every key at once); dropping a [`Registry`] without it stops
//! the keepalives, which is what a dead master looks like to etcd.
//!
//! Nothing here blocks or fails the master: `start` and `update` return at once, every
//! request has a timeout, and a failing etcd is retried with exponential backoff
//! (100 ms doubling to 5 s, with jitter), the next endpoint on each failure, the state
//! visible in [`Registry::state`]. A lost lease (etcd restarted without its data, or the
//! lease expired during an outage) is replaced by a new one and every key is put again.
//!
//! etcd is spoken to through its documented JSON gateway (gRPC-gateway, `POST /v3/...`,
//! keys and values base64), served by etcd 3.4 and later, with a small HTTP/1.1 client
//! here — no protobuf, no new dependency. Paths: `/v3/lease/grant`,
//! `/v3/lease/keepalive` (a stream: one newline-terminated message, chunked),
//! `/v3/lease/revoke`, `/v3/kv/put`, `/v3/kv/deleterange`, `/v3/kv/range` ([`list`]).

use std::collections::BTreeMap;
use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// Where keys go unless configured otherwise.
pub const DEFAULT_PREFIX: &str = "/processes/";
/// How long keys outlive a master that died without revoking its lease.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);
/// etcd's client port, used when the URL gives none.
pub const DEFAULT_PORT: u16 = 2379;
/// First retry delay after a failure; doubled per consecutive failure…
pub const BACKOFF_INITIAL: Duration = Duration::from_millis(100);
/// …up to this.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Longest answer accepted from etcd; anything longer is treated as a broken server.
const MAX_RESPONSE: usize = 1 << 20;

/// What the registry needs to know; built by the config layer from `--registry`,
/// `prefix`, the TTL and `--advertise`.
#[derive(Clone, Debug, PartialEq)]
pub struct RegistryConfig {
    /// etcd client endpoints, `host:port` each, tried in order (see [`parse_url`]).
    pub endpoints: Vec<String>,
    /// Key prefix; a missing trailing `/` is implied.
    pub prefix: String,
    /// Lease TTL, whole seconds (rounded up; etcd may raise it to its own minimum).
    pub ttl: Duration,
    /// This machine's name in keys and values: the advertised host (`--advertise`, else
    /// the hostname).
    pub node: String,
}

impl RegistryConfig {
    /// The defaults for prefix and TTL.
    pub fn new(endpoints: Vec<String>, node: impl Into<String>) -> RegistryConfig {
        RegistryConfig {
            endpoints,
            prefix: DEFAULT_PREFIX.to_string(),
            ttl: DEFAULT_TTL,
            node: node.into(),
        }
    }

    /// Checks what [`Registry::start`] does not: at least one endpoint, a prefix starting
    /// with `/`, a TTL of at least 1 s, a node name usable as a key segment.
    pub fn validate(&self) -> Result<(), String> {
        if self.endpoints.is_empty() {
            return Err("no etcd endpoint".into());
        }
        if !self.prefix.starts_with('/') {
            return Err(format!("prefix {:?} must start with '/'", self.prefix));
        }
        if self.ttl < Duration::from_secs(1) {
            return Err(format!("ttl {:?} is below 1s", self.ttl));
        }
        if self.node.is_empty() {
            return Err("node name is empty".into());
        }
        if let Some(c) = self
            .node
            .chars()
            .find(|c| *c == '/' || c.is_whitespace() || c.is_control())
        {
            return Err(format!("node name {:?} contains {c:?}", self.node));
        }
        Ok(())
    }

    /// `{prefix}{app}/{node}`.
    pub fn key(&self, app: &str) -> String {
        let sep = if self.prefix.ends_with('/') { "" } else { "/" };
        format!("{}{sep}{app}/{}", self.prefix, self.node)
    }

    fn ttl_secs(&self) -> i64 {
        let s = self.ttl.as_secs() + u64::from(self.ttl.subsec_nanos() > 0);
        i64::try_from(s.max(1)).unwrap_or(i64::MAX)
    }

    fn request_timeout(&self) -> Duration {
        (self.ttl / 3).clamp(Duration::from_millis(500), Duration::from_secs(2))
    }
}

/// Parses `etcd://HOST:PORT[,HOST:PORT…]` into `host:port` endpoints. A missing port means
/// 2379; IPv6 addresses go in brackets (`etcd://[::1]:2379`).
pub fn parse_url(s: &str) -> Result<Vec<String>, String> {
    let usage = "expected etcd://HOST:PORT[,HOST:PORT…]";
    let Some(rest) = s.strip_prefix("etcd://") else {
        return Err(match s.split_once("://") {
            Some((scheme, _)) => format!("{s:?}: scheme {scheme:?} is not supported, {usage}"),
            None => format!("{s:?}: {usage}"),
        });
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.is_empty() {
        return Err(format!("{s:?}: no endpoint, {usage}"));
    }
    let mut out = Vec::new();
    for item in rest.split(',') {
        let item = item.trim();
        if item.is_empty() {
            return Err(format!("{s:?}: empty endpoint in the list, {usage}"));
        }
        if let Some(c) = item.chars().find(|c| matches!(c, '/' | '@' | '?' | '#')) {
            return Err(format!(
                "{s:?}: {item:?} contains {c:?}; a path, user or query is not supported"
            ));
        }
        let (host, port) = if let Some(v6) = item.strip_prefix('[') {
            let Some((addr, after)) = v6.split_once(']') else {
                return Err(format!("{s:?}: {item:?} has no closing ']'"));
            };
            if addr.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(format!("{s:?}: {addr:?} is not an IPv6 address"));
            }
            let port = match after {
                "" => None,
                p => match p.strip_prefix(':') {
                    Some(p) => Some(p),
                    None => return Err(format!("{s:?}: {item:?}: expected ':' after ']'")),
                },
            };
            (format!("[{addr}]"), port)
        } else {
            let (host, port) = match item.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (item, None),
            };
            if port.is_some_and(|p| p.contains(':')) {
                return Err(format!(
                    "{s:?}: {item:?}: write an IPv6 address in brackets, as [::1]:2379"
                ));
            }
            if host.is_empty() {
                return Err(format!("{s:?}: {item:?} has no host"));
            }
            if let Some(c) = host
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')))
            {
                return Err(format!("{s:?}: host {host:?} contains {c:?}"));
            }
            (host.to_string(), port)
        };
        let port = match port {
            None => DEFAULT_PORT,
            Some(p) => match p.parse::<u16>() {
                Ok(0) => return Err(format!("{s:?}: {item:?}: port 0 is not a server port")),
                Ok(n) => n,
                Err(_) => return Err(format!("{s:?}: {item:?}: port {p:?} is not a number")),
            },
        };
        out.push(format!("{host}:{port}"));
    }
    Ok(out)
}

/// How a client elsewhere reaches a listener bound at `bound`: `bound` itself, or the
/// advertised host with its port when it binds every address (`0.0.0.0`, `[::]`).
pub fn advertised_endpoint(bound: SocketAddr, advertise: &str) -> String {
    if !bound.ip().is_unspecified() {
        return bound.to_string();
    }
    if advertise.contains(':') && !advertise.starts_with('[') {
        format!("[{advertise}]:{}", bound.port())
    } else {
        format!("{advertise}:{}", bound.port())
    }
}

/// One app as a load balancer sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AppEndpoints {
    pub app: String,
    /// `host:port` of each TCP listener, as [`advertised_endpoint`] gives it.
    pub endpoints: Vec<String>,
    /// Ready workers; 0 means the key is deleted.
    pub ready: usize,
    /// The app's reload generation.
    pub version: u64,
}

/// The JSON stored under an app's key.
#[derive(Serialize)]
struct Record<'a> {
    app: &'a str,
    node: &'a str,
    endpoints: &'a [String],
    ready: usize,
    version: u64,
    updated_unix_ms: u64,
}

/// The value stored under `app`'s key:
/// `{"app","node","endpoints","ready","version","updated_unix_ms"}`.
pub fn record_value(app: &AppEndpoints, node: &str, updated_unix_ms: u64) -> String {
    let record = Record {
        app: &app.app,
        node,
        endpoints: &app.endpoints,
        ready: app.ready,
        version: app.version,
        updated_unix_ms,
    };
    serde_json::to_string(&record).unwrap_or_default()
}

/// The keys etcd should hold for this snapshot: one per app with a ready worker. A
/// repeated app name keeps its last entry.
pub fn desired(cfg: &RegistryConfig, apps: &[AppEndpoints]) -> BTreeMap<String, AppEndpoints> {
    apps.iter()
        .filter(|a| a.ready > 0)
        .map(|a| (cfg.key(&a.app), a.clone()))
        .collect()
}

/// What to send to etcd to go from `written` to `desired`.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    pub puts: Vec<(String, AppEndpoints)>,
    pub deletes: Vec<String>,
}

/// Puts for keys that are new or changed (all desired keys when `resync`, e.g. under a new
/// lease), deletes for keys written before and no longer desired.
pub fn plan(
    written: &BTreeMap<String, AppEndpoints>,
    desired: &BTreeMap<String, AppEndpoints>,
    resync: bool,
) -> Plan {
    Plan {
        puts: desired
            .iter()
            .filter(|(k, v)| resync || written.get(*k) != Some(*v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        deletes: written
            .keys()
            .filter(|k| !desired.contains_key(*k))
            .cloned()
            .collect(),
    }
}

/// The wait before retry number `failures` (1 for the first): [`BACKOFF_INITIAL`] doubled
/// per failure up to [`BACKOFF_MAX`], scaled into `[0.5, 1.0]` of that by `jitter` in
/// `[0, 1)` so that masters that lost etcd together do not come back in lockstep.
pub fn backoff_delay(failures: u32, jitter: f64) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    let nominal = BACKOFF_INITIAL
        .saturating_mul(1u32 << doublings)
        .min(BACKOFF_MAX);
    let j = if jitter.is_finite() {
        jitter.clamp(0.0, 1.0)
    } else {
        0.0
    };
    nominal.mul_f64(0.5 + 0.5 * j)
}

/// The end of the key range that holds every key starting with `prefix` (etcd's
/// `range_end` for a prefix query): the prefix with its last byte below 0xff incremented.
pub fn prefix_range_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte is 0xff (or the prefix is empty): "\0" means "to the end of the keyspace".
    vec![0]
}

/// The standard base64 alphabet with padding, as the gateway writes bytes (proto3 JSON).
pub mod base64 {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    /// Standard alphabet, padded.
    pub fn encode(bytes: &[u8]) -> String {
        let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
        for chunk in bytes.chunks(3) {
            let b = [
                chunk[0],
                chunk.get(1).copied().unwrap_or(0),
                chunk.get(2).copied().unwrap_or(0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    /// Standard or URL-safe alphabet, padding optional.
    pub fn decode(s: &str) -> Result<Vec<u8>, String> {
        let body = s.trim_end_matches('=');
        if s.len() - body.len() > 2 || (s.len() != body.len() && s.len() % 4 != 0) {
            return Err(format!("base64 {s:?}: bad padding"));
        }
        if body.len() % 4 == 1 {
            return Err(format!("base64 {s:?}: truncated"));
        }
        let mut out = Vec::with_capacity(body.len() * 3 / 4);
        let mut acc: u32 = 0;
        let mut bits = 0;
        for c in body.bytes() {
            let v = match c {
                b'A'..=b'Z' => c - b'A',
                b'a'..=b'z' => c - b'a' + 26,
                b'0'..=b'9' => c - b'0' + 52,
                b'+' | b'-' => 62,
                b'/' | b'_' => 63,
                _ => return Err(format!("base64 {s:?}: unexpected {:?}", char::from(c))),
            };
            acc = (acc << 6) | u32::from(v);
            bits += 6;
            if bits >= 8 {
                bits -= 8;
                out.push((acc >> bits) as u8);
                acc &= (1 << bits) - 1;
            }
        }
        Ok(out)
    }
}

/// The registry's connection to etcd, for status and metrics.
#[derive(Clone, Debug, PartialEq)]
pub enum RegistryState {
    /// Not yet connected since start.
    Connecting,
    /// The lease is held and the keys match the last snapshot written.
    Connected { since: Instant, endpoint: String },
    /// The last attempt failed with `error`; the next comes in `retry_in`.
    Down { error: String, retry_in: Duration },
}

impl RegistryState {
    /// `connecting`, `connected` or `down`: for a metric label or a status column.
    pub fn label(&self) -> &'static str {
        match self {
            RegistryState::Connecting => "connecting",
            RegistryState::Connected { .. } => "connected",
            RegistryState::Down { .. } => "down",
        }
    }

    /// `{"state": …}` plus `endpoint` and `connected_for_ms`, or `error` and `retry_in_ms`.
    pub fn to_json(&self) -> Value {
        match self {
            RegistryState::Connecting => json!({ "state": "connecting" }),
            RegistryState::Connected { since, endpoint } => json!({
                "state": "connected",
                "endpoint": endpoint,
                "connected_for_ms": since.elapsed().as_millis() as u64,
            }),
            RegistryState::Down { error, retry_in } => json!({
                "state": "down",
                "error": error,
                "retry_in_ms": retry_in.as_millis() as u64,
            }),
        }
    }
}

/// What the task records; `Down` keeps the instant of the retry so that `retry_in` counts
/// down when read.
#[derive(Clone, Debug)]
enum Shared {
    Connecting,
    Connected { since: Instant, endpoint: String },
    Down { error: String, retry_at: Instant },
}

fn lock(m: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The master's handle on the registration task. Dropping it aborts the task without
/// touching etcd (the keys expire with the lease); [`Registry::shutdown`] removes them.
pub struct Registry {
    snapshot: watch::Sender<Vec<AppEndpoints>>,
    state: Arc<Mutex<Shared>>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Registry {
    /// Spawns the registration task on the current tokio runtime (calling it outside one
    /// panics, as `tokio::spawn` does). Never blocks, never fails: etcd being unreachable is
    /// retried and shown in [`Registry::state`]. The caller validates `cfg` first
    /// ([`RegistryConfig::validate`]).
    pub fn start(cfg: RegistryConfig) -> Registry {
        let (snapshot, rx) = watch::channel(Vec::new());
        let (stop, stop_rx) = oneshot::channel();
        let state = Arc::new(Mutex::new(Shared::Connecting));
        let mut session = Session::new(cfg, state.clone());
        let task = tokio::spawn(async move {
            let mut rx = rx;
            tokio::select! {
                _ = session.run(&mut rx) => {}
                _ = stop_rx => {}
            }
            session.cleanup().await;
        });
        Registry {
            snapshot,
            state,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Replaces the snapshot of every app. Cheap and coalescing: only the newest snapshot
    /// is written, within a second while etcd is reachable; an unchanged one costs nothing.
    pub fn update(&self, apps: Vec<AppEndpoints>) {
        self.snapshot.send_if_modified(|cur| {
            if *cur == apps {
                false
            } else {
                *cur = apps;
                true
            }
        });
    }

    /// The connection state now.
    pub fn state(&self) -> RegistryState {
        match &*lock(&self.state) {
            Shared::Connecting => RegistryState::Connecting,
            Shared::Connected { since, endpoint } => RegistryState::Connected {
                since: *since,
                endpoint: endpoint.clone(),
            },
            Shared::Down { error, retry_at } => RegistryState::Down {
                error: error.clone(),
                retry_in: retry_at.saturating_duration_since(Instant::now()),
            },
        }
    }

    /// Graceful stop: revokes the lease, which deletes every key at once, within `timeout`;
    /// past it (etcd down) the task is abandoned and the keys expire with the lease.
    pub async fn shutdown(mut self, timeout: Duration) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(mut task) = self.task.take() {
            if tokio::time::timeout(timeout, &mut task).await.is_err() {
                task.abort();
                tracing::warn!(
                    "registry: keys not removed within {timeout:?}; they expire with the lease"
                );
            }
        }
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Why a call to etcd failed.
#[derive(Debug, thiserror::Error)]
enum EtcdError {
    #[error("{endpoint}: {what}: {message}")]
    Io {
        endpoint: String,
        what: &'static str,
        message: String,
    },
    #[error("{endpoint}: no answer within {timeout:?}")]
    Timeout { endpoint: String, timeout: Duration },
    #[error("{endpoint}: {path}: bad response: {message}")]
    Protocol {
        endpoint: String,
        path: &'static str,
        message: String,
    },
    #[error("{endpoint}: {path}: {message} (http {status})")]
    Server {
        endpoint: String,
        path: &'static str,
        status: u16,
        code: Option<i64>,
        message: String,
    },
    #[error("lease {0:x} not found")]
    LeaseLost(i64),
}

impl EtcdError {
    /// etcd answered that the lease does not exist (gRPC NOT_FOUND).
    fn is_lease_not_found(&self) -> bool {
        match self {
            EtcdError::LeaseLost(_) => true,
            EtcdError::Server { code, message, .. } => {
                *code == Some(5) || message.contains("lease not found")
            }
            _ => false,
        }
    }
}

fn lower_first(s: String) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) if f.is_uppercase() => f.to_lowercase().chain(c).collect(),
        _ => s,
    }
}

/// An HTTP response: status and (de-chunked) body.
#[derive(Debug, PartialEq)]
struct HttpResponse {
    status: u16,
    body: Vec<u8>,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Parses what has arrived so far: `Ok(None)` while incomplete, the response once it is
/// (by `Content-Length`, the last chunk, the connection closing, or — for a stream, with
/// `first_message` — the first newline-terminated message).
fn parse_response(
    buf: &[u8],
    eof: bool,
    first_message: bool,
) -> Result<Option<HttpResponse>, String> {
    let Some(head_end) = find(buf, b"\r\n\r\n") else {
        return if eof {
            Err("connection closed before the headers ended".into())
        } else {
            Ok(None)
        };
    };
    let head =
        std::str::from_utf8(&buf[..head_end]).map_err(|_| "headers are not utf-8".to_string())?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    if !parts.next().is_some_and(|v| v.starts_with("HTTP/1.")) {
        return Err(format!("not an http/1 status line: {status_line:?}"));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line: {status_line:?}"))?;
    let mut length = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(format!("bad header line: {line:?}"));
        };
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("content-length") {
            let n: usize = value
                .parse()
                .map_err(|_| format!("bad content-length: {value:?}"))?;
            if n > MAX_RESPONSE {
                return Err(format!("body of {n} bytes is too large"));
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        }
    }
    let body = &buf[head_end + 4..];
    let done = if chunked {
        dechunk(body, first_message)?
    } else if let Some(n) = length {
        (body.len() >= n).then(|| body[..n].to_vec())
    } else {
        eof.then(|| body.to_vec())
    };
    match done {
        Some(body) => Ok(Some(HttpResponse { status, body })),
        None if eof => Err("connection closed in the middle of the body".into()),
        None => Ok(None),
    }
}

/// Decodes a chunked body: `Ok(None)` until the last chunk (or, with `first_message`, a
/// newline) has arrived. Trailers are ignored.
fn dechunk(mut b: &[u8], first_message: bool) -> Result<Option<Vec<u8>>, String> {
    let mut out = Vec::new();
    loop {
        if first_message && out.contains(&b'\n') {
            return Ok(Some(out));
        }
        let Some(line_end) = find(b, b"\r\n") else {
            return if b.len() > 100 {
                Err("chunk size line too long".into())
            } else {
                Ok(None)
            };
        };
        let line = std::str::from_utf8(&b[..line_end]).map_err(|_| "bad chunk size line")?;
        let hex = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(hex, 16).map_err(|_| format!("bad chunk size {hex:?}"))?;
        if size == 0 {
            return Ok(Some(out));
        }
        if out.len().saturating_add(size) > MAX_RESPONSE {
            return Err("chunked body too large".into());
        }
        let rest = &b[line_end + 2..];
        if rest.len() < size + 2 {
            return Ok(None);
        }
        if &rest[size..size + 2] != b"\r\n" {
            return Err("chunk not followed by crlf".into());
        }
        out.extend_from_slice(&rest[..size]);
        b = &rest[size + 2..];
    }
}

/// The message and gRPC code of an error body, in any of the shapes the gateway uses:
/// `{"error": "…", "message": "…", "code": 5}` (3.4), `{"code": 5, "message": "…"}`
/// (3.5), and in streams `{"error": {"grpc_code": 5, "message": "…"}}`.
fn error_of(v: &Value) -> (Option<i64>, Option<String>) {
    let inner = match v.get("error") {
        Some(e @ Value::Object(_)) => e,
        _ => v,
    };
    let code = inner
        .get("code")
        .or_else(|| inner.get("grpc_code"))
        .and_then(json_i64);
    let message = inner
        .get("message")
        .or_else(|| inner.get("error"))
        .and_then(Value::as_str)
        .filter(|m| !m.is_empty())
        .map(str::to_string);
    (code, message)
}

/// An int64 as proto3 JSON writes it (a string) or as a number.
fn json_i64(v: &Value) -> Option<i64> {
    match v {
        Value::String(s) => s.parse().ok(),
        v => v.as_i64(),
    }
}

/// One HTTP/1.1 POST per call, `Connection: close`, everything under `timeout`.
async fn post(
    endpoint: &str,
    path: &'static str,
    body: &Value,
    stream: bool,
    timeout: Duration,
) -> Result<Value, EtcdError> {
    let io = |what: &'static str| {
        move |e: std::io::Error| EtcdError::Io {
            endpoint: endpoint.to_string(),
            what,
            message: lower_first(e.to_string()),
        }
    };
    let protocol = |message: String| EtcdError::Protocol {
        endpoint: endpoint.to_string(),
        path,
        message,
    };
    let exchange = async {
        let mut conn = TcpStream::connect(endpoint).await.map_err(io("connect"))?;
        let _ = conn.set_nodelay(true);
        let body = body.to_string();
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: {endpoint}\r\nContent-Type: application/json\r\n\
             Accept: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        conn.write_all(request.as_bytes())
            .await
            .map_err(io("send"))?;
        let mut buf = Vec::with_capacity(1024);
        let mut chunk = [0u8; 8192];
        loop {
            let n = conn.read(&mut chunk).await.map_err(io("receive"))?;
            buf.extend_from_slice(&chunk[..n]);
            if buf.len() > MAX_RESPONSE + 64 * 1024 {
                return Err(protocol("response too large".into()));
            }
            if let Some(resp) = parse_response(&buf, n == 0, stream).map_err(&protocol)? {
                return Ok(resp);
            }
        }
    };
    let resp = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| EtcdError::Timeout {
            endpoint: endpoint.to_string(),
            timeout,
        })??;
    let text: &[u8] = if stream {
        resp.body.split(|b| *b == b'\n').next().unwrap_or_default()
    } else {
        &resp.body
    };
    let parsed: Option<Value> = serde_json::from_slice(text).ok();
    let server = |code, message| EtcdError::Server {
        endpoint: endpoint.to_string(),
        path,
        status: resp.status,
        code,
        message,
    };
    if resp.status != 200 {
        let (code, message) = parsed.as_ref().map(error_of).unwrap_or_default();
        let message = message.unwrap_or_else(|| {
            let raw = String::from_utf8_lossy(text);
            let raw = raw.trim();
            if raw.is_empty() {
                "no message".to_string()
            } else {
                raw.chars().take(200).collect()
            }
        });
        return Err(server(code, message));
    }
    let v = parsed.ok_or_else(|| protocol("body is not json".into()))?;
    if !stream {
        return Ok(v);
    }
    if let Some(result) = v.get("result") {
        return Ok(result.clone());
    }
    let (code, message) = error_of(&v);
    Err(server(
        code,
        message.unwrap_or_else(|| "stream message without result".into()),
    ))
}

/// A lease held in etcd.
#[derive(Debug)]
struct Lease {
    id: i64,
    next_keepalive: Instant,
}

/// The task's side: which endpoint, which lease, what has been written.
struct Session {
    cfg: RegistryConfig,
    current: usize,
    state: Arc<Mutex<Shared>>,
    lease: Option<Lease>,
    /// What this session has put and not deleted since (some of it may be gone with a lost
    /// lease); the base for the next plan.
    written: BTreeMap<String, AppEndpoints>,
    /// Put every desired key again: after a new lease or a failure (etcd's contents are
    /// unknown).
    resync: bool,
    failures: u32,
}

impl Session {
    fn new(cfg: RegistryConfig, state: Arc<Mutex<Shared>>) -> Session {
        Session {
            cfg,
            current: 0,
            state,
            lease: None,
            written: BTreeMap::new(),
            resync: true,
            failures: 0,
        }
    }

    fn endpoint(&self) -> &str {
        self.cfg
            .endpoints
            .get(self.current)
            .map(String::as_str)
            .unwrap_or("no endpoint")
    }

    fn rotate(&mut self) {
        if !self.cfg.endpoints.is_empty() {
            self.current = (self.current + 1) % self.cfg.endpoints.len();
        }
    }

    async fn call(
        &self,
        path: &'static str,
        body: Value,
        stream: bool,
    ) -> Result<Value, EtcdError> {
        post(
            self.endpoint(),
            path,
            &body,
            stream,
            self.cfg.request_timeout(),
        )
        .await
    }

    /// Runs until the snapshot sender is gone; never returns on etcd errors.
    async fn run(&mut self, snapshots: &mut watch::Receiver<Vec<AppEndpoints>>) {
        let mut lost_in_row = 0u32;
        loop {
            let apps = snapshots.borrow_and_update().clone();
            match self.step(&apps).await {
                Ok(()) => {
                    lost_in_row = 0;
                    self.connected();
                    let next = self
                        .lease
                        .as_ref()
                        .map(|l| l.next_keepalive)
                        .unwrap_or_else(Instant::now);
                    tokio::select! {
                        changed = snapshots.changed() => if changed.is_err() { return },
                        _ = tokio::time::sleep_until(next.into()) => {}
                    }
                }
                Err(e) if e.is_lease_not_found() && lost_in_row == 0 => {
                    lost_in_row += 1;
                    tracing::info!(
                        "registry: lease lost ({e}); granting a new one and registering again"
                    );
                    self.lease = None;
                    self.resync = true;
                }
                Err(e) => {
                    if e.is_lease_not_found() {
                        self.lease = None;
                    }
                    self.failures = self.failures.saturating_add(1);
                    let delay = backoff_delay(self.failures, jitter());
                    let error = e.to_string();
                    if self.failures == 1 {
                        tracing::warn!("registry: etcd unreachable: {error}; retrying");
                    } else {
                        tracing::debug!("registry: attempt {} failed: {error}", self.failures);
                    }
                    *lock(&self.state) = Shared::Down {
                        error,
                        retry_at: Instant::now() + delay,
                    };
                    self.resync = true;
                    self.rotate();
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    fn connected(&mut self) {
        self.failures = 0;
        let endpoint = self.endpoint().to_string();
        let mut state = lock(&self.state);
        match &mut *state {
            Shared::Connected { endpoint: e, .. } => *e = endpoint,
            other => {
                tracing::info!("registry: connected to etcd at {endpoint}");
                *other = Shared::Connected {
                    since: Instant::now(),
                    endpoint,
                };
            }
        }
    }

    /// Holds a lease (granting or renewing it when due) and brings etcd to `apps`.
    async fn step(&mut self, apps: &[AppEndpoints]) -> Result<(), EtcdError> {
        let now = Instant::now();
        match &self.lease {
            None => {
                let ttl = self.cfg.ttl_secs();
                let r = self
                    .call("/v3/lease/grant", json!({ "TTL": ttl }), false)
                    .await?;
                let proto = |message: String| EtcdError::Protocol {
                    endpoint: self.endpoint().to_string(),
                    path: "/v3/lease/grant",
                    message,
                };
                let err = r.get("error").and_then(Value::as_str).unwrap_or_default();
                if !err.is_empty() {
                    return Err(proto(err.to_string()));
                }
                let id = r
                    .get("ID")
                    .and_then(json_i64)
                    .filter(|id| *id != 0)
                    .ok_or_else(|| proto("no lease id".into()))?;
                let granted = r.get("TTL").and_then(json_i64).unwrap_or(ttl).max(1);
                tracing::debug!("registry: lease {id:x} granted, ttl {granted}s");
                self.lease = Some(Lease {
                    id,
                    next_keepalive: now + keepalive_interval(granted),
                });
                self.resync = true;
            }
            Some(lease) if now >= lease.next_keepalive => {
                let id = lease.id;
                let r = self
                    .call("/v3/lease/keepalive", json!({ "ID": id.to_string() }), true)
                    .await?;
                let ttl = r.get("TTL").and_then(json_i64).unwrap_or(0);
                if ttl <= 0 {
                    return Err(EtcdError::LeaseLost(id));
                }
                self.lease = Some(Lease {
                    id,
                    next_keepalive: now + keepalive_interval(ttl),
                });
            }
            Some(_) => {}
        }
        let lease = self.lease.as_ref().map(|l| l.id).unwrap_or_default();
        let want = desired(&self.cfg, apps);
        let todo = plan(&self.written, &want, self.resync);
        for (key, app) in todo.puts {
            let value = record_value(&app, &self.cfg.node, unix_ms());
            let body = json!({
                "key": base64::encode(key.as_bytes()),
                "value": base64::encode(value.as_bytes()),
                "lease": lease.to_string(),
            });
            self.call("/v3/kv/put", body, false).await?;
            self.written.insert(key, app);
        }
        for key in todo.deletes {
            let body = json!({ "key": base64::encode(key.as_bytes()) });
            self.call("/v3/kv/deleterange", body, false).await?;
            self.written.remove(&key);
        }
        self.resync = false;
        Ok(())
    }

    /// After a stop request: revoke the lease (every key goes with it); if etcd no longer
    /// knows it, delete the keys one by one. Each endpoint is tried once.
    async fn cleanup(&mut self) {
        let tries = self.cfg.endpoints.len().max(1);
        if let Some(lease) = self.lease.take() {
            for _ in 0..tries {
                let body = json!({ "ID": lease.id.to_string() });
                match self.call("/v3/lease/revoke", body, false).await {
                    Ok(_) => {
                        tracing::info!("registry: lease revoked, keys removed");
                        self.written.clear();
                        return;
                    }
                    Err(e) if e.is_lease_not_found() => break,
                    Err(e) => {
                        tracing::warn!("registry: revoking the lease: {e}");
                        self.rotate();
                    }
                }
            }
        }
        let keys: Vec<String> = self.written.keys().cloned().collect();
        for key in keys {
            for _ in 0..tries {
                let body = json!({ "key": base64::encode(key.as_bytes()) });
                match self.call("/v3/kv/deleterange", body, false).await {
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!("registry: deleting {key}: {e}");
                        self.rotate();
                    }
                }
            }
        }
        self.written.clear();
    }
}

/// Renew at a third of the TTL, so two renewals can fail before the lease expires.
fn keepalive_interval(ttl_secs: i64) -> Duration {
    let ttl = Duration::from_secs(u64::try_from(ttl_secs).unwrap_or(1).max(1));
    (ttl / 3).max(Duration::from_millis(100))
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A uniform draw in `[0, 1)`, from std's randomly keyed hasher.
fn jitter() -> f64 {
    let h = std::collections::hash_map::RandomState::new().hash_one(Instant::now());
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// Reads every key under `prefix` from the first endpoint that answers: `(key, value)`
/// pairs in key order. For tools and tests; the registry itself never reads.
pub async fn list(
    endpoints: &[String],
    prefix: &str,
    timeout: Duration,
) -> Result<Vec<(String, String)>, String> {
    let body = json!({
        "key": base64::encode(prefix.as_bytes()),
        "range_end": base64::encode(&prefix_range_end(prefix.as_bytes())),
    });
    let mut last = "no etcd endpoint".to_string();
    for endpoint in endpoints {
        match post(endpoint, "/v3/kv/range", &body, false, timeout).await {
            Ok(v) => {
                let mut out = Vec::new();
                for kv in v.get("kvs").and_then(Value::as_array).into_iter().flatten() {
                    let field = |name: &str| -> Result<String, String> {
                        let raw = kv.get(name).and_then(Value::as_str).unwrap_or_default();
                        let bytes = base64::decode(raw)?;
                        String::from_utf8(bytes).map_err(|_| format!("{name} is not utf-8"))
                    };
                    out.push((field("key")?, field("value")?));
                }
                return Ok(out);
            }
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cfg() -> RegistryConfig {
        RegistryConfig::new(vec!["127.0.0.1:2379".into()], "host-a")
    }

    fn app(name: &str, ready: usize, version: u64) -> AppEndpoints {
        AppEndpoints {
            app: name.into(),
            endpoints: vec!["10.0.0.1:8080".into()],
            ready,
            version,
        }
    }

    #[test]
    fn parse_url_accepts_lists_ipv6_and_default_port() {
        assert_eq!(
            parse_url("etcd://127.0.0.1:2379").unwrap(),
            vec!["127.0.0.1:2379"]
        );
        assert_eq!(
            parse_url("etcd://a.example:1, b-2.example:2,c").unwrap(),
            vec!["a.example:1", "b-2.example:2", "c:2379"]
        );
        assert_eq!(
            parse_url("etcd://[::1]:23790,[fe80::1]/").unwrap(),
            vec!["[::1]:23790", "[fe80::1]:2379"]
        );
    }

    #[test]
    fn parse_url_errors_say_what_is_wrong() {
        let err = |s: &str| parse_url(s).unwrap_err();
        assert_eq!(
            err("127.0.0.1:2379"),
            "\"127.0.0.1:2379\": expected etcd://HOST:PORT[,HOST:PORT…]"
        );
        assert!(err("http://h:1").contains("scheme \"http\" is not supported"));
        assert!(err("etcd://").contains("no endpoint"));
        assert!(err("etcd://a:1,,b:2").contains("empty endpoint"));
        assert!(err("etcd://a:x").contains("port \"x\" is not a number"));
        assert!(err("etcd://a:70000").contains("port \"70000\" is not a number"));
        assert!(err("etcd://a:0").contains("port 0"));
        assert!(err("etcd://:2379").contains("has no host"));
        assert!(err("etcd://::1:2379").contains("in brackets"));
        assert!(err("etcd://[::1:2379").contains("no closing ']'"));
        assert!(err("etcd://[nope]:1").contains("not an IPv6 address"));
        assert!(err("etcd://h:1/v3").contains("a path, user or query"));
        assert!(err("etcd://user@h:1").contains("a path, user or query"));
        assert!(err("etcd://h!:1").contains("contains '!'"));
        for s in ["etcd://", "etcd://a:x", "x"] {
            let e = err(s);
            assert!(!e.chars().next().unwrap().is_uppercase(), "{e}");
        }
    }

    #[test]
    fn validate_and_key() {
        let mut c = cfg();
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(c.key("web"), "/processes/web/host-a");
        c.prefix = "/lb".into();
        assert_eq!(c.key("web"), "/lb/web/host-a");
        assert!(c.validate().is_ok());
        c.prefix = "lb/".into();
        assert!(c.validate().unwrap_err().contains("must start with '/'"));
        let mut c = cfg();
        c.node = "a/b".into();
        assert!(c.validate().unwrap_err().contains("contains '/'"));
        c.node = String::new();
        assert!(c.validate().is_err());
        let mut c = cfg();
        c.ttl = Duration::from_millis(500);
        assert!(c.validate().is_err());
        c.endpoints.clear();
        c.ttl = DEFAULT_TTL;
        assert_eq!(c.validate().unwrap_err(), "no etcd endpoint");
    }

    #[test]
    fn ttl_rounds_up_to_whole_seconds_and_timeouts_scale() {
        let mut c = cfg();
        assert_eq!(c.ttl_secs(), 10);
        assert_eq!(c.request_timeout(), Duration::from_secs(2));
        c.ttl = Duration::from_millis(2500);
        assert_eq!(c.ttl_secs(), 3);
        c.ttl = Duration::from_secs(2);
        assert_eq!(c.request_timeout(), Duration::from_secs(2) / 3);
        assert_eq!(keepalive_interval(10), Duration::from_secs(10) / 3);
        assert_eq!(keepalive_interval(0), Duration::from_secs(1) / 3);
    }

    #[test]
    fn advertised_endpoint_replaces_wildcards_only() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(
            advertised_endpoint(a("0.0.0.0:80"), "web-1.lan"),
            "web-1.lan:80"
        );
        assert_eq!(advertised_endpoint(a("[::]:80"), "10.0.0.7"), "10.0.0.7:80");
        assert_eq!(advertised_endpoint(a("[::]:80"), "fd00::7"), "[fd00::7]:80");
        assert_eq!(
            advertised_endpoint(a("0.0.0.0:80"), "[fd00::7]"),
            "[fd00::7]:80"
        );
        assert_eq!(
            advertised_endpoint(a("127.0.0.1:8080"), "web-1.lan"),
            "127.0.0.1:8080"
        );
        assert_eq!(advertised_endpoint(a("[::1]:8080"), "x"), "[::1]:8080");
    }

    #[test]
    fn record_value_has_every_field_in_order() {
        let v = record_value(&app("web", 3, 7), "host-a", 1_700_000_000_123);
        assert_eq!(
            v,
            r#"{"app":"web","node":"host-a","endpoints":["10.0.0.1:8080"],"ready":3,"version":7,"updated_unix_ms":1700000000123}"#
        );
    }

    #[test]
    fn desired_keeps_apps_with_ready_workers() {
        let d = desired(
            &cfg(),
            &[app("web", 2, 1), app("api", 0, 1), app("web", 3, 2)],
        );
        assert_eq!(d.len(), 1);
        assert_eq!(d["/processes/web/host-a"], app("web", 3, 2));
    }

    #[test]
    fn plan_puts_changes_and_deletes_what_went() {
        let c = cfg();
        let written = desired(&c, &[app("web", 2, 1), app("api", 1, 1)]);
        // Nothing changed: nothing to do, unless resyncing.
        assert_eq!(plan(&written, &written, false), Plan::default());
        assert_eq!(plan(&written, &written, true).puts.len(), 2);
        // web scaled, api drained to zero, jobs appeared.
        let want = desired(&c, &[app("web", 3, 1), app("api", 0, 1), app("jobs", 1, 4)]);
        let p = plan(&written, &want, false);
        assert_eq!(
            p.puts,
            vec![
                ("/processes/jobs/host-a".to_string(), app("jobs", 1, 4)),
                ("/processes/web/host-a".to_string(), app("web", 3, 1)),
            ]
        );
        assert_eq!(p.deletes, vec!["/processes/api/host-a".to_string()]);
        // A reload bumps the version: one put.
        let want = desired(&c, &[app("web", 2, 2), app("api", 1, 1)]);
        assert_eq!(plan(&written, &want, false).puts.len(), 1);
        // Everything stopped: delete all.
        assert_eq!(plan(&written, &BTreeMap::new(), false).deletes.len(), 2);
    }

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter() {
        let ms = |n| Duration::from_millis(n);
        // Nominal delays (jitter at the top of its range): 100 ms doubling, capped at 5 s.
        let nominal: Vec<Duration> = (1..=8).map(|n| backoff_delay(n, 1.0)).collect();
        assert_eq!(
            nominal,
            [100, 200, 400, 800, 1600, 3200, 5000, 5000]
                .map(ms)
                .to_vec()
        );
        // Jitter scales into [0.5, 1.0] of nominal.
        assert_eq!(backoff_delay(1, 0.0), ms(50));
        assert_eq!(backoff_delay(3, 0.5), ms(300));
        assert!(backoff_delay(2, 0.999_999) <= ms(200));
        // Out-of-range inputs stay sane.
        assert_eq!(backoff_delay(0, 1.0), ms(100));
        assert_eq!(backoff_delay(u32::MAX, 0.0), ms(2500));
        assert_eq!(backoff_delay(3, f64::NAN), ms(200));
        assert_eq!(backoff_delay(3, 7.0), ms(400));
        for _ in 0..100 {
            let j = jitter();
            assert!((0.0..1.0).contains(&j), "{j}");
        }
    }

    #[test]
    fn range_end_of_a_prefix() {
        assert_eq!(prefix_range_end(b"/processes/"), b"/processes0".to_vec());
        assert_eq!(prefix_range_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_range_end(b"\xff\xff"), vec![0]);
        assert_eq!(prefix_range_end(b""), vec![0]);
    }

    #[test]
    fn base64_known_vectors() {
        for (plain, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
            ("/processes/web/n1", "L3Byb2Nlc3Nlcy93ZWIvbjE="),
        ] {
            assert_eq!(base64::encode(plain.as_bytes()), enc);
            assert_eq!(base64::decode(enc).unwrap(), plain.as_bytes());
        }
        assert_eq!(base64::encode(&[0xfb, 0xff]), "+/8=");
        assert_eq!(base64::decode("-_8").unwrap(), vec![0xfb, 0xff]);
        assert_eq!(base64::decode("Zg").unwrap(), b"f");
        assert!(base64::decode("Z").unwrap_err().contains("truncated"));
        assert!(base64::decode("Zg===").unwrap_err().contains("padding"));
        assert!(base64::decode("Zg=").unwrap_err().contains("padding"));
        assert!(base64::decode("Z=g=").is_err());
        assert!(
            base64::decode("Zm 9")
                .unwrap_err()
                .contains("unexpected ' '")
        );
    }

    proptest! {
        #[test]
        fn base64_round_trips(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let enc = base64::encode(&bytes);
            prop_assert_eq!(enc.len() % 4, 0);
            prop_assert_eq!(base64::decode(&enc).unwrap(), bytes.clone());
            prop_assert_eq!(base64::decode(enc.trim_end_matches('=')).unwrap(), bytes);
        }

        #[test]
        fn base64_decode_never_panics(s in ".{0,40}") {
            let _ = base64::decode(&s);
        }

        #[test]
        fn parse_response_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300), eof: bool, stream: bool) {
            let mut buf = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            buf.extend_from_slice(&bytes);
            let _ = parse_response(&buf, eof, stream);
            let _ = parse_response(&bytes, eof, stream);
        }

        #[test]
        fn parse_response_is_the_same_however_it_arrives(cut in 0usize..200) {
            let full = KEEPALIVE_REPLY.as_bytes();
            let cut = cut.min(full.len());
            let part = parse_response(&full[..cut], false, false).unwrap();
            if cut < full.len() {
                prop_assert_eq!(part, None);
            }
            let whole = parse_response(full, false, false).unwrap().unwrap();
            prop_assert_eq!(whole.status, 200);
            prop_assert!(whole.body.ends_with(b"}}\n"));
        }
    }

    /// What etcd 3.4.23 sends for `POST /v3/lease/keepalive` with `Connection: close`.
    const KEEPALIVE_REPLY: &str = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
        Grpc-Metadata-Content-Type: application/grpc\r\nConnection: close\r\n\
        Transfer-Encoding: chunked\r\n\r\n\
        3b\r\n{\"result\":{\"header\":{\"revision\":\"1\"},\"ID\":\"41\",\"TTL\":\"5\"}}\n\r\n\
        0\r\n\r\n";

    #[test]
    fn parse_response_lengths_chunks_and_eof() {
        let r = parse_response(KEEPALIVE_REPLY.as_bytes(), false, false)
            .unwrap()
            .unwrap();
        assert_eq!(
            String::from_utf8(r.body).unwrap(),
            "{\"result\":{\"header\":{\"revision\":\"1\"},\"ID\":\"41\",\"TTL\":\"5\"}}\n"
        );
        // A stream that stays open is complete at its first message.
        let open = KEEPALIVE_REPLY.trim_end_matches("0\r\n\r\n");
        assert!(
            parse_response(open.as_bytes(), false, false)
                .unwrap()
                .is_none()
        );
        assert!(
            parse_response(open.as_bytes(), false, true)
                .unwrap()
                .is_some()
        );
        // Content-Length, case-insensitive, extra bytes ignored.
        let r = parse_response(
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 2\r\n\r\n{}xx",
            false,
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!((r.status, r.body), (404, b"{}".to_vec()));
        // Neither: the body runs to the end of the connection.
        let raw = b"HTTP/1.0 200 OK\r\n\r\nabc";
        assert!(parse_response(raw, false, false).unwrap().is_none());
        assert_eq!(
            parse_response(raw, true, false).unwrap().unwrap().body,
            b"abc"
        );
        // Chunk extensions and trailers (etcd's errors carry a Grpc-Trailer).
        let raw = b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n2;x=y\r\n{}\r\n0\r\nGrpc-Trailer-Content-Type: application/grpc\r\n\r\n";
        assert_eq!(
            parse_response(raw, true, false).unwrap().unwrap().body,
            b"{}"
        );
    }

    #[test]
    fn parse_response_rejects_garbage() {
        let err = |raw: &[u8], eof| parse_response(raw, eof, false).unwrap_err();
        assert!(err(b"", true).contains("before the headers ended"));
        assert!(err(b"SSH-2.0-OpenSSH\r\n\r\n", false).contains("not an http/1 status line"));
        assert!(err(b"HTTP/1.1 abc\r\n\r\n", false).contains("bad status line"));
        assert!(err(b"HTTP/1.1 200 OK\r\nnocolon\r\n\r\n", false).contains("bad header"));
        assert!(
            err(b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", false).contains("content-length")
        );
        assert!(
            err(
                b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n",
                false
            )
            .contains("too large")
        );
        assert!(
            err(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab", true)
                .contains("middle of the body")
        );
        assert!(
            err(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                false
            )
            .contains("bad chunk size")
        );
        assert!(
            err(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabcd",
                false
            )
            .contains("crlf")
        );
        assert!(
            err(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nfffffffff\r\n",
                false
            )
            .contains("too large")
        );
    }

    #[test]
    fn error_bodies_in_every_shape() {
        let v: Value = serde_json::from_str(
            r#"{"error":"etcdserver: requested lease not found","message":"etcdserver: requested lease not found","code":5}"#,
        )
        .unwrap();
        assert_eq!(
            error_of(&v),
            (
                Some(5),
                Some("etcdserver: requested lease not found".into())
            )
        );
        let v = json!({"code": 14, "message": "etcdserver: no leader"});
        assert_eq!(
            error_of(&v),
            (Some(14), Some("etcdserver: no leader".into()))
        );
        let v = json!({"error": {"grpc_code": 5, "http_code": 404, "message": "lease not found"}});
        assert_eq!(error_of(&v), (Some(5), Some("lease not found".into())));
        assert_eq!(error_of(&json!([1, 2])), (None, None));
        assert_eq!(
            json_i64(&json!("7587862072907372613")),
            Some(7587862072907372613)
        );
        assert_eq!(json_i64(&json!(12)), Some(12));
        assert_eq!(json_i64(&json!("x")), None);
    }

    #[test]
    fn state_labels_and_json() {
        let s = RegistryState::Down {
            error: "127.0.0.1:1: connect: connection refused".into(),
            retry_in: Duration::from_millis(400),
        };
        assert_eq!(s.label(), "down");
        assert_eq!(
            s.to_json(),
            json!({"state": "down", "error": "127.0.0.1:1: connect: connection refused", "retry_in_ms": 400})
        );
        assert_eq!(
            RegistryState::Connecting.to_json(),
            json!({"state": "connecting"})
        );
        let c = RegistryState::Connected {
            since: Instant::now(),
            endpoint: "e:1".into(),
        };
        assert_eq!(c.label(), "connected");
        assert_eq!(c.to_json()["endpoint"], "e:1");
    }

    /// A one-shot server on loopback that answers every connection with `reply`, in
    /// pieces, after reading the request.
    async fn serve(reply: Option<&'static str>) -> String {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf).await;
                    let Some(reply) = reply else {
                        tokio::time::sleep(Duration::from_secs(30)).await;
                        return;
                    };
                    for piece in reply.as_bytes().chunks(7) {
                        let _ = s.write_all(piece).await;
                        let _ = s.flush().await;
                        tokio::task::yield_now().await;
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn post_reads_streams_errors_and_times_out() {
        let t = Duration::from_secs(2);
        let ep = serve(Some(KEEPALIVE_REPLY)).await;
        let v = post(&ep, "/v3/lease/keepalive", &json!({"ID": "41"}), true, t)
            .await
            .unwrap();
        assert_eq!(v["TTL"], "5");

        let ep = serve(Some(
            "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n\
             6c\r\n{\"error\":\"etcdserver: requested lease not found\",\"message\":\"etcdserver: requested lease not found\",\"code\":5}\r\n0\r\n\r\n",
        ))
        .await;
        let e = post(&ep, "/v3/kv/put", &json!({}), false, t)
            .await
            .unwrap_err();
        assert!(e.is_lease_not_found(), "{e}");
        assert!(
            e.to_string()
                .ends_with("requested lease not found (http 404)"),
            "{e}"
        );

        let ep = serve(Some("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nxyz")).await;
        let e = post(&ep, "/v3/kv/put", &json!({}), false, t)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("body is not json"), "{e}");

        let ep = serve(None).await;
        let e = post(
            &ep,
            "/v3/kv/put",
            &json!({}),
            false,
            Duration::from_millis(100),
        )
        .await
        .unwrap_err();
        assert!(matches!(e, EtcdError::Timeout { .. }), "{e}");

        // A port nobody listens on: refused, said in lowercase.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        let e = post(&closed, "/v3/kv/put", &json!({}), false, t)
            .await
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with(&format!("{closed}: connect: connection refused")),
            "{e}"
        );
    }

    #[tokio::test]
    async fn registry_down_retries_without_blocking() {
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        let reg = Registry::start(RegistryConfig::new(vec![closed.clone()], "n"));
        let started = Instant::now();
        reg.update(vec![app("web", 1, 1)]);
        assert!(started.elapsed() < Duration::from_millis(50));
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let RegistryState::Down { error, retry_in } = reg.state() {
                assert!(error.contains("connection refused"), "{error}");
                assert!(retry_in <= BACKOFF_MAX);
                break;
            }
            assert!(Instant::now() < deadline, "never down: {:?}", reg.state());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let started = Instant::now();
        reg.shutdown(Duration::from_secs(1)).await;
        assert!(started.elapsed() < Duration::from_millis(1500));
    }
}
