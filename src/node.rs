//! Node's IPC and cluster protocol, as the primary speaks it (see `NODE-IPC.md`).
//!
//! Pure: parsing what a worker sends into a [`FromWorker`] and building what the master
//! sends. The master decides what to do; this module only knows the bytes. The rules it
//! encodes: every cluster message carries the sender's own `seq`, a reply carries the
//! peer's `seq` as `ack`; a `NODE_HANDLE` always travels with exactly one fd; `data` is
//! echoed per listening key (https workers crash without it); `sockname.port` equals the
//! requested port.

use serde_json::{Value, json};

/// A message from a worker, classified.
#[derive(Debug, Clone, PartialEq)]
pub enum FromWorker {
    /// `NODE_HANDLE_ACK`: the worker took the handle we sent.
    HandleAck,
    /// `NODE_HANDLE_NACK`: the handle's fd did not arrive; send it again.
    HandleNack,
    /// The worker sends us a handle (we acknowledge and close it).
    Handle { inner: Value },
    /// `online`.
    Online { seq: u64 },
    /// `queryServer`: asks for a listening handle.
    QueryServer(QueryServer),
    /// `listening`: a server in the worker is up (its readiness signal).
    Listening { seq: u64 },
    /// `close`: the worker's server for `key` closed.
    Close { key: String, seq: u64 },
    /// `exitedAfterDisconnect`: must be acknowledged.
    ExitedAfterDisconnect { seq: u64 },
    /// A reply to one of our messages (`newconn`): `accepted` for connections.
    Reply { ack: u64, accepted: Option<bool> },
    /// Our preload's report of event-loop load.
    Metrics(Value),
    /// Our preload's answer to a ping.
    Pong { id: u64 },
    /// `process.send('ready')` (PM2's habit) or `{"cmd":"PROCESSES_READY"}`.
    Ready,
    /// Some other cluster act we do not act on.
    OtherCluster { act: String, seq: Option<u64> },
    /// Any other internal (`NODE_`) message.
    OtherInternal(String),
    /// A user message for the primary (`process.send(x)`): no primary of the app's own
    /// reads it here, so it is dropped; the debug log shows its start and size.
    User { head: String, bytes: usize },
}

/// How much of a user message the debug log shows.
const USER_HEAD: usize = 200;

fn user(text: &[u8]) -> FromWorker {
    FromWorker::User {
        head: String::from_utf8_lossy(&text[..text.len().min(USER_HEAD)]).into_owned(),
        bytes: text.len(),
    }
}

/// The fields of `queryServer` that matter to the primary.
#[derive(Debug, Clone, PartialEq)]
pub struct QueryServer {
    pub seq: u64,
    /// `null` (any address), an IP, or a pipe path.
    pub address: Option<String>,
    /// −1 for a pipe.
    pub port: i64,
    /// `4`, `6`, `-1` (pipe), or `"udp4"`/`"udp6"`.
    pub address_type: AddressType,
    pub fd: Option<i64>,
    pub index: i64,
    /// What `tls.Server` sends (`{ticketKeys}`), echoed back per key.
    pub data: Value,
    pub backlog: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressType {
    Tcp4,
    Tcp6,
    Pipe,
    Udp4,
    Udp6,
}

impl AddressType {
    fn parse(v: &Value) -> Option<AddressType> {
        match v {
            Value::Number(n) => match n.as_i64()? {
                4 => Some(AddressType::Tcp4),
                6 => Some(AddressType::Tcp6),
                -1 => Some(AddressType::Pipe),
                _ => None,
            },
            Value::String(s) if s == "udp4" => Some(AddressType::Udp4),
            Value::String(s) if s == "udp6" => Some(AddressType::Udp6),
            _ => None,
        }
    }
    fn key_part(&self) -> &'static str {
        match self {
            AddressType::Tcp4 => "4",
            AddressType::Tcp6 => "6",
            AddressType::Pipe => "-1",
            AddressType::Udp4 => "udp4",
            AddressType::Udp6 => "udp6",
        }
    }
    pub fn is_udp(&self) -> bool {
        matches!(self, AddressType::Udp4 | AddressType::Udp6)
    }
}

impl QueryServer {
    /// The listening key, as Node's primary builds it: `address:port:addressType:fd`,
    /// with `:index` appended when the port is 0 (every `listen(0)` gets its own port).
    pub fn key(&self) -> String {
        let addr = self.address.as_deref().unwrap_or("null");
        let fd = self.fd.map_or("undefined".to_string(), |f| f.to_string());
        let mut key = format!("{addr}:{}:{}:{fd}", self.port, self.address_type.key_part());
        if self.port == 0 {
            key.push_str(&format!(":{}", self.index));
        }
        key
    }
}

fn seq_of(v: &Value) -> Option<u64> {
    v.get("seq").and_then(Value::as_u64)
}

/// The two messages every connection passed to a Node worker brings back, recognised from
/// the bytes Node writes for them — `{"cmd":"NODE_HANDLE_ACK"}` and
/// `{"cmd":"NODE_CLUSTER","ack":N,"accepted":true|false,"seq":M}` — without building a JSON
/// value. Anything else, even the same message spaced or ordered otherwise, is `None`
/// and goes through the parser and [`classify`], which agree with this wherever it
/// answers (a property test says so).
pub fn recognise(line: &[u8]) -> Option<FromWorker> {
    if line == br#"{"cmd":"NODE_HANDLE_ACK"}"# {
        return Some(FromWorker::HandleAck);
    }
    let rest = line.strip_prefix(br#"{"cmd":"NODE_CLUSTER","ack":"#)?;
    let (ack, rest) = json_u64(rest)?;
    let (accepted, rest) = match rest.strip_prefix(br#","accepted":true"#) {
        Some(r) => (true, r),
        None => (false, rest.strip_prefix(br#","accepted":false"#)?),
    };
    let (_seq, rest) = json_u64(rest.strip_prefix(br#","seq":"#)?)?;
    (rest == b"}").then_some(FromWorker::Reply {
        ack,
        accepted: Some(accepted),
    })
}

/// A line that can only be a user message: every message the master reads has a `"cmd"`
/// key, except `"ready"`; a line with `\u` escapes is left to the full parse. Such a line is checked to be JSON without building a value (a
/// worker sending megabyte arrays costs the loop a scan, not the allocations).
pub fn user_line(line: &[u8]) -> Option<Result<FromWorker, serde_json::Error>> {
    // A key may be written with escapes (`"\u0063md"`): such a line gets the full parse.
    if line.windows(5).any(|w| w == br#""cmd""#)
        || line.windows(2).any(|w| w == br"\u")
        || line.trim_ascii() == br#""ready""#
    {
        return None;
    }
    Some(serde_json::from_slice::<serde::de::IgnoredAny>(line).map(|_| user(line)))
}

/// A JSON integer that fits a `u64` at the start of `b`, and what follows it. Declines
/// leading zeros (not JSON) and anything that overflows.
fn json_u64(b: &[u8]) -> Option<(u64, &[u8])> {
    let len = b.iter().take_while(|c| c.is_ascii_digit()).count();
    if len == 0 || (len > 1 && b[0] == b'0') {
        return None;
    }
    let mut n: u64 = 0;
    for &c in &b[..len] {
        n = n.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
    }
    Some((n, &b[len..]))
}

/// Classifies one message from a worker. Malformed cluster messages become
/// `OtherCluster`/`OtherInternal`, never an error: the master ignores what it does not
/// understand.
pub fn classify(v: &Value) -> FromWorker {
    if v.as_str() == Some("ready") {
        return FromWorker::Ready;
    }
    let Some(cmd) = v.get("cmd").and_then(Value::as_str) else {
        return user(v.to_string().as_bytes());
    };
    match cmd {
        "NODE_HANDLE_ACK" => FromWorker::HandleAck,
        "NODE_HANDLE_NACK" => FromWorker::HandleNack,
        "NODE_HANDLE" => FromWorker::Handle {
            inner: v.get("msg").cloned().unwrap_or(Value::Null),
        },
        "NODE_PROCESSES_METRICS" => FromWorker::Metrics(v.clone()),
        "NODE_PROCESSES_PONG" => FromWorker::Pong {
            id: v.get("id").and_then(Value::as_u64).unwrap_or(0),
        },
        "PROCESSES_READY" | "NODE_PROCESSES_READY" => FromWorker::Ready,
        "NODE_CLUSTER" => classify_cluster(v),
        c if c.len() > 5 && c.starts_with("NODE_") => FromWorker::OtherInternal(c.to_string()),
        _ => user(v.to_string().as_bytes()),
    }
}

fn classify_cluster(v: &Value) -> FromWorker {
    let seq = seq_of(v);
    let act = v.get("act").and_then(Value::as_str);
    match (act, seq) {
        (None, _) => match v.get("ack").and_then(Value::as_u64) {
            Some(ack) => FromWorker::Reply {
                ack,
                accepted: v.get("accepted").and_then(Value::as_bool),
            },
            None => FromWorker::OtherCluster {
                act: String::new(),
                seq,
            },
        },
        (Some("online"), Some(seq)) => FromWorker::Online { seq },
        (Some("listening"), Some(seq)) => FromWorker::Listening { seq },
        (Some("exitedAfterDisconnect"), Some(seq)) => FromWorker::ExitedAfterDisconnect { seq },
        (Some("close"), Some(seq)) => match v.get("key").and_then(Value::as_str) {
            Some(key) => FromWorker::Close {
                key: key.to_string(),
                seq,
            },
            None => FromWorker::OtherCluster {
                act: "close".into(),
                seq: Some(seq),
            },
        },
        (Some("queryServer"), Some(seq)) => {
            let port = v.get("port").and_then(Value::as_i64);
            let at = v.get("addressType").and_then(AddressType::parse);
            match (port, at) {
                (Some(port), Some(address_type)) => FromWorker::QueryServer(QueryServer {
                    seq,
                    address: v.get("address").and_then(Value::as_str).map(String::from),
                    port,
                    address_type,
                    fd: v.get("fd").and_then(Value::as_i64),
                    index: v.get("index").and_then(Value::as_i64).unwrap_or(0),
                    data: v.get("data").cloned().unwrap_or(Value::Null),
                    backlog: v.get("backlog").and_then(Value::as_i64),
                }),
                _ => FromWorker::OtherCluster {
                    act: "queryServer".into(),
                    seq: Some(seq),
                },
            }
        }
        (Some(act), seq) => FromWorker::OtherCluster {
            act: act.to_string(),
            seq,
        },
    }
}

/// The round-robin reply to `queryServer`: no fd; `sockname` makes `server.address()`
/// work and must carry the requested port.
pub fn reply_round_robin(
    ack: u64,
    seq: u64,
    key: &str,
    data: &Value,
    sockname: Option<Value>,
) -> Value {
    let mut v = json!({
        "cmd": "NODE_CLUSTER",
        "errno": null,
        "key": key,
        "ack": ack,
        "data": data,
    });
    if let Some(s) = sockname {
        v["sockname"] = s;
    }
    v["seq"] = json!(seq);
    v
}

/// The shared-handle reply to `queryServer`: a `NODE_HANDLE` carrying the listening
/// socket (`net.Native`, or `dgram.Native` for UDP).
pub fn reply_shared(ack: u64, seq: u64, key: &str, data: &Value, udp: bool) -> Value {
    json!({
        "cmd": "NODE_HANDLE",
        "type": if udp { "dgram.Native" } else { "net.Native" },
        "msg": {"cmd": "NODE_CLUSTER", "errno": 0, "key": key, "ack": ack, "data": data, "seq": seq},
    })
}

/// A failed `queryServer`: `errno` is a negative libuv error code (`-errno` on Linux).
pub fn reply_error(ack: u64, seq: u64, key: &str, errno: i32) -> Value {
    json!({"cmd": "NODE_CLUSTER", "errno": -errno.abs(), "key": key, "ack": ack, "data": null, "seq": seq})
}

/// One connection for a cluster worker's server, as the line that goes on the wire
/// (newline included), written without building a JSON value: one goes out per connection.
pub fn newconn(seq: u64, key: &str) -> Vec<u8> {
    use std::io::Write;
    let mut line = Vec::with_capacity(96 + key.len());
    line.extend_from_slice(br#"{"cmd":"NODE_HANDLE","type":"net.Native","msg":{"cmd":"NODE_CLUSTER","act":"newconn","key":"#);
    // A key is a string from a worker: escaped as JSON, it cannot break the line.
    let _ = serde_json::to_writer(&mut line, key);
    let _ = write!(line, r#","seq":{seq}}}}}"#);
    line.push(b'\n');
    line
}

/// One connection for a worker that is not a cluster server: a plain Node child gets it
/// as `process.on('message', (msg, socket) => …)`; other runtimes read the same envelope.
pub fn connection(listener: usize, local: &str) -> Value {
    json!({
        "cmd": "NODE_HANDLE",
        "type": "net.Socket",
        "msg": {"cmd": "PROCESSES_CONNECTION", "listener": listener, "address": local},
    })
}

/// Asks a cluster worker to close its servers and leave when idle.
pub fn disconnect(seq: u64) -> Value {
    json!({"cmd": "NODE_CLUSTER", "act": "disconnect", "seq": seq})
}

/// The acknowledgement of a worker's message (for `exitedAfterDisconnect`).
pub fn ack(ack: u64, seq: u64) -> Value {
    json!({"cmd": "NODE_CLUSTER", "ack": ack, "seq": seq})
}

pub fn handle_ack() -> Value {
    json!({"cmd": "NODE_HANDLE_ACK"})
}

/// The refusal of a handle: a `NODE_HANDLE` that came without its fd.
pub fn handle_nack() -> Value {
    json!({"cmd": "NODE_HANDLE_NACK"})
}

/// A ping for our preload; the `NODE_` prefix keeps it from the app's `'message'`
/// listeners.
pub fn ping(id: u64) -> Value {
    json!({"cmd": "NODE_PROCESSES_PING", "id": id})
}

/// `sockname` for a TCP listener, as Node's round-robin primary reports it.
pub fn sockname(addr: &std::net::SocketAddr) -> Value {
    json!({
        "address": addr.ip().to_string(),
        "family": if addr.is_ipv6() { "IPv6" } else { "IPv4" },
        "port": addr.port(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Value {
        serde_json::from_str(s).unwrap()
    }

    /// The replies as Node writes them (shared/node-ipc/trace_rr.txt) are recognised, and
    /// as the parser would classify them.
    #[test]
    fn the_hot_replies_are_recognised_from_their_bytes() {
        for line in [
            r#"{"cmd":"NODE_HANDLE_ACK"}"#,
            r#"{"cmd":"NODE_CLUSTER","ack":1,"accepted":true,"seq":3}"#,
            r#"{"cmd":"NODE_CLUSTER","ack":0,"accepted":false,"seq":0}"#,
            r#"{"cmd":"NODE_CLUSTER","ack":18446744073709551615,"accepted":true,"seq":7}"#,
        ] {
            let fast = recognise(line.as_bytes());
            assert!(fast.is_some(), "{line}");
            assert_eq!(fast.unwrap(), classify(&parse(line)), "{line}");
        }
        // Other forms go to the parser: spacing, order, other keys, numbers a u64 or JSON
        // does not take, a trailing byte.
        for line in [
            r#"{"cmd": "NODE_HANDLE_ACK"}"#,
            r#"{"cmd":"NODE_CLUSTER","accepted":true,"ack":1,"seq":3}"#,
            r#"{"cmd":"NODE_CLUSTER","ack":1,"accepted":true}"#,
            r#"{"cmd":"NODE_CLUSTER","ack":1,"accepted":true,"seq":3,"x":1}"#,
            r#"{"cmd":"NODE_CLUSTER","ack":01,"accepted":true,"seq":3}"#,
            r#"{"cmd":"NODE_CLUSTER","ack":18446744073709551616,"accepted":true,"seq":3}"#,
            r#"{"cmd":"NODE_CLUSTER","ack":-1,"accepted":true,"seq":3}"#,
            r#"{"cmd":"NODE_CLUSTER","ack":1.5,"accepted":true,"seq":3}"#,
            r#"{"cmd":"NODE_CLUSTER","ack":1,"accepted":null,"seq":3}"#,
            r#"{"cmd":"NODE_CLUSTER","ack":1,"accepted":true,"seq":3} "#,
            r#"{"cmd":"NODE_HANDLE_ACK"} "#,
        ] {
            assert_eq!(recognise(line.as_bytes()), None, "{line}");
        }
    }

    proptest::proptest! {
        /// Wherever the fast path answers, the parser and `classify` say the same; and it
        /// answers for every reply Node can write.
        #[test]
        fn recognise_agrees_with_the_parser(
            ack in proptest::prelude::any::<u64>(),
            seq in proptest::prelude::any::<u64>(),
            accepted in proptest::prelude::any::<bool>(),
            noise in "[ -~]{0,80}",
            cut in 0usize..80,
        ) {
            let line = format!(r#"{{"cmd":"NODE_CLUSTER","ack":{ack},"accepted":{accepted},"seq":{seq}}}"#);
            proptest::prop_assert_eq!(
                recognise(line.as_bytes()),
                Some(FromWorker::Reply { ack, accepted: Some(accepted) })
            );
            // Mangled variants: a cut, an insertion of printable noise.
            let at = cut.min(line.len());
            for candidate in [
                format!("{}{}", &line[..at], &line[at..].get(1..).unwrap_or("")),
                format!("{}{}{}", &line[..at], noise, &line[at..]),
                noise.clone(),
            ] {
                if let Some(fast) = recognise(candidate.as_bytes()) {
                    let parsed: Value = serde_json::from_str(&candidate)
                        .map_err(|e| proptest::test_runner::TestCaseError::fail(format!("{candidate}: {e}")))?;
                    proptest::prop_assert_eq!(fast, classify(&parsed), "{}", candidate);
                }
            }
        }

        /// A line taken for a user message without building its value is one: valid JSON
        /// exactly when the parser says so, and never a message the master acts on.
        #[test]
        fn user_lines_are_what_the_parser_calls_user_messages(
            line in r#"[ -~]{0,40}|"ready"|\{"cmd":"[A-Z_]{0,16}"\}|\{"\\u0063md":"NODE_HANDLE_ACK"\}|\[[0-9,]{0,20}\]|\{"a":"[a-z]{0,8}"\}"#,
        ) {
            let parsed = serde_json::from_str::<Value>(&line);
            match user_line(line.as_bytes()) {
                None => proptest::prop_assert!(
                    line.contains(r#""cmd""#) || line.contains("\\u") || line.trim() == r#""ready""#
                ),
                Some(Err(_)) => proptest::prop_assert!(parsed.is_err(), "{}", line),
                Some(Ok(fast)) => {
                    let v = parsed.map_err(|e| proptest::test_runner::TestCaseError::fail(format!("{line}: {e}")))?;
                    proptest::prop_assert!(matches!(classify(&v), FromWorker::User { .. }), "{}", line);
                    proptest::prop_assert_eq!(fast, user(line.as_bytes()));
                }
            }
        }

        /// The `newconn` line written by hand is one line of exactly Node's `newconn`
        /// message, whatever the key holds.
        #[test]
        fn newconn_is_one_line_of_nodes_newconn(seq in proptest::prelude::any::<u64>(), key in "\\PC{0,40}|[\"\\\\\n\u{0}-\u{1f}]{0,8}") {
            let line = newconn(seq, &key);
            proptest::prop_assert_eq!(line.last(), Some(&b'\n'));
            proptest::prop_assert!(!line[..line.len() - 1].contains(&b'\n'));
            let parsed: Value = serde_json::from_slice(&line).unwrap();
            proptest::prop_assert_eq!(parsed, json!({
                "cmd": "NODE_HANDLE",
                "type": "net.Native",
                "msg": {"cmd": "NODE_CLUSTER", "act": "newconn", "key": key, "seq": seq},
            }));
        }
    }

    #[test]
    fn the_wire_trace_classifies() {
        // From shared/node-ipc/trace_rr.txt.
        assert_eq!(
            classify(&parse(r#"{"cmd":"NODE_CLUSTER","act":"online","seq":0}"#)),
            FromWorker::Online { seq: 0 }
        );
        let q = classify(&parse(
            r#"{"cmd":"NODE_CLUSTER","act":"queryServer","index":0,"data":null,"address":null,"port":18080,"addressType":4,"backlog":0,"seq":1}"#,
        ));
        let FromWorker::QueryServer(q) = q else {
            panic!("{q:?}")
        };
        assert_eq!(q.key(), "null:18080:4:undefined");
        assert_eq!(q.seq, 1);
        assert_eq!(
            classify(&parse(r#"{"cmd":"NODE_HANDLE_ACK"}"#)),
            FromWorker::HandleAck
        );
        assert_eq!(
            classify(&parse(
                r#"{"cmd":"NODE_CLUSTER","ack":1,"accepted":true,"seq":3}"#
            )),
            FromWorker::Reply {
                ack: 1,
                accepted: Some(true)
            }
        );
        assert_eq!(
            classify(&parse(
                r#"{"cmd":"NODE_CLUSTER","act":"close","key":"null:18080:4:undefined:0","seq":4}"#
            )),
            FromWorker::Close {
                key: "null:18080:4:undefined:0".into(),
                seq: 4
            }
        );
        assert_eq!(classify(&parse(r#""ready""#)), FromWorker::Ready);
        assert!(matches!(classify(&parse("42")), FromWorker::User { .. }));
        assert!(matches!(
            classify(&parse(
                r#"{"cmd":"NODE_CLUSTER","act":"queryServer","seq":1}"#
            )),
            FromWorker::OtherCluster { .. }
        ));
    }

    #[test]
    fn replies_match_the_trace_byte_for_byte() {
        let rr = reply_round_robin(
            1,
            0,
            "null:18080:4:undefined:0",
            &Value::Null,
            Some(json!({"address":"::","family":"IPv6","port":18080})),
        );
        assert_eq!(
            serde_json::to_string(&rr).unwrap(),
            r#"{"cmd":"NODE_CLUSTER","errno":null,"key":"null:18080:4:undefined:0","ack":1,"data":null,"sockname":{"address":"::","family":"IPv6","port":18080},"seq":0}"#
        );
        assert_eq!(
            String::from_utf8(newconn(1, "null:18080:4:undefined:0")).unwrap(),
            concat!(
                r#"{"cmd":"NODE_HANDLE","type":"net.Native","msg":{"cmd":"NODE_CLUSTER","act":"newconn","key":"null:18080:4:undefined:0","seq":1}}"#,
                "\n"
            )
        );
        assert_eq!(
            serde_json::to_string(&reply_shared(
                1,
                0,
                "null:18081:4:undefined:0",
                &Value::Null,
                false
            ))
            .unwrap(),
            r#"{"cmd":"NODE_HANDLE","type":"net.Native","msg":{"cmd":"NODE_CLUSTER","errno":0,"key":"null:18081:4:undefined:0","ack":1,"data":null,"seq":0}}"#
        );
        assert_eq!(
            serde_json::to_string(&disconnect(2)).unwrap(),
            r#"{"cmd":"NODE_CLUSTER","act":"disconnect","seq":2}"#
        );
    }

    #[test]
    fn port_zero_keys_carry_the_index() {
        let q = QueryServer {
            seq: 0,
            address: Some("127.0.0.1".into()),
            port: 0,
            address_type: AddressType::Tcp4,
            fd: None,
            index: 2,
            data: Value::Null,
            backlog: None,
        };
        assert_eq!(q.key(), "127.0.0.1:0:4:undefined:2");
    }
}
