//! Bad input, property-based: the channel decoder, the config parser, the command line and
//! the control request parser take arbitrary and mutated input without panicking, and
//! say what is wrong the way they promise to.
//!
//! Case counts are modest for CI; `PROCESSES_FUZZ_CASES` raises them (`scripts/reliability.sh`
//! runs 10 000 per property, fewer for the 1 MiB line cases). A failure prints the shrunk
//! input; proptest keeps its seed in `tests/proptest-regressions/fuzz.txt` and replays it
//! first from then on.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use proptest::prelude::*;
use serde_json::{Value, json};

use processes::channel::{Decoder, MAX_LINE, MAX_PENDING_FDS, Violation};

/// `default` cases, or `PROCESSES_FUZZ_CASES` (divided by `cost` for properties whose cases
/// are expensive).
fn cases(default: u32, cost: u32) -> ProptestConfig {
    let cases = std::env::var("PROCESSES_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .map_or(default, |n| (n / cost).max(default));
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

fn dev_null() -> OwnedFd {
    std::fs::File::open("/dev/null").unwrap().into()
}

// ---- the channel decoder ----------------------------------------------------------------

/// What a read from the channel can bring.
#[derive(Debug, Clone)]
enum Op {
    Bytes(Vec<u8>),
    Fds(usize),
}

/// Bytes that look like the protocol often enough to get past the first check: pieces of
/// JSON and of Node's messages, newlines, and anything at all.
fn protocolish_bytes() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        4 => proptest::collection::vec(any::<u8>(), 0..64),
        2 => Just(b"\n".to_vec()),
        2 => Just(br#"{"cmd":"NODE_HANDLE","type":"net.Native","msg":{"cmd":"NODE_CLUSTER","act":"newconn"}}"#.to_vec()),
        2 => Just(br#"{"cmd":"NODE_HANDLE_ACK"}"#.to_vec()),
        1 => Just(br#"{"cmd":"NODE_CLUSTER","act":"queryServer","port":0,"addressType":4,"seq":1}"#.to_vec()),
        1 => Just(b"\"ready\"".to_vec()),
        1 => Just(b"{".to_vec()),
        1 => Just(b"}".to_vec()),
        1 => Just(b"[".to_vec()),
        1 => Just(b"\"".to_vec()),
        1 => Just(b"\\u00".to_vec()),
        1 => Just(vec![0xff, 0xfe, 0xc3]),
        1 => Just(b"42".to_vec()),
    ];
    proptest::collection::vec(piece, 0..12).prop_map(|v| v.concat())
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    proptest::collection::vec(
        prop_oneof![
            6 => protocolish_bytes().prop_map(Op::Bytes),
            1 => (0usize..=MAX_PENDING_FDS + 2).prop_map(Op::Fds),
        ],
        0..40,
    )
}

/// A JSON value of any shape, with strings that need escaping.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1e300f64..1e300).prop_map(Value::from),
        ".*".prop_map(Value::String),
        Just(Value::String("line\nbreak\r\n\u{0}\u{2028}".into())),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map(".{0,8}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A message a worker may send, and whether an fd rides with it.
fn message() -> impl Strategy<Value = (Value, bool)> {
    prop_oneof![
        3 => json_value().prop_map(|v| (v, false)),
        2 => json_value().prop_map(|m| (json!({"cmd": "NODE_HANDLE", "type": "net.Native", "msg": m}), true)),
        // A handle message that comes without its fd (it must get none).
        1 => json_value().prop_map(|m| (json!({"cmd": "NODE_HANDLE", "type": "net.Native", "msg": m}), false)),
        1 => Just((json!({"cmd": "NODE_HANDLE_ACK"}), false)),
    ]
}

/// Feeds `ops` until the decoder refuses; returns what came out.
/// Messages out of the decoder, each with the fd it was given.
type Decoded = Vec<(Value, Option<OwnedFd>)>;

fn feed(ops: &[Op]) -> (Decoded, Option<Violation>, usize) {
    let mut d = Decoder::default();
    let mut out = Vec::new();
    let mut pushed = 0;
    for op in ops {
        let r = match op {
            Op::Fds(n) => {
                pushed += n;
                d.push_fds((0..*n).map(|_| dev_null()))
            }
            Op::Bytes(b) => d.push_bytes(b).map(|msgs| out.extend(msgs)),
        };
        if let Err(v) = r {
            return (out, Some(v), pushed);
        }
    }
    (out, None, pushed)
}

/// Decodes `msgs` as the kernel delivers them: every line written with one `sendmsg`, its
/// fd (if any) arriving with the read that starts at its first byte, and the reads cut at
/// `cuts` besides (a read never runs on past a message that carries an fd into the next
/// one: unix stream sockets do not merge across fd-carrying writes). Returns each decoded
/// message with the index of the message whose fd it got.
fn decode_split(
    msgs: &[(Value, bool)],
    cuts: &[usize],
) -> Result<Vec<(Value, Option<usize>)>, String> {
    let mut bytes = Vec::new();
    let mut fd_at = std::collections::BTreeMap::new();
    for (i, (v, with_fd)) in msgs.iter().enumerate() {
        if *with_fd {
            fd_at.insert(bytes.len(), i);
        }
        bytes.extend(serde_json::to_vec(v).unwrap());
        bytes.push(b'\n');
    }
    let mut bounds: Vec<usize> = cuts
        .iter()
        .map(|c| c % (bytes.len() + 1))
        .chain(fd_at.keys().copied())
        .chain([0, bytes.len()])
        .collect();
    bounds.sort();
    bounds.dedup();
    let mut d = Decoder::default();
    let mut raw_of: std::collections::HashMap<RawFd, usize> = Default::default();
    let mut out = Vec::new();
    for w in bounds.windows(2) {
        let (from, to) = (w[0], w[1]);
        if let Some(&i) = fd_at.get(&from) {
            let fd = dev_null();
            raw_of.insert(fd.as_raw_fd(), i);
            d.push_fds([fd])
                .map_err(|e| format!("fds at {from}: {e}"))?;
        }
        for (v, fd) in d
            .push_bytes(&bytes[from..to])
            .map_err(|e| format!("bytes {from}..{to}: {e}"))?
        {
            let owner = fd.map(|fd| raw_of[&fd.as_raw_fd()]);
            out.push((v, owner));
        }
    }
    Ok(out)
}

proptest! {
    #![proptest_config(cases(512, 1))]

    /// Any bytes and any number of fds, in any order: no panic; an fd only ever comes out
    /// with a `NODE_HANDLE` message; never more fds out than went in; more than
    /// `MAX_PENDING_FDS` waiting is refused.
    #[test]
    fn the_decoder_takes_arbitrary_bytes_and_fds(ops in ops()) {
        let (out, refused, pushed) = feed(&ops);
        let with_fd = out.iter().filter(|(_, fd)| fd.is_some()).count();
        prop_assert!(with_fd <= pushed);
        for (v, fd) in &out {
            if fd.is_some() {
                prop_assert_eq!(v.get("cmd").and_then(Value::as_str), Some("NODE_HANDLE"));
            }
        }
        if let Some(Violation::UnexpectedFds) = refused {
            prop_assert!(pushed - with_fd > MAX_PENDING_FDS);
        }
    }

    /// A valid stream decodes to the same messages, with the same fds on them, however
    /// the reads split it.
    #[test]
    fn a_valid_stream_split_anywhere_decodes_the_same(
        msgs in proptest::collection::vec(message(), 1..24),
        cuts in proptest::collection::vec(any::<usize>(), 0..40),
    ) {
        let whole = decode_split(&msgs, &[]).map_err(TestCaseError::fail)?;
        let split = decode_split(&msgs, &cuts).map_err(TestCaseError::fail)?;
        prop_assert_eq!(&whole, &split);
        prop_assert_eq!(whole.len(), msgs.len());
        for (i, ((v, owner), (sent, with_fd))) in whole.iter().zip(&msgs).enumerate() {
            // Through serde_json and back: the same value.
            let expected: Value = serde_json::from_slice(&serde_json::to_vec(sent).unwrap()).unwrap();
            prop_assert_eq!(v, &expected);
            prop_assert_eq!(*owner, with_fd.then_some(i));
        }
    }
}

proptest! {
    #![proptest_config(cases(16, 50))]

    /// A line longer than `MAX_LINE`, in any pieces, is refused before the decoder holds
    /// more than `MAX_LINE` of it; one of exactly `MAX_LINE` is taken.
    #[test]
    fn the_line_limit_holds_in_any_pieces(
        extra in 0usize..3,
        pieces in proptest::collection::vec(1usize..300_000, 1..12),
    ) {
        // A JSON string of exactly MAX_LINE bytes (+ extra), then a newline.
        let mut line = vec![b'"'];
        line.resize(MAX_LINE - 1 + extra, b'a');
        line.push(b'"');
        line.push(b'\n');
        let mut d = Decoder::default();
        let mut at = 0;
        let mut got = Vec::new();
        let mut refused = None;
        let mut sizes = pieces.iter().cycle();
        while at < line.len() {
            let n = (*sizes.next().unwrap()).min(line.len() - at);
            match d.push_bytes(&line[at..at + n]) {
                Ok(msgs) => got.extend(msgs),
                Err(e) => {
                    refused = Some(e);
                    break;
                }
            }
            at += n;
        }
        if extra == 0 {
            prop_assert!(refused.is_none(), "{:?}", refused);
            prop_assert_eq!(got.len(), 1);
        } else {
            prop_assert!(matches!(refused, Some(Violation::LineTooLong)), "{:?}", refused);
            // Refused by the time the decoder would hold more than MAX_LINE bytes.
            prop_assert!(at <= MAX_LINE, "read {} bytes before refusing", at);
        }
    }
}

// ---- the config parser ------------------------------------------------------------------

const ORIGIN: &str = "config fuzz.toml";

/// Checks an error the way `processes` promises them: `ORIGIN: PATH: MESSAGE`, with a
/// field path — `(file)` only for text that is not TOML at all.
fn check_config_error(text: &str, e: &processes::errors::ConfigError) -> Result<(), TestCaseError> {
    let shown = e.to_string();
    prop_assert!(
        shown.starts_with(&format!("{ORIGIN}: {}: ", e.path)),
        "{shown:?} does not start with the origin and the field"
    );
    prop_assert!(!e.path.is_empty(), "{shown:?} names no field");
    prop_assert!(!e.message.trim().is_empty(), "{shown:?} says nothing");
    match text.parse::<toml::Table>() {
        Err(_) => prop_assert_eq!(&e.path, "(file)", "{:?}", shown),
        Ok(table) => {
            prop_assert_ne!(
                &e.path,
                "(file)",
                "valid TOML reported as not TOML: {:?}",
                shown
            );
            // The field path starts at a key of the document (or names the missing `apps`).
            let first = e.path.split(['.', '[']).next().unwrap();
            prop_assert!(
                first == "apps" || table.contains_key(first),
                "{shown:?}: `{first}` is not in the document"
            );
        }
    }
    Ok(())
}

/// Valid configs to mutate: every field set once, and two apps.
fn valid_configs() -> Vec<String> {
    vec![
        r#"
metrics = "127.0.0.1:9464"
sample_interval = "1s"

[apps.web]
command = ["/bin/sh", "-c", "sleep 1"]
cwd = "/tmp"
env = { NODE_ENV = "production", A = "1" }
autoscale = { min = 2, max = 16 }
listen = ["127.0.0.1:8080", ":9090"]
grace = "10s"
restart = "always"
ready_after = "1s"
dispatch = "round-robin"
runtime = "generic"
max_memory = "512MiB"
kill_memory = "1GiB"

[apps.web.backoff]
initial = "100ms"
multiplier = 2.0
max = "30s"
reset_after = "30s"
crash_loop_restarts = 5
crash_loop_window = "60s"
"#
        .to_string(),
        r#"
[apps.a]
command = ["sh", "-c", "true"]
instances = 4
listen = "127.0.0.1:8081"

[apps.b]
command = ["sh"]
autoscale = "min=1,max=3"
listen = "/tmp/processes-fuzz.sock"
restart = "on-failure"
"#
        .to_string(),
    ]
}

/// A TOML value of any type, with the edge cases the parsers must refuse in words.
fn toml_value() -> impl Strategy<Value = toml::Value> {
    let leaf = prop_oneof![
        any::<i64>().prop_map(toml::Value::Integer),
        prop_oneof![
            Just(0i64),
            Just(-1),
            Just(1),
            Just(1001),
            Just(i64::MAX),
            Just(i64::MIN)
        ]
        .prop_map(toml::Value::Integer),
        any::<f64>().prop_map(toml::Value::Float),
        any::<bool>().prop_map(toml::Value::Boolean),
        ".{0,12}".prop_map(toml::Value::String),
        prop_oneof![
            Just("0s"),
            Just("-1s"),
            Just("1e308s"),
            Just("18446744073709551615s"),
            Just("NaNs"),
            Just("1.5.5s"),
            Just("10"),
            Just("5x"),
            Just("min=4,max=2"),
            Just("min=0,max=0"),
            Just("0B"),
            Just("1e20GiB"),
            Just("512MiB"),
            Just(":0"),
            Just("[::]:65536"),
            Just("999.1.1.1:80"),
            Just(""),
            Just(" "),
            Just("nobody"),
            Just("node"),
            Just("least-loaded"),
            Just("never"),
            Just("etcd://"),
            Just("/"),
            Just("..")
        ]
        .prop_map(|s| toml::Value::String(s.to_string())),
    ];
    leaf.prop_recursive(2, 12, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(toml::Value::Array),
            proptest::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                .prop_map(|m| toml::Value::Table(m.into_iter().collect())),
        ]
    })
}

/// One change to a parsed document.
#[derive(Debug, Clone)]
enum Mutation {
    Remove(usize),
    Replace(usize, toml::Value),
    Add(usize, String, toml::Value),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<usize>().prop_map(Mutation::Remove),
        (any::<usize>(), toml_value()).prop_map(|(i, v)| Mutation::Replace(i, v)),
        (any::<usize>(), "[a-z_]{1,10}", toml_value()).prop_map(|(i, k, v)| Mutation::Add(i, k, v)),
    ]
}

/// Every key path in a table, depth first.
fn key_paths(t: &toml::Table, prefix: &[String], out: &mut Vec<Vec<String>>) {
    for (k, v) in t {
        let mut p = prefix.to_vec();
        p.push(k.clone());
        out.push(p.clone());
        if let toml::Value::Table(inner) = v {
            key_paths(inner, &p, out);
        }
    }
}

fn table_at<'a>(t: &'a mut toml::Table, path: &[String]) -> Option<&'a mut toml::Table> {
    let mut cur = t;
    for k in path {
        cur = cur.get_mut(k)?.as_table_mut()?;
    }
    Some(cur)
}

/// Applies a mutation; returns the key path it touched.
fn mutate(t: &mut toml::Table, m: &Mutation) -> Vec<String> {
    let mut paths = Vec::new();
    key_paths(t, &[], &mut paths);
    if paths.is_empty() {
        // Everything was removed already: only an addition, at the top.
        if let Mutation::Add(_, key, v) = m {
            t.insert(key.clone(), v.clone());
            return vec![key.clone()];
        }
        return Vec::new();
    }
    let pick = |i: usize| paths[i % paths.len()].clone();
    match m {
        Mutation::Remove(i) => {
            let p = pick(*i);
            let (last, parent) = p.split_last().unwrap();
            table_at(t, parent).unwrap().remove(last);
            p
        }
        Mutation::Replace(i, v) => {
            let p = pick(*i);
            let (last, parent) = p.split_last().unwrap();
            table_at(t, parent).unwrap().insert(last.clone(), v.clone());
            p
        }
        Mutation::Add(i, key, v) => {
            // Into a table: the picked key's own table if it is one, else its parent.
            let p = pick(*i);
            let parent = if table_at(t, &p).is_some() {
                p
            } else {
                p[..p.len() - 1].to_vec()
            };
            table_at(t, &parent).unwrap().insert(key.clone(), v.clone());
            let mut at = parent;
            at.push(key.clone());
            at
        }
    }
}

/// Byte-level damage: cut a range, or insert text.
fn damage(text: &str, at: usize, len: usize, insert: &str) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    let at = at % (chars.len() + 1);
    let end = (at + len).min(chars.len());
    chars.splice(at..end, insert.chars());
    chars.into_iter().collect()
}

proptest! {
    #![proptest_config(cases(512, 1))]

    /// Arbitrary text: no panic, and a refusal says where and what.
    #[test]
    fn the_config_parser_takes_arbitrary_text(text in prop_oneof![
        ".*",
        "(\\[apps\\.[a-z]{1,3}\\]\n|[a-z_]{1,10} = (\"[^\"]{0,10}\"|[0-9]{1,3}|\\[\\]|\\{\\})\n){0,8}",
    ]) {
        if let Err(e) = processes::config::parse_str(&text, ORIGIN, None) {
            check_config_error(&text, &e)?;
        }
    }

    /// A valid config with one field removed, retyped or added: no panic, and a refusal
    /// names the field that changed (or one around it).
    #[test]
    fn a_mutated_config_is_refused_at_the_field_that_changed(
        which in 0usize..2,
        mutations in proptest::collection::vec(mutation(), 1..3),
    ) {
        let mut table: toml::Table = valid_configs()[which].parse().unwrap();
        let mut touched = Vec::new();
        for m in &mutations {
            let at = mutate(&mut table, m);
            if !at.is_empty() {
                touched.push(at.join("."));
            }
        }
        let text = toml::to_string(&table);
        prop_assume!(text.is_ok());
        let text = text.unwrap();
        if let Err(e) = processes::config::parse_str(&text, ORIGIN, None) {
            check_config_error(&text, &e)?;
            // The field named is one that changed, inside one, or around one — or, for a
            // listen address now shared by two apps, the other app's.
            let related = touched.iter().any(|t| {
                e.path == *t
                    || t.starts_with(&format!("{}.", e.path))
                    || t.starts_with(&format!("{}[", e.path))
                    || e.path.starts_with(&format!("{t}."))
                    || e.path.starts_with(&format!("{t}["))
            }) || e.path == "apps"
                || e.message.contains("is also used by")
                // A limit checked against another (kill_memory against max_memory).
                || touched.iter().any(|t| e.message.contains(t.rsplit('.').next().unwrap()));
            prop_assert!(related, "changed {:?}, refused at {}: {}", touched, e.path, e);
        }
    }

    /// A valid config with bytes cut out or text pasted in: no panic, and a refusal says
    /// where and what.
    #[test]
    fn a_damaged_config_is_refused_in_words(
        which in 0usize..2,
        at in any::<usize>(),
        len in 0usize..20,
        insert in prop_oneof![".{0,10}", Just("\n[apps.x]\n".to_string()), Just("\"".to_string()), Just("=".to_string())],
    ) {
        let text = damage(&valid_configs()[which], at, len, &insert);
        if let Err(e) = processes::config::parse_str(&text, ORIGIN, None) {
            check_config_error(&text, &e)?;
        }
    }
}

proptest! {
    #![proptest_config(cases(512, 1))]

    /// An error is one line, whatever the user's values hold: a value with a newline (a
    /// TOML `"\n"` escape) or a terminal escape is quoted, not echoed raw.
    #[test]
    fn config_errors_are_one_line(
        which in 0usize..2,
        mutations in proptest::collection::vec(
            (
                any::<usize>(),
                prop_oneof![Just("1\n27.0.0.1:80"), Just("a\u{1b}[31mb"), Just("x\ry")],
            )
                .prop_map(|(i, v)| Mutation::Replace(i, toml::Value::String(v.to_string()))),
            1..2,
        ),
    ) {
        let mut table: toml::Table = valid_configs()[which].parse().unwrap();
        for m in &mutations {
            mutate(&mut table, m);
        }
        let text = toml::to_string(&table).unwrap();
        if let Err(e) = processes::config::parse_str(&text, ORIGIN, None) {
            let shown = e.to_string();
            prop_assert!(
                !shown.contains(['\n', '\r', '\u{1b}']),
                "{:?} is more than one plain line",
                shown
            );
        }
    }
}

#[test]
fn the_valid_configs_are_valid() {
    for text in valid_configs() {
        processes::config::parse_str(&text, ORIGIN, None).unwrap();
    }
}

// ---- the command line -------------------------------------------------------------------

fn cli_arg() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop_oneof![
            Just("run"), Just("status"), Just("scale"), Just("reload"), Just("restart"),
            Just("stop"), Just("top"), Just("--"), Just("-i"), Just("--instances"),
            Just("--autoscale"), Just("--name"), Just("--cwd"), Just("--env"), Just("--listen"),
            Just("--grace"), Just("--restart"), Just("--ready-after"), Just("--dispatch"),
            Just("--runtime"), Just("--sample-interval"), Just("--metrics"), Just("--registry"),
            Just("--advertise"), Just("--max-memory"), Just("--kill-memory"),
            Just("--inherit-env"), Just("--user"), Just("-c"), Just("--config"),
            Just("--control"), Just("--json"), Just("--batch"), Just("--help"), Just("-h"),
            Just("--version"), Just("-V"), Just("help"),
        ].prop_map(String::from),
        2 => prop_oneof![
            Just("4"), Just("0"), Just("-1"), Just("99999999999999999999"), Just("min=2,max=1"),
            Just("min=1,max=3"), Just("127.0.0.1:0"), Just(":80"), Just("[::]:99999"),
            Just("/tmp/x.sock"), Just("10s"), Just("1e308s"), Just("never"), Just("round-robin"),
            Just("node"), Just("K=V"), Just("=V"), Just("etcd://127.0.0.1:2379"),
            Just("512MiB"), Just("all"), Just("nobody"), Just("/bin/sh"), Just("/nonexistent"),
            Just("web"), Just(""),
        ].prop_map(String::from),
        1 => ".{0,16}",
    ]
}

proptest! {
    #![proptest_config(cases(1024, 1))]

    /// Any arguments: no panic, neither in parsing nor in turning `run`'s flags into a
    /// config, and a refused `run` says where the mistake came from.
    #[test]
    fn the_command_line_takes_arbitrary_arguments(args in proptest::collection::vec(cli_arg(), 0..10)) {
        use clap::Parser;
        use processes::cli::{Cli, Command};
        let argv = std::iter::once("processes".to_string()).chain(args);
        if let Ok(cli) = Cli::try_parse_from(argv) {
            match cli.command {
                Command::Run(run) => {
                    if let Err(e) = run.to_config() {
                        let shown = processes::master::error_chain(&e);
                        prop_assert!(
                            shown.starts_with("command line: ")
                                || shown.starts_with("config ")
                                || shown.starts_with("cannot read config file"),
                            "{}", shown
                        );
                    }
                }
                Command::Scale(s) => {
                    let _ = s.parse_size();
                }
                _ => {}
            }
        }
    }
}

#[test]
fn the_command_line_definition_is_consistent() {
    use clap::CommandFactory;
    processes::cli::Cli::command().debug_assert();
}

// ---- the control request parser -------------------------------------------------------

fn request_json() -> impl Strategy<Value = Value> {
    let cmd = prop_oneof![
        Just(json!("status")),
        Just(json!("scale")),
        Just(json!("reload")),
        Just(json!("restart")),
        Just(json!("stop")),
        Just(json!("explode")),
        Just(json!(null)),
        Just(json!(7)),
        ".{0,8}".prop_map(Value::String),
    ];
    let field = prop_oneof![
        Just(json!(null)),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,8}".prop_map(Value::String),
        Just(json!([])),
        Just(json!({})),
    ];
    let key = prop_oneof![
        Just("app"),
        Just("n"),
        Just("min"),
        Just("max"),
        Just("batch"),
        Just("slot"),
        Just("v"),
        Just("extra"),
    ];
    (
        prop_oneof![
            Just(json!(1)),
            Just(json!(0)),
            Just(json!(2)),
            Just(json!("1")),
            Just(json!(null))
        ],
        proptest::option::of(cmd),
        proptest::collection::vec((key, field), 0..5),
    )
        .prop_map(|(v, cmd, fields)| {
            let mut o = serde_json::Map::new();
            o.insert("v".into(), v);
            if let Some(c) = cmd {
                o.insert("cmd".into(), c);
            }
            for (k, f) in fields {
                o.insert(k.into(), f);
            }
            Value::Object(o)
        })
}

proptest! {
    #![proptest_config(cases(1024, 1))]

    /// Any bytes: no panic; a refusal says why.
    #[test]
    fn the_control_parser_takes_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        if let Err(msg) = processes::control::parse_request(&bytes) {
            prop_assert!(msg.starts_with("not a request") || msg.starts_with("protocol version"), "{}", msg);
        }
    }

    /// Requests of the right shape with wrong parts: no panic; what parses is exactly
    /// what a client would have sent (it round-trips).
    #[test]
    fn the_control_parser_takes_odd_requests(v in request_json()) {
        let line = serde_json::to_vec(&v).unwrap();
        match processes::control::parse_request(&line) {
            Err(msg) => prop_assert!(msg.starts_with("not a request") || msg.starts_with("protocol version"), "{}", msg),
            Ok(req) => {
                let mut again = serde_json::to_value(&req).unwrap();
                again["v"] = json!(processes::control::PROTOCOL_VERSION);
                let back = processes::control::parse_request(&serde_json::to_vec(&again).unwrap());
                prop_assert_eq!(back, Ok(req));
            }
        }
    }
}
